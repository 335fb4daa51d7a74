// Weight-only quantized y = x @ W^T (+ b): fp32 activations and arithmetic, W in ggml's block
// formats (groups of 32 along K), kept as planar tensors (see models/quantized.py):
//   q4: W[n, 32g + j] = q * scale[n, g] + min[n, g], q a nibble of qs[n, 16g + j % 16]: low
//       nibble for j < 16, high nibble for j >= 16 (ggml Q4_0/Q4_1's order).
//   q8: W[n, 32g + j] = qs[n, 32g + j] * scale[n, g]                    (ggml Q8_0)
// scale and min are fp16, as in the GGUF blocks.
//
// Per output row: y = sum_g scale_g * (x_g . q_g) + sum_g min_g * sum(x_g). The second sum's
// sum(x_g) is the same for every output row, so it is computed once per call. Weights are
// read once per 16 rows of x (a decode step, a verification chunk, a small batch) and unpacked
// once per 4 rows. Row m of y depends only on row m of x.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace distspec {

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kChunkRows = 16;  // rows of x per pass over W
constexpr int kPassRows = 4;        // rows of x per unpacking of a group
constexpr int64_t kPrefetchRows = 4;  // rows of W ahead

// The 32 weights of one group as 4 x 8 floats (before scale and min).
struct Q4 {
  static constexpr int64_t kBytes = 16;
  // the group's 32 codes as bytes, in element order (0..15 low nibbles, 16..31 high)
  static inline __m256i bytes(const uint8_t* q) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
  }
  // 8 int32 partial sums of codes * x (x: int8), codes unsigned
  static inline __m256i dot(__m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
  }
  static inline void unpack(const uint8_t* q, __m256 w[4]) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }
};

struct Q8 {
  static constexpr int64_t kBytes = 32;
  static inline __m256i bytes(const uint8_t* q) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  }
  // signed codes: |w| * (x with w's sign), as maddubs wants an unsigned first operand
  static inline __m256i dot(__m256i w, __m256i x) {
#ifdef __AVX512VNNI__
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w),
                               _mm256_sign_epi8(x, w));
#else
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
  }
  static inline void unpack(const uint8_t* q, __m256 w[4]) {
    for (int i = 0; i < 4; ++i) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i));
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    }
  }
};

inline float half_to_float(const at::Half* h, int64_t i) {
  return _cvtsh_ss(reinterpret_cast<const uint16_t*>(h)[i]);
}

// sum_g a[g] * b[g] for fp16 a and fp32 b
inline float dot_half(const at::Half* a, const float* b, int64_t n) {
  const uint16_t* a16 = reinterpret_cast<const uint16_t*>(a);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 av = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a16 + i)));
    acc = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + i), acc);
  }
  float s = hsum(acc);
  for (; i < n; ++i) s += _cvtsh_ss(a16[i]) * b[i];
  return s;
}

#ifdef __AVX512F__
// The 32 weights of a group as 2 x 16 floats: one widening per 16 weights, not per 8, as
// widening is a shuffle and this CPU's shuffles have one port (the AVX2 unpack is bound by it).
inline void unpack16(Q4, const uint8_t* q, __m512 w[2]) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i mask = _mm_set1_epi8(0x0F);
  w[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, mask)));
  w[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), mask)));
}
inline void unpack16(Q8, const uint8_t* q, __m512 w[2]) {
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * i))));
}
#endif

