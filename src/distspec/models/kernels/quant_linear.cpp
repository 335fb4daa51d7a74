// Weight-only quantized y = x @ W^T (+ b) for the few rows of a decode step, a verification
// chunk or a small batch, W in ggml's block formats (groups of 32 along K, fp16 scales):
//   q8 (Q8_0), planar tensors (models/quantized.py Q8Weight): W[n, 32g + j] = qs[n, 32g + j] *
//       scale[n, g].
//   q4 (Q4_1, Q4_0), in tiles (models/quantized.py Q4Tiles): W = q * scale + min, 16 output
//       rows by one group in 320 bytes, one dword per row holding 8 of its codes.
// x is fp32, or rounded to int8 per group of 32 first (int8_x: ggml's Q8_0, as llama.cpp
// computes; integer dot products). Row m of y depends only on row m of x, and its sums are
// formed in the same order whatever the number of rows: a token's logits do not change with
// what it is batched with.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace distspec {

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kChunkRows = 16;  // rows of x per pass over W
constexpr int kPassRows = 4;        // rows of x per unpacking of W
constexpr int64_t kPrefetchRows = 4;  // q8: rows of W ahead

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

// ---- q8, planar: one output row at a time ----

inline float half_to_float(const at::Half* h, int64_t i) {
  return _cvtsh_ss(reinterpret_cast<const uint16_t*>(h)[i]);
}

// MB rows of x (x[m] at x + m * K) against output row n of W: y[m * ldy] for each m
template <int MB>
inline void q8_row(const float* x, int64_t K, const int8_t* q, const at::Half* scale, int64_t G,
                   float bias, float* y, int64_t ldy) {
#ifdef __AVX512F__
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  alignas(64) float ds[16];  // 16 groups' scales in fp32: broadcasts then come from memory
  // the prefetcher alone leaves this much arithmetic per byte waiting
  const int64_t ahead = kPrefetchRows * K;
  _mm_prefetch(reinterpret_cast<const char*>(scale + kPrefetchRows * G), _MM_HINT_T0);
  for (int64_t g = 0; g < G; ++g) {
    if (g % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(q + g * kGroup + ahead), _MM_HINT_T0);
    if (g % 16 == 0) {
      if (g + 16 <= G)
        _mm512_store_ps(ds, _mm512_cvtph_ps(
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + g))));
      else
        for (int64_t i = g; i < G; ++i) ds[i - g] = half_to_float(scale, i);
    }
    const int8_t* qg = q + g * kGroup;
    const __m512 w0 = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg))));
    const __m512 w1 = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + 16))));
    const __m512 d = _mm512_set1_ps(ds[g % 16]);
    for (int m = 0; m < MB; ++m) {
      const float* xg = x + m * K + g * kGroup;
      const __m512 a = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xg + 16),
                                       _mm512_mul_ps(w0, _mm512_loadu_ps(xg)));
      acc[m] = _mm512_fmadd_ps(a, d, acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(acc[m]),
                                   _mm512_extractf32x8_ps(acc[m], 1));
    y[m * ldy] = hsum(h) + bias;
  }
#else
  __m256 tot[MB];
  for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 w[4];
    for (int i = 0; i < 4; ++i) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + g * kGroup + 8 * i));
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    }
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
  for (int m = 0; m < MB; ++m) y[m * ldy] = hsum(tot[m]) + bias;
#endif
}

// signed codes times int8 x: |w| * (x with w's sign), as the byte dot products want an
// unsigned first operand; 8 int32 partial sums
inline __m256i q8_dot(__m256i w, __m256i x) {
#ifdef __AVX512VNNI__
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w),
                             _mm256_sign_epi8(x, w));
#else
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

// the same with x quantized to int8 per group (xq, scale xd)
template <int MB>
inline void q8_row_x8(const int8_t* xq, const float* xd, int64_t K, const int8_t* q,
                      const at::Half* scale, int64_t G, float bias, float* y, int64_t ldy) {
  __m256 tot[MB];
  for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + g * kGroup));
    const float d = half_to_float(scale, g);
    for (int m = 0; m < MB; ++m) {
      const __m256i xv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + g * kGroup));
      const __m256 p = _mm256_cvtepi32_ps(q8_dot(w, xv));
      tot[m] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * xd[m * G + g]), tot[m]);
    }
  }
  for (int m = 0; m < MB; ++m) y[m * ldy] = hsum(tot[m]) + bias;
}

