"""The book's structure, checked without executing anything: toc, offline config, bibliography, chapters."""

import ast
import re
from pathlib import Path

import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "_config.yml").read_text())
TOC = yaml.safe_load((REPO / "_toc.yml").read_text())
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
REQUIRED_CITATIONS = {
    "roth2022patchcore",  # PatchCore, CVPR 2022
    "lee2022cfa",  # CFA, IEEE Access 2022
    "cohen2020spade",  # SPADE
    "defard2021padim",  # PaDiM, ICPR 2021
    "bergmann2019mvtec",  # MVTec AD, CVPR 2019
    "bergmann2021mvtec",  # MVTec AD, IJCV 2021
    "huang2020magnetic",  # Magnetic Tile Defects, The Visual Computer 2020
    "tan2019efficientnet",  # EfficientNet, ICML 2019
}


def toc_files(entry: dict | list) -> list[str]:
    """Every ``root``/``file`` named in the toc, in order."""
    if isinstance(entry, list):
        return [f for item in entry for f in toc_files(item)]
    found = [entry[key] for key in ("root", "file") if key in entry]
    for key in ("parts", "chapters", "sections"):
        found += toc_files(entry.get(key, []))
    return found


def source(name: str) -> Path | None:
    return next((p for p in (REPO / f"{name}.md", REPO / f"{name}.ipynb") if p.is_file()), None)


def markdown(nb: nbformat.NotebookNode) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def test_toc_lists_every_notebook_once_and_the_narrative_pages():
    files = toc_files(TOC)
    assert TOC["root"] == "book/intro"
    assert len(files) == len(set(files)), "a file is listed twice"
    assert {"book/how_to_use", "book/references"} <= set(files)
    missing = [nb.name for nb in NOTEBOOKS if f"notebooks/{nb.stem}" not in files]
    assert not missing, f"add these notebooks to _toc.yml: {missing}"


def test_every_file_in_the_toc_exists():
    missing = [name for name in toc_files(TOC) if source(name) is None]
    assert not missing, f"_toc.yml names files that do not exist (.md or .ipynb): {missing}"


def test_config_executes_every_chapter_and_fails_on_errors():
    assert CONFIG["execute"]["execute_notebooks"] == "force"  # "cache" would keep stale numbers
    assert 60 <= CONFIG["execute"]["timeout"] <= 600
    assert CONFIG["sphinx"]["config"]["nb_execution_raise_on_error"] is True
    required = {"_build", ".venv", "data", "tests", "benchmarks", "README.md", "**/.ipynb_checkpoints", "runs"}
    assert required <= set(CONFIG["exclude_patterns"])


def test_config_links_a_repository_only_when_the_build_knows_its_address(monkeypatch, tmp_path: Path):
    """No written address (a placeholder links every page to nothing): book/repository_link.py reads it
    at build time and turns on the repository button and the launch buttons (sphinx-book-theme) for it."""
    import tomllib
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(REPO / CONFIG["sphinx"]["local_extensions"]["repository_link"]))
    link = __import__("repository_link")
    assert "url" not in CONFIG["repository"] and "use_repository_button" not in CONFIG.get("html", {})
    assert "urls" not in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert CONFIG["repository"]["path_to_book"] == "" and (REPO / "_config.yml").is_file()
    launch = CONFIG["launch_buttons"]
    assert launch["notebook_interface"] in ("classic", "jupyterlab")  # anything else stops the build
    assert launch.get("thebe", False) is False, "thebe without the sphinx_thebe extension warns (fails -W)"
    assert (REPO / "requirements.txt").is_file(), "Binder builds the environment from requirements.txt"

    for remote in ("git@github.com:someone/patchcore_lite.git", "https://github.com/someone/patchcore_lite.git",
                   "ssh://git@github.com/someone/patchcore_lite", "https://github.com/someone/patchcore_lite/\n"):
        assert link.github_address(remote) == "https://github.com/someone/patchcore_lite", remote
    for remote in ("", "/work/main", "https://example.org/a/b", "https://github.com/only-owner"):
        assert link.github_address(remote) is None, remote

    def built(env: str | None, folder: Path) -> dict:
        monkeypatch.delenv(link.ENV, raising=False) if env is None else monkeypatch.setenv(link.ENV, env)
        options = {"launch_buttons": dict(launch), "path_to_docs": ""}
        link.link_repository(SimpleNamespace(confdir=str(folder)), SimpleNamespace(html_theme_options=options))
        return options

    published = built("git@github.com:owner/book.git", REPO)
    assert published["repository_url"] == "https://github.com/owner/book" and published["use_repository_button"]
    assert published["launch_buttons"] == launch
    unknown = built(None, tmp_path)  # not a git checkout, no setting
    assert "repository_url" not in unknown and "launch_buttons" not in unknown, "no address, no buttons"
    assert unknown["use_repository_button"] is False


