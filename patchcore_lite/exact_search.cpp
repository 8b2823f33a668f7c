// Fused certified filter for k = 1 (derivation: exact_search.py, "Fused path"; tau_of mirrors it).
//
// An AVX2 register-blocked product in 16-bit integers (4 queries x 16 bank vectors; vpmaddwd
// multiplies two int16 columns and adds the pair in int32, vpaddd accumulates) gives the exact
// h = |a^_m|^2 - 2 a^_q.a^_m in registers; it is never stored. On this CPU it does 1.3x the
// multiply-adds per second of the fp32 FMA kernel it replaced, and integer sums need no rounding
// bound. The bank is in panel order (a k-d tree: near vectors share a panel); a coarse stage (the
// leading r1 columns and their residual) rules out most 4 x 16 blocks before the other columns, and a
// seed from each query's home panel makes tau tight from the start. One compare per 8 lanes against
// the query's tau keeps the pairs that may be the nearest; a
// lane under the running minimum also updates the seed (its double-precision distance bounds T_q,
// which tightens tau_q). Bank tiles of `tile` vectors stay in L2 while every query block passes over
// them. Finally pairs above the final tau are dropped and each kept pair gets s = sum (q - m)^2 in double.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

const double U32 = std::ldexp(1.0, -24);
const double HALF_SUB = std::ldexp(1.0, -150);
const float INF = std::numeric_limits<float>::infinity();

struct Consts {
  double sigma, eta, g64, step;
};

float round_up_f32(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, INF);
  return f;
}

// tau_q for an upper bound t of the best ref: the integer form of Filter.thresholds (exact_search.py,
// "Fused path"). pq = (e_q + e_max + delta_q + delta_max, |a^_q|^2).
int32_t tau_of(double t, const double* pq, const Consts& c) {
  const double tt = (t + HALF_SUB) / (1 - U32);
  const double reach = (c.sigma * std::sqrt(tt * (1 + c.eta)) + pq[0]) / c.step;
  const double tau = std::floor(reach * reach * (1 + 1e-12) + 1) - pq[1];  // + 1e-12, + 1: this formula's rounding
  return tau >= INT32_MAX - 1 ? INT32_MAX - 1 : (tau <= INT32_MIN + 1 ? INT32_MIN + 1 : static_cast<int32_t>(tau));
}

// sum (q_i - m_i)^2 in double (differences exact unless exponents are far apart; any order: the
// bound gamma64(D + 2) S does not depend on it). Four accumulators hide the add latency.
double sq_dist(const float* q, const float* m, int64_t d) {
  __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    for (int h = 0; h < 2; ++h) {
      const __m256 qa = _mm256_loadu_ps(q + i + 8 * h), ma = _mm256_loadu_ps(m + i + 8 * h);
      const __m256d lo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(qa)),
                                       _mm256_cvtps_pd(_mm256_castps256_ps128(ma)));
      const __m256d hi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(qa, 1)),
                                       _mm256_cvtps_pd(_mm256_extractf128_ps(ma, 1)));
      if (h == 0) {
        s0 = _mm256_fmadd_pd(lo, lo, s0);
        s1 = _mm256_fmadd_pd(hi, hi, s1);
      } else {
        s2 = _mm256_fmadd_pd(lo, lo, s2);
        s3 = _mm256_fmadd_pd(hi, hi, s3);
      }
    }
  }
  alignas(32) double part[4];
  _mm256_store_pd(part, _mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)));
  double s = (part[0] + part[1]) + (part[2] + part[3]);
  for (; i < d; ++i) {
    const double v = static_cast<double>(q[i]) - static_cast<double>(m[i]);
    s += v * v;
  }
  return s;
}

struct Pair {
  int64_t q, m;  // m: the bank vector's position in the panels (its index is perm[m])
  int32_t h;
  double s;  // sum (q - m)^2 in double, filled once the pair survives the final tau
};

