// The coreset's catch-up filter (lazy_greedy._filter_pairs, term for term), in one read of the filter
// product instead of the torch ops' passes (row minimum, compare, gather, compare, nonzero): each row is
// still in L1 when its pairs are collected. ``pruned_pairs`` first computes a cheaper lower bound
// (lazy_greedy._LowBound) in registers and evaluates the full filter only on the pairs it cannot rule out.
// Built with exact_search.cpp into one extension.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <limits>
#include <vector>

namespace {

float row_min(const float* row, int64_t m) {
  __m256 v = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) v = _mm256_min_ps(v, _mm256_loadu_ps(row + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float low = lanes[0];
  for (int k = 1; k < 8; ++k) low = lanes[k] < low ? lanes[k] : low;
  for (; j < m; ++j) low = row[j] < low ? row[j] : low;
  return low;
}

// Appends (i, col) for every value <= min(r + tol, min + 2 tol), if min < r + tol: the filter's selection.
void select_pairs(int64_t i, const float* vals, const int64_t* cols, int64_t m, float r, float tol1, float tol2,
                  std::vector<int64_t>& out) {
  const float low = row_min(vals, m), bound = r + tol1;
  if (!(low < bound)) return;
  const float near = low + tol2, thr = near < bound ? near : bound;
  const __m256 vt = _mm256_set1_ps(thr);
  int64_t j = 0;
  for (; j + 8 <= m; j += 8)
    for (int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(vals + j), vt, _CMP_LE_OQ)); mask;
         mask &= mask - 1) {
      const int64_t k = j + __builtin_ctz(mask);
      out.insert(out.end(), {i, cols ? cols[k] : k});
    }
  for (; j < m; ++j)
    if (vals[j] <= thr) out.insert(out.end(), {i, cols ? cols[j] : j});
}

// a . b over d floats, eight lanes (any summation order is inside the filter's bound).
float dot(const float* a, const float* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= d; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float s = 0;
  for (int l = 0; l < 8; ++l) s += lanes[l];
  for (; k < d; ++k) s += a[k] * b[k];
  return s;
}

// Rows of `found` (flattened (row, col) per thread, in thread order) as two int64 tensors.
std::vector<at::Tensor> gather_pairs(const std::vector<std::vector<int64_t>>& found) {
  int64_t total = 0;
  for (const auto& v : found) total += static_cast<int64_t>(v.size()) / 2;
  at::Tensor rows = at::empty({total}, at::kLong), cols = at::empty({total}, at::kLong);
  int64_t *ro = rows.data_ptr<int64_t>(), *co = cols.data_ptr<int64_t>();
  for (const auto& v : found)
    for (size_t k = 0; k < v.size(); k += 2) *ro++ = v[k], *co++ = v[k + 1];
  return {rows, cols};
}

// Runs body(thread, i) for rows i in [0, n), split in contiguous ranges, one per thread (rows ascending).
template <class F>
void over_rows(int64_t n, int64_t nth, F body) {
  at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t th = t0; th < t1; ++th)
      for (int64_t i = n * th / nth; i < n * (th + 1) / nth; ++i) body(th, i);
  });
}

int64_t threads(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n)); }

}  // namespace

// approx (n, m) fp32, r (n,) fp32. Row i takes part if min_j approx[i, j] < r[i] + tol; its pairs are
// the j with approx[i, j] <= min(r[i] + tol, min + 2 tol). Returns (rows, cols), row-major order.
std::vector<at::Tensor> catch_up_pairs(at::Tensor approx, at::Tensor r, double tol) {
  TORCH_CHECK(approx.dtype() == at::kFloat && approx.is_contiguous() && approx.dim() == 2, "approx: contiguous (n, m) fp32");
  TORCH_CHECK(r.dtype() == at::kFloat && r.is_contiguous() && r.numel() == approx.size(0), "r: contiguous (n,) fp32");
  const int64_t n = approx.size(0), m = approx.size(1), nth = threads(n);
  const float *a = approx.data_ptr<float>(), *rv = r.data_ptr<float>();
  const float tol1 = static_cast<float>(tol), tol2 = static_cast<float>(2 * tol);  // as torch casts the scalars
  std::vector<std::vector<int64_t>> found(nth);  // (row, col) flattened, rows ascending per thread
  over_rows(n, nth, [&](int64_t th, int64_t i) { select_pairs(i, a + i * m, nullptr, m, rv[i], tol1, tol2, found[th]); });
  return gather_pairs(found);
}

