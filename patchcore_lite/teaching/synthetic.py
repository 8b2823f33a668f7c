"""A small synthetic dataset in MVTec AD layout, generated on demand.

It lets the book and the tests run without downloading anything. Three textures
(``stripes``, ``grain``, ``tile``) and one object (``disc``), each with 30 normal
training images, 20 normal test images and 5 test images per defect type.

It is meant to be hard enough to teach with: a default PatchCore does not solve it.
Every defect's strength is drawn from a wide range, down to faint (a few grey levels,
a thin line, a change of texture only), and normal images carry irregularities that
look like defects (knots, slubs, glaze specks, highlights, the disc's rim notch).

Everything is drawn with NumPy on float64 arrays (no PIL drawing, whose
rasterisation changes between versions) from seeded PCG64 generators, so the pixels
are reproducible across machines; the PNG bytes are identical for the same Pillow/zlib
build (two runs on one machine give identical files).

Every image is rendered in layers: an albedo (surface colour), a lighting field and
sensor noise. A defect only changes the albedo inside its shape, with hard edges,
and every pixel there by at least ``_MIN_CHANGE``, so its mask is exactly the set of
changed pixels. Normal images vary in lighting,
colour, phase, orientation and pose, so that a defect cannot be found from global
colour statistics, only by looking at local structure.

Two in-memory helpers serve the book: ``synthetic_validation`` draws fresh labelled
images (a validation split), ``toy_point_cloud`` a 2-D stand-in for a memory bank.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..datasets import data_root, writable_dir
from ..errors import DataError

if TYPE_CHECKING:
    from ..datasets import Preprocess

DEFECTS: dict[str, tuple[str, ...]] = {
    "stripes": ("hole", "misweave", "scratch", "stain"),
    "grain": ("crack", "sanding", "scratch", "stain"),
    "tile": ("crack", "glaze", "hole", "stain"),
    "disc": ("hole", "missing_piece", "scratch", "stain"),
}
CATEGORIES: tuple[str, ...] = tuple(DEFECTS)
N_TRAIN, N_TEST_GOOD, N_PER_DEFECT = 30, 20, 5

# The least change a defect makes to a pixel it covers, in albedo (about 4 grey levels under
# the dimmest lighting): defects may be faint, but every pixel of their mask changes.
_MIN_CHANGE = 6 / 255

# Defects stay inside the centre 224/256 of the image: the default pipeline
# (resize 256, centre crop 224) must not cut them.
_CROP_FRACTION = 224 / 256


@dataclass
class _Scene:
    """The layers of one image; defects edit ``albedo`` only.

    Colour arrays are channel-first (3, H, W): NumPy is several times faster on them
    than on (H, W, 3), whose innermost loop is only 3 long.
    """

    albedo: np.ndarray  # (3, H, W) surface colour in [0, 1]
    body: np.ndarray  # (H, W) bool, where defects may lie
    light: np.ndarray  # (H, W) multiplicative illumination
    noise: np.ndarray  # (H, W) additive sensor noise
    background: np.ndarray | None = None  # (3, H, W) what shows where part of an object breaks off
    flaw: np.ndarray | None = None  # (3, H, W) the same surface with its texture disturbed (texture defects)


# ----------------------------------------------------------------------------- drawing helpers


@functools.lru_cache(maxsize=4)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y, x), float64; cached and read-only."""
    axis = np.arange(n, dtype=np.float64)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _box(n: int, cy: float, cx: float, half: float) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The square of half-side ``half`` around (cy, cx), clipped to the image: (slices, yy, xx)."""
    ys = slice(max(int(cy - half), 0), min(int(cy + half) + 2, n))
    xs = slice(max(int(cx - half), 0), min(int(cx + half) + 2, n))
    yy, xx = _grid(n)
    return (ys, xs), yy[ys, xs], xx[ys, xs]


def _rotate(yy: np.ndarray, xx: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return yy * c + xx * s, xx * c - yy * s


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _value_noise(rng: np.random.Generator, n: int, cell_y: float, cell_x: float) -> np.ndarray:
    """Smooth noise in [0, 1]: random values on a lattice, smoothstep-interpolated."""
    gy = np.arange(n) / cell_y + rng.random()
    gx = np.arange(n) / cell_x + rng.random()
    lattice = rng.random((int(gy[-1]) + 2, int(gx[-1]) + 2))
    iy, ix = gy.astype(np.int64), gx.astype(np.int64)
    fy, fx = _smoothstep(gy - iy)[:, None], _smoothstep(gx - ix)
    rows, next_rows = lattice[iy], lattice[iy + 1]
    top = rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx
    bottom = next_rows[:, ix] * (1 - fx) + next_rows[:, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _tint(rng: np.random.Generator, colour: tuple[float, float, float]) -> np.ndarray:
    """A (3, 1, 1) colour with a slight random shift per channel (white balance)."""
    return (np.asarray(colour) * rng.uniform(0.95, 1.05, size=3))[:, None, None]


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """Per-pixel blend of colours ``a`` and ``b`` (3, ...) by ``t`` (...)."""
    return a + (b - a) * t


def _lighting(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A global gain with a linear gradient, in half the images a soft highlight or shadow, and +-4 grey levels of noise.

    The highlight or shadow is normal: a detector that flags local brightness changes flags it too.
    """
    gain = rng.uniform(0.85, 1.05)
    gy, gx = rng.uniform(-0.12, 0.12, size=2)
    ramp = np.arange(n) / n - 0.5
    light = gain * (1 + gy * ramp[:, None] + gx * ramp[None, :])
    if rng.random() < 0.5:
        cy, cx = rng.uniform(0.15, 0.85, size=2) * n
        sigma = rng.uniform(20, 50) * n / 256
        yy, xx = _grid(n)
        spot = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        light = light * (1 + rng.uniform(-0.12, 0.12) * spot)
    noise = (rng.random((n, n)) - 0.5) * (8 / 255)
    return light, noise