// M rows of x against output row n, kPassRows at a time
void q8_rows(const float* x, const int8_t* xq, const float* xd, int64_t M, int64_t K,
             const int8_t* q, const at::Half* scale, int64_t G, float bias, float* y,
             int64_t ldy) {
  int64_t m = 0;
  for (; m + kPassRows <= M; m += kPassRows) {
    if (xq)
      q8_row_x8<kPassRows>(xq + m * K, xd + m * G, K, q, scale, G, bias, y + m * ldy, ldy);
    else
      q8_row<kPassRows>(x + m * K, K, q, scale, G, bias, y + m * ldy, ldy);
  }
  for (; m < M; ++m) {
    if (xq)
      q8_row_x8<1>(xq + m * K, xd + m * G, K, q, scale, G, bias, y + m * ldy, ldy);
    else
      q8_row<1>(x + m * K, K, q, scale, G, bias, y + m * ldy, ldy);
  }
}

// ---- q4, in tiles: 16 output rows at a time, one row per vector lane ----

constexpr int kTileRows = 16;
constexpr int64_t kTileBytes = 320;  // 4 x 64 bytes of codes, 16 fp16 scales, 16 fp16 mins
// tiles prefetched ahead, into L2 (10 KB): the demo's gate/up matrices from memory then stream
// at 17.6 GB/s (2 cores, int8 x), 14.6-15.5 asked into L1 (5-10 KB ahead); without any
// prefetch a model step from cache is 15-20% slower
constexpr int64_t kTileAhead = 32;

