"""Open every chapter of the built site in Chromium, as a reader would, and check what a reader sees.

    python .ci/check_site.py [_build/html]

For every page of the table of contents: it loads without a failed or missing request, no
image is broken, equations are typeset by MathJax and the header's repository and launch buttons
name the book's own repository (book/repository_link.py), none when it has none. Every chapter also
has a Summary, at least three collapsed exercise solutions and none whose code or output is in view
unfolded, executed outputs with figures, and every flipbook's range control changes the visible
figure when moved with the keyboard (no kernel: the page alone); at least four chapters have one.
Exits 1 with one line per problem.
Needs Debian's ``chromium`` and the ``playwright`` package (its own browser download is not used).
"""

from __future__ import annotations

import functools
import http.server
import re
import sys
import threading
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "book"))
from repository_link import book_address  # noqa: E402  (the address the build linked, or None)

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """The site on a loopback port, in a thread (file:// would hide missing-file requests)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # one line per problem, not per request
        pass


MIN_SOLUTIONS, MIN_FLIPBOOK_CHAPTERS = 3, 4


def pages() -> list[str]:
    """Every page of the table of contents, the root first."""
    toc = Path("_toc.yml").read_text()
    return re.findall(r"^root: (\S+)", toc, re.M) + re.findall(r"file: (\S+)", toc)


def check_page(page: Page, url: str, name: str) -> list[str]:
    """What every page needs: every request answered, every image shown, every equation typeset."""
    problems: list[str] = []
    page.on("requestfailed", lambda r: problems.append(f"{name}: request failed: {r.url}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"{name}: HTTP {r.status}: {r.url}"))
    page.goto(url, wait_until="networkidle")
    page.wait_for_timeout(500)  # MathJax typesets after load
    broken = page.eval_on_selector_all("img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0))"
                                       ".map(i => i.src.slice(0, 80))")
    problems += [f"{name}: broken image {src}" for src in broken]
    if page.locator(".math").count() and not page.locator("mjx-container").count():
        problems.append(f"{name}: equations are not typeset (no MathJax output)")
    problems += check_repository_links(page, name)
    raw = page.eval_on_selector_all("p", "ps => ps.filter(p => /^\\|.*\\|\\s*$/m.test(p.textContent)).length")
    if raw:
        problems.append(f"{name}: {raw} Markdown table(s) shown as raw text (nb_render_markdown_format)")
    return problems


def check_repository_links(page: Page, name: str) -> list[str]:
    """The header's repository and launch buttons name the book's own repository, and only when one is known."""
    address = book_address(Path.cwd())
    links = page.eval_on_selector_all(".article-header-buttons a[href], .header-article-items a[href]",
                                      "links => links.map(a => a.href)")
    hosts = ("github.com", "mybinder.org", "colab.research.google.com")
    repo = address.removeprefix("https://github.com/") if address else None
    wrong = [url for url in links if any(h in url for h in hosts) and not (repo and repo in url)]
    return [f"{name}: header links to a repository the book does not know ({url}); "
            "set $PATCHCORE_BOOK_REPOSITORY or the git remote" for url in wrong]


def check_chapter(page: Page, name: str) -> list[str]:
    """What a chapter adds: a Summary, hidden solutions, figures, and flipbooks that move."""
    problems: list[str] = []
    if not page.locator("section#summary").count():
        problems.append(f"{name}: no Summary section")
    solutions = page.locator("details:not([open])").filter(has_text="Solution").count()
    if solutions < MIN_SOLUTIONS:
        problems.append(f"{name}: {solutions} hidden (collapsed) exercise solutions, fewer than {MIN_SOLUTIONS}")
    problems += check_exercises(page, name)
    if not page.locator(".cell_output").count() or not page.locator(".cell_output img").count():
        problems.append(f"{name}: no executed output with a figure")
    for i in range(page.locator(".flipbook").count()):
        problems += check_flipbook(page, i, name)
    return problems


def check_exercises(page: Page, name: str) -> list[str]:
    """An exercise's answer stays folded: no code or output of its solution is in view until opened."""
    problems = []
    for section in page.locator('section[id^="exercise-"]').all():
        shown = [el for el in section.locator(".cell_input, .cell_output").all() if el.is_visible()]
        if shown:
            title = section.locator("h3").first.inner_text().strip().rstrip("#")
            problems.append(f"{name}: '{title}': {len(shown)} solution input/output block(s) in view, not folded "
                            "(tag the solution cell hide-cell)")
    return problems


def check_flipbook(page: Page, i: int, name: str) -> list[str]:
    """Moving the range control with the keyboard must show another frame, and another picture."""
    book = page.locator(".flipbook").nth(i)
    book.scroll_into_view_if_needed()
    before = book.screenshot()
    control = book.locator('input[type="range"]')
    control.focus()
    value = control.input_value()
    page.keyboard.press("ArrowLeft" if value == control.get_attribute("max") else "ArrowRight")
    if control.input_value() == value:
        return [f"{name}: flipbook {i}: the range control did not move"]
    if book.locator(".flipbook-frame:not([hidden])").count() != 1:
        return [f"{name}: flipbook {i}: not exactly one frame visible after moving the control"]
    if book.screenshot() == before:
        return [f"{name}: flipbook {i}: moving the control did not change the figure"]
    return []


def main(site: Path) -> int:
    server, base = serve(site)
    problems, flipbooks, chapters = [], {}, 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        for name in pages():
            page = browser.new_page()
            problems += check_page(page, f"{base}/{name}.html", name)
            if name.startswith("notebooks/"):
                chapters += 1
                problems += check_chapter(page, name)
                flipbooks[name] = page.locator(".flipbook").count()
            page.close()
        browser.close()
    server.shutdown()
    moving = sum(1 for n in flipbooks.values() if n)
    if moving < MIN_FLIPBOOK_CHAPTERS:
        problems.append(f"only {moving} chapters have a flipbook, fewer than {MIN_FLIPBOOK_CHAPTERS}")
    print("\n".join(problems) or f"site in Chromium: {len(pages())} pages, {chapters} chapters, "
          f"{sum(flipbooks.values())} flipbooks in {moving} chapters, no problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "_build/html")))
