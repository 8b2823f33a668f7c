"""Flipbooks: one frame per value, exactly one visible, a range control that switches frames without a kernel."""

import re

import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from patchcore_lite.teaching.flipbook import Flipbook, flipbook


def square_view(side: int, colour: str = "red"):
    """A figure whose picture depends on ``side``, and the number it shows."""
    figure = Figure(figsize=(2, 2))
    ax = figure.add_subplot()
    ax.add_patch(Rectangle((0, 0), side, side, color=colour))
    ax.set_xlim(0, 5)
    ax.set_ylim(0, 5)
    return figure, {"area": side * side}


def test_one_frame_and_result_per_value():
    book = flipbook(square_view, "side", [1, 2, 3], start=1, colour="blue")
    assert [r["area"] for r in book.results] == [1, 4, 9]
    assert len(set(book.frames)) == 3 and all(f.startswith(b"\x89PNG") for f in book.frames)


def test_html_has_a_range_control_and_only_the_start_frame_visible():
    page = flipbook(square_view, "side", [1, 2, 3], start=2)._repr_html_()
    (control,) = re.findall(r'<input type="range"[^>]*>', page)
    assert 'min="0"' in control and 'max="2"' in control and 'value="2"' in control and "oninput=" in control
    frames = re.findall(r'<img class="flipbook-frame"[^>]*>', page)
    assert len(frames) == 3 and [" hidden" in f for f in frames] == [True, True, False]
    assert all("data:image/png;base64," in f for f in frames)
    assert "<output" in page and ">3</output>" in page


def test_values_beside_the_slider_are_formatted():
    page = flipbook(square_view, "side", [1.23456, 2.5], fmt=".2f")._repr_html_()
    assert ">1.23</output>" in page and "&#x27;2.50&#x27;" in page and "1.2345" not in page
    assert Flipbook("t", [29.426121616363524], [b"x"]).shown() == ["29.426121616363524"]  # no fmt: as given


def test_each_flipbook_on_a_page_has_its_own_ids():
    a, b = (flipbook(square_view, "side", [1, 2])._repr_html_() for _ in range(2))
    assert re.search(r'id="(flipbook-\d+)"', a).group(1) != re.search(r'id="(flipbook-\d+)"', b).group(1)


def test_frames_must_match_values():
    with pytest.raises(ValueError, match="one frame per value"):
        Flipbook("side", [1, 2], [b"x"])
    with pytest.raises(ValueError, match="start"):
        Flipbook("side", [1], [b"x"], start=1)
