"""Point sets the coreset tests share (imported by test_coreset.py and test_lazy_greedy.py)."""

import torch


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def clustered(n: int, d: int, k: int, seed: int, spread: float = 0.05) -> torch.Tensor:
    """``n`` points around ``k`` Gaussian centres in ``d`` dimensions."""
    g = gen(seed)
    centers = torch.randn(k, d, generator=g)
    return centers[torch.randint(k, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)
