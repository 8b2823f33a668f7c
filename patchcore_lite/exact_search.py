"""Exact nearest-neighbour search with a certified low-dimensional filter (eq. 6 at the hardware limit).

PatchCore scores a test patch by its distance to the nearest memory-bank patch (Roth et al. 2022,
eq. 6: ``min_m ||m_test - m||_2``); eq. 7 needs its k nearest. Exact search costs 2 N M D flops.
This module does the same exact search with far fewer flops: a certified lower bound of every
distance, computed from the bank's leading principal components and one residual norm (K = r + 1
columns instead of D; r = 64 by default, the fastest in a sweep of r = 32..96 on the 288-pixel bank of
benchmarks/RESULTS.md: fewer columns leave so many candidates that re-ranking costs more than they save),
discards almost all bank vectors; the few left are re-ranked exactly.
``knn.NearestNeighbors(bank, "exact")`` is this index (opt-in: ``knn_backend="exact"``; the default stays faiss Flat, RESULTS.md says why).

Result definition (implementation independent)
-----------------------------------------------
For fp32 vectors q, m let S(q, m) = sum_d (q_d - m_d)^2 be the *exact* real squared distance and

    ref(q, m) = fl32(S(q, m)),  the float32 nearest to S (round to nearest, ties to even).

The answer for a query is its k bank vectors with the smallest (ref, index) pairs in lexicographic
order: a smaller ref first, equal refs by the lower bank index. Distances returned are
``sqrt(ref)`` rounded to float32 (IEEE sqrt, correctly rounded). This depends on no summation
order, BLAS, thread count or SIMD width: ``reference_search`` (brute force) and
``ExactKNN.search`` return identical bits. faiss ``IndexFlatL2`` computes |q|^2 + |m|^2 - 2 q.m
in fp32 sgemm; its squared distances differ from ref by cancellation error (measured in
benchmarks/RESULTS.md), and where two neighbours are that close it may return the other one.

ref is computed (``exact_sq``) as s = sum fl64(q_d - m_d)^2 in float64; |s - S| <= g S with
g = gamma64(D + 2). If fl32(s (1 - 2g)) == fl32(s (1 + 2g)) then fl32(S) is that value (rounding is
monotone); otherwise (about once in 10^7 pairs, and always for the hand-made midpoint cases in
the tests) S is summed exactly in integers (every fp32 is an integer multiple of 2^-149) and
rounded to fp32 by hand: no double rounding.

Search: filter, certify, re-rank
--------------------------------
Notation: u = 2^-24 (fp32 unit roundoff), u_b = 2^-8 (bfloat16), gamma_n = n u / (1 - n u);
TINY = 2^-126 covers underflow (and flush-to-zero) of any single fp32 operation.

1. Filter space. a(x) = fl32(sigma [y_1..y_r, rho]) with y = U^T (x - mu) computed in float64,
   rho = |(y_{r+1}, ..., y_D)|, U the bank's PCA basis (float64, D x D, nearly orthogonal:
   ||U^T U - I||_2 <= eta, eta measured), mu the bank mean, sigma a power of two that brings
   the largest |a| near 1 (exact scaling). K = r + 1 columns. With exact reals
   a*(x) = sigma [y*_{1..r}, rho*] (y* = U^T (x - mu) exactly):
       |U^T (q - m)|^2 = sum_{i<=r} (y*_i(q) - y*_i(m))^2 + |y*_{>r}(q) - y*_{>r}(m)|^2
                       >= |a*(q) - a*(m)|^2 / sigma^2                (reverse triangle inequality)
   and |U^T z|^2 <= (1 + eta) |z|^2, so   S(q, m) >= |a*(q) - a*(m)|^2 / (sigma^2 (1 + eta)).
   The "full" filter is the same with U = I, r = D (no residual, eta = 0).
   Representation error: |a(x) - a*(x)| <= e(x) := 1.01 sigma (1 + eta) (u + kappa64) |x - mu|
   (u: rounding to fp32; kappa64 = 4 (D + 2) sqrt(D) 2^-53: the float64 centring, product and
   residual norm).

2. Filter product. h = fl32(nm - 2 A_q A_m^T) by one GEMM (``addmm``), nm = fl32(|a_m|^2).
   Any summation order, blocking or FMA: |nm - |a_m|^2| <= gamma_K |a_m|^2 and
   |h - (nm - 2 a_q.a_m)| <= gamma_{K+1} (|nm| + 2 |a_q||a_m|), hence with G* = |a(q) - a(m)|^2
       |h + |a_q|^2 - G*| <= E_G := 2 gamma_{K+2} (|a_q| + |a_m|)^2 + (4K + 8) TINY.
   bfloat16 filter (inputs rounded to bf16, products exact in fp32, fp32 accumulation, output
   rounded to bf16, then nm - 2p in fp32):
       E_G := (8 u_b + 2 gamma_{2K+4}) (|a_q| + |a_m|)^2 + (4K + 8) TINY.
   (int8 with per-vector scales is the same shape: |dq.m| <= |dq||m| + |q||dm| + |dq||dm| with
   the stored quantisation residual norms; not built: no faster than fp32 on AVX2 CPUs.)

3. Candidate rule. T_q = the k-th smallest ref over any k distinct bank vectors (we take the k
   with the smallest h, and compute their ref exactly) is >= the k-th smallest ref over the bank.
   m can be in the answer only if ref(q, m) <= T_q. Since ref >= S (1 - u) - 2^-150:
       ref <= T_q  =>  S <= T' := (T_q + 2^-150) / (1 - u)
                   =>  |a*(q) - a*(m)| <= sigma sqrt(T' (1 + eta))
                   =>  |a(q) - a(m)| <= R_q := sigma sqrt(T' (1 + eta)) + e(q) + e_max
                   =>  h <= tau_q := R_q^2 + E_G(|a_q|, A_max) - |a_q|^2,
   with e_max, A_max the bank's largest e(m), |a_m|. tau_q is computed in float64, widened by
   1e-12 relative and rounded up to fp32, so h <= tau_q (an exact fp32 comparison) keeps every m
   with ref(q, m) <= T_q: every member of the true top-k, and every vector tied with it.
   This is "lower bound could beat the best upper bound": T_q is an upper bound of the k-th
   best ref, and the filter gives a certified lower bound of each ref.

4. Re-rank. Candidates get fp32 distances in the difference form F = fl32(sum (q_d - m_d)^2),
   |F - S| <= gamma_{D+2} S + (2D + 2) TINY (no cancellation: relative to S itself), hence
   ref in [lo, hi]; survivors: lo <= min(T_q, k-th smallest hi). Survivors (usually 1 or 2 per
   query) get ref exactly (``exact_sq``) and the k smallest (ref, index) are returned.

Fused path (k = 1, AVX2 + a C++ compiler: ``exact_search.cpp``, built once by torch.utils.cpp_extension):
the filter product runs in 16-bit integers, exactly. With a power-of-two step s such that the bank's
largest |a_m| / s is at most 2^13, a^(x) = round(a(x) / s) (an integer vector, int16) and
delta(x) = |a(x) - s a^(x)| (exact in float64: a(x) / s and its distance to the grid are exact;
only the final norm rounds, widened by 1e-12). The kernel computes h = |a^_m|^2 - 2 a^_q.a^_m in
int32 (AVX2 vpmaddwd: two int16 products added per lane, then vpaddd), without any rounding: a query
is sent to the kernel only if |a^_q| <= 2^14 (by |a_q| <= sigma sqrt(1 + eta) |q - mu|, so up to about
twice the bank's largest spread; farther queries take the torch ops), and then every partial sum
of the dot product is at most |a^_q| |a^_m| < 2^28 by Cauchy-Schwarz on the terms summed so far,
|h| < 2^29: nothing overflows. By the triangle inequality
    |a*(q) - a*(m)| <= s |a^_q - a^_m| + delta(q) + delta(m) + e(q) + e(m),
so step 3's chain gives, with R'_q = R_q + delta(q) + delta_max (delta_max the bank's largest),
    ref <= T_q  =>  |a^_q - a^_m|^2 = h + |a^_q|^2 <= (R'_q / s)^2
                =>  h <= tau_q := floor((R'_q / s)^2 (1 + 1e-12) + 1) - |a^_q|^2
(float64, widened for its own rounding; an integer comparison). No product rounding enters the
bound at all, which is what lets a low-precision product stay exact here: int16 takes the place of
the bf16 / int8 filters of stage 2 on CPUs without AVX512-BF16 or VNNI, at 1.3x the fp32 FMA rate
(4 queries x 16 bank vectors per register block, h never leaves the registers); one compare per
8 lanes against tau_q records candidates. T_q is not known in advance: the running argmin of h is
the seed, its distance s in double gives T_q <= round_up_f32(s (1 + 2 g)) (an upper bound of its
ref, no exact rounding needed), tau_q shrinks as seeds improve, and pairs recorded with an earlier,
looser tau are dropped at the end. Kept pairs get s in double; stage 4 then works on s
(|s - S| <= g S, g = gamma64(D + 2)) instead of an fp32 sum. Without the kernel (no compiler, no
AVX2, k > 1) the same stages run as torch ops, with the fp32 or bf16 product of stage 2: exact, slower.

Coarse stage (``coarse_dim`` r1 = 24 of the PCA filter's r = 64): a1(x) = sigma [y_1..y_r1, |y_{>r1}|]
is the same filter with r1 components, so step 3's chain holds for it with its own delta and
|a^|^2 (tau1_q); the kernel rows hold a^_1..a^_r1, then a1's residual, then a^_r1+1..a^_K, and a
4 x 16 block computes the r1 + 1 coarse columns first. If no pair of the block passes tau1 (no
bank vector there can be any of the 4 queries' nearest, given T_q) the other columns are skipped.
That only pays if a panel of 16 holds near vectors: the bank is scanned in the order of a k-d tree
on the 8 leading coordinates (``_panel_tree``, leaves = panels; about 2/3 of the blocks are then
skipped on the MTD bank), and each query first takes a seed T_q from its home panel (the tree's leaf
for it), so tau is tight from the start. Order, stages and seeds change which pairs are looked at,
never the answer: every pair that can satisfy ref <= T_q passes both tests.

Queries with more than ``heavy_fraction`` of the bank as candidates (far from the bank: the
PCA bound is weak there) are re-filtered with the full filter (same rule, r = D), so the cost
never exceeds about one fp32 GEMM plus the reduced one; the fused path first probes 1/32 of a chunk
and, if more than half of it is heavy, filters the chunk in full space directly. Inputs whose norms could overflow fp32
squares skip the fp32 stage 4 test (all candidates go to float64). Results never depend on
the path taken.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

U32 = 2.0**-24
U64 = 2.0**-53
UBF16 = 2.0**-8
TINY = 2.0**-126  # any fp32 operation that underflows (or is flushed to zero) errs by at most this
HALF_SUB = 2.0**-150  # half the smallest fp32 subnormal: fl32 rounding's absolute error
SAFE_SQ = 1e36  # fp32 squares of sums below this cannot overflow
TREE_DIMS = 8  # the panel order splits along this many leading filter coordinates
Q_NORM_BITS = 14  # the kernel's int16 filter rows have norms <= 2^14: no int32 sum can overflow


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error bound of n roundings."""
    return n * u / (1 - n * u)