struct Row {  // running state of one query
  int32_t best = INT32_MAX, tau = INT32_MAX - 1, tau1 = INT32_MAX - 1;  // tau1: the coarse stage's
  double t = std::numeric_limits<double>::infinity();
  int64_t count = 0;
  bool heavy = false;
};

struct Problem {
  const int32_t *A, *Bsq, *Bsq1;  // A: query rows as int16 pairs packed in int32; |a^_m|^2 (full, coarse)
  const int16_t* Bp;
  const int64_t* perm;  // panel position -> bank index
  const double* tree;  // the panel order's k-d tree: per split (coordinate, value, left, right); child < 0: a panel
  const float* lead;  // per query: its leading filter coordinates (the tree's), `nlead` of them
  int64_t ntree, nlead;
  const float *Q, *BK;
  const double* PQ;  // per query: extra reach and |a^_q|^2, full stage then coarse stage
  int64_t n, kp, kp1, d, panels;  // kp: column pairs; kp1: the coarse stage's (0: none)
  Consts c;
  int64_t cap;
};

// a new filter minimum of query i at panel position m: its exact distance may tighten T_q and both taus
void tighten(const Problem& P, int64_t i, int64_t m, Row& row) {
  const double t_up = round_up_f32(sq_dist(P.Q + i * P.d, P.BK + P.perm[m] * P.d, P.d) * (1 + 2 * P.c.g64));
  if (t_up < row.t) {
    row.t = t_up;
    row.tau = tau_of(t_up, P.PQ + i * 4, P.c);
    if (P.kp1) row.tau1 = tau_of(t_up, P.PQ + i * 4 + 2, P.c);
  }
}

// lanes of h (16 bank vectors from panel position j0) for query i that passed h <= tau: push, maybe new seed
void lanes(const Problem& P, const int32_t* h, unsigned mask, int64_t i, int64_t j0, Row& row,
           std::vector<Pair>& out) {
  while (mask) {
    const int l = __builtin_ctz(mask);
    mask &= mask - 1;
    if (h[l] > row.tau) continue;  // tau may have shrunk at an earlier lane
    const int64_t m = j0 + l;
    out.push_back({i, m, h[l], 0.0});
    if (++row.count > P.cap) {  // too many candidates: the caller re-filters this query
      row.heavy = true;
      row.tau = row.tau1 = INT32_MIN;
      return;
    }
    if (h[l] < row.best) {
      row.best = h[l];
      tighten(P, i, m, row);
    }
  }
}

inline __m256i bcast(const float* a) { return _mm256_castps_si256(_mm256_broadcast_ss(a)); }

// c[r][0..1] += the int16 dot products of query rows a + r kp with the panel b, column pairs [k0, k1)
__attribute__((always_inline)) inline void madd4(const float* a, int64_t kp, const __m256i* b, int64_t k0,
                                                 int64_t k1, __m256i& c00, __m256i& c01, __m256i& c10,
                                                 __m256i& c11, __m256i& c20, __m256i& c21, __m256i& c30,
                                                 __m256i& c31) {
  for (int64_t k = k0; k < k1; ++k) {
    const __m256i b0 = _mm256_load_si256(b + 2 * k), b1 = _mm256_load_si256(b + 2 * k + 1);
    __m256i x = bcast(a + k);
    c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(x, b0));
    c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(x, b1));
    x = bcast(a + kp + k);
    c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(x, b0));
    c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(x, b1));
    x = bcast(a + 2 * kp + k);
    c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(x, b0));
    c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(x, b1));
    x = bcast(a + 3 * kp + k);
    c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(x, b0));
    c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(x, b1));
  }
}

// lanes of h = sq - 2 c (16 int32 in two registers) with h <= tau, as a 16-bit mask
inline unsigned below(__m256i s0, __m256i s1, __m256i c0, __m256i c1, int32_t tau, __m256i& h0, __m256i& h1) {
  h0 = _mm256_sub_epi32(s0, _mm256_slli_epi32(c0, 1));
  h1 = _mm256_sub_epi32(s1, _mm256_slli_epi32(c1, 1));
  const __m256i t = _mm256_set1_epi32(tau);
  const unsigned above = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(h0, t))) |
                         (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(h1, t))) << 8);
  return ~above & 0xFFFFu;
}