// MB rows of x (x[m] at x + m * K) against output row n of W: y[m * ldy] for each m. Row m's
// sums are formed in the same order whatever MB is.
template <class F, int MB>
inline void row(const float* x, int64_t K, const uint8_t* q, const at::Half* scale,
                const at::Half* min, const float* xsum, int64_t G, float bias, float* y,
                int64_t ldy) {
#ifdef __AVX512F__
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  alignas(64) float ds[16];  // 16 groups' scales in fp32: broadcasts then come from memory
  // as in row_q4_pairs: the prefetcher alone leaves this much arithmetic per byte waiting
  const int64_t ahead = kPrefetchRows * G * F::kBytes;
  _mm_prefetch(reinterpret_cast<const char*>(scale + kPrefetchRows * G), _MM_HINT_T0);
  if (min) _mm_prefetch(reinterpret_cast<const char*>(min + kPrefetchRows * G), _MM_HINT_T0);
  for (int64_t g = 0; g < G; ++g) {
    if ((g * F::kBytes) % 64 == 0)
      _mm_prefetch(reinterpret_cast<const char*>(q + g * F::kBytes + ahead), _MM_HINT_T0);
    if (g % 16 == 0) {
      if (g + 16 <= G)
        _mm512_store_ps(ds, _mm512_cvtph_ps(
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + g))));
      else
        for (int64_t i = g; i < G; ++i) ds[i - g] = half_to_float(scale, i);
    }
    __m512 w[2];
    unpack16(F{}, q + g * F::kBytes, w);
    const __m512 d = _mm512_set1_ps(ds[g % 16]);
    for (int m = 0; m < MB; ++m) {
      const float* xg = x + m * K + g * kGroup;
      const __m512 a = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xg + 16),
                                       _mm512_mul_ps(w[0], _mm512_loadu_ps(xg)));
      acc[m] = _mm512_fmadd_ps(a, d, acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(acc[m]),
                                   _mm512_extractf32x8_ps(acc[m], 1));
    float s = hsum(h) + bias;
    if (min) s += dot_half(min, xsum + m * G, G);
    y[m * ldy] = s;
  }
#else
  __m256 tot[MB];
  for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 w[4];
    F::unpack(q + g * F::kBytes, w);
    const __m256 d = _mm256_set1_ps(half_to_float(scale, g));
    for (int m = 0; m < MB; ++m) {
      const float* xg = x + m * K + g * kGroup;
      __m256 a = _mm256_mul_ps(w[0], _mm256_loadu_ps(xg));
      a = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xg + 8), a);
      a = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xg + 16), a);
      a = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xg + 24), a);
      tot[m] = _mm256_fmadd_ps(a, d, tot[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float s = hsum(tot[m]) + bias;
    if (min) s += dot_half(min, xsum + m * G, G);
    y[m * ldy] = s;
  }
#endif
}

// The same with x quantized to int8 per group (xq, scale xd): integer dot products, 4x the
// multiply-adds per instruction of fp32 (llama.cpp's way; its numerics, not fp32's).
template <class F, int MB>
inline void row_q8x(const int8_t* xq, const float* xd, int64_t K, const uint8_t* q,
                    const at::Half* scale, const at::Half* min, const float* xsum, int64_t G,
                    float bias, float* y, int64_t ldy) {
  __m256 tot[MB];
  for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256i w = F::bytes(q + g * F::kBytes);
    const float d = half_to_float(scale, g);
    for (int m = 0; m < MB; ++m) {
      const __m256i xv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + g * kGroup));
      const __m256 p = _mm256_cvtepi32_ps(F::dot(w, xv));
      tot[m] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * xd[m * G + g]), tot[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float s = hsum(tot[m]) + bias;
    if (min) s += dot_half(min, xsum + m * G, G);
    y[m * ldy] = s;
  }
}

// Q4 codes against int8 x, two groups at a time. The two groups' 32 code bytes come in one
// load; their low nibbles (elements 0-15 of each) meet one 32-byte vector of x, their high
// nibbles (16-31) the next, so x is laid out in pairs first (pair_x). The int16 products of
// both halves are added (at most 2 * 2 * 15 * 127, no overflow) before widening: lanes 0-3
// then hold the first group's partial sums, 4-7 the second's. Half the shuffling and
// widening per group of row_q8x, which is what bounds this CPU here, not memory.
// xp: the row's K paired bytes; xdp: 4 copies of each group's x scale (G * 4 floats); an odd
// last group is left in element order after the pairs. With AVX-512 VNNI four groups go
// at a time (the x halves of two pairs swapped into quads) and the dot products are vpdpbusd.
template <int MB>
inline void row_q4_pairs(const int8_t* xp, const float* xdp, int64_t K, const uint8_t* q,
                         const at::Half* scale, const at::Half* min, const float* xsum, int64_t G,
                         float bias, float* y, int64_t ldy) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  // {d0, d0, d0, d0, d1, d1, d1, d1} from the fp16 pair {d0, d1}
  const __m128i spread = _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3);
  const uint16_t* s16 = reinterpret_cast<const uint16_t*>(scale);
  __m256 tot[MB];
  for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
  const int64_t P = G / 2;
  // this CPU's prefetcher does not run far enough ahead of this much arithmetic per byte
  // (a pass over the demo's layers: 7.4 -> 6.4 ms); a prefetch past the end does not fault
  const int64_t ahead = kPrefetchRows * K / 2;
  _mm_prefetch(reinterpret_cast<const char*>(scale + kPrefetchRows * G), _MM_HINT_T0);
  if (min) _mm_prefetch(reinterpret_cast<const char*>(min + kPrefetchRows * G), _MM_HINT_T0);
  int64_t p = 0;