# ---- the reference distance ---------------------------------------------------------


def exact_sq(q: Tensor, m: Tensor, block: int = 8192) -> Tensor:
    """ref(q_i, m_i) = fl32(exact sum_d (q_id - m_id)^2) for row pairs of two (P, D) fp32 tensors."""
    out = torch.empty(len(q), dtype=torch.float32)
    g = 2 * gamma(q.shape[1] + 2, U64)
    for s in range(0, len(q), block):
        d = q[s : s + block].double() - m[s : s + block].double()
        ssum = (d * d).sum(dim=1)
        lo, hi = (ssum * (1 - g)).float(), (ssum * (1 + g)).float()
        out[s : s + block] = lo
        for i in torch.nonzero(lo != hi).view(-1).tolist():  # rare: S within g of an fp32 midpoint
            out[s + i] = _exact_int_sq(q[s + i], m[s + i])
    return out


def _exact_int_sq(q: Tensor, m: Tensor) -> float:
    """fl32 of the exact squared distance, summed in Python integers (units of 2^-149)."""
    qi = [int(v * 2.0**149) for v in q.double().tolist()]  # exact: fp32 values are k * 2^-149
    mi = [int(v * 2.0**149) for v in m.double().tolist()]
    return _round_to_f32(sum((a - b) * (a - b) for a, b in zip(qi, mi)), -298)