#ifdef __AVX512F__
// all 16 rows of a tile in one vector
struct Lanes {
  static constexpr int kRows = 16;
  using I = __m512i;
  using F = __m512;
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I low(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
  static I high(I v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
  // byte b of each dword, as an int32
  static I byte(I v, int b) {
    return _mm512_and_si512(_mm512_srli_epi32(v, 8 * b), _mm512_set1_epi32(0xFF));
  }
  // acc + per dword: its 4 unsigned bytes times the 4 signed bytes of x4
  static I dot(I acc, I u, int32_t x4) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, u, _mm512_set1_epi32(x4));
#else
    const I p = _mm512_maddubs_epi16(u, _mm512_set1_epi32(x4));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
#endif
  }
  static I izero() { return _mm512_setzero_si512(); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F halves(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1); }
  static F load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static void store_n(float* p, F v, int n) { _mm512_mask_storeu_ps(p, first(n), v); }
};
#else
// 8 rows of a tile per vector: a tile in two halves
struct Lanes {
  static constexpr int kRows = 8;
  using I = __m256i;
  using F = __m256;
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static I low(I v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
  static I high(I v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
  static I byte(I v, int b) {
    return _mm256_and_si256(_mm256_srli_epi32(v, 8 * b), _mm256_set1_epi32(0xFF));
  }
  static I dot(I acc, I u, int32_t x4) {
    const I p = _mm256_maddubs_epi16(u, _mm256_set1_epi32(x4));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
  static I izero() { return _mm256_setzero_si256(); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F halves(const uint8_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static I first(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static F load_n(const float* p, int n) { return _mm256_maskload_ps(p, first(n)); }
  static void store_n(float* p, F v, int n) { _mm256_maskstore_ps(p, first(n), v); }
};
#endif

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The activations of MB rows as a tile pass reads them: fp32 x or int8 xq with its group
// scales xd; xsum: per row and group the sum of x as multiplied (for the min term).
struct Rows {
  const float* x;
  const int8_t* xq;
  const float* xd;
  const float* xsum;
  int64_t K, G;
  Rows at(int64_t m) const {
    return {x ? x + m * K : nullptr, xq ? xq + m * K : nullptr, xq ? xd + m * G : nullptr,
            xsum + m * G, K, G};
  }
};

// One tile group (g) of Lanes::kRows rows starting at row `off` against MB rows of int8 x:
// acc[m] += (codes . x) * scale * xd + min * xsum, one row of W per lane.
template <int MB>
inline void tile_group_x8(const uint8_t* tg, int off, int64_t g, const Rows& a,
                          typename Lanes::F acc[MB]) {
  using L = Lanes;
  typename L::I s0[MB], s1[MB];  // low and high nibbles' sums: two chains, not one
  for (int m = 0; m < MB; ++m) s0[m] = s1[m] = L::izero();
  for (int j = 0; j < 4; ++j) {
    const typename L::I p = L::load(tg + 64 * j + 4 * off);
    const typename L::I lo = L::low(p), hi = L::high(p);
    for (int m = 0; m < MB; ++m) {
      const int8_t* xg = a.xq + m * a.K + kGroup * g + 8 * j;
      s0[m] = L::dot(s0[m], lo, load4(xg));
      s1[m] = L::dot(s1[m], hi, load4(xg + 4));
    }
  }
  const typename L::F d = L::halves(tg + 256 + 2 * off), mn = L::halves(tg + 288 + 2 * off);
  for (int m = 0; m < MB; ++m) {
    const typename L::F dx = L::mul(d, L::set1(a.xd[m * a.G + g]));
    acc[m] = L::fma(L::cvt(L::iadd(s0[m], s1[m])), dx, acc[m]);
    acc[m] = L::fma(mn, L::set1(a.xsum[m * a.G + g]), acc[m]);
  }
}

// The same against fp32 x: each code widened to fp32 in its lane (a shift and a mask per 16
// codes, no shuffles), acc[m] += (codes . x) * scale + min * xsum
template <int MB>
inline void tile_group_f32(const uint8_t* tg, int off, int64_t g, const Rows& a,
                           typename Lanes::F acc[MB]) {
  using L = Lanes;
  typename L::F s0[MB], s1[MB];
  for (int m = 0; m < MB; ++m) s0[m] = s1[m] = L::zero();
  for (int j = 0; j < 4; ++j) {
    const typename L::I p = L::load(tg + 64 * j + 4 * off);
    const typename L::I lo = L::low(p), hi = L::high(p);
#pragma GCC unroll 4
    for (int b = 0; b < 4; ++b) {
      const typename L::F wl = L::cvt(L::byte(lo, b)), wh = L::cvt(L::byte(hi, b));
      for (int m = 0; m < MB; ++m) {
        const float* xg = a.x + m * a.K + kGroup * g + 8 * j;
        s0[m] = L::fma(wl, L::set1(xg[b]), s0[m]);
        s1[m] = L::fma(wh, L::set1(xg[4 + b]), s1[m]);
      }
    }
  }
  const typename L::F d = L::halves(tg + 256 + 2 * off), mn = L::halves(tg + 288 + 2 * off);
  for (int m = 0; m < MB; ++m) {
    acc[m] = L::fma(L::add(s0[m], s1[m]), d, acc[m]);
    acc[m] = L::fma(mn, L::set1(a.xsum[m * a.G + g]), acc[m]);
  }
}

// MB rows of x against one row block of tiles (t: its G tiles, `rows` of its 16 real):
// y[m * ldy + r] for r < rows
template <int MB>
void tile_rows(const uint8_t* t, int rows, const Rows& a, const float* bias, float* y,
               int64_t ldy, bool prefetch) {
  using L = Lanes;
  for (int off = 0; off < rows; off += L::kRows) {
    typename L::F acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = L::zero();
    for (int64_t g = 0; g < a.G; ++g) {
      const uint8_t* tg = t + g * kTileBytes;
      if (prefetch && off == 0)  // tiles are read in memory order: stay ahead of the stream
        for (int64_t i = 0; i < kTileBytes; i += 64)
          _mm_prefetch(reinterpret_cast<const char*>(tg + kTileAhead * kTileBytes + i),
                       _MM_HINT_T1);
      if (a.xq)
        tile_group_x8<MB>(tg, off, g, a, acc);
      else
        tile_group_f32<MB>(tg, off, g, a, acc);
    }
    const int n = std::min(L::kRows, rows - off);
    const typename L::F b = bias ? L::load_n(bias + off, n) : L::zero();
    for (int m = 0; m < MB; ++m) L::store_n(y + m * ldy + off, L::add(acc[m], b), n);
  }
}

void tile_block(const uint8_t* t, int rows, int64_t M, const Rows& a, const float* bias,
                float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + kPassRows <= M; m += kPassRows)
    tile_rows<kPassRows>(t, rows, a.at(m), bias, y + m * ldy, ldy, m == 0);
  switch (M - m) {
    case 3: tile_rows<3>(t, rows, a.at(m), bias, y + m * ldy, ldy, m == 0); break;
    case 2: tile_rows<2>(t, rows, a.at(m), bias, y + m * ldy, ldy, m == 0); break;
    case 1: tile_rows<1>(t, rows, a.at(m), bias, y + m * ldy, ldy, m == 0); break;
  }
}

// x as the kernels read it: [M, K] contiguous, and (int8_x) rounded to int8 per group
struct Activations {
  at::Tensor x2;
  std::vector<int8_t> xq;
  std::vector<float> xd, xsum;
  int64_t M, K, G;

  Activations(const at::Tensor& x, int64_t K_, bool int8_x, bool sums)
      : x2(x.reshape({-1, K_}).contiguous()), M(x2.size(0)), K(K_), G(K_ / kGroup) {
    const float* xp = x2.data_ptr<float>();
    if (sums) xsum.resize(M * G);
    if (int8_x) {
      xq.resize(M * K);
      xd.resize(M * G);
      quantize_groups(xp, M * G, xq.data(), xd.data(), sums ? xsum.data() : nullptr);
      return;
    }
    for (size_t i = 0; i < xsum.size(); ++i) {
      const float* xg = xp + i * kGroup;
      __m256 acc = _mm256_loadu_ps(xg);
      for (int j = 8; j < kGroup; j += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(xg + j));
      xsum[i] = hsum(acc);
    }
  }
  Rows rows() const {
    return {xq.empty() ? x2.data_ptr<float>() : nullptr, xq.empty() ? nullptr : xq.data(),
            xd.data(), xsum.data(), K, G};
  }
};

void check_x(const at::Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, ": float32 CPU x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, name, ": x has ", x.size(-1), " columns, W has ",
              K);
}

const float* bias_data(const c10::optional<at::Tensor>& bias, int64_t N, const char* name) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
              name, ": float32 bias of ", N);
  return bias->data_ptr<float>();
}

at::Tensor output(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return at::empty(shape, x.options());
}

}  // namespace

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& tiles, int64_t n,
                     const c10::optional<at::Tensor>& bias, bool int8_x) {
  const char* name = "q4_linear";
  TORCH_CHECK(tiles.dim() == 3 && tiles.is_contiguous() && tiles.scalar_type() == at::kByte &&
                  tiles.size(2) == kTileBytes,
              name, ": contiguous uint8 tiles [T, G, ", kTileBytes, "], got ", tiles.sizes());
  const int64_t T = tiles.size(0), G = tiles.size(1), K = G * kGroup;
  TORCH_CHECK(n > 0 && (n + kTileRows - 1) / kTileRows == T, name, ": ", T,
              " row blocks of tiles do not hold ", n, " rows");
  check_x(x, K, name);
  const float* bp = bias_data(bias, n, name);
  at::Tensor y = output(x, n);
  const Activations act(x, K, int8_x, true);
  if (act.M == 0) return y;
  const Rows all = act.rows();
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // a thread's share is worth its wake-up from about 32 KB of weights on
  const int64_t grain = std::max<int64_t>(1, (32 * 1024) / (G * kTileBytes));
  for (int64_t c = 0; c < act.M; c += kChunkRows) {
    const int64_t mc = std::min(kChunkRows, act.M - c);
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, n - t * kTileRows));
        tile_block(tp + t * G * kTileBytes, rows, mc, all.at(c), bp ? bp + t * kTileRows : nullptr,
                   yp + c * n + t * kTileRows, n);
      }
    });
  }
  return y;
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias, bool int8_x) {
  const char* name = "q8_linear";
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.element_size() == 1, name,
              ": contiguous 2-D byte qs");
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous() && scales.scalar_type() == at::kHalf,
              name, ": contiguous float16 scales");
  const int64_t N = qs.size(0), G = scales.size(1), K = G * kGroup;
  TORCH_CHECK(scales.size(0) == N && qs.size(1) == K, name, ": qs ", qs.sizes(),
              " do not fit scales ", scales.sizes());
  check_x(x, K, name);
  const float* bp = bias_data(bias, N, name);
  at::Tensor y = output(x, N);
  const Activations act(x, K, int8_x, false);
  if (act.M == 0 || N == 0) return y;
  const int8_t* qp = static_cast<const int8_t*>(qs.data_ptr());
  const at::Half* dp = scales.data_ptr<at::Half>();
  const float* xp = act.x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (32 * 1024) / (G * (kGroup + 2)));
  for (int64_t c = 0; c < act.M; c += kChunkRows) {
    const int64_t mc = std::min(kChunkRows, act.M - c);
    const int8_t* xq = int8_x ? act.xq.data() + c * K : nullptr;
    const float* xd = int8_x ? act.xd.data() + c * G : nullptr;
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t r = n0; r < n1; ++r)
        q8_rows(xp + c * K, xq, xd, mc, K, qp + r * K, dp + r * G, G, bp ? bp[r] : 0.0f,
                yp + c * N + r, N);
    });
  }
  return y;
}

}  // namespace distspec