def _texture_scene(rng: np.random.Generator, albedo: np.ndarray, flaw: np.ndarray) -> _Scene:
    n = albedo.shape[1]
    light, noise = _lighting(rng, n)
    return _Scene(albedo, np.ones((n, n), dtype=bool), light, noise, flaw=flaw)


def _polyline(n: int, points: np.ndarray, width: float) -> np.ndarray:
    """Pixels within width/2 of a polyline given as (k, 2) (y, x) points."""
    (y0, x0), (y1, x1) = points.min(axis=0), points.max(axis=0)
    box, yy, xx = _box(n, (y0 + y1) / 2, (x0 + x1) / 2, max(y1 - y0, x1 - x0) / 2 + width)
    best = np.full(yy.shape, np.inf)
    for (ay, ax), (by, bx) in zip(points[:-1], points[1:]):
        dy, dx = by - ay, bx - ax
        t = np.clip(((yy - ay) * dy + (xx - ax) * dx) / max(dy * dy + dx * dx, 1e-12), 0, 1)
        best = np.minimum(best, (yy - ay - t * dy) ** 2 + (xx - ax - t * dx) ** 2)
    shape = np.zeros((n, n), dtype=bool)
    shape[box] = best <= (width / 2) ** 2
    return shape


def _spots(rng: np.random.Generator, n: int, count: int, radius: tuple[float, float]) -> np.ndarray:
    """(H, W) bool: ``count`` small discs at random places (normal blemishes)."""
    spots = np.zeros((n, n), dtype=bool)
    for _ in range(count):
        cy, cx, r = *rng.uniform(0, n, size=2), rng.uniform(*radius) * n / 256
        box, yy, xx = _box(n, cy, cx, r)
        spots[box] |= np.hypot(yy - cy, xx - cx) <= r
    return spots


# ----------------------------------------------------------------------------- normal images