// A pair the lower bound could not rule out: its bound and its column.
struct Cand {
  float bound;
  int64_t j;
};

// Columns l of an 8-column block whose bound acc[l] is <= keep, as the set bits of an int.
inline int below(__m256 acc, float keep) {
  return _mm256_movemask_ps(_mm256_cmp_ps(acc, _mm256_set1_ps(keep), _CMP_LE_OQ));
}

// Appends the columns j0 + l of the set bits l of mask, with their bounds v[l].
inline void push_columns(const float* v, int mask, int64_t j0, std::vector<Cand>& js) {
  for (; mask; mask &= mask - 1) js.push_back({v[__builtin_ctz(mask)], j0 + __builtin_ctz(mask)});
}

// Lower bounds of R (1 or 4) rows a[q] (K floats) against columns [j0, j1) of bt (K rows, leading dimension
// ldb; j1 - j0 a multiple of 16), R x 16 at a time in registers; appends to js[q] the columns whose bound is
// <= keep[q].
template <int R>
inline void bound_rows(const float* const* a, int64_t K, const float* bt, int64_t ldb, int64_t j0, int64_t j1,
                       const float* keep, std::vector<Cand>* js) {
  for (int64_t j = j0; j < j1; j += 16) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    const float* b = bt + j;
    for (int64_t k = 0; k < K; ++k, b += ldb) {
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
      __m256 av = _mm256_broadcast_ss(a[0] + k);
      c00 = _mm256_fmadd_ps(av, b0, c00), c01 = _mm256_fmadd_ps(av, b1, c01);
      if constexpr (R == 4) {
        av = _mm256_broadcast_ss(a[1] + k);
        c10 = _mm256_fmadd_ps(av, b0, c10), c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(a[2] + k);
        c20 = _mm256_fmadd_ps(av, b0, c20), c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(a[3] + k);
        c30 = _mm256_fmadd_ps(av, b0, c30), c31 = _mm256_fmadd_ps(av, b1, c31);
      }
    }
    // Masks first, and the bounds stored before any push_back: a call while accumulators are live
    // makes GCC keep them in memory inside the loop above (half the speed).
    const __m256 acc[8] = {c00, c01, c10, c11, c20, c21, c30, c31};
    int mask[8], any = 0;
    for (int h = 0; h < 2 * R; ++h) any |= mask[h] = below(acc[h], keep[h / 2]);
    if (!any) continue;
    alignas(32) float v[8][8];
    for (int h = 0; h < 2 * R; ++h) _mm256_store_ps(v[h], acc[h]);
    for (int h = 0; h < 2 * R; ++h) push_columns(v[h], mask[h], j + 8 * (h % 2), js[h / 2]);
  }
}