def _round_to_f32(t: int, exp: int) -> float:
    """The float32 nearest to t * 2^exp (t >= 0 an int), ties to even, as a Python float."""
    if t == 0:
        return 0.0
    shift = max(t.bit_length() - 24, -149 - exp)  # keep 24 significant bits, ulp >= 2^-149
    if shift <= 0:
        return math.ldexp(t, exp)
    mant, rem, half = t >> shift, t & ((1 << shift) - 1), 1 << (shift - 1)
    if rem > half or (rem == half and mant & 1):
        mant += 1
    return float(np.float32(math.ldexp(mant, exp + shift)))


def reference_search(bank: Tensor, queries: Tensor, k: int = 1, chunk: int = 64,
                     squared: bool = False) -> tuple[Tensor, Tensor]:
    """Brute force by the definition: ref for every pair, k smallest (ref, index). Slow; for tests."""
    bank, queries = _as_f32(bank), _as_f32(queries)
    n, mlen = len(queries), len(bank)
    dist, idx = torch.empty(n, k), torch.empty(n, k, dtype=torch.long)
    for s in range(0, n, chunk):
        c = queries[s : s + chunk]
        qi = torch.arange(len(c)).repeat_interleave(mlen)
        mi = torch.arange(mlen).repeat(len(c))
        ref = exact_sq(c[qi], bank[mi])
        d, i = _select_topk(qi, mi, ref, len(c), k)
        dist[s : s + chunk], idx[s : s + chunk] = d, i
    return (dist if squared else dist.sqrt()), idx


def _select_topk(qi: Tensor, mi: Tensor, ref: Tensor, n: int, k: int) -> tuple[Tensor, Tensor]:
    """Per query, the k smallest (ref, index) pairs: (n, k) refs and indices. Needs >= k pairs each."""
    # ref >= 0 fp32: its bit pattern orders like the value; (bits, index) is one unique int64 key.
    key = (ref.view(torch.int32).long() << 32) | mi
    order = torch.sort(key, stable=True).indices
    order = order[torch.sort(qi[order], stable=True).indices]
    pos = _positions(qi[order], n)
    take = order[pos < k]
    if len(take) != n * k:
        raise AssertionError("fewer than k candidates for a query: the filter bound is broken")
    return ref[take].view(n, k), mi[take].view(n, k)


