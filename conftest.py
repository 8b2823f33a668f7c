"""pytest set-up for the whole repository: package tests (tests/) and chapter notebooks (notebooks/).

Under ``pytest -n N`` every worker, and every notebook kernel a worker starts, uses one
thread. Torch's default (one thread per core in each process) oversubscribes the cores,
and its OpenMP threads then spin against each other: measured on 2 cores, the notebooks
ran 2x slower in total with ``-n 2`` than one after another, instead of 2x faster.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # inherited by notebook kernels
    import torch

    torch.set_num_threads(1)