#ifdef __AVX512VNNI__
  // four groups per step in 512-bit registers (x laid out in quads: see pair_x)
  __m512 tot4[MB];
  for (int m = 0; m < MB; ++m) tot4[m] = _mm512_setzero_ps();
  const __m512i mask4 = _mm512_set1_epi8(0x0F);
  // {d0 x4, d1 x4, d2 x4, d3 x4} from the fp16 scales {d0, d1, d2, d3}
  const __m256i spread4 = _mm256_setr_epi16(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (; p + 2 <= P; p += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(q + 32 * p + ahead), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(q + 32 * p);
    const __m512i lo = _mm512_and_si512(v, mask4);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask4);
    const __m128i four = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s16 + 2 * p));
    const __m512 dw =
        _mm512_cvtph_ps(_mm256_permutexvar_epi16(spread4, _mm256_castsi128_si256(four)));
    for (int m = 0; m < MB; ++m) {
      const int8_t* xm = xp + m * K + 64 * p;
      const __m512i i32 = _mm512_dpbusd_epi32(
          _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xm)), hi,
          _mm512_loadu_si512(xm + 64));
      const __m512 f =
          _mm512_mul_ps(_mm512_cvtepi32_ps(i32), _mm512_loadu_ps(xdp + m * G * 4 + 8 * p));
      tot4[m] = _mm512_fmadd_ps(f, dw, tot4[m]);
    }
  }
  for (int m = 0; m < MB; ++m)
    tot[m] = _mm256_add_ps(_mm512_castps512_ps256(tot4[m]), _mm512_extractf32x8_ps(tot4[m], 1));
#endif
  for (; p < P; ++p) {
    if (p % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(q + 32 * p + ahead), _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * p));
    const __m256i lo = _mm256_and_si256(v, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    int32_t two;
    std::memcpy(&two, s16 + 2 * p, sizeof two);
    const __m256 dw = _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_cvtsi32_si128(two), spread));
    for (int m = 0; m < MB; ++m) {
      const int8_t* xm = xp + m * K + 64 * p;
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + 32));
#ifdef __AVX512VNNI__
      // the same integer sums in two instructions instead of four
      const __m256i i32 = _mm256_dpbusd_epi32(
          _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, x0), hi, x1);
#else
      const __m256i i32 = _mm256_madd_epi16(
          _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1)), ones);
#endif
      const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(i32),
                                     _mm256_loadu_ps(xdp + m * G * 4 + 8 * p));
      tot[m] = _mm256_fmadd_ps(f, dw, tot[m]);
    }
  }
  if (G % 2) {
    const int64_t g = G - 1;
    const __m256i w = Q4::bytes(q + g * Q4::kBytes);
    const float d = half_to_float(scale, g);
    for (int m = 0; m < MB; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + m * K + 32 * g));
      const __m256 f = _mm256_cvtepi32_ps(Q4::dot(w, xv));
      tot[m] = _mm256_fmadd_ps(f, _mm256_set1_ps(d * xdp[m * G * 4 + 4 * g]), tot[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float s = hsum(tot[m]) + bias;
    if (min) s += dot_half(min, xsum + m * G, G);
    y[m * ldy] = s;
  }
}

void rows_q4_pairs(const int8_t* xp, const float* xdp, int64_t M, int64_t K, const uint8_t* q,
                   const at::Half* scale, const at::Half* min, const float* xsum, int64_t G,
                   float bias, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + kPassRows <= M; m += kPassRows)
    row_q4_pairs<kPassRows>(xp + m * K, xdp + m * G * 4, K, q, scale, min, xsum + m * G, G, bias,
                            y + m * ldy, ldy);
  for (; m < M; ++m)
    row_q4_pairs<1>(xp + m * K, xdp + m * G * 4, K, q, scale, min, xsum + m * G, G, bias,
                    y + m * ldy, ldy);
}