// The catch-up filter after a lower-bound pass, fused: no product is stored. Point i (row ids[i] of low and
// rows) against picks first..end-1: the bound low[ids[i]] . low_t[:, j] (lazy_greedy._LowBound: within
// bound_tol below the pair's squared distance, so a pair above r[i] + bound_tol cannot lower r[i]) is
// computed in registers, 4 x 16 pairs at a time over column tiles that stay in L2; the pairs it cannot rule
// out get the full filter's value rows[ids[i]] . picks[j] (lazy_greedy._LazyGreedy.aug, pick_rows), and
// catch_up_pairs' selection runs on them. Returns (row i, column j - first) pairs, rows ascending (the
// order of a row's columns does not matter to the min-distances they update).
std::vector<at::Tensor> pruned_pairs(at::Tensor low, at::Tensor low_t, at::Tensor rows, at::Tensor picks,
                                     at::Tensor ids, at::Tensor r, int64_t first, int64_t end, double bound_tol,
                                     double tol) {
  TORCH_CHECK(low.dtype() == at::kFloat && low.is_contiguous() && low.dim() == 2, "low: contiguous (N, K) fp32");
  TORCH_CHECK(low_t.dtype() == at::kFloat && low_t.is_contiguous() && low_t.dim() == 2 && low_t.size(0) == low.size(1),
              "low_t: contiguous (K, S) fp32");
  TORCH_CHECK(rows.dtype() == at::kFloat && rows.is_contiguous() && rows.dim() == 2 && rows.size(0) == low.size(0),
              "rows: contiguous (N, D) fp32");
  TORCH_CHECK(picks.dtype() == at::kFloat && picks.is_contiguous() && picks.dim() == 2 && picks.size(1) == rows.size(1) &&
              picks.size(0) == low_t.size(1), "picks: contiguous (S, D) fp32");
  TORCH_CHECK(ids.dtype() == at::kLong && ids.is_contiguous() && ids.dim() == 1, "ids: contiguous (n,) int64");
  TORCH_CHECK(r.dtype() == at::kFloat && r.is_contiguous() && r.numel() == ids.numel(), "r: contiguous (n,) fp32");
  TORCH_CHECK(0 <= first && first <= end && end <= picks.size(0), "picks first..end out of range");
  const int64_t n = ids.numel(), m = end - first, K = low.size(1), ldb = low_t.size(1), d = rows.size(1);
  const int64_t nth = threads(n), tile = 512;  // 512 columns of K = 34 floats (BOUND_DIMS 32): 70 KiB, in L2
  const int64_t panel = 96;  // rows whose candidates are collected over all tiles, then re-ranked
  const float *lo = low.data_ptr<float>(), *bt = low_t.data_ptr<float>() + first, *p = rows.data_ptr<float>(),
              *c = picks.data_ptr<float>() + first * d, *rv = r.data_ptr<float>();
  const int64_t* id = ids.data_ptr<int64_t>();
  const float tol1 = static_cast<float>(tol), tol2 = static_cast<float>(2 * tol), btol = static_cast<float>(bound_tol);
  std::vector<float> keep(n);
  for (int64_t i = 0; i < n; ++i) keep[i] = rv[i] + btol;
  std::vector<std::vector<int64_t>> found(nth);
  at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
    std::vector<std::vector<Cand>> js(panel);  // one panel's candidates; the buffers are reused
    std::vector<float> v;
    std::vector<int64_t> cols;
    for (int64_t th = t0; th < t1; ++th)
      for (int64_t p0 = n * th / nth, end_th = n * (th + 1) / nth; p0 < end_th; p0 += panel) {
        const int64_t p1 = std::min(end_th, p0 + panel);
        for (auto& cs : js) cs.clear();
        for (int64_t j0 = 0; j0 < m; j0 += tile) {
          const int64_t j1 = std::min(m, j0 + tile), full = j0 + (j1 - j0) / 16 * 16;
          for (int64_t i = p0; i < p1; i += 4) {
            const int R = static_cast<int>(std::min<int64_t>(4, p1 - i));
            const float* a[4];
            for (int q = 0; q < R; ++q) a[q] = lo + id[i + q] * K;
            std::vector<Cand>* out = &js[i - p0];
            if (R == 4) bound_rows<4>(a, K, bt, ldb, j0, full, &keep[i], out);
            else for (int q = 0; q < R; ++q) bound_rows<1>(a + q, K, bt, ldb, j0, full, &keep[i + q], out + q);
            for (int q = 0; q < R; ++q)
              for (int64_t j = full; j < j1; ++j) {
                float s = 0;
                for (int64_t k = 0; k < K; ++k) s += a[q][k] * bt[k * ldb + j];
                if (s <= keep[i + q]) out[q].push_back({s, j});
              }
          }
        }
        // Full values: first of the pair with the smallest bound, then of the pairs whose bound does not
        // prove them above low + 2 tol (bound - bound_tol > low + 2 tol gives a squared distance above
        // low + 3 tol, so a full value above low + 2 tol: not selected, whatever comes after).
        for (int64_t i = p0; i < p1; ++i) {
          const std::vector<Cand>& cs = js[i - p0];
          v.clear(), cols.clear();
          if (cs.empty()) continue;
          const float* pi = p + id[i] * d;
          const auto best = std::min_element(cs.begin(), cs.end(), [](const Cand& x, const Cand& y) { return x.bound < y.bound; });
          float low = dot(pi, c + best->j * d, d);
          v.push_back(low), cols.push_back(best->j);
          for (auto cd = cs.begin(); cd != cs.end(); ++cd) {
            if (cd == best || cd->bound - btol > low + tol2) continue;
            v.push_back(dot(pi, c + cd->j * d, d)), cols.push_back(cd->j);
            low = std::min(low, v.back());
          }
          select_pairs(i, v.data(), cols.data(), static_cast<int64_t>(v.size()), rv[i], tol1, tol2, found[th]);
        }
      }
  });
  return gather_pairs(found);
}

