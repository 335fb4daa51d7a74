// y = x @ W^T (+ b) in fp32 for the few rows of a decode step, a verification chunk or a small
// batch (1-16 rows), at memory bandwidth.
//
// Decoding is bound by reading W once per step. Each thread takes a contiguous range of W's
// rows and reads them one after another: one sequential stream per core is what the hardware
// prefetcher follows best (measured here: 16% faster than interleaving the rows of 4-row
// tiles). Every row of x is applied to a row of W while it sits in L1, so W is read from
// memory exactly once whatever the number of rows of x. Row m of y depends only on row m of x:
// a token's logits do not change with what it is batched with.
//
// Arithmetic: two sets of 8 fp32 lanes accumulate k = lane (mod 16) with FMA, then a fixed
// horizontal sum; the result differs from BLAS only in summation order (~1e-7 relative).

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <ATen/ATen.h>

#include <algorithm>

#include "ops.h"
#include "vec.h"

namespace distspec {

extern const int64_t kMaxRows = 16;  // more rows than this: the caller uses BLAS

namespace {

constexpr int kPassRows = 6;  // rows of x per pass over a row of W (12 accumulators)

// y[m * ldy] = x[m] . w (+ bias) for MB rows of x (x[m] at x + m * K) and one row w of W
template <int MB>
inline void row(const float* x, int64_t K, const float* w, float bias, float* y, int64_t ldy) {
  __m256 a0[MB], a1[MB];
  for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    // Several rows of x make the pass arithmetic-heavy enough that the hardware prefetcher
    // falls behind: ask for W two rows ahead (one row of x: the prefetcher alone is faster).
    if constexpr (MB >= 3) _mm_prefetch(reinterpret_cast<const char*>(w + 2 * K + k), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
    for (int m = 0; m < MB; ++m) {
      a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), a0[m]);
      a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), a1[m]);
    }
  }
  if (k + 8 <= K) {
    const __m256 w0 = _mm256_loadu_ps(w + k);
    for (int m = 0; m < MB; ++m) a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), a0[m]);
    k += 8;
  }
  for (int m = 0; m < MB; ++m) {
    float s = hsum(_mm256_add_ps(a0[m], a1[m]));
    for (int64_t j = k; j < K; ++j) s += w[j] * x[m * K + j];
    y[m * ldy] = s + bias;
  }
}

// every row of x against one row of W
inline void rows(const float* x, int64_t M, int64_t K, const float* w, float bias, float* y,
                 int64_t ldy) {
  int64_t m = 0;
  for (; m + kPassRows <= M; m += kPassRows)
    row<kPassRows>(x + m * K, K, w, bias, y + m * ldy, ldy);
  switch (M - m) {
    case 5: row<5>(x + m * K, K, w, bias, y + m * ldy, ldy); break;
    case 4: row<4>(x + m * K, K, w, bias, y + m * ldy, ldy); break;
    case 3: row<3>(x + m * K, K, w, bias, y + m * ldy, ldy); break;
    case 2: row<2>(x + m * K, K, w, bias, y + m * ldy, ldy); break;
    case 1: row<1>(x + m * K, K, w, bias, y + m * ldy, ldy); break;
  }
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
  // a thread's share is worth its wake-up from about 64 KB of weights on
  const int64_t grain = std::max<int64_t>(1, (16 * 1024) / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) rows(xp, M, K, wp + n * K, b ? b[n] : 0.0f, yp + n, N);
  });
  return y;
}

}  // namespace distspec