def test_config_serves_mathjax_and_widget_scripts_from_the_site():
    sphinx = CONFIG["sphinx"]["config"]
    static = [REPO / folder for folder in sphinx["html_static_path"]]
    assert not (REPO / "_static").exists(), "a root _static/ adds every .js in it to every page"
    scripts = [sphinx["mathjax_path"], *sphinx["nb_ipywidgets_js"]]
    assert [s for s in scripts if "://" in s] == [], "scripts must be local for the site to work offline"
    assert any(s.endswith("require.js") for s in scripts) and any(s.endswith("embed-amd.js") for s in scripts)
    for script in scripts:
        assert any((folder / script).is_file() for folder in static), f"{script} is not in {static}"
    mathjax = next(folder / sphinx["mathjax_path"] for folder in static)
    fonts = mathjax.parent / "output" / "chtml" / "fonts" / "woff-v2"
    assert len(list(fonts.glob("*.woff"))) == 23, "MathJax's CommonHTML output needs its fonts beside it"
    assert all((folder / "README.md").is_file() for folder in static), "vendored files need their licences noted"


def test_bibliography_has_the_required_works_and_every_citation():
    keys = set(re.findall(r"^@\w+\{([^,\s]+),", (REPO / "book" / "references.bib").read_text(), re.M))
    assert REQUIRED_CITATIONS <= keys
    pages = [p.read_text() for p in (REPO / "book").glob("*.md")]
    pages += [markdown(nbformat.read(nb, as_version=4)) for nb in NOTEBOOKS]
    cited = {key.strip() for page in pages for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", page)
             for key in group.split(",")}
    assert cited, "no citations found"
    assert not cited - keys, f"cited but not in book/references.bib: {sorted(cited - keys)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_chapter_has_goals_equation_exercise_and_package_code(path: Path):
    nb = nbformat.read(path, as_version=4)
    text = markdown(nb)
    number = path.stem.split("_")[0].lstrip("0") or "0"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# {number}. "), (
        f"{path.name}: start with the title '# {number}. ...' (the toc does not number chapters)"
    )
    assert re.search(r"learning goals", text, re.I), f"{path.name}: add a 'Learning goals' cell"
    assert "$$" in text or "{math}" in text or r"\begin{" in text, f"{path.name}: state the paper's equation(s)"
    assert re.search(r"^## Summary$", text, re.M), f"{path.name}: add a '## Summary' before the exercises"
    exercises = re.findall(r"^### Exercise \d+: ", text, re.M)
    assert len(exercises) >= 3, f"{path.name}: {len(exercises)} exercises ('### Exercise k: title'); write 3 or 4"
    solutions = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Solution")]
    assert len(solutions) >= len(exercises), f"{path.name}: every exercise needs a '# Solution' cell"
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert any(re.search(r"^\s*(from|import) patchcore_lite", s, re.M) for s in code), (
        f"{path.name}: chapters call the package (import patchcore_lite)"
    )


