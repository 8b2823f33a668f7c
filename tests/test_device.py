"""--device cpu|cuda|auto on every command that computes; the GPU's scores against the CPU's.

CI has no GPU: the tests that need one skip with that reason. On a GPU the backbone's convolutions
may use TF32 (torch's default for cuDNN) and the search sums in another order, so scores agree with
the CPU's within ``GPU_RTOL`` relative, not to the bit.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from patchcore_lite.backbone import resolve_device
from patchcore_lite.errors import ConfigError
from patchcore_lite.knn import NearestNeighbors
from patchcore_lite.teaching.synthetic import CATEGORIES, generate
from patchcore_lite.tools.cli import build_parser, main

SMALL = ["--resize", "64", "--crop", "64", "--coreset-ratio", "0.1", "--batch-size", "4"]
GPU_RTOL = 5e-3  # TF32 convolutions (10-bit mantissa products) on the GPU; fp32 search differs by ~1e-6
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("dev") / "data", categories=CATEGORIES[:1], size=64) / CATEGORIES[0]


@pytest.mark.parametrize("command", ["demo", "evaluate", "fit", "predict"])
def test_every_computing_command_takes_device(command: str):
    extra = {"demo": [], "evaluate": ["root"], "fit": ["root", "--model", "m.npz"],
             "predict": ["img.png", "--model", "m.npz"]}[command]
    for device in ("cpu", "cuda", "auto"):
        assert build_parser().parse_args([command, *extra, "--device", device]).device == device


def test_auto_is_cuda_exactly_when_torch_sees_a_gpu():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_and_exit_2(category: Path, tmp_path: Path, capsys):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert main(["fit", str(category), "--model", str(tmp_path / "m.npz"), "--device", "cuda", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device" in err and "cpu or auto" in err
    assert not (tmp_path / "m.npz").exists()  # refused before any work


@needs_gpu
def test_gpu_scores_equal_the_cpus_within_tolerance(category: Path, tmp_path: Path):
    model = tmp_path / "m.npz"
    assert main(["fit", str(category), "--model", str(model), *SMALL]) == 0
    scores = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert main(["predict", str(category / "test"), "--model", str(model), "--out", str(out),
                     "--device", device]) == 0
        with open(out / "scores.csv") as f:
            rows = list(csv.reader(f))[1:]
        scores[device] = np.array([float(r[1]) for r in rows])
        maps = np.stack([np.load(p).astype(np.float32) for p in sorted((out / "maps").iterdir())])
        scores[device + "_maps"] = maps
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], rtol=GPU_RTOL)
    np.testing.assert_allclose(scores["cuda_maps"], scores["cpu_maps"], rtol=GPU_RTOL, atol=1e-2)


@needs_gpu
@pytest.mark.parametrize("k", [1, 9])
def test_gpu_search_equals_the_cpu_search(k: int):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(3000, 64)).astype(np.float32)
    queries = rng.normal(size=(500, 64)).astype(np.float32)
    (d0, i0), (d1, i1) = NearestNeighbors(bank).search(queries, k), NearestNeighbors(bank, device="cuda").search(queries, k)
    torch.testing.assert_close(d1, d0, rtol=1e-4, atol=1e-5)
    assert (i0 == i1).float().mean() > 0.999  # only near-ties (within float32 rounding) may swap
