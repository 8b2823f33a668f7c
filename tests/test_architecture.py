"""The package's layers: the paper's concepts at the top of the package, then the other methods, the
teaching aids and the tools, each importing only from its own layer and the ones below (README,
"Architecture"). One loader reads images for everything."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "patchcore_lite"
LAYERS = {"core": 0, "methods": 1, "teaching": 2, "tools": 3}  # a module may import from its layer or below


def _layer(module: str) -> str:
    """``patchcore_lite.teaching.viz`` -> "teaching"; top-level modules are the core, ``__main__`` (the command
    line's entry point) is a tool."""
    if module == "patchcore_lite.__main__":
        return "tools"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "core"


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str, path: Path) -> set[str]:
    """Every patchcore_lite module ``path`` imports, at any depth (function-level imports too)."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (package[: len(package) - node.level + 1] if node.level else []) + (node.module or "").split(".")
            target = ".".join(p for p in base if p)
            names = [f"{target}.{a.name}" for a in node.names]
            found |= {n for n in names if n in _modules()} or {target}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("patchcore_lite")}


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_module_imports_from_a_layer_above_it(module):
    here = LAYERS[_layer(module)]
    above = sorted(m for m in _imports(module, _modules()[module]) if LAYERS[_layer(m)] > here)
    assert not above, f"{module} ({_layer(module)}) imports {above} from a layer above it"


def test_the_layer_check_sees_relative_and_function_level_imports():
    imports = _imports("patchcore_lite.tools.cli", PACKAGE / "tools" / "cli.py")
    assert "patchcore_lite.model" in imports and "patchcore_lite.teaching.viz" in imports  # the latter inside a function


def test_one_loader_reads_every_image():
    """torch's DataLoader is built in one place (datasets.image_batches), whatever reads images."""
    users = [p.relative_to(REPO).as_posix() for p in [*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]
             if "DataLoader(" in p.read_text()]
    users += [p.relative_to(REPO).as_posix() for p in (REPO / "notebooks").glob("*.ipynb") if "DataLoader(" in p.read_text()]
    assert users == ["patchcore_lite/datasets.py"]


def test_the_readme_names_every_module_in_its_layer():
    """The README's architecture table lists each module in the row of its layer."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Architecture"):]
    section = section[: section.index("\n## ", 3)]
    rows = {row.split("|")[1].strip(): row for row in section.splitlines() if re.match(r"\| \*\*\w+\*\*", row)}
    for module in _modules():
        name = module.split(".")[-1]
        if name in ("__init__", "__main__"):
            continue
        row = next((r for layer, r in rows.items() if layer.strip("*") == _layer(module)), "")
        assert f"`{name}`" in row, f"{module} is missing from the README's {_layer(module)} row"