// a panel near the query: down the k-d tree of the panel order (exact_search._panel_tree)
int64_t home_panel(const Problem& P, int64_t i) {
  if (P.ntree == 0) return 0;
  int64_t cur = 0;
  while (cur >= 0) {
    const double* node = P.tree + 4 * cur;
    cur = static_cast<int64_t>(P.lead[i * P.nlead + static_cast<int64_t>(node[0])] >= node[1] ? node[3] : node[2]);
  }
  return -cur - 1;
}

// Seeds before the scan: the home panels of the 4 rows (each near its query) give every row its first T_q,
// the exact distance of its filter-nearest vector there. Without them tau stays loose until the scan
// meets a near panel. Nothing is pushed: the scan visits these panels again.
void seed4(const Problem& P, int64_t i0, Row* rows) {
  const int64_t kp = P.kp, kp1 = P.kp1;
  const float* a = reinterpret_cast<const float*>(P.A + i0 * kp);
  alignas(32) int32_t h[4][16];
  for (int home = 0; home < 4 && i0 + home < P.n; ++home) {
    const int64_t p = home_panel(P, i0 + home);
    const __m256i* b = reinterpret_cast<const __m256i*>(P.Bp + p * kp * 32);
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
            c31 = c00;
    madd4(a, kp, b, 0, kp1 ? kp1 - 1 : 0, c00, c01, c10, c11, c20, c21, c30, c31);  // without the coarse residual
    madd4(a, kp, b, kp1, kp, c00, c01, c10, c11, c20, c21, c30, c31);
    const __m256i* sq = reinterpret_cast<const __m256i*>(P.Bsq + p * 16);
    const __m256i s0 = _mm256_load_si256(sq), s1 = _mm256_load_si256(sq + 1);
    const __m256i acc[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    for (int r = 0; r < 4; ++r) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(h[r]), _mm256_sub_epi32(s0, _mm256_slli_epi32(acc[r][0], 1)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(h[r] + 8), _mm256_sub_epi32(s1, _mm256_slli_epi32(acc[r][1], 1)));
    }
    for (int r = 0; r < 4 && i0 + r < P.n; ++r) {
      int l = 0;
      for (int j = 1; j < 16; ++j)
        if (h[r][j] < h[r][l]) l = j;
      Row& row = rows[r];
      if (h[r][l] == INT32_MAX || h[r][l] >= row.best) continue;  // padding, or no better than a seed so far
      row.best = h[r][l];
      tighten(P, i0 + r, p * 16 + l, row);
    }
  }
}

