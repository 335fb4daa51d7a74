// y = x @ W^T (+ b) in fp32 for the few rows of a decode step, a verification chunk or a small
// batch (1-16 rows), at memory bandwidth.
//
// Decoding is bound by reading W once per step. Each thread takes a contiguous range of W's
// rows and walks it in tiles of 4 rows; every row of x is applied to a tile while the tile
// sits in L1, so W is read from memory exactly once whatever the number of rows of x. Row m of
// y depends only on row m of x: a token's logits do not change with what it is batched with.
//
// Arithmetic: 8 fp32 lanes accumulate k = lane (mod 8) with FMA, then a fixed horizontal sum;
// the result differs from BLAS only in summation order (~1e-7 relative).

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <ATen/ATen.h>

#include <algorithm>

#include "vec.h"

namespace distspec {

extern const int64_t kMaxRows = 16;  // more rows than this: the caller uses BLAS

namespace {

constexpr int64_t kTileRows = 4;  // rows of W per tile

// y[m, n] for MB rows of x and NB rows of W (w points at W's first row of the tile).
template <int MB, int NB>
inline void tile(const float* x, int64_t K, const float* w, const float* bias, float* y,
                 int64_t ldy) {
  __m256 acc[NB][MB];
  for (int n = 0; n < NB; ++n)
    for (int m = 0; m < MB; ++m) acc[n][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int n = 0; n < NB; ++n) {
      const __m256 wv = _mm256_loadu_ps(w + n * K + k);
      for (int m = 0; m < MB; ++m) acc[n][m] = _mm256_fmadd_ps(wv, xv[m], acc[n][m]);
    }
  }
  for (int n = 0; n < NB; ++n) {
    for (int m = 0; m < MB; ++m) {
      float s = hsum(acc[n][m]);
      for (int64_t j = k; j < K; ++j) s += w[n * K + j] * x[m * K + j];
      y[m * ldy + n] = bias ? s + bias[n] : s;
    }
  }
}

// every row of x over one tile, 3 rows (12 accumulators, 3 + 1 loads per step) at a time
template <int NB>
inline void tile_rows(const float* x, int64_t M, int64_t K, const float* w, const float* bias,
                      float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) tile<3, NB>(x + m * K, K, w, bias, y + m * ldy, ldy);
  if (M - m == 2) tile<2, NB>(x + m * K, K, w, bias, y + m * ldy, ldy);
  if (M - m == 1) tile<1, NB>(x + m * K, K, w, bias, y + m * ldy, ldy);
}

}  // namespace

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "skinny_linear: CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "skinny_linear: float32 tensors");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "skinny_linear: contiguous [N, K] W");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "skinny_linear: x has ", x.size(-1), " columns, W has ", K);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  TORCH_CHECK(M <= kMaxRows, "skinny_linear: at most ", kMaxRows, " rows, got ", M);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
                "skinny_linear: float32 bias of ", N);
    b = bias->data_ptr<float>();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x2.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + kTileRows - 1) / kTileRows;
  // a thread's share is worth its wake-up from about 64 KB of weights on
  const int64_t grain = std::max<int64_t>(1, (16 * 1024) / (kTileRows * K));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileRows;
      const float* w = wp + n0 * K;
      const float* bt = b ? b + n0 : nullptr;
      if (n0 + kTileRows <= N) {
        tile_rows<kTileRows>(xp, M, K, w, bt, yp + n0, N);
      } else {
        for (int64_t n = n0; n < N; ++n)
          tile_rows<1>(xp, M, K, wp + n * K, b ? b + n : nullptr, yp + n, N);
      }
    }
  });
  return y;
}

}  // namespace distspec