// int8 x (M rows of K, element order) and its group scales in row_q4_pairs's layout
void pair_x(const int8_t* xq, const float* xd, int64_t M, int64_t K, int8_t* xp, float* xdp) {
  const int64_t G = K / kGroup;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* src = xq + m * K;
    int8_t* dst = xp + m * K;
    for (int64_t p = 0; p < G / 2; ++p) {
      const int8_t* g0 = src + 64 * p;
      std::memcpy(dst + 64 * p, g0, 16);
      std::memcpy(dst + 64 * p + 16, g0 + 32, 16);
      std::memcpy(dst + 64 * p + 32, g0 + 16, 16);
      std::memcpy(dst + 64 * p + 48, g0 + 48, 16);
    }
    if (G % 2) std::memcpy(dst + 32 * (G - 1), src + 32 * (G - 1), 32);
#ifdef __AVX512VNNI__
    // quads for row_q4_pairs's 512-bit steps: [x0 of pair 2j, x0 of 2j + 1, x1, x1]
    for (int64_t j = 0; j < G / 4 * 2; j += 2) {  // j: the first pair of each quad
      int8_t tmp[32];
      std::memcpy(tmp, dst + 64 * j + 32, 32);
      std::memcpy(dst + 64 * j + 32, dst + 64 * j + 64, 32);
      std::memcpy(dst + 64 * j + 64, tmp, 32);
    }
#endif
    for (int64_t g = 0; g < G; ++g)
      for (int j = 0; j < 4; ++j) xdp[(m * G + g) * 4 + j] = xd[m * G + g];
  }
}

template <class F>
void rows_q8x(const int8_t* xq, const float* xd, int64_t M, int64_t K, const uint8_t* q,
              const at::Half* scale, const at::Half* min, const float* xsum, int64_t G,
              float bias, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + kPassRows <= M; m += kPassRows)
    row_q8x<F, kPassRows>(xq + m * K, xd + m * G, K, q, scale, min, xsum + m * G, G, bias,
                          y + m * ldy, ldy);
  for (; m < M; ++m)
    row_q8x<F, 1>(xq + m * K, xd + m * G, K, q, scale, min, xsum + m * G, G, bias, y + m * ldy,
                  ldy);
}

// x to int8 per group of 32: scale max|x| / 127, round half away from zero as
// sign(y) * floor(|y| + 0.5) in fp32 (ggml's Q8_0; quantized.round_activations computes the
// same); xsum then sums the rounded values (the min term multiplies what the codes multiply)
void quantize_groups(const float* x, int64_t n_groups, int8_t* xq, float* xd, float* xsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f);
  // packs interleave 128-bit lanes: this puts the 32 bytes back in element order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t i = 0; i < n_groups; ++i) {
    const float* xg = x + i * kGroup;
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xg + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
    __m256i q[4], sum = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256 y = _mm256_mul_ps(v[j], _mm256_set1_ps(inv));
      const __m256 r = _mm256_floor_ps(_mm256_add_ps(_mm256_andnot_ps(sign, y), half));
      q[j] = _mm256_cvttps_epi32(_mm256_or_ps(r, _mm256_and_ps(y, sign)));
      sum = _mm256_add_epi32(sum, q[j]);
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + i * kGroup),
                        _mm256_permutevar8x32_epi32(b, order));
    xd[i] = d;
    if (xsum) {
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      xsum[i] = static_cast<float>(_mm_cvtsi128_si32(s4)) * d;
    }
  }
}

template <class F>
void rows(const float* x, int64_t M, int64_t K, const uint8_t* q, const at::Half* scale,
          const at::Half* min, const float* xsum, int64_t G, float bias, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + kPassRows <= M; m += kPassRows)
    row<F, kPassRows>(x + m * K, K, q, scale, min, xsum + m * G, G, bias, y + m * ldy, ldy);
  switch (M - m) {
    case 3: row<F, 3>(x + m * K, K, q, scale, min, xsum + m * G, G, bias, y + m * ldy, ldy); break;
    case 2: row<F, 2>(x + m * K, K, q, scale, min, xsum + m * G, G, bias, y + m * ldy, ldy); break;
    case 1: row<F, 1>(x + m * K, K, q, scale, min, xsum + m * G, G, bias, y + m * ldy, ldy); break;
  }
}

