"""Generated command lines: every run ends in success (0) or in one error line with exit code 2.

Sub-command, paths (a tiny category, a test set without anomalies, Magnetic Tile Defects, missing,
empty, a text file) and option values (valid and invalid numbers, unknown names) are drawn by
hypothesis. A run that passes every check fits a random backbone on three 32-pixel images
(well under a second); the others must fail before any work, so their stderr is that one line.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_datasets import make_category, make_mtd

from patchcore_lite.tools.cli import main

# option -> (valid values, invalid values); sizes keep >= 2 memory-bank patches on the tiny category.
OPTIONS: dict[str, tuple[list[str], list[str]]] = {
    "--resize": (["32", "40"], ["0", "-1", "abc"]),
    "--crop": (["32"], ["0", "-3", "300", "1.5"]),
    "--coreset-ratio": (["0.1", "0.5", "1"], ["0", "-0.5", "1.5", "nan", "inf", "x"]),
    "--patch-size": (["1", "3"], ["0", "-2"]),
    "--batch-size": (["1", "4"], ["0", "-4"]),
    "--seed": (["0", "7"], ["-1"]),
    "--backbone": (["efficientnet_lite0", "resnet18"], ["vgg", ""]),
    "--layers": (["layer2 layer3", "layer1 layer2"], ["layer9", "layer2 blocks.99"]),
    "--feature-mode": (["avgpool"], ["max"]),
    "--coreset-method": (["greedy", "random"], ["kmeans"]),
    "--knn": (["exact", "faiss", "torch"], ["annoy"]),
    "--knn-index": (["flat", "ivf"], ["hnsw"]),
    "--nprobe": (["1", "4"], ["0", "-1"]),
}
FLAGS = ["--no-reweight", "--random-init"]


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    tiny = make_category(root / "tiny")
    model = root / "model.npz"
    assert main(["fit", str(tiny), "--model", str(model), "--random-init", "--resize", "32", "--crop", "32"]) == 0
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not an image, a model or a dataset")
    (root / "garbage.npz").write_bytes(b"not a model")
    return {
        "tiny": tiny,
        "good_only": make_category(root / "good_only", defects={}),
        "mtd": make_mtd(root / "mtd", n_free=4, defects={"Crack": 1}),
        "missing": root / "missing",
        "empty": root / "empty",
        "text": root / "notes.txt",
        "image": tiny / "test" / "good" / "000.png",
        "model": model,
        "garbage": root / "garbage.npz",
        "out": root / "out",
    }


def _mostly(usual: str, others: list[str]) -> st.SearchStrategy[str]:
    """``usual`` three times in four, else one of ``others``: enough runs get through every check."""
    return st.sampled_from([usual] * 3 * len(others) + others)


@st.composite
def option_values(draw: st.DrawFn, force_invalid: bool = False) -> list[str]:
    """Some model options, each valid three times in four; at least one invalid if asked."""
    names = draw(st.lists(st.sampled_from(sorted(OPTIONS)), unique=True, max_size=5))
    invalid = {name for name in names if draw(_mostly("valid", ["invalid"])) == "invalid"}
    if force_invalid and not invalid:
        invalid.add(draw(st.sampled_from(sorted(OPTIONS))))
        names = list(dict.fromkeys([*names, *invalid]))
    argv = []
    for name in names:
        value = draw(st.sampled_from(OPTIONS[name][name in invalid]))
        argv += [name, *(value.split() or [value])]
    return argv + draw(st.lists(st.sampled_from(FLAGS), unique=True))


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    """A command line with place names in braces (filled in by the test), mostly the usable ones."""
    command = draw(st.sampled_from(["demo", "evaluate", "fit", "predict"]))
    out = ["--out", draw(_mostly("{out}/run", ["{text}"]))]
    if command == "demo":  # a full demo takes minutes: always one invalid value
        return [command, *out, *draw(option_values(force_invalid=True))]
    if command == "predict":
        images = st.lists(_mostly("{tiny}", ["{image}", "{missing}", "{empty}", "{text}", "{mtd}"]), min_size=1, max_size=2)
        model = _mostly("{model}", ["{garbage}", "{missing}", "{empty}"])
        return [command, *draw(images), "--model", draw(model), *out]
    data = _mostly("{tiny}", ["{good_only}", "{mtd}", "{missing}", "{empty}", "{text}"])
    weights = draw(_mostly("", ["{missing}", "{text}"]))
    args = [draw(data), *draw(option_values())]
    if weights:
        args += ["--weights", weights]
    elif "--random-init" not in args:
        args.append("--random-init")  # never download a torchvision backbone
    target = ["--model", draw(_mostly("{out}/m.npz", ["{empty}"]))] if command == "fit" else out
    return [command, *args, *target]


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    return code, err.getvalue()


_runs = itertools.count()


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(template=command_lines())
def test_every_command_line_succeeds_or_is_one_error_line(places: dict[str, Path], template: list[str]):
    fill = {**places, "out": places["out"] / str(next(_runs))}  # a fresh output folder per run
    argv = [arg.format(**fill) for arg in template]
    code, err = _run(argv)  # any other exception is a traceback: the test fails with it
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        assert err.count("\n") == 1 and "error: " in err, (argv, err)