// 4 query rows (i0..i0+3, padded rows have tau = INT32_MIN) against panels [p0, p1): h = |a^_m|^2 -
// 2 a^_q.a^_m exactly, in int32 (vpmaddwd: two int16 products summed per lane; no partial sum can
// overflow, see the module docstring). With a coarse stage (kp1 > 0) the first kp1 - 1 pairs are the
// leading r1 coordinates and pair kp1 - 1 is the coarse residual: its bound h1 rules out most panels
// (a bank in panel order: near vectors share a panel) before the other pairs are computed.
void block4(const Problem& P, int64_t i0, int64_t p0, int64_t p1, Row* rows, std::vector<Pair>& out) {
  const int64_t kp = P.kp, kp1 = P.kp1;
  const float* a = reinterpret_cast<const float*>(P.A + i0 * kp);  // an int16 pair = one 32-bit broadcast
  alignas(32) int32_t h[16];
  __m256i h0, h1;
  for (int64_t p = p0; p < p1; ++p) {
    const __m256i* b = reinterpret_cast<const __m256i*>(P.Bp + p * kp * 32);
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
            c31 = c00;
    int64_t k = 0;
    if (kp1) {
      madd4(a, kp, b, 0, kp1 - 1, c00, c01, c10, c11, c20, c21, c30, c31);
      const __m256i* sq1 = reinterpret_cast<const __m256i*>(P.Bsq1 + p * 16);
      const __m256i s0 = _mm256_load_si256(sq1), s1 = _mm256_load_si256(sq1 + 1);
      const __m256i r0 = _mm256_load_si256(b + 2 * (kp1 - 1)), r1 = _mm256_load_si256(b + 2 * (kp1 - 1) + 1);
      const __m256i acc[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
      unsigned any = 0;
      for (int r = 0; r < 4; ++r) {
        const __m256i x = bcast(a + r * kp + kp1 - 1);
        any |= below(s0, s1, _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(x, r0)),
                     _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(x, r1)), rows[r].tau1, h0, h1);
      }
      if (!any) continue;  // no pair of this panel can be the nearest of any of the 4 queries
      k = kp1;
    }
    madd4(a, kp, b, k, kp, c00, c01, c10, c11, c20, c21, c30, c31);
    const __m256i* sq = reinterpret_cast<const __m256i*>(P.Bsq + p * 16);
    const __m256i s0 = _mm256_load_si256(sq), s1 = _mm256_load_si256(sq + 1);
    const __m256i acc[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    for (int r = 0; r < 4; ++r) {
      const unsigned mask = below(s0, s1, acc[r][0], acc[r][1], rows[r].tau, h0, h1);
      if (mask) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(h), h0);
        _mm256_store_si256(reinterpret_cast<__m256i*>(h + 8), h1);
        lanes(P, h, mask, i0 + r, p * 16, rows[r], out);
      }
    }
  }
}

}  // namespace

