// y = x @ W^T (+ b) in fp32 for the few rows of a decode step, a verification chunk or a small
// batch (up to kMaxRows rows), at memory bandwidth.
//
// Decoding is bound by reading W once per step. Each thread takes a contiguous range of W's
// rows and reads them one after another: one sequential stream per core is what the hardware
// prefetcher follows best (measured here: 16% faster than interleaving the rows of 4-row
// tiles). Every row of x is applied to a row of W while it sits in L1, so W is read from
// memory exactly once whatever the number of rows of x. Row m of y depends only on row m of x:
// a token's logits do not change with what it is batched with.
//
// The hardware prefetcher alone keeps up with one row of x only: with more rows each line of W
// takes longer to use, the stream stalls on memory, and 5 rows cost 2.5x one row (measured on a
// Zen 4). Asking for W 8 KB ahead into L2 keeps the memory busy while the FMAs run: 1-5 rows
// then cost the same. From 6 rows on, the FMAs themselves bound the pass; with AVX-512 a tile of
// 4 rows of W x 6 rows of x (24 accumulators, 32 registers) loads less per FMA than a row of W
// at a time (16 rows: 1.75x faster).
//
// Arithmetic: 16 fp32 lanes (two AVX2 registers or one AVX-512 register) accumulate
// k = lane (mod 16) with FMA, then a fixed horizontal sum: every path gives the same bits, and
// the result differs from BLAS only in summation order (~1e-7 relative).

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>

#include "ops.h"
#include "vec.h"

namespace distspec {

// more rows than this: the caller uses BLAS (measured over the demo's matrices, 2 threads:
// AVX-512 tiles at 48 rows 79 ms, BLAS 131 ms; AVX2 rows at 32 rows about BLAS's time)
#ifdef __AVX512F__
extern const int64_t kMaxRows = 64;
#else
extern const int64_t kMaxRows = 16;
#endif

namespace {

constexpr int kPassRows = 6;  // rows of x per pass over a row of W (12 accumulators)
constexpr int64_t kAheadBytes = 8192;  // how far ahead of its reads a thread asks for W

inline void fetch_ahead(const float* w) {
  _mm_prefetch(reinterpret_cast<const char*>(w) + kAheadBytes, _MM_HINT_T1);
}

// y[m * ldy] = x[m] . w (+ bias) for MB rows of x (x[m] at x + m * K) and one row w of W
template <int MB>
inline void row(const float* x, int64_t K, const float* w, float bias, float* y, int64_t ldy) {
  __m256 a0[MB], a1[MB];
  for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    fetch_ahead(w + k);
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

// f(std::integral_constant<int, MB>, m) over the M rows of x: passes of kPassRows rows, then
// the rest in one pass (MB is a template constant, so the accumulators stay in registers)
template <class F>
inline void by_passes(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + kPassRows <= M; m += kPassRows) f(std::integral_constant<int, kPassRows>{}, m);
  switch (M - m) {
    case 5: f(std::integral_constant<int, 5>{}, m); break;
    case 4: f(std::integral_constant<int, 4>{}, m); break;
    case 3: f(std::integral_constant<int, 3>{}, m); break;
    case 2: f(std::integral_constant<int, 2>{}, m); break;
    case 1: f(std::integral_constant<int, 1>{}, m); break;
  }
}

// every row of x against one row of W
inline void rows(const float* x, int64_t M, int64_t K, const float* w, float bias, float* y,
                 int64_t ldy) {
  by_passes(M, [&](auto mb, int64_t m) {
    row<decltype(mb)::value>(x + m * K, K, w, bias, y + m * ldy, ldy);
  });
}

#ifdef __AVX512F__
constexpr int kTileW = 4;  // rows of W per tile

inline float hsum16(__m512 v) {
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

// y[m * ldy + n] = x[m] . w[n] (+ bias[n]) for kTileW rows of W and MB rows of x; K % 16 == 0
template <int MB>
inline void tile(const float* x, int64_t K, const float* w, const float* bias, float* y,
                 int64_t ldy) {
  __m512 a[kTileW][MB];
  for (int n = 0; n < kTileW; ++n)
    for (int m = 0; m < MB; ++m) a[n][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 wv[kTileW];
    for (int n = 0; n < kTileW; ++n) {
      fetch_ahead(w + n * K + k);
      wv[n] = _mm512_loadu_ps(w + n * K + k);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int n = 0; n < kTileW; ++n) a[n][m] = _mm512_fmadd_ps(wv[n], xv, a[n][m]);
    }
  }
  for (int n = 0; n < kTileW; ++n)
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = hsum16(a[n][m]) + (bias ? bias[n] : 0.0f);
}

// every row of x against kTileW rows of W
inline void tiles(const float* x, int64_t M, int64_t K, const float* w, const float* bias,
                  float* y, int64_t ldy) {
  by_passes(M, [&](auto mb, int64_t m) {
    tile<decltype(mb)::value>(x + m * K, K, w, bias, y + m * ldy, ldy);
  });
}
#endif

// rows [n0, n1) of y
inline void span(const float* x, int64_t M, int64_t K, const float* w, const float* b, float* y,
                 int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
#ifdef __AVX512F__
  if (M >= kPassRows && K % 16 == 0)
    for (; n + kTileW <= n1; n += kTileW) tiles(x, M, K, w + n * K, b ? b + n : nullptr, y + n, N);
#endif
  for (; n < n1; ++n) rows(x, M, K, w + n * K, b ? b[n] : 0.0f, y + n, N);
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
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { span(xp, M, K, wp, b, yp, N, n0, n1); });
  return y;
}

}  // namespace distspec