template <class F>
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qs,
                           const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                           const c10::optional<at::Tensor>& bias, bool int8_x,
                           const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, ": float32 CPU x");
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.element_size() == 1, name,
              ": contiguous 2-D byte qs");
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous() && scales.scalar_type() == at::kHalf,
              name, ": contiguous float16 scales");
  const int64_t N = qs.size(0), G = scales.size(1), K = G * kGroup;
  TORCH_CHECK(scales.size(0) == N && qs.size(1) == G * F::kBytes, name, ": qs ",
              qs.sizes(), " do not fit scales ", scales.sizes());
  TORCH_CHECK(x.size(-1) == K, name, ": x has ", x.size(-1), " columns, W has ", K);
  const at::Half* mp = nullptr;
  if (mins.has_value() && mins->defined()) {
    TORCH_CHECK(mins->sizes() == scales.sizes() && mins->is_contiguous() &&
                    mins->scalar_type() == at::kHalf,
                name, ": mins like scales");
    mp = mins->data_ptr<at::Half>();
  }
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
                name, ": float32 bias of ", N);
    bp = bias->data_ptr<float>();
  }
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x2.data_ptr<float>();
  // sum(x_g) per row and group, for the min term
  std::vector<float> xsum(mp ? M * G : 0);
  for (size_t i = 0; !int8_x && i < xsum.size(); ++i) {
    const float* xg = xp + i * kGroup;
    __m256 acc = _mm256_loadu_ps(xg);
    for (int j = 8; j < kGroup; j += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(xg + j));
    xsum[i] = hsum(acc);
  }
  std::vector<int8_t> xq(int8_x ? M * K : 0);
  std::vector<float> xd(int8_x ? M * G : 0);
  if (int8_x) quantize_groups(xp, M * G, xq.data(), xd.data(), mp ? xsum.data() : nullptr);
  constexpr bool kPairs = std::is_same_v<F, Q4>;
  std::vector<int8_t> xqp(int8_x && kPairs ? M * K : 0);
  std::vector<float> xdp(int8_x && kPairs ? M * G * 4 : 0);
  if (int8_x && kPairs) pair_x(xq.data(), xd.data(), M, K, xqp.data(), xdp.data());
  const float* sp = xsum.data();
  const uint8_t* qp = static_cast<const uint8_t*>(qs.data_ptr());
  const at::Half* dp = scales.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = G * (F::kBytes + (mp ? 4 : 2));
  // a thread's share is worth its wake-up from about 32 KB of weights on
  const int64_t grain = std::max<int64_t>(1, (32 * 1024) / row_bytes);
  for (int64_t c = 0; c < M; c += kChunkRows) {
    const int64_t mc = std::min(kChunkRows, M - c);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* qn = qp + n * G * F::kBytes;
        const at::Half* mn = mp ? mp + n * G : nullptr;
        const float bn = bp ? bp[n] : 0.0f;
        if (int8_x && kPairs)
          rows_q4_pairs(xqp.data() + c * K, xdp.data() + c * G * 4, mc, K, qn, dp + n * G, mn,
                        sp + c * G, G, bn, yp + c * N + n, N);
        else if (int8_x)
          rows_q8x<F>(xq.data() + c * K, xd.data() + c * G, mc, K, qn, dp + n * G, mn,
                      sp + c * G, G, bn, yp + c * N + n, N);
        else
          rows<F>(xp + c * K, mc, K, qn, dp + n * G, mn, sp + c * G, G, bn, yp + c * N + n, N);
      }
    });
  }
  return y;
}

}  // namespace

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs,
                        const at::Tensor& scales, const at::Tensor& mins,
                        const c10::optional<at::Tensor>& bias, bool int8_x) {
  return quant_linear<Q4>(x, qs, scales, mins, bias, int8_x, "q4_linear");
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs,
                        const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                        bool int8_x) {
  return quant_linear<Q8>(x, qs, scales, c10::nullopt, bias, int8_x, "q8_linear");
}

}  // namespace distspec
