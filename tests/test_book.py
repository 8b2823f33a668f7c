"""The book's structure, checked without executing anything: toc, offline config, bibliography, chapters."""

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


def test_config_links_the_repository_and_launches_chapters_live():
    """Jupyter Book 1.x's repository button and launch buttons (sphinx-book-theme), on one address."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    repository = CONFIG["repository"]
    assert repository["url"] == project["urls"]["Repository"], "_config.yml and pyproject.toml name one repository"
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository["url"]), "Binder and Colab links need GitHub"
    assert repository["branch"] and repository["path_to_book"] == "", "the book's root is the repository's root"
    assert (REPO / repository["path_to_book"] / "_config.yml").is_file()
    assert CONFIG["html"]["use_repository_button"] is True
    launch = CONFIG["launch_buttons"]
    assert launch["binderhub_url"] == "https://mybinder.org"
    assert launch["colab_url"] == "https://colab.research.google.com"
    assert "jupyterhub_url" in launch, "name the JupyterHub key (empty until a hub is chosen)"
    assert launch["notebook_interface"] in ("classic", "jupyterlab")  # anything else stops the build
    assert launch.get("thebe", False) is False, "thebe without the sphinx_thebe extension warns (fails -W)"
    assert (REPO / "requirements.txt").is_file(), "Binder builds the environment from requirements.txt"


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
    solutions = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Solution")
                 and "hide-input" in c.metadata.get("tags", [])]
    assert len(solutions) >= len(exercises), f"{path.name}: every exercise needs a '# Solution' cell tagged hide-input"
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert any(re.search(r"^\s*(from|import) patchcore_lite", s, re.M) for s in code), (
        f"{path.name}: chapters call the package (import patchcore_lite)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_chapter_is_saved_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (
        f"{path.name}: cells {dirty} have outputs; clear them (numbers on the site come from the build): "
        f"jupyter nbconvert --clear-output --inplace {path.relative_to(REPO)}"
    )
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state; clear outputs and widget state"
