"""Figures that move on the published site: every setting drawn when the book is built, a slider picks one.

A static page has no kernel, so an ipywidgets slider there cannot redraw anything. A
``Flipbook`` draws a view's figure once per value of one parameter while the chapter
executes, and shows them as one HTML block: a standard ``<input type="range">`` (so the
keyboard moves it too) above the frames, of which exactly one is visible. Moving the slider
swaps the visible frame with a few characters of inline JavaScript; nothing is fetched,
since the frames are PNG data URIs inside the page.

    book = flipbook(patch_size_view, "p", [1, 3, 5, 7], results=results)
    book                        # in a notebook: the slider and the frames
    book.results[1]             # the numbers view() returned for the second value

``view(**{name: value}, **fixed)`` returns ``(Figure, dict)``, the contract of the
ipywidgets views in ``widgets.py``, so one view serves JupyterLab and the site.
"""

from __future__ import annotations

import base64
import html
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .viz import View, png_bytes

_ids = itertools.count()


@dataclass
class Flipbook:
    """Frames (PNG bytes) of one figure at several values of one parameter, and each frame's numbers."""

    name: str
    values: list[Any]
    frames: list[bytes]
    results: list[dict[str, Any]] = field(default_factory=list)
    start: int = 0
    caption: str = ""
    fmt: str = ""  # format spec for the value shown beside the slider (".2f": 29.43, not 29.426121616363524)

    def __post_init__(self) -> None:
        if not self.values or len(self.values) != len(self.frames):
            raise ValueError(f"need one frame per value: {len(self.values)} values, {len(self.frames)} frames")
        if not 0 <= self.start < len(self.values):
            raise ValueError(f"start must index the values (0..{len(self.values) - 1}), got {self.start}")

    def shown(self) -> list[str]:
        """The values as the reader sees them beside the slider."""
        return [format(v, self.fmt) for v in self.values]

    def _repr_html_(self) -> str:
        uid = f"flipbook-{next(_ids)}"
        label, texts = html.escape(self.name), self.shown()
        frames = "".join(
            f'<img class="flipbook-frame" src="data:image/png;base64,{base64.b64encode(png).decode()}" '
            f'alt="{html.escape(self.caption or "figure")} at {label} = {html.escape(v)}"'
            f'{"" if i == self.start else " hidden"} style="max-width:100%">'
            for i, (v, png) in enumerate(zip(texts, self.frames))
        )
        shown = "[" + ",".join(html.escape(repr(v), quote=True) for v in texts) + "]"
        # On input: show frame i, hide the others, and write the value beside the slider.
        update = (
            "const b=this.closest('.flipbook');"
            "b.querySelectorAll('.flipbook-frame').forEach((f,i)=>{f.hidden=i!=this.value});"
            f"b.querySelector('output').value={shown}[this.value]"
        )
        return (
            f'<div class="flipbook" id="{uid}">'
            f'<label for="{uid}-range">{label} = </label>'
            f'<output for="{uid}-range">{html.escape(texts[self.start])}</output> '
            f'<input type="range" id="{uid}-range" min="0" max="{len(self.values) - 1}" step="1" '
            f'value="{self.start}" aria-label="{label}" oninput="{update}" style="width:16em;vertical-align:middle">'
            f"<div>{frames}</div></div>"
        )


def flipbook(
    view: View, name: str, values: Sequence[Any], start: int = 0, caption: str = "", dpi: int = 80, fmt: str = "",
    **fixed: Any,
) -> Flipbook:
    """Draw ``view(**{name: v}, **fixed)`` for every ``v`` in ``values``; ``start`` indexes the first frame shown
    and ``fmt`` formats the values beside the slider."""
    frames, results = [], []
    for value in values:
        figure, numbers = view(**{name: value}, **fixed)
        frames.append(png_bytes(figure, dpi))
        results.append(numbers)
    return Flipbook(name, list(values), frames, results, start, caption, fmt)
