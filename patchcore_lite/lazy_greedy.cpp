// The coreset's catch-up filter pass (lazy_greedy._filter_pairs, term for term), in one read of the
// filter product instead of the torch ops' passes (row minimum, compare, gather, compare, nonzero): each row
// is still in L1 when its pairs are collected. Built with exact_search.cpp into one extension.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
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

}  // namespace

// approx (n, m) fp32, r (n,) fp32. Row i takes part if min_j approx[i, j] < r[i] + tol; its pairs are
// the j with approx[i, j] <= min(r[i] + tol, min + 2 tol). Returns (rows, cols), row-major order.
std::vector<at::Tensor> catch_up_pairs(at::Tensor approx, at::Tensor r, double tol) {
  TORCH_CHECK(approx.dtype() == at::kFloat && approx.is_contiguous() && approx.dim() == 2, "approx: contiguous (n, m) fp32");
  TORCH_CHECK(r.dtype() == at::kFloat && r.is_contiguous() && r.numel() == approx.size(0), "r: contiguous (n,) fp32");
  const int64_t n = approx.size(0), m = approx.size(1);
  const float *a = approx.data_ptr<float>(), *rv = r.data_ptr<float>();
  const float tol1 = static_cast<float>(tol), tol2 = static_cast<float>(2 * tol);  // as torch casts the scalars
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::vector<std::vector<int64_t>> found(nth);  // (row, col) flattened, rows ascending per thread
  at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t th = t0; th < t1; ++th)
      for (int64_t i = n * th / nth; i < n * (th + 1) / nth; ++i) {
        const float* row = a + i * m;
        const float low = row_min(row, m), bound = rv[i] + tol1;
        if (!(low < bound)) continue;
        const float near = low + tol2, thr = near < bound ? near : bound;
        const __m256 vt = _mm256_set1_ps(thr);
        int64_t j = 0;
        for (; j + 8 <= m; j += 8)
          for (int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + j), vt, _CMP_LE_OQ)); mask;
               mask &= mask - 1)
            found[th].insert(found[th].end(), {i, j + __builtin_ctz(mask)});
        for (; j < m; ++j)
          if (row[j] <= thr) found[th].insert(found[th].end(), {i, j});
      }
  });
  int64_t total = 0;
  for (const auto& v : found) total += static_cast<int64_t>(v.size()) / 2;
  at::Tensor rows = at::empty({total}, at::kLong), cols = at::empty({total}, at::kLong);
  int64_t *ro = rows.data_ptr<int64_t>(), *co = cols.data_ptr<int64_t>();
  for (const auto& v : found)
    for (size_t k = 0; k < v.size(); k += 2) *ro++ = v[k], *co++ = v[k + 1];
  return {rows, cols};
}