def _stripes(rng: np.random.Generator, n: int) -> _Scene:
    """Woven fabric with coloured stripes: bands across, a twill of threads inside, the odd thick thread (slub)."""
    s = n / 256
    u, v = _rotate(*_grid(n), np.deg2rad(rng.uniform(-4, 4)))
    period = 22 * s * rng.uniform(0.95, 1.05)
    duty = rng.uniform(0.25, 0.35)
    bands = _smoothstep((0.5 + 0.5 * np.sin(2 * np.pi * (u / period + rng.random())) - duty) / 0.4)
    phase = rng.uniform(0, 2 * np.pi)
    twill = 0.86 + 0.14 * (0.5 + 0.5 * np.sin(2 * np.pi * (u + v) / (5 * s) + phase))
    crossed = 0.86 + 0.14 * (0.5 + 0.5 * np.sin(2 * np.pi * (u - v) / (5 * s) + phase))  # a misweave
    slubs = np.ones((n, n))
    for _ in range(rng.integers(0, 4)):  # slubs: short thicker threads, brighter, along the stripes
        cu, cv, length = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(8, 24) * s
        slubs += 0.1 * np.exp(-(((u - cu) / (1.5 * s)) ** 2) - ((v - cv) / length) ** 2)
    albedo = _mix(_tint(rng, (0.16, 0.22, 0.46)), _tint(rng, (0.76, 0.70, 0.56)), bands) * slubs
    return _texture_scene(rng, albedo * twill, albedo * crossed)


def _grain(rng: np.random.Generator, n: int) -> _Scene:
    """Wood: growth rings warped by smooth noise and the odd knot, with fine fibres along the grain."""
    s = n / 256
    yy, xx = _grid(n)
    u, _ = _rotate(yy, xx, np.deg2rad(rng.uniform(-8, 8)))
    warp = 2.2 * _value_noise(rng, n, 48 * s, 160 * s) + 0.3 * _value_noise(rng, n, 10 * s, 40 * s)
    core = np.zeros((n, n))
    for _ in range(rng.integers(0, 3)):  # knots: the rings bulge around a dark core
        ky, kx = rng.uniform(0.1, 0.9, size=2) * n
        d2 = ((yy - ky) ** 2 + (xx - kx) ** 2) / (rng.uniform(4, 10) * s) ** 2
        warp = warp + rng.uniform(1, 2.5) * np.exp(-d2 / 6)
        core = np.maximum(core, np.exp(-d2))
    rings = (0.5 + 0.5 * np.sin(2 * np.pi * (u / (26 * s * rng.uniform(0.9, 1.1)) + warp))) ** 2
    light, dark = _tint(rng, (0.80, 0.60, 0.40)), _tint(rng, (0.46, 0.29, 0.16))
    wood = _mix(_mix(light, dark, rings), 0.7 * dark, 0.8 * core)
    fibres = 0.92 + 0.08 * _value_noise(rng, n, 1.5 * s, 24 * s)
    sanded = 0.92 + 0.08 * _value_noise(rng, n, 24 * s, 1.5 * s)  # fibres torn across the grain
    return _texture_scene(rng, wood * fibres, wood * sanded)