def exercise_cells(nb: nbformat.NotebookNode) -> list[tuple[str, int, nbformat.NotebookNode]]:
    """(exercise heading, cell index, cell) for every code cell under a '### Exercise k:' heading."""
    found, exercise = [], None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            headings = re.findall(r"^(#{1,3}) (.*)$", cell.source, re.M)
            if headings:
                exercise = headings[-1][1] if headings[-1][1].startswith("Exercise ") else None
        elif exercise:
            found.append((exercise, i, cell))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_exercise_answers_are_folded_code_and_output_together(path: Path):
    """A solution gives nothing away until opened: myst-nb's ``hide-cell`` folds input and output into one
    toggle on the site; ``jupyter.source_hidden``/``outputs_hidden`` collapse both in JupyterLab."""
    nb = nbformat.read(path, as_version=4)
    cells = exercise_cells(nb)
    assert {e for e, _, c in cells if c.source.startswith("# Solution")} == set(
        re.findall(r"^### (Exercise \d+: .*)$", markdown(nb), re.M)), f"{path.name}: every exercise ends in a solution"
    for exercise, i, cell in cells:
        tags = cell.metadata.get("tags", [])
        if not cell.source.startswith("# Solution"):
            assert "remove-cell" in tags, f"{path.name} cell {i} ({exercise}): only '# Solution' cells under an exercise"
            continue
        assert "hide-cell" in tags and "hide-input" not in tags, (
            f"{path.name} cell {i} ({exercise}): tag the solution hide-cell (hide-input leaves its output in view)")
        assert cell.metadata.get("jupyter") == {"source_hidden": True, "outputs_hidden": True}, (
            f"{path.name} cell {i} ({exercise}): collapse its source and outputs in JupyterLab too")
        prompt = cell.metadata.get("mystnb", {}).get("code_prompt_show", "")
        assert "solution" in prompt.lower(), f"{path.name} cell {i}: the toggle says what it opens (mystnb.code_prompt_show)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_chapter_is_saved_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (
        f"{path.name}: cells {dirty} have outputs; clear them (numbers on the site come from the build): "
        f"jupyter nbconvert --clear-output --inplace {path.relative_to(REPO)}"
    )
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state; clear outputs and widget state"


def figure_helpers() -> set[str]:
    """Names of the package's functions that return a bare matplotlib Figure (not pyplot's)."""
    import importlib
    import inspect
    import pkgutil

    import patchcore_lite

    names = set()
    for info in pkgutil.walk_packages(patchcore_lite.__path__, "patchcore_lite."):
        if not info.name.endswith("__main__"):
            module = importlib.import_module(info.name)
            names |= {name for name, f in vars(module).items() if inspect.isfunction(f)
                      and f.__module__ == module.__name__ and inspect.signature(f).return_annotation == "Figure"}
    return names


def test_every_figure_a_chapter_draws_is_shown():
    """A helper's Figure shows only as a cell's last expression (or through display): one made earlier in
    the cell and dropped is lost, as chapter 7's histogram was. Drawing into a given ``ax=`` is fine."""
    helpers = figure_helpers()
    assert {"plot_score_histogram", "overlay", "plot_failures"} <= helpers
    lost = []
    for path in NOTEBOOKS:
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type != "code":
                continue
            body = ast.parse("\n".join(line for line in cell.source.splitlines()
                                       if not line.lstrip().startswith(("%", "!")))).body
            for statement in body[:-1]:
                call = statement.value if isinstance(statement, ast.Expr) else None
                name = getattr(getattr(call, "func", None), "id", None) or getattr(getattr(call, "func", None), "attr", None)
                if name in helpers and not any(k.arg == "ax" for k in call.keywords):
                    lost.append(f"{path.name} cell {i} line {statement.lineno}: {name}(...) is never shown; display() it")
    assert not lost, lost