def _positions(sorted_qi: Tensor, n: int) -> Tensor:
    """Rank of each entry inside its query's run of a query-sorted list."""
    counts = torch.bincount(sorted_qi, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(len(sorted_qi)) - starts[sorted_qi]


def _kth_smallest(qi: Tensor, values: Tensor, n: int, k: int) -> Tensor:
    """Per query, the k-th smallest of its values (inf where it has fewer than k)."""
    out = torch.full((n,), math.inf, dtype=values.dtype)
    if k == 1:
        return out.scatter_reduce_(0, qi, values, "amin")
    order = torch.sort(values, stable=True).indices
    order = order[torch.sort(qi[order], stable=True).indices]
    hit = order[_positions(qi[order], n) == k - 1]
    out[qi[hit]] = values[hit]
    return out


def _as_f32(x: Tensor | np.ndarray) -> Tensor:
    x = torch.as_tensor(x).float().contiguous()
    if x.dim() != 2 or not torch.isfinite(x).all():
        raise ValueError("expected a finite 2-D array")
    return x


# ---- CPU detection and the compiled kernel -------------------------------------------------


def cpu_support() -> dict[str, bool]:
    """What this CPU offers, by torch's own cpuinfo probes: AVX2 (the fused kernel), bf16/AMX/VNNI."""
    probe = {name: getattr(torch.cpu, f"_is_{name}_supported", lambda: False)()
             for name in ("avx512_bf16", "amx_tile", "vnni", "avx512")}
    probe["avx2"] = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return probe


# One build per checkout: torch rebuilds an extension whenever its sources' paths change, so two
# checkouts sharing one name would rebuild it (a minute) each time the other had run.
KERNEL_NAME = "patchcore_lite_kernels_" + hashlib.sha256(str(Path(__file__).resolve().parent).encode()).hexdigest()[:10]
_KERNEL: dict[str, object] = {}  # "module": the loaded extension, or None where it cannot be built


def fused_kernel() -> object | None:
    """The package's compiled kernels: the k = 1 filter (``exact_search.cpp``) and the coreset's catch-up
    filter, lower-bound pass and hot-set loop (``lazy_greedy.cpp``), built at first use and cached by torch
    (about a minute, once per checkout);
    None, with one warning line, where the CPU lacks AVX2 or no compiler works."""
    if "module" not in _KERNEL:
        _KERNEL["module"] = _build_kernel()
    return _KERNEL["module"]


def _build_kernel() -> object | None:
    if not cpu_support()["avx2"]:
        reason = f"this CPU reports {torch.backends.cpu.get_cpu_capability()}, the kernel needs AVX2 and FMA"
    else:
        try:
            log = logging.getLogger("torch.utils.cpp_extension")
            level, _ = log.level, log.setLevel(logging.ERROR)  # its import says "No CUDA runtime is found"
            from torch.utils.cpp_extension import get_default_build_root, load

            log.setLevel(level)

            root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())  # + py3xx_cpu/
            if not any(root.glob(f"{KERNEL_NAME}/*.so")) and not any(root.glob(f"*/{KERNEL_NAME}/*.so")):
                print("patchcore_lite: compiling its AVX2 kernels (exact search, coreset; once per checkout, "
                      "about a minute)", file=sys.stderr)
            here = Path(__file__).parent
            return load(KERNEL_NAME, [str(here / "exact_search.cpp"), str(here / "lazy_greedy.cpp")],
                        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as exc:  # no compiler, no ninja, no headers: the torch-ops path is just as exact
            last = (str(exc).strip().splitlines() or [""])[-1]
            reason = f"it could not be compiled: {type(exc).__name__}: {last}"
    warnings.warn(f"patchcore_lite: fused AVX2 kernel unavailable ({reason}); exact search and coreset use "
                  "torch ops (identical results, slower: install a C++ compiler and ninja for the fast path)",
                  RuntimeWarning, stacklevel=3)
    return None


# ---- the filter ---------------------------------------------------------------------


@dataclass
class Filter:
    """A certified lower-bound space: bank rows a(m) (M, K) and the bound constants."""

    mu: Tensor  # (D,) float64
    basis: Tensor | None  # (D, D) float64, None = identity
    r: int  # leading coordinates kept; a residual norm follows unless r == D
    eta: float  # ||U^T U - I||_2 bound
    sigma: float  # power-of-two scale
    precision: str  # "fp32" or "bf16"
    kappa: float = 0.0  # relative representation error of a(x), per |x - mu|
    bank_a: Tensor = field(default=None)  # (M, K) fp32 (bf16 copy in bank_low)
    bank_low: Tensor | None = None
    bank_sq: Tensor = field(default=None)  # (M,) fp32 computed |a_m|^2
    a_max: float = 0.0
    e_max: float = 0.0
    r1: int = 0  # the kernel's coarse stage: the r1 leading coordinates and their residual (0: none)
    step: float = 1.0  # the kernel's int16 grid: a^ = round(a / step), power of two
    bank_q: Tensor = field(default=None)  # (M, 2 kp) int16 kernel rows (``quantize``)
    bank_qsq: Tensor = field(default=None)  # (M, 2) int32 |a^_m|^2, full and coarse stage
    d_max: Tensor = field(default=None)  # (2,) float64 the bank's largest delta, full and coarse stage

    @property
    def k_cols(self) -> int:
        return self.r + (self.r < len(self.mu))

    @property
    def kp1(self) -> int:
        """The kernel's coarse stage in int16 column pairs (0: none)."""
        return self.r1 // 2 + 1 if self.r1 else 0

    def project(self, x: Tensor, coarse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """a(x) fp32 (n, K), e(x) (n,) and |a(x)| (n,) float64. ``coarse``: a K+1-th column, the coarse
        stage's residual sigma |y_{>r1}| (its bound: the same e(x))."""
        c = x.double() - self.mu
        y = c if self.basis is None else c @ self.basis
        parts = [y[:, : self.r]]
        if self.r < y.shape[1]:
            parts.append(y[:, self.r :].norm(dim=1, keepdim=True))
        if coarse and self.r1:
            parts.append(y[:, self.r1 :].norm(dim=1, keepdim=True))
        a = (torch.cat(parts, 1) * self.sigma).float()
        e = c.norm(dim=1) * self.kappa
        return a, e, a[:, : self.k_cols].double().norm(dim=1)

    def quantize(self, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The kernel's rows of a = ``project(x, coarse=True)``: a^ = round(a / step) as int16 column pairs,
        [a^_1 .. a^_r1, the coarse residual's a^, 0, a^_r1+1 .. a^_K] (without a coarse stage a^_1 .. a^_K),
        zero-padded to 2 kp columns; per stage (full, coarse) |a^|^2 and delta = |a - step a^|, (n, 2)
        float64 (a / step and a / step - a^ are exact; the norm is widened for its own rounding). Rows
        must fit (``fits``): |a^| <= 2^14."""
        kk, r1 = self.k_cols, self.r1
        scaled = a.double() / self.step
        q = torch.round(scaled)
        err, sq = (scaled - q) ** 2, q * q  # sq: exact, integers far below 2^53
        coarse = list(range(r1)) + [kk] if r1 else list(range(kk))
        delta = torch.stack([err[:, :kk].sum(1), err[:, coarse].sum(1)], 1).sqrt() * self.step * (1 + 1e-12)
        nq = torch.stack([sq[:, :kk].sum(1), sq[:, coarse].sum(1)], 1)
        if len(q) and float(nq.max()) > 2.0 ** (2 * Q_NORM_BITS):
            raise AssertionError("a filter row outside the kernel's int16 range: fits() is broken")
        zero = torch.zeros(len(q), 1, dtype=q.dtype)
        parts = [q[:, :r1], q[:, kk:], zero, q[:, r1:kk]] if r1 else [q]
        rows = torch.cat(parts + [zero] * (sum(p.shape[1] for p in parts) % 2), 1)
        return rows.to(torch.int16), nq, delta

    def fits(self, spread: Tensor) -> Tensor:
        """Which queries the kernel takes: |a^_q| <= 2^14, by |a_q| <= sigma sqrt(1 + eta) |q - mu| (1 + 1e-6)
        (fp32 and float64 rounding included) and |a^_q| <= |a_q| / step + sqrt(K) / 2. ``spread``: |q - mu|."""
        reach = spread * (self.sigma * math.sqrt(1 + self.eta) * (1 + 1e-6) / self.step)
        return reach + math.sqrt(self.k_cols) / 2 <= 2.0**Q_NORM_BITS

    def products(self, a_q: Tensor) -> Tensor:
        """h = |a_m|^2 - 2 a_q . a_m, (n, M) fp32, by one matrix product."""
        if self.precision == "bf16":
            p = (a_q.bfloat16() @ self.bank_low.T).float()
            return self.bank_sq - 2 * p
        return torch.addmm(self.bank_sq, a_q, self.bank_a.T, alpha=-2)

    def error(self, a_norm: Tensor) -> Tensor:
        """E_G for each query against the worst bank vector, float64."""
        kk = self.k_cols
        rel = 8 * UBF16 + 2 * gamma(2 * kk + 4) if self.precision == "bf16" else 2 * gamma(kk + 2)
        return rel * (a_norm + self.a_max) ** 2 + (4 * kk + 8) * TINY

    def thresholds(self, t_sq: Tensor, a_norm: Tensor, e_q: Tensor) -> Tensor:
        """tau_q: h > tau_q proves ref(q, m) > t_sq (fp32, rounded up)."""
        t = (t_sq.double() + HALF_SUB) / (1 - U32)
        reach = self.sigma * torch.sqrt(t * (1 + self.eta)) + e_q + self.e_max
        tau = reach**2 + self.error(a_norm) - a_norm**2
        tau = tau + 1e-12 * (reach**2 + a_norm**2) + TINY  # float64 rounding of this very formula
        return _round_up_f32(tau)


def _round_up_f32(x: Tensor) -> Tensor:
    """The smallest fp32 >= each float64 value."""
    f = x.float()
    low = f.double() < x
    return torch.where(low, torch.nextafter(f, torch.tensor(math.inf)), f)


def build_filter(bank: Tensor, r: int | None, precision: str, r1: int = 0) -> Filter:
    """PCA filter with r leading components and one residual norm (r None or >= D: full space); r1 > 0
    (even, < r): the kernel's coarse stage."""
    b64 = bank.double()
    mu = b64.mean(dim=0)
    d = bank.shape[1]
    if r is None or r >= d:
        basis, r, eta = None, d, 0.0
    else:
        c = b64 - mu
        _, vecs = torch.linalg.eigh(c.T @ c)
        basis = vecs.flip(1).contiguous()
        dev = basis.T @ basis - torch.eye(d, dtype=torch.float64)
        eta = float(dev.norm()) * (1 + 1e-6) + 4 * d * d * U64  # Frobenius >= spectral, + its own rounding
    kappa64 = 4 * (d + 2) * math.sqrt(d) * U64
    f = Filter(mu, basis, r, eta, 1.0, precision, r1=r1 if 0 < r1 < r else 0)
    a, _, a_norm = f.project(bank)  # sigma = 1 pass to pick the scale
    spread = float(a_norm.max())  # 0 for a one-vector (or all-equal) bank
    f.sigma = 2.0 ** -min(100, max(-100, math.ceil(math.log2(spread)))) if spread > 0 else 1.0
    f.kappa = 1.01 * f.sigma * (1 + eta) * (U32 + kappa64)
    a_ext, e, a_norm = f.project(bank, coarse=True)
    a = a_ext[:, : f.k_cols]
    f.bank_a, f.bank_sq = a.contiguous(), (a * a).sum(dim=1)
    f.bank_low = a.bfloat16().contiguous() if precision == "bf16" else None
    f.a_max, f.e_max = float(a_norm.max()), float(e.max())
    # the bank on a grid of 2^13 steps per largest norm, queries up to 2^14 (module docstring, "Fused path")
    f.step = 2.0 ** (math.ceil(math.log2(f.a_max)) - Q_NORM_BITS + 1) if f.a_max > 0 else 1.0
    f.bank_q, nq, delta = f.quantize(a_ext)
    f.bank_qsq, f.d_max = nq.to(torch.int32), delta.amax(dim=0)
    return f


# ---- the index ----------------------------------------------------------------------


@dataclass
class SearchStats:
    """What the last search did."""

    path: str = ""
    candidates: list[Tensor] = field(default_factory=list)  # per-query counts after the filter
    heavy: int = 0  # queries re-filtered in the full space
    survivors: int = 0  # pairs whose ref was computed exactly (stage 5)
    pushed: int = 0  # fused kernel: pairs recorded before the final threshold
    seconds: float = 0.0


class ExactKNN:
    """Exact k-NN (definition: module docstring) over a bank (M, D), fp32.

    ``reduce_dim``: PCA coordinates in the filter (None: the plain full-space filter). ``precision``:
    the torch-ops filter's product (k > 1, or no kernel): "fp32", "bf16" (only sensible with
    AVX512-BF16/AMX), or "auto" (bf16 if the CPU has it *and* a timing probe finds it faster, else
    fp32). ``fused``: the int16 AVX2 kernel for k = 1 where it builds; ``coarse_dim``: its coarse stage
    (module docstring; ignored unless below ``reduce_dim``).
    """

    def __init__(self, bank: Tensor | np.ndarray, reduce_dim: int | None = 64, precision: str = "auto",
                 heavy_fraction: float = 1 / 16, chunk_elems: int = 1 << 23, pair_block: int = 16384,
                 fused: bool = True, tile: int = 512, probe_limit: float = 0.5, coarse_dim: int = 24):
        self.bank = _as_f32(bank)
        if len(self.bank) == 0:
            raise ValueError("empty bank")
        if torch.get_float32_matmul_precision() != "highest":
            raise RuntimeError("fp32 matmul precision must be 'highest' (reduced precision breaks the bound)")
        self.cpu = cpu_support()
        self.precision = self._choose(precision, reduce_dim)
        small = not reduce_dim or reduce_dim >= self.bank.shape[1]  # then the full-space filter alone
        self.reduced = None if small else build_filter(self.bank, reduce_dim, self.precision, coarse_dim // 2 * 2)
        self.full = build_filter(self.bank, None, self.precision)
        self.heavy_limit = max(1, int(heavy_fraction * len(self.bank)))
        self.chunk = max(1, chunk_elems // len(self.bank))
        self.pair_block = pair_block
        self.bank_norm_max = float(self.bank.double().norm(dim=1).max())
        self.stats = SearchStats()
        self.kernel = fused_kernel() if fused else None  # int16, whatever ``precision`` says
        self.tile, self.probe_limit = tile, probe_limit
        if self.kernel:  # one panel order for both filters, from the first filter's coordinates
            order, self.tree = _panel_tree((self.reduced or self.full).bank_a)
            self.panels = {id(f): _panels(f, order) for f in (self.reduced, self.full) if f is not None}

    # -- path choice
    def _choose(self, precision: str, reduce_dim: int | None) -> str:
        if precision in ("fp32", "bf16"):
            return precision
        if precision != "auto":
            raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
        if not (self.cpu["avx512_bf16"] or self.cpu["amx_tile"]):
            return "fp32"
        return "bf16" if _bf16_faster(self.bank.shape[1] if not reduce_dim else reduce_dim + 1) else "fp32"

    def describe(self) -> str:
        """Which path runs, e.g. "exact: certified PCA-64 filter + exact re-rank: int16 AVX2 kernel (k=1),
        fp32 torch ops (k>1); cpu: avx2"."""
        feats = ", ".join(k for k, v in self.cpu.items() if v) or "none"
        space = f"PCA-{self.reduced.r}" if self.reduced else "full-space"
        ops = f"{self.precision} torch ops"
        kern = f"int16 AVX2 kernel (k=1), {ops} (k>1)" if self.kernel else f"{ops} (no kernel)"
        return f"exact: certified {space} filter + exact re-rank: {kern}; cpu: {feats}"

    # -- search
    @torch.no_grad()
    def search(self, queries: Tensor | np.ndarray, k: int = 1, squared: bool = False) -> tuple[Tensor, Tensor]:
        """Distances (N, k) fp32 ascending (sqrt of ref; ref itself if ``squared``) and bank indices (N, k) int64."""
        start = time.perf_counter()
        queries = _as_f32(queries)
        if queries.shape[1] != self.bank.shape[1] or not 1 <= k <= len(self.bank):
            raise ValueError("bad query width or k")
        self.stats = SearchStats(path=self.describe())
        if len(queries) == 0:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        rows = max(self.chunk, 2048) if k == 1 and self.kernel is not None else self.chunk  # fused: no n x M
        parts = [self._search_chunk(c, k) for c in queries.split(rows)]
        self.stats.seconds = time.perf_counter() - start
        dist = torch.cat([p[0] for p in parts])
        return (dist if squared else dist.sqrt()), torch.cat([p[1] for p in parts])

    def _search_chunk(self, c: Tensor, k: int) -> tuple[Tensor, Tensor]:
        spread = (c.double() - self.full.mu).norm(dim=1)  # |q - mu| (both filters share mu)
        wild = self._overflow_rows(spread)
        if wild.any():  # filter vectors could overflow fp32: brute force by the definition (exact)
            return _by_rows(c, wild, lambda x: reference_search(self.bank, x, k, squared=True),
                            lambda x: self._search_chunk(x, k))
        if k == 1 and self.kernel is not None:
            fit = torch.stack([f.fits(spread) for f in (self.reduced, self.full) if f is not None]).all(dim=0)
            if fit.all():
                return self._search_fused(c)
            return _by_rows(c, fit, self._search_fused, lambda x: self._search_ops(x, k))  # far out: torch ops
        return self._search_ops(c, k)

    def _search_ops(self, c: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The filter as torch ops (any k, any precision)."""
        n = len(c)
        first = self.reduced or self.full
        qi, mi, t_sq, counts = self._filter(first, c, k, None)
        if first is self.reduced:
            heavy = counts > self.heavy_limit
            if heavy.any():  # far queries: the PCA bound is weak there, refilter in full space
                rows = torch.nonzero(heavy).view(-1)
                keep = ~heavy[qi]
                hq, hm, t_heavy, hcounts = self._filter(self.full, c[rows], k, t_sq[rows])
                qi, mi = torch.cat([qi[keep], rows[hq]]), torch.cat([mi[keep], hm])
                t_sq, counts = t_sq.clone(), counts.clone()
                t_sq[rows] = t_heavy
                counts[rows] = hcounts
                self.stats.heavy += len(rows)
        self.stats.candidates.append(counts)
        return self._rerank(c, qi, mi, t_sq, n, k)

    def _overflow_rows(self, spread: Tensor) -> Tensor:
        """Queries whose scaled filter vectors (or their squares) could leave the fp32 range (spread: |q - mu|)."""
        f = self.reduced or self.full
        reach = spread * f.sigma + f.a_max
        return ~(reach * reach < SAFE_SQ)

    def _search_fused(self, c: Tensor) -> tuple[Tensor, Tensor]:
        """k = 1 through the compiled kernel: candidates with double-precision distances s."""
        first, start, probe = self.reduced or self.full, 0, None
        if first is self.reduced and len(c) >= 256:  # probe: far queries make the PCA bound useless
            start = len(c) // 32
            probe = self._fused_filter(first, c[:start], self.heavy_limit)
            if probe[4].float().mean() > self.probe_limit:
                first, start, probe = self.full, 0, None
                self.stats.heavy += len(c)
        cap = self.heavy_limit if first is self.reduced else len(self.bank)
        qi, mi, s, t_sq, heavy, pushed = self._fused_filter(first, c[start:], cap)
        if probe is not None:  # the probe's rows are done: keep them
            qi = torch.cat([probe[0], qi + start])
            mi, s, t_sq, heavy = (torch.cat([a, b]) for a, b in zip(probe[1:5], (mi, s, t_sq, heavy)))
            pushed = pushed + probe[5]
        self.stats.pushed += int(pushed)
        if heavy.any():
            rows = torch.nonzero(heavy).view(-1)
            hq, hm, hs, ht, _, pushed = self._fused_filter(self.full, c[rows], len(self.bank))
            self.stats.pushed += int(pushed)
            qi, mi, s = torch.cat([qi, rows[hq]]), torch.cat([mi, hm]), torch.cat([s, hs])
            t_sq = t_sq.clone()
            t_sq[rows] = ht
            self.stats.heavy += len(rows)
        self.stats.candidates.append(torch.bincount(qi, minlength=len(c)))
        g = 2 * gamma(c.shape[1] + 2, U64)  # |s - S| <= g/2 S for any summation order
        lo = (s * (1 - g) * (1 - U32) - HALF_SUB) * (1 - 1e-12)
        hi = (s * (1 + g) * (1 + U32) + HALF_SUB) * (1 + 1e-12)
        thr = torch.minimum(_kth_smallest(qi, hi, len(c), 1), t_sq)
        alive = lo <= thr[qi]
        qi, mi = qi[alive], mi[alive]
        self.stats.survivors += len(qi)
        return _select_topk(qi, mi, exact_sq(c[qi], self.bank[mi]), len(c), 1)

    def _fused_filter(self, f: Filter, c: Tensor, cap: int) -> tuple[Tensor, ...]:
        a_q, e_q, _ = f.project(c, coarse=True)
        q, nq, delta = f.quantize(a_q)
        extra = e_q[:, None] + f.e_max + delta + f.d_max  # the reach's terms beyond sigma sqrt(T'(1 + eta))
        per_query = torch.stack([extra[:, 0], nq[:, 0], extra[:, 1], nq[:, 1]], 1).contiguous()
        q_pad = torch.zeros((len(c) + 3) // 4 * 4, q.shape[1], dtype=torch.int16)
        q_pad[: len(c)] = q
        bank_p, bank_sq, bank_sq1, perm = self.panels[id(f)]
        tree_f = self.reduced or self.full  # the panel tree's coordinates
        lead = (a_q if f is tree_f else tree_f.project(c)[0])[:, :TREE_DIMS].contiguous()
        return self.kernel.filter_knn1(q_pad.view(torch.int32), bank_p, bank_sq, bank_sq1, perm, self.tree, lead,
                                       f.kp1, c, self.bank, per_query,
                                       f.sigma, f.eta, gamma(c.shape[1] + 2, U64), f.step, self.tile, cap)

    def _filter(self, f: Filter, c: Tensor, k: int, t_sq: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Candidate pairs (qi, mi), the bound T_q (fp32) and candidates per query."""
        a_q, e_q, a_norm = f.project(c)
        h = f.products(a_q)
        seeds = h.argmin(dim=1, keepdim=True) if k == 1 else torch.topk(h, k, dim=1, largest=False).indices
        rows = torch.arange(len(c)).repeat_interleave(k)
        t_new = exact_sq(c[rows], self.bank[seeds.reshape(-1)]).view(len(c), k).amax(dim=1)
        t_sq = t_new if t_sq is None else torch.minimum(t_sq, t_new)
        mask = h <= f.thresholds(t_sq, a_norm, e_q)[:, None]
        qi, mi = torch.nonzero(mask, as_tuple=True)
        return qi, mi, t_sq, torch.bincount(qi, minlength=len(c))

    def _rerank(self, c: Tensor, qi: Tensor, mi: Tensor, t_sq: Tensor, n: int, k: int) -> tuple[Tensor, Tensor]:
        """Stage 4 (fp32 difference form, certified) and stage 5 (exact ref) on candidate pairs."""
        lo, hi = self._pair_bounds(c, qi, mi)
        thr = torch.minimum(_kth_smallest(qi, hi, n, k), t_sq.double())
        alive = lo <= thr[qi]
        qi, mi = qi[alive], mi[alive]
        self.stats.survivors += len(qi)
        ref = exact_sq(c[qi], self.bank[mi])
        return _select_topk(qi, mi, ref, n, k)

    def _pair_bounds(self, c: Tensor, qi: Tensor, mi: Tensor) -> tuple[Tensor, Tensor]:
        """[lo, hi] containing ref(q, m) for each pair, from an fp32 difference-form sum."""
        d = c.shape[1]
        q_norm_max = float(c.double().norm(dim=1).max()) if len(c) else 0.0
        if (q_norm_max + self.bank_norm_max) ** 2 >= SAFE_SQ:  # fp32 squares could overflow
            return torch.zeros(len(qi), dtype=torch.float64), torch.full((len(qi),), math.inf, dtype=torch.float64)
        f = torch.empty(len(qi), dtype=torch.float32)
        for s in range(0, len(qi), self.pair_block):
            diff = c.index_select(0, qi[s : s + self.pair_block])
            diff.sub_(self.bank.index_select(0, mi[s : s + self.pair_block]))
            f[s : s + self.pair_block] = diff.square_().sum(dim=1)
        g, absolute = gamma(d + 2), (2 * d + 2) * TINY
        f64 = f.double()
        s_lo = ((f64 - absolute) / (1 + g)).clamp_min(0)
        s_hi = (f64 + absolute) / (1 - g)
        lo = (s_lo * (1 - U32) - HALF_SUB) * (1 - 1e-12)
        hi = (s_hi * (1 + U32) + HALF_SUB) * (1 + 1e-12)
        return lo, hi


def _panel_tree(a: Tensor, leaf: int = 16, dims: int = TREE_DIMS) -> tuple[Tensor, Tensor]:
    """A bank order in which each panel of 16 holds near vectors (so the coarse stage rules out whole
    panels): median splits along the ``dims`` leading filter coordinates in turn, a k-d tree whose
    leaves are the panels. Returns the order and the tree (per split: coordinate, value, left and right
    child; a child < 0 is panel -child - 1): the kernel walks it down to a panel near each query and
    scans that one first, for a seed. Deterministic (stable sorts)."""
    order, nodes = [], []

    def split(ids: Tensor, depth: int) -> int:
        if len(ids) <= leaf:
            order.append(ids)
            return -len(order)
        dim = depth % min(dims, a.shape[1])
        ids = ids[torch.sort(a[ids, dim], stable=True).indices]
        half = max(leaf, len(ids) // 2 // leaf * leaf)
        node = len(nodes)
        nodes.append([dim, float(a[ids[half], dim]), 0, 0])
        nodes[node][2:] = split(ids[:half], depth + 1), split(ids[half:], depth + 1)
        return node

    split(torch.arange(len(a)), 0)
    return torch.cat(order), torch.tensor(nodes, dtype=torch.float64).view(-1, 4)


def _panels(f: Filter, order: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The bank's int16 rows, in ``order``, packed for the kernel: (P, kp, 16, 2) panels (16 vectors, a
    column pair each), |a^_m|^2 of the full and of the coarse stage (P * 16,) int32 each (the largest int32
    in the padding: it never passes) and the bank index of each panel position (padding: 0, never read)."""
    m, kk = f.bank_q.shape
    p = (m + 15) // 16
    a = torch.zeros(p * 16, kk, dtype=torch.int16)
    a[:m] = f.bank_q[order]
    sq = torch.full((p * 16, 2), torch.iinfo(torch.int32).max, dtype=torch.int32)
    sq[:m] = f.bank_qsq[order]
    perm = torch.zeros(p * 16, dtype=torch.long)
    perm[:m] = order
    panels = a.view(p, 16, kk // 2, 2).permute(0, 2, 1, 3).contiguous()
    return panels, sq[:, 0].contiguous(), sq[:, 1].contiguous(), perm


def _by_rows(c: Tensor, mask: Tensor, when: object, otherwise: object) -> tuple[Tensor, Tensor]:
    """Search the rows of c where mask holds with ``when``, the others with ``otherwise``; rows in order."""
    parts = [(rows, fn(c[rows])) for rows, fn in ((mask, when), (~mask, otherwise)) if rows.any()]
    k = parts[0][1][0].shape[1]
    d, i = torch.empty(len(c), k), torch.empty(len(c), k, dtype=torch.long)
    for rows, (dist, idx) in parts:
        d[rows], i[rows] = dist, idx
    return d, i


def _bf16_faster(kcols: int, n: int = 256, m: int = 8192) -> bool:
    """Timing probe: is a bf16 (n, K) x (K, m) product faster than fp32 here?"""
    a, b = torch.randn(n, kcols), torch.randn(m, kcols)

    def best(x: Tensor, y: Tensor) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            x @ y.T
            times.append(time.perf_counter() - t)
        return min(times)

    return best(a.bfloat16(), b.bfloat16()) < 0.8 * best(a, b)