// aq (n4, kp) int32: each query's int16 filter row, two columns per int32, n4 a multiple of 4 (rows >= n
// are padding); bank_p (panels, kp, 16, 2) int16; bank_sq, bank_sq1 (panels*16,) int32 |a^_m|^2 of the
// full and the coarse stage (INT32_MAX in padding); perm (panels*16,) int64 panel position -> bank index;
// tree (T, 4) float64 the panel order's k-d tree, lead (n, L) fp32 each query's coordinates in it (a near
// panel is scanned first for a seed); kp1 the coarse stage's pairs (0: none);
// q (n, D), bank (M, D) fp32; per_query (n, 4) float64: extra
// reach (e_q + e_max + delta_q + delta_max) and |a^_q|^2, full stage then coarse stage. Returns qi, mi,
// s (double squared distance) of the candidate pairs, t (n,) upper bounds of each query's best ref,
// heavy (n,) bool: queries that passed `cap` candidates (their pairs are dropped).
std::vector<at::Tensor> filter_knn1(at::Tensor aq, at::Tensor bank_p, at::Tensor bank_sq, at::Tensor bank_sq1,
                                    at::Tensor perm, at::Tensor tree, at::Tensor lead, int64_t kp1, at::Tensor q,
                                    at::Tensor bank,
                                    at::Tensor per_query, double sigma, double eta, double g64, double step,
                                    int64_t tile, int64_t cap) {
  TORCH_CHECK(aq.scalar_type() == at::kInt && bank_p.scalar_type() == at::kShort && bank_sq.scalar_type() == at::kInt &&
              bank_sq1.scalar_type() == at::kInt && perm.scalar_type() == at::kLong &&
              tree.scalar_type() == at::kDouble && lead.scalar_type() == at::kFloat,
              "filter_knn1: int32 queries, int16 panels, int32 norms, int64 order");
  Problem P{aq.data_ptr<int32_t>(), bank_sq.data_ptr<int32_t>(), bank_sq1.data_ptr<int32_t>(),
            bank_p.data_ptr<int16_t>(), perm.data_ptr<int64_t>(), tree.data_ptr<double>(), lead.data_ptr<float>(),
            tree.size(0), lead.size(1), q.data_ptr<float>(), bank.data_ptr<float>(),
            per_query.data_ptr<double>(), q.size(0), aq.size(1), kp1, q.size(1), bank_p.size(0),
            {sigma, eta, g64, step}, cap};
  const int64_t n4 = aq.size(0), blocks = n4 / 4, ptile = std::max<int64_t>(1, tile / 16);
  std::vector<Row> rows(n4);
  for (int64_t i = P.n; i < n4; ++i) rows[i].tau = rows[i].tau1 = INT32_MIN;  // padding rows never match
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  std::vector<std::vector<Pair>> found(nth);
  for (auto& v : found) v.reserve(static_cast<size_t>(P.n / nth + 1) * 64);
  at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t th = t0; th < t1; ++th) {
      const int64_t b0 = blocks * th / nth, b1 = blocks * (th + 1) / nth;
      for (int64_t blk = b0; blk < b1; ++blk) seed4(P, blk * 4, rows.data() + blk * 4);
      for (int64_t p0 = 0; p0 < P.panels; p0 += ptile)  // bank tile in L2, every block of this thread
        for (int64_t blk = b0; blk < b1; ++blk)
          block4(P, blk * 4, p0, std::min(P.panels, p0 + ptile), rows.data() + blk * 4, found[th]);
      std::vector<Pair>& out = found[th];
      size_t kept = 0;
      for (const Pair& p : out)  // the final tau: earlier panels used looser ones
        if (!rows[p.q].heavy && p.h <= rows[p.q].tau) out[kept++] = p;
      out.resize(kept);
      for (Pair& p : out) {  // in this thread
        p.m = P.perm[p.m];
        p.s = sq_dist(P.Q + p.q * P.d, P.BK + p.m * P.d, P.d);
      }
    }
  });
  int64_t total = 0, pushed = 0;
  for (auto& v : found) total += static_cast<int64_t>(v.size());
  for (const Row& r : rows) pushed += r.count;
  at::Tensor qi = at::empty({total}, at::kLong), mi = at::empty({total}, at::kLong);
  at::Tensor s = at::empty({total}, at::kDouble), t = at::empty({P.n}, at::kDouble);
  at::Tensor heavy = at::empty({P.n}, at::kBool);
  for (int64_t i = 0; i < P.n; ++i) {
    t.data_ptr<double>()[i] = rows[i].t;
    heavy.data_ptr<bool>()[i] = rows[i].heavy;
  }
  int64_t o = 0;
  for (auto& v : found)
    for (const Pair& p : v) {
      qi.data_ptr<int64_t>()[o] = p.q;
      mi.data_ptr<int64_t>()[o] = p.m;
      s.data_ptr<double>()[o++] = p.s;
    }
  return {qi, mi, s, t, heavy, at::scalar_tensor(static_cast<double>(pushed), at::kDouble)};
}

std::vector<at::Tensor> catch_up_pairs(at::Tensor approx, at::Tensor r, double tol);  // lazy_greedy.cpp
std::vector<at::Tensor> pruned_pairs(at::Tensor low, at::Tensor low_t, at::Tensor rows, at::Tensor picks,
                                     at::Tensor ids, at::Tensor r, int64_t first, int64_t end, double bound_tol,
                                     double tol);  // lazy_greedy.cpp
int64_t hot_picks(at::Tensor x, at::Tensor xsq, at::Tensor ids, at::Tensor mindist, at::Tensor seen, at::Tensor picks,
                  int64_t count, double tau, int64_t compact_every, double picked);  // lazy_greedy.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("filter_knn1", &filter_knn1, "fused certified k=1 filter");
  m.def("catch_up_pairs", &catch_up_pairs, "the coreset's catch-up filter pass");
  m.def("pruned_pairs", &pruned_pairs, "the catch-up filter after a fused lower-bound pass");
  m.def("hot_picks", &hot_picks, "the coreset's greedy picks from the hot set");
}