def _tile(rng: np.random.Generator, n: int) -> _Scene:
    """Glazed square tiles with grout lines; each tile slightly different in shade, with the odd glaze speck."""
    s = n / 256
    period, grout = 32 * s, 3 * s
    # Axis-aligned, so rows and columns are computed once and broadcast.
    v = np.arange(n)[:, None] + rng.uniform(0, period)
    u = np.arange(n)[None, :] + rng.uniform(0, period)
    fu, fv = u % period, v % period
    shade = rng.random((16, 16))[(v // period).astype(np.int64) % 16, (u // period).astype(np.int64) % 16]
    to_edge = np.minimum(np.minimum(fu - grout, period - fu), np.minimum(fv - grout, period - fv))
    bevel = (0.94 + 0.08 * shade) * (0.9 + 0.1 * np.clip(to_edge / (3 * s), 0, 1))
    glaze = bevel * (0.96 + 0.04 * _value_noise(rng, n, 6 * s, 6 * s))
    mottled = bevel * (0.9 + 0.1 * _value_noise(rng, n, 2.5 * s, 2.5 * s))  # uneven glaze
    is_grout = (fu < grout) | (fv < grout)
    specks = np.where(_spots(rng, n, int(rng.integers(0, 5)), (1.0, 1.8)), 0.7, 1.0)
    grout_colour, tile_colour = _tint(rng, (0.36, 0.34, 0.31)), _tint(rng, (0.62, 0.70, 0.76)) * specks
    albedo = np.where(is_grout, grout_colour, tile_colour * glaze)
    return _texture_scene(rng, albedo, np.where(is_grout, grout_colour, tile_colour * mottled))


def _disc(rng: np.random.Generator, n: int) -> _Scene:
    """A machined metal disc with a centre bore, six bolt holes and an index notch in its rim, on a plain mat."""
    s = n / 256
    cy, cx = n / 2 + rng.uniform(-8, 8, size=2) * s
    radius = 82 * s * rng.uniform(0.97, 1.03)
    turn = rng.uniform(0, 2 * np.pi)
    box, yy, xx = _box(n, cy, cx, radius)  # only the disc's square needs the geometry
    r, angle = np.hypot(yy - cy, xx - cx), np.arctan2(yy - cy, xx - cx)
    # Distance to the nearest of six bolt holes on a circle of radius 52, and to the notch (law of cosines).
    sector = angle - turn - np.round((angle - turn) / (np.pi / 3)) * (np.pi / 3)
    to_bolt = r**2 + (52 * s) ** 2 - 2 * r * 52 * s * np.cos(sector)
    to_notch = r**2 + radius**2 - 2 * r * radius * np.cos(angle - rng.uniform(0, 2 * np.pi))
    body = np.zeros((n, n), dtype=bool)
    body[box] = (r <= radius) & (r > 16 * s) & (to_bolt > (7 * s) ** 2) & (to_notch > (6 * s) ** 2)
    background = _tint(rng, (0.70, 0.73, 0.78)) * (0.97 + 0.03 * _value_noise(rng, n, 20 * s, 20 * s))
    sheen = 1 - rng.uniform(0.1, 0.2) * (1 - np.cos(2 * (angle - rng.uniform(0, np.pi))))  # brushed, anisotropic
    machining = 1 + 0.04 * np.sin(2 * np.pi * r / (3 * s))
    rim = np.where(r > radius - 5 * s, 0.78, 1.0)
    metal = _tint(rng, (0.52, 0.52, 0.55)) * (sheen * machining * rim)
    albedo = background.copy()
    albedo[:, box[0], box[1]] = np.where(body[box], metal, albedo[:, box[0], box[1]])
    light, noise = _lighting(rng, n)
    return _Scene(albedo, body, light, noise, background)


_RENDERERS: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "stripes": _stripes,
    "grain": _grain,
    "tile": _tile,
    "disc": _disc,
}


# ----------------------------------------------------------------------------- defects


def _centre(rng: np.random.Generator, scene: _Scene, extent: float) -> tuple[float, float]:
    """A random point on the object at least ``extent`` inside the centre crop."""
    n = scene.body.shape[0]
    lo = int(np.ceil(n * (1 - _CROP_FRACTION) / 2 + extent))
    ys, xs = np.nonzero(scene.body[lo : n - lo, lo : n - lo])
    k = rng.integers(len(ys))
    return lo + ys[k] + rng.random(), lo + xs[k] + rng.random()


def _fits(shape: np.ndarray, scene: _Scene) -> bool:
    """Whether a defect is big enough to see, on the object, and inside the centre crop."""
    n = shape.shape[0]
    m = round(n * (1 - _CROP_FRACTION) / 2)
    inside = not (shape[:m].any() or shape[n - m :].any() or shape[:, :m].any() or shape[:, n - m :].any())
    return inside and shape.sum() >= 12 * (n / 256) ** 2 and not (shape & ~scene.body).any()


def _apply(scene: _Scene, shape: np.ndarray, new: np.ndarray) -> None:
    """Write the defect's colours ``new`` (3, k) at the k pixels of ``shape``.

    Each pixel moves at least ``_MIN_CHANGE``, along the defect's own change (or towards
    mid-grey where it has none), so that subtle defects still change every pixel of their
    mask: the mask stays exactly the set of changed pixels.
    """
    old = scene.albedo[:, shape]
    delta = new - old
    size = np.abs(delta).max(axis=0)
    towards_grey = np.where(old.mean(axis=0) > 0.5, -_MIN_CHANGE, _MIN_CHANGE)
    delta = np.where(size > 1e-6, delta * np.maximum(1, _MIN_CHANGE / np.maximum(size, 1e-6)), towards_grey)
    scene.albedo[:, shape] = np.clip(old + delta, 0, 1)


def _blob(scene: _Scene, rng: np.random.Generator, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """An irregular round region (a few random harmonics on its outline): its mask and, per pixel, 0 at the centre to 1 on the outline."""
    n = scene.body.shape[0]
    cy, cx = _centre(rng, scene, radius * 1.4)
    box, yy, xx = _box(n, cy, cx, 1.4 * radius)
    angle = np.arctan2(yy - cy, xx - cx)
    edge = np.full_like(angle, radius)
    for k in (2, 3, 5):
        edge += radius * rng.uniform(0, 0.12) * np.sin(k * angle + rng.uniform(0, 2 * np.pi))
    rho = np.ones((n, n))
    rho[box] = np.hypot(yy - cy, xx - cx) / edge
    return rho < 1, rho


def _hole(scene: _Scene, rng: np.random.Generator) -> np.ndarray | None:
    """A round pit, from a shallow dent to a dark hole, slightly lighter towards its lower rim."""
    n = scene.body.shape[0]
    radius = rng.uniform(2.5, 7) * n / 256
    cy, cx = _centre(rng, scene, radius + 1)
    box, yy, xx = _box(n, cy, cx, radius)
    shape = np.zeros((n, n), dtype=bool)
    shape[box] = np.hypot(yy - cy, xx - cx) <= radius
    if not _fits(shape, scene):
        return None
    pit = np.array([1.0, 0.95, 0.9])[:, None, None] * (0.04 + 0.06 * np.clip((yy - cy) / radius, 0, 1))
    inside = shape[box]
    _apply(scene, shape, _mix(scene.albedo[:, box[0], box[1]], pit, rng.uniform(0.3, 0.95))[:, inside])
    return shape


def _scratch(scene: _Scene, rng: np.random.Generator) -> np.ndarray | None:
    """A thin, slightly curved line, from faintly to clearly brighter or darker than the surface."""
    n = scene.body.shape[0]
    s = n / 256
    length = rng.uniform(25, 100) * s
    cy, cx = _centre(rng, scene, length / 2 + 2 * s)
    heading = rng.uniform(0, np.pi)
    direction = np.array([np.sin(heading), np.cos(heading)])
    normal = np.array([direction[1], -direction[0]])
    t = np.linspace(-0.5, 0.5, 17)[:, None]
    bend = rng.uniform(-0.15, 0.15) * length * (1 - 4 * t**2)  # a parabola: bowed line
    points = np.array([cy, cx]) + t * length * direction + bend * normal
    shape = _polyline(n, points, rng.uniform(1.0, 2.2) * s) & scene.body
    if not _fits(shape, scene):
        return None
    contrast, old = rng.uniform(0.12, 0.6), scene.albedo[:, shape]
    _apply(scene, shape, old * (1 - contrast) if rng.random() < 0.5 else 1 - (1 - old) * (1 - contrast))
    return shape


def _crack(scene: _Scene, rng: np.random.Generator) -> np.ndarray | None:
    """A dark random-walk polyline with one branch, from hairline to wide."""
    n = scene.body.shape[0]
    s = n / 256
    step, steps = 5 * s, int(rng.integers(8, 18))
    heading = rng.uniform(0, 2 * np.pi)
    points = [np.array(_centre(rng, scene, 0.4 * step * steps))]
    for _ in range(steps):
        heading += rng.uniform(-0.6, 0.6)
        points.append(points[-1] + step * np.array([np.sin(heading), np.cos(heading)]))
    main = np.array(points)
    # Start the branch at the middle point and head off at an angle from it.
    branch = [main[steps // 2]]
    heading += rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2)
    for _ in range(steps // 3):
        heading += rng.uniform(-0.6, 0.6)
        branch.append(branch[-1] + step * np.array([np.sin(heading), np.cos(heading)]))
    width = rng.uniform(1.0, 2.2) * s
    shape = (_polyline(n, main, width) | _polyline(n, np.array(branch), width * 0.8)) & scene.body
    if not _fits(shape, scene):
        return None
    _apply(scene, shape, scene.albedo[:, shape] * rng.uniform(0.25, 0.7))
    return shape


def _stain(scene: _Scene, rng: np.random.Generator) -> np.ndarray | None:
    """A coloured blob, from faint to strong, strongest in its centre; fades towards its edge."""
    shape, rho = _blob(scene, rng, rng.uniform(8, 20) * scene.body.shape[0] / 256)
    if not _fits(shape, scene):
        return None
    palette = np.array([[0.55, 0.40, 0.20], [0.35, 0.55, 0.30], [0.65, 0.30, 0.35], [0.30, 0.35, 0.60]])
    colour = palette[rng.integers(len(palette))][:, None]
    alpha = rng.uniform(0.15, 0.7) * (0.4 + 0.6 * (1 - rho[shape] ** 2))
    old = scene.albedo[:, shape]
    _apply(scene, shape, _mix(old, old * colour, alpha))
    return shape


def _texture_flaw(scene: _Scene, rng: np.random.Generator) -> np.ndarray | None:
    """A patch where the surface keeps its colour but its texture changes (``flaw``): misweave, sanding, uneven glaze."""
    shape, _ = _blob(scene, rng, rng.uniform(8, 18) * scene.body.shape[0] / 256)
    if not _fits(shape, scene):
        return None
    _apply(scene, shape, scene.flaw[:, shape])
    return shape


def _missing_piece(scene: _Scene, rng: np.random.Generator) -> np.ndarray | None:
    """A segment broken off the object's rim, from a small chip to a large piece: the background shows instead."""
    n = scene.body.shape[0]
    yy, xx = _grid(n)
    ys, xs = np.nonzero(scene.body)
    cy, cx = ys.mean(), xs.mean()
    heading = rng.uniform(0, 2 * np.pi)
    along = (yy - cy) * np.sin(heading) + (xx - cx) * np.cos(heading)
    reach = np.max(np.hypot(ys - cy, xs - cx))
    shape = (along > reach * rng.uniform(0.72, 0.93)) & scene.body
    if not _fits(shape, scene):
        return None
    _apply(scene, shape, scene.background[:, shape])
    return shape


# Each painter draws a random placement; if it fits it paints and returns the mask,
# otherwise it returns None without painting and is asked again.
_DEFECT_PAINTERS: dict[str, Callable[[_Scene, np.random.Generator], np.ndarray | None]] = {
    "crack": _crack,
    "glaze": _texture_flaw,
    "hole": _hole,
    "misweave": _texture_flaw,
    "missing_piece": _missing_piece,
    "sanding": _texture_flaw,
    "scratch": _scratch,
    "stain": _stain,
}


def _paint_defect(scene: _Scene, defect: str, rng: np.random.Generator) -> np.ndarray:
    """Paint ``defect`` on the scene, redrawing its placement until it fits."""
    painter = _DEFECT_PAINTERS[defect]
    for _ in range(200):
        shape = painter(scene, rng)
        if shape is not None:
            return shape
    raise RuntimeError(f"could not place a {defect} defect; the generator's parameters are inconsistent")


def make_image(
    category: str, defect: str | None, rng: np.random.Generator, size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size, 3) uint8 image and its (size, size) bool defect mask.

    ``defect`` None gives a normal image with an empty mask. The defect is drawn
    after the normal image from the same generator, so the same seed with and
    without a defect gives images that differ exactly inside the mask.
    """
    if category not in DEFECTS:
        raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
    scene = _RENDERERS[category](rng, size)
    mask = np.zeros((size, size), dtype=bool)
    if defect is not None:
        if defect not in DEFECTS[category]:
            choices = ", ".join(DEFECTS[category])
            raise ValueError(f"{category} has no defect {defect!r}; choose from {choices}")
        mask = _paint_defect(scene, defect, rng)
    rgb = np.rint(np.clip(scene.albedo * scene.light + scene.noise, 0, 1) * 255).astype(np.uint8)
    return np.ascontiguousarray(rgb.transpose(1, 2, 0)), mask


def _generator(seed: int, index: int, *names: str) -> np.random.Generator:
    """One generator per image, keyed by names: adding a category or an image does not change any other image."""
    return np.random.default_rng([seed, *(zlib.crc32(name.encode()) for name in names), index])


# ----------------------------------------------------------------------------- in memory


def synthetic_validation(
    category: str, preprocess: Preprocess, n_normal: int = 10, n_anomalous: int = 10, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray]:
    """A validation split for thresholds: fresh synthetic images of ``category``, normalised (N, 3, h, w), and labels.

    The images come from generators keyed on "validation", so they are neither training nor
    test images of the synthetic dataset; the anomalous ones cycle through the category's defects.
    """
    if category not in DEFECTS:
        raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
    images, labels = [], []
    for i in range(n_normal + n_anomalous):
        defect = None if i < n_normal else DEFECTS[category][i % len(DEFECTS[category])]
        image, _ = make_image(category, defect, _generator(seed, i, category, "validation"))
        images.append(preprocess.image(Image.fromarray(image)))
        labels.append(int(defect is not None))
    return torch.stack(images), np.array(labels)


def toy_point_cloud(n: int = 600, seed: int = 0) -> torch.Tensor:
    """(n, 2) float32 stand-in for a memory bank (eq. 4) to run Algorithm 1 on: common patterns and a few rare ones.

    A dense blob (55%), a wider blob (25%), a thin arc (15%) and isolated points
    (5%): the arc and the isolated points are rare but normal patterns that a
    good coreset keeps and uniform sampling tends to miss.
    """
    if n < 20:
        raise ValueError(f"need at least 20 points, got n={n}")
    rng = np.random.default_rng(seed)
    n_wide, n_arc, n_rare = n // 4, (15 * n) // 100, n // 20
    n_dense = n - n_wide - n_arc - n_rare
    angle = rng.uniform(0.1 * np.pi, 0.9 * np.pi, n_arc)
    parts = [
        rng.normal((0.0, 0.0), 0.35, (n_dense, 2)),
        rng.normal((3.5, 0.5), 0.9, (n_wide, 2)),
        np.c_[3.0 * np.cos(angle), 3.0 * np.sin(angle) + 1.5] + rng.normal(0, 0.06, (n_arc, 2)),
        rng.uniform((-4.0, -4.0), (6.0, -2.0), (n_rare, 2)),
    ]
    return torch.from_numpy(np.concatenate(parts)).float()


# ----------------------------------------------------------------------------- files


def _stamp(categories: tuple[str, ...], seed: int, size: int) -> str:
    # Hashing this file's source makes any change to the generator regenerate the data.
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return f"patchcore_lite synthetic {source} seed={seed} size={size} categories={','.join(categories)}\n"


def _read_stamp(root: Path) -> str | None:
    try:
        return (root / "VERSION").read_text()
    except OSError:
        return None


def _jobs(categories: Iterable[str]) -> list[tuple[str, str, str | None, int]]:
    """(category, split, defect, index) of every image to write."""
    jobs = []
    for cat in categories:
        jobs += [(cat, "train", None, i) for i in range(N_TRAIN)]
        jobs += [(cat, "test", None, i) for i in range(N_TEST_GOOD)]
        jobs += [(cat, "test", d, i) for d in DEFECTS[cat] for i in range(N_PER_DEFECT)]
    return jobs


def _write(root: Path, job: tuple[str, str, str | None, int], seed: int, size: int) -> None:
    category, split, defect, index = job
    name = defect or "good"
    image, mask = make_image(category, defect, _generator(seed, index, category, split, name), size)
    folder = root / category / split / name
    Image.fromarray(image).save(folder / f"{index:03d}.png", compress_level=1)
    if defect is not None:
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            root / category / "ground_truth" / name / f"{index:03d}_mask.png", compress_level=1
        )


def _make_folders(root: Path, categories: Iterable[str]) -> None:
    for cat in categories:
        per_defect = [f"{parent}/{d}" for d in DEFECTS[cat] for parent in ("test", "ground_truth")]
        for folder in ["train/good", "test/good", *per_defect]:
            (root / cat / folder).mkdir(parents=True, exist_ok=True)


def _move_into_place(tmp: Path, root: Path, stamp: str) -> None:
    """Rename the finished ``tmp`` to ``root``, replacing an older synthetic dataset there."""
    for _ in range(3):
        try:
            tmp.rename(root)
            return
        except OSError:
            pass  # root exists (and is not empty)
        if _read_stamp(root) == stamp:
            return  # another process generated the same data meanwhile
        old = root.with_name(f".{root.name}-old-{os.getpid()}")
        try:
            root.rename(old)
        except FileNotFoundError:
            continue  # another process moved it away first
        shutil.rmtree(old, ignore_errors=True)
    raise DataError(f"{root}: could not replace the folder with the generated data; remove it and run again.")


def default_root() -> Path:
    """``<data root>/synthetic``, or the user's cache when the data root is read-only (``datasets.writable_dir``)."""
    return writable_dir(data_root() / "synthetic", "synthetic")


def generate(
    root: str | os.PathLike | None = None,
    categories: Iterable[str] = CATEGORIES,
    seed: int = 0,
    size: int = 256,
) -> Path:
    """Write the dataset to ``root/<category>/...`` in MVTec AD layout and a ``root/VERSION`` stamp.

    The data is written to a temporary folder beside ``root`` and renamed into place,
    so readers never see half a dataset. An existing ``root`` is replaced only if it
    is empty or an earlier synthetic dataset (it has a VERSION file).
    """
    root, categories = Path(root or default_root()), tuple(categories)
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {', '.join(CATEGORIES)}")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, not {size}")
    if root.is_dir() and any(root.iterdir()) and _read_stamp(root) is None:
        raise DataError(
            f"{root}: exists and is not a synthetic dataset (no VERSION file); refusing to replace it. "
            "Choose a new or empty folder."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        _make_folders(tmp, categories)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(lambda job: _write(tmp, job, seed, size), _jobs(categories)))
        stamp = _stamp(categories, seed, size)
        (tmp / "VERSION").write_text(stamp)
        _move_into_place(tmp, root, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return root


def ensure_synthetic(root: str | os.PathLike | None = None) -> Path:
    """The default synthetic dataset at ``root`` (default: ``default_root()``), generated only if missing or outdated."""
    root = Path(root or default_root())
    if _read_stamp(root) != _stamp(CATEGORIES, 0, 256):
        generate(root)
    return root