// coreset.finish, op for op: (xsq - 2 dots) + csq, clamped at 0.
at::Tensor finish(const at::Tensor& dots, const at::Tensor& xsq, const at::Tensor& csq) {
  return at::sub(xsq, at::mul(dots, 2)).add_(csq).clamp_min_(0);
}

// lazy_greedy._LazyGreedy._pick_hot's loop, op for op (the same torch kernels, without Python between them):
// greedy picks from the hot points ids while their maximum is >= tau, written to picks[count..]; every
// compact_every picks, the points below tau leave the scan once they are most of it; at the end every
// hot point's min-distance and seen count are written back. Returns the new count of picks.
int64_t hot_picks(at::Tensor x, at::Tensor xsq, at::Tensor ids, at::Tensor mindist, at::Tensor seen, at::Tensor picks,
                  int64_t count, double tau, int64_t compact_every, double picked) {
  TORCH_CHECK(picks.dtype() == at::kLong && picks.is_contiguous() && count <= picks.numel(), "picks: contiguous int64");
  at::Tensor xt = x.index_select(0, ids).t().contiguous(), sq = xsq.index_select(0, ids), r = mindist.index_select(0, ids);
  ids = ids.contiguous();
  int64_t* out = picks.data_ptr<int64_t>();
  const int64_t n_select = picks.numel();
  while (count < n_select && ids.numel() > 0) {
    auto [value, j] = at::max(r, 0);  // first maximum, as argmax
    if (static_cast<double>(value.item<float>()) < tau) break;
    const int64_t jj = j.item<int64_t>(), i = ids.data_ptr<int64_t>()[jj];
    out[count++] = i;
    at::minimum_out(r, r, finish(at::matmul(x.select(0, i), xt), sq, xsq.select(0, i)));
    r.select(0, jj).fill_(picked);
    if (count % compact_every == 0) {
      at::Tensor keep = at::ge(r, tau);
      if (2 * keep.sum().item<int64_t>() < ids.numel()) {  // most are done: shrink the scan
        at::Tensor drop = keep.logical_not();
        at::Tensor gone = ids.index({drop});
        mindist.index_put_({gone}, r.index({drop}));
        seen.index_put_({gone}, at::scalar_tensor(count, seen.options()));
        ids = ids.index({keep}), xt = xt.index({at::indexing::Slice(), keep}), sq = sq.index({keep}), r = r.index({keep});
      }
    }
  }
  mindist.index_put_({ids}, r);
  seen.index_put_({ids}, at::scalar_tensor(count, seen.options()));
  return count;
}
