"""The coupled hyperspheres of CFA (chapter 6) in two dimensions, for the chapter's figure and slider.

``hypersphere_toy`` moves 2-D points by gradient descent on CFA's own loss (``cfa.cfa_loss`` on
``cfa.nearest_squared``): each point is pulled into the sphere of radius r around its K nearest
memory vectors and pushed out of the smaller sphere around the next J. ``hypersphere_view``
draws one step of such a run; ``hypersphere_radius_view`` runs the toy at one radius r and draws
its start and end (the chapter's flipbook over r); ``inside_repulsion`` counts the points that
sit inside a hard negative's repulsion sphere (what L_rep would push).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..methods.cfa import cfa_loss, nearest_squared


@dataclass
class ToyRun:
    """A 2-D run of ``hypersphere_toy``: the memory vectors and every point's path."""

    memory: torch.Tensor  # (M, 2)
    path: torch.Tensor  # (steps + 1, N, 2)
    l_att: list[float]
    l_rep: list[float]
    radius: float
    alpha: float
    k: int
    j: int


def hypersphere_toy(
    steps: int = 40, n_points: int = 60, k: int = 1, j: int = 1, radius: float = 0.6, alpha: float = 0.1,
    lr: float = 0.04, seed: int = 0,
) -> ToyRun:
    """The coupled hyperspheres in 2-D: points phi(p_t) moved by gradient descent on L_att + L_rep.

    Seven fixed memory vectors (a hexagon and its centre, 0.7 apart); each point is pulled into the
    sphere of radius r around its K nearest (L_att) and pushed out of the sphere of squared radius
    r^2 - alpha around the next J (L_rep). Here the points move freely (in CFA the descriptor's
    weights move them all at once), by plain gradient descent on the loss summed over points
    (nu = 1, so a step does not depend on their number). Uses the model's own ``nearest_squared``
    and ``cfa_loss``.
    """
    generator = torch.Generator().manual_seed(seed)
    angles = torch.arange(6) * math.pi / 3
    memory = torch.cat([torch.zeros(1, 2), 0.7 * torch.stack([angles.cos(), angles.sin()], dim=1)])
    points = (0.8 * torch.randn(n_points, 2, generator=generator)).requires_grad_()
    optimizer = torch.optim.SGD([points], lr=lr)
    path, atts, reps = [points.detach().clone()], [], []
    for step in range(steps + 1):
        att, rep = cfa_loss(nearest_squared(points, memory, k + j), radius, k, alpha, nu=1.0)
        atts.append(att.item())
        reps.append(rep.item())
        if step == steps:
            break
        optimizer.zero_grad()
        ((att + rep) * n_points).backward()
        optimizer.step()
        path.append(points.detach().clone())
    return ToyRun(memory, torch.stack(path), atts, reps, radius, alpha, k, j)


def inside_repulsion(points: torch.Tensor, memory: torch.Tensor, radius: float, alpha: float, k: int = 1,
                     j: int = 1) -> int:
    """How many points have one of their hard negatives (the (K+1)-th .. (K+J)-th nearest memory
    vectors) closer than sqrt(r^2 - alpha): the points L_rep acts on (none while r^2 <= alpha)."""
    if j == 0 or radius**2 <= alpha:
        return 0
    hard = nearest_squared(points, memory, k + j)[:, k:]
    return int((hard < radius**2 - alpha).any(dim=1).sum())


def hypersphere_view(run: ToyRun, step: int, ax: Any = None) -> tuple[Any, dict[str, float]]:
    """Draw ``run`` at ``step`` (spheres, paths so far, points coloured by the loss term acting on
    them); return the figure and its numbers, as the book's slider callbacks (``widgets``) do."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    ax = ax if ax is not None else Figure(figsize=(5.2, 5.6), layout="constrained").add_subplot()
    inner = math.sqrt(max(run.radius**2 - run.alpha, 0.0))
    for i, c in enumerate(run.memory.tolist()):
        labels = ("attraction sphere r", "repulsion sphere sqrt(r² - α)") if i == 0 else (None, None)
        ax.add_patch(Circle(c, run.radius, fill=False, color="tab:blue", label=labels[0]))
        if inner > 0:
            ax.add_patch(Circle(c, inner, fill=False, ls="--", color="tab:red", label=labels[1]))
    now = run.path[step]
    d = nearest_squared(now, run.memory, run.k + run.j)
    pulled = (d[:, : run.k] > run.radius**2).any(dim=1)
    pushed = (d[:, run.k :] < run.radius**2 - run.alpha).any(dim=1)
    for n in range(now.shape[0]):
        ax.plot(*run.path[: step + 1, n].T, color="0.8", lw=0.7, zorder=1)
    for mask, colour, label in ((~pulled & ~pushed, "tab:green", "at rest"), (pulled, "tab:blue", "pulled (L_att > 0)"),
                                (pushed, "tab:red", "pushed (L_rep > 0)")):
        ax.scatter(*now[mask].T, s=14, color=colour, label=label, zorder=3)
    ax.scatter(*run.memory.T, marker="X", s=90, color="black", label="memory vectors c", zorder=4)
    ax.set(xlim=(-2.2, 2.2), ylim=(-2.2, 2.2), aspect="equal", xlabel="feature 1", ylabel="feature 2",
           title=f"step {step}: L_att = {run.l_att[step]:.3f}, L_rep = {run.l_rep[step]:.3f}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7)
    numbers = {"step": step, "l_att": run.l_att[step], "l_rep": run.l_rep[step],
               "pulled": int(pulled.sum()), "pushed": int(pushed.sum())}
    return ax.figure, numbers


def hypersphere_radius_view(radius: float, alpha: float = 0.1, steps: int = 40, **toy: Any) -> tuple[Any, dict[str, float]]:
    """Run ``hypersphere_toy`` at radius r and draw its first and last step side by side.

    Returns the figure and the run's numbers: r^2 - alpha, the largest L_rep over the run, the
    points L_rep acts on at the start, and L_att and L_rep at the end.
    """
    from matplotlib.figure import Figure

    run = hypersphere_toy(steps=steps, radius=radius, alpha=alpha, **toy)
    fig = Figure(figsize=(10.4, 6.6), layout="constrained")
    for ax, step in zip(fig.subplots(1, 2), (0, steps)):
        hypersphere_view(run, step, ax=ax)
    inner = "no repulsion sphere (r² ≤ α)" if radius**2 <= alpha else f"repulsion sphere √(r² - α) = {math.sqrt(radius**2 - alpha):.2f}"
    fig.suptitle(f"r = {radius:.2f}, α = {alpha:.2f}: {inner}; largest L_rep over the run = {max(run.l_rep):.4f}")
    numbers = {"radius": radius, "r2_minus_alpha": radius**2 - alpha, "max_l_rep": max(run.l_rep),
               "pushed_at_start": inside_repulsion(run.path[0], run.memory, radius, alpha, run.k, run.j),
               "l_att_end": run.l_att[-1], "l_rep_end": run.l_rep[-1]}
    return fig, numbers
