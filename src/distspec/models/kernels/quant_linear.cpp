// Weight-only quantized y = x @ W^T (+ b) for the few rows of a decode step, a verification
// chunk or a small batch, W in ggml's block formats (groups of 32 along K, fp16 scales) moved
// into tiles of 16 output rows by one group (models/quantized.py Q4Tiles, Q8Tiles): one
// vector load holds 4 or 8 inputs of all 16 rows, one row per 32-bit lane, so no sum ever
// crosses lanes and 16 outputs are stored at once.
//   q4 (Q4_1, Q4_0): W = q * scale + min, q in 0..15, 320 bytes a tile.
//   q8 (Q8_0):       W = q * scale, q in -127..127, 544 bytes a tile.
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

// x to int8 per group of 32: scale max|x| / 127, round half away from zero as
// sign(y) * floor(|y| + 0.5) in fp32 (ggml's Q8_0; quantized.round_activations computes the
// same); xsum then sums the rounded values (the min term multiplies what the codes multiply)
// and xqsum their integers
void quantize_groups(const float* x, int64_t n_groups, int8_t* xq, float* xd, float* xsum,
                     int32_t* xqsum) {
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
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    const int32_t total = _mm_cvtsi128_si32(s4);
    if (xsum) xsum[i] = static_cast<float>(total) * d;
    if (xqsum) xqsum[i] = total;
  }
}

// ---- tiles: 16 output rows at a time, one row per vector lane ----

constexpr int kTileRows = 16;
// tiles prefetched ahead, into L2 (about 10 KB): the demo's gate/up matrices from memory then
// stream at 17.6 GB/s (2 cores, int4, int8 x), 14.6-15.5 asked into L1 (5-10 KB ahead);
// without any prefetch a model step from cache is 15-20% slower
constexpr int64_t kAheadBytes = 10240;

#ifdef __AVX512F__
// all 16 rows of a tile in one vector
struct Lanes {
  static constexpr int kRows = 16;
  using I = __m512i;
  using F = __m512;
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I low(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
  static I high(I v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
  // byte b of each dword as an int32: unsigned, or signed
  static I byte(I v, int b) {
    return _mm512_and_si512(_mm512_srli_epi32(v, 8 * b), _mm512_set1_epi32(0xFF));
  }
  static I sbyte(I v, int b) { return _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * b), 24); }
  // acc + per dword: its 4 unsigned bytes times the 4 signed bytes of x4
  static I dot(I acc, I u, int32_t x4) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, u, _mm512_set1_epi32(x4));
#else
    const I p = _mm512_maddubs_epi16(u, _mm512_set1_epi32(x4));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
#endif
  }
  // the same for 4 signed bytes s, from acc = signed_start(sum of x4's bytes over the group)
#ifdef __AVX512VNNI__
  // s + 128 is unsigned: the start takes 128 * sum(x) back off
  static I signed_start(int32_t xsum) { return _mm512_set1_epi32(-128 * xsum); }
  static I dot_signed(I acc, I s, int32_t x4) {
    return dot(acc, _mm512_xor_si512(s, _mm512_set1_epi8(-128)), x4);
  }
#else
  // |s| times x with s's sign (|s| <= 128, so the int16 pairs cannot saturate)
  static I signed_start(int32_t) { return izero(); }
  static I dot_signed(I acc, I s, int32_t x4) {
    const I x = _mm512_set1_epi32(x4);
    const __mmask64 neg = _mm512_movepi8_mask(s);
    const I sx = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
    const I p = _mm512_maddubs_epi16(_mm512_abs_epi8(s), sx);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
  }
#endif
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
  static I sbyte(I v, int b) { return _mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * b), 24); }
  static I dot(I acc, I u, int32_t x4) {
    const I p = _mm256_maddubs_epi16(u, _mm256_set1_epi32(x4));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
  static I signed_start(int32_t) { return izero(); }
  static I dot_signed(I acc, I s, int32_t x4) {
    const I p = _mm256_maddubs_epi16(_mm256_sign_epi8(s, s),
                                     _mm256_sign_epi8(_mm256_set1_epi32(x4), s));
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

using I = Lanes::I;
using F = Lanes::F;

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The activations of MB rows as a tile pass reads them: fp32 x or int8 xq with its group
// scales xd; per row and group, xsum: the sum of x as multiplied (for a min term) and xqsum:
// the sum of xq.
struct Rows {
  const float* x;
  const int8_t* xq;
  const float* xd;
  const float* xsum;
  const int32_t* xqsum;
  int64_t K, G;
  Rows at(int64_t m) const {
    return {x ? x + m * K : nullptr, xq ? xq + m * K : nullptr, xq ? xd + m * G : nullptr,
            xsum ? xsum + m * G : nullptr, xqsum ? xqsum + m * G : nullptr, K, G};
  }
};

// A tile format: its bytes, and one group of a tile (Lanes::kRows rows from row `off`)
// against MB rows of x, added to acc[m].
struct Q4Tile {
  // 4 x 64 bytes: dword r of chunk j holds row r's codes of inputs 8j + b (low nibble of byte
  // b) and 8j + 4 + b (high); then 16 fp16 scales, 16 fp16 mins
  static constexpr int64_t kBytes = 320, kScales = 256;
  static constexpr bool kMins = true, kIntSums = false;

  // acc[m] += (codes . xq) * scale * xd + min * xsum
  template <int MB>
  static void int8_x(const uint8_t* tg, int off, int64_t g, const Rows& a, F acc[MB]) {
    I s0[MB], s1[MB];  // low and high nibbles' sums: two chains, not one
    for (int m = 0; m < MB; ++m) s0[m] = s1[m] = Lanes::izero();
    for (int j = 0; j < 4; ++j) {
      const I p = Lanes::load(tg + 64 * j + 4 * off);
      const I lo = Lanes::low(p), hi = Lanes::high(p);
      for (int m = 0; m < MB; ++m) {
        const int8_t* xg = a.xq + m * a.K + kGroup * g + 8 * j;
        s0[m] = Lanes::dot(s0[m], lo, load4(xg));
        s1[m] = Lanes::dot(s1[m], hi, load4(xg + 4));
      }
    }
    const F d = Lanes::halves(tg + kScales + 2 * off), mn = Lanes::halves(tg + 288 + 2 * off);
    for (int m = 0; m < MB; ++m) {
      const F dx = Lanes::mul(d, Lanes::set1(a.xd[m * a.G + g]));
      acc[m] = Lanes::fma(Lanes::cvt(Lanes::iadd(s0[m], s1[m])), dx, acc[m]);
      acc[m] = Lanes::fma(mn, Lanes::set1(a.xsum[m * a.G + g]), acc[m]);
    }
  }

  // acc[m] += (codes . x) * scale + min * xsum, each code widened to fp32 in its lane (a
  // shift and a mask per 16 codes, no shuffles)
  template <int MB>
  static void fp32_x(const uint8_t* tg, int off, int64_t g, const Rows& a, F acc[MB]) {
    F s0[MB], s1[MB];
    for (int m = 0; m < MB; ++m) s0[m] = s1[m] = Lanes::zero();
    for (int j = 0; j < 4; ++j) {
      const I p = Lanes::load(tg + 64 * j + 4 * off);
      const I lo = Lanes::low(p), hi = Lanes::high(p);
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) {
        const F wl = Lanes::cvt(Lanes::byte(lo, b)), wh = Lanes::cvt(Lanes::byte(hi, b));
        for (int m = 0; m < MB; ++m) {
          const float* xg = a.x + m * a.K + kGroup * g + 8 * j;
          s0[m] = Lanes::fma(wl, Lanes::set1(xg[b]), s0[m]);
          s1[m] = Lanes::fma(wh, Lanes::set1(xg[4 + b]), s1[m]);
        }
      }
    }
    const F d = Lanes::halves(tg + kScales + 2 * off), mn = Lanes::halves(tg + 288 + 2 * off);
    for (int m = 0; m < MB; ++m) {
      acc[m] = Lanes::fma(Lanes::add(s0[m], s1[m]), d, acc[m]);
      acc[m] = Lanes::fma(mn, Lanes::set1(a.xsum[m * a.G + g]), acc[m]);
    }
  }
};

struct Q8Tile {
  // 8 x 64 bytes: dword r of chunk j holds row r's codes of inputs 4j .. 4j + 3 (signed
  // bytes); then 16 fp16 scales
  static constexpr int64_t kBytes = 544, kScales = 512;
  static constexpr bool kMins = false, kIntSums = true;

  // acc[m] += (codes . xq) * scale * xd
  template <int MB>
  static void int8_x(const uint8_t* tg, int off, int64_t g, const Rows& a, F acc[MB]) {
    I s0[MB], s1[MB];
    for (int m = 0; m < MB; ++m) {
      s0[m] = Lanes::signed_start(a.xqsum[m * a.G + g]);
      s1[m] = Lanes::izero();
    }
    for (int j = 0; j < 8; j += 2) {
      const I p0 = Lanes::load(tg + 64 * j + 4 * off), p1 = Lanes::load(tg + 64 * j + 64 + 4 * off);
      for (int m = 0; m < MB; ++m) {
        const int8_t* xg = a.xq + m * a.K + kGroup * g + 4 * j;
        s0[m] = Lanes::dot_signed(s0[m], p0, load4(xg));
        s1[m] = Lanes::dot_signed(s1[m], p1, load4(xg + 4));
      }
    }
    const F d = Lanes::halves(tg + kScales + 2 * off);
    for (int m = 0; m < MB; ++m) {
      const F dx = Lanes::mul(d, Lanes::set1(a.xd[m * a.G + g]));
      acc[m] = Lanes::fma(Lanes::cvt(Lanes::iadd(s0[m], s1[m])), dx, acc[m]);
    }
  }

  template <int MB>
  static void fp32_x(const uint8_t* tg, int off, int64_t g, const Rows& a, F acc[MB]) {
    F s0[MB], s1[MB];
    for (int m = 0; m < MB; ++m) s0[m] = s1[m] = Lanes::zero();
    for (int j = 0; j < 8; j += 2) {
      const I p0 = Lanes::load(tg + 64 * j + 4 * off), p1 = Lanes::load(tg + 64 * j + 64 + 4 * off);
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) {
        const F w0 = Lanes::cvt(Lanes::sbyte(p0, b)), w1 = Lanes::cvt(Lanes::sbyte(p1, b));
        for (int m = 0; m < MB; ++m) {
          const float* xg = a.x + m * a.K + kGroup * g + 4 * j;
          s0[m] = Lanes::fma(w0, Lanes::set1(xg[b]), s0[m]);
          s1[m] = Lanes::fma(w1, Lanes::set1(xg[4 + b]), s1[m]);
        }
      }
    }
    const F d = Lanes::halves(tg + kScales + 2 * off);
    for (int m = 0; m < MB; ++m) acc[m] = Lanes::fma(Lanes::add(s0[m], s1[m]), d, acc[m]);
  }
};

// MB rows of x against one row block of tiles (t: its G tiles, `rows` of its 16 real):
// y[m * ldy + r] for r < rows
template <class T, int MB>
void tile_rows(const uint8_t* t, int rows, const Rows& a, const float* bias, float* y,
               int64_t ldy, bool prefetch) {
  constexpr int64_t ahead = kAheadBytes / T::kBytes * T::kBytes;
  for (int off = 0; off < rows; off += Lanes::kRows) {
    F acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = Lanes::zero();
    for (int64_t g = 0; g < a.G; ++g) {
      const uint8_t* tg = t + g * T::kBytes;
      if (prefetch && off == 0)  // tiles are read in memory order: stay ahead of the stream
        for (int64_t i = 0; i < T::kBytes; i += 64)
          _mm_prefetch(reinterpret_cast<const char*>(tg + ahead + i), _MM_HINT_T1);
      if (a.xq)
        T::template int8_x<MB>(tg, off, g, a, acc);
      else
        T::template fp32_x<MB>(tg, off, g, a, acc);
    }
    const int n = std::min(Lanes::kRows, rows - off);
    const F b = bias ? Lanes::load_n(bias + off, n) : Lanes::zero();
    for (int m = 0; m < MB; ++m) Lanes::store_n(y + m * ldy + off, Lanes::add(acc[m], b), n);
  }
}

template <class T>
void tile_block(const uint8_t* t, int rows, int64_t M, const Rows& a, const float* bias,
                float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + kPassRows <= M; m += kPassRows)
    tile_rows<T, kPassRows>(t, rows, a.at(m), bias, y + m * ldy, ldy, m == 0);
  switch (M - m) {
    case 3: tile_rows<T, 3>(t, rows, a.at(m), bias, y + m * ldy, ldy, m == 0); break;
    case 2: tile_rows<T, 2>(t, rows, a.at(m), bias, y + m * ldy, ldy, m == 0); break;
    case 1: tile_rows<T, 1>(t, rows, a.at(m), bias, y + m * ldy, ldy, m == 0); break;
  }
}

// x as the kernels read it: [M, K] contiguous, (int8_x) rounded to int8 per group, and the
// per-group sums the format needs
struct Activations {
  at::Tensor x2;
  std::vector<int8_t> xq;
  std::vector<float> xd, xsum;
  std::vector<int32_t> xqsum;
  int64_t M, K, G;

  Activations(const at::Tensor& x, int64_t K_, bool int8_x, bool sums, bool int_sums)
      : x2(x.reshape({-1, K_}).contiguous()), M(x2.size(0)), K(K_), G(K_ / kGroup) {
    const float* xp = x2.data_ptr<float>();
    if (sums) xsum.resize(M * G);
    if (int8_x) {
      xq.resize(M * K);
      xd.resize(M * G);
      if (int_sums) xqsum.resize(M * G);
      quantize_groups(xp, M * G, xq.data(), xd.data(), sums ? xsum.data() : nullptr,
                      int_sums ? xqsum.data() : nullptr);
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
    const bool q = !xq.empty();
    return {q ? nullptr : x2.data_ptr<float>(), q ? xq.data() : nullptr, xd.data(),
            xsum.empty() ? nullptr : xsum.data(), xqsum.empty() ? nullptr : xqsum.data(), K, G};
  }
};

template <class T>
at::Tensor tiles_linear(const at::Tensor& x, const at::Tensor& tiles, int64_t n,
                        const c10::optional<at::Tensor>& bias, bool int8_x, const char* name) {
  TORCH_CHECK(tiles.dim() == 3 && tiles.is_contiguous() && tiles.scalar_type() == at::kByte &&
                  tiles.size(2) == T::kBytes,
              name, ": contiguous uint8 tiles [T, G, ", T::kBytes, "], got ", tiles.sizes());
  const int64_t nt = tiles.size(0), G = tiles.size(1), K = G * kGroup;
  TORCH_CHECK(n > 0 && (n + kTileRows - 1) / kTileRows == nt, name, ": ", nt,
              " row blocks of tiles do not hold ", n, " rows");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, ": float32 CPU x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, name, ": x has ", x.size(-1), " columns, W has ",
              K);
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_contiguous(),
                name, ": float32 bias of ", n);
    bp = bias->data_ptr<float>();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  const Activations act(x, K, int8_x, T::kMins, T::kIntSums && int8_x);
  if (act.M == 0) return y;
  const Rows all = act.rows();
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // a thread's share is worth its wake-up from about 32 KB of weights on
  const int64_t grain = std::max<int64_t>(1, (32 * 1024) / (G * T::kBytes));
  for (int64_t c = 0; c < act.M; c += kChunkRows) {
    const int64_t mc = std::min(kChunkRows, act.M - c);
    at::parallel_for(0, nt, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, n - t * kTileRows));
        tile_block<T>(tp + t * G * T::kBytes, rows, mc, all.at(c),
                      bp ? bp + t * kTileRows : nullptr, yp + c * n + t * kTileRows, n);
      }
    });
  }
  return y;
}

}  // namespace

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& tiles, int64_t n,
                     const c10::optional<at::Tensor>& bias, bool int8_x) {
  return tiles_linear<Q4Tile>(x, tiles, n, bias, int8_x, "q4_linear");
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& tiles, int64_t n,
                     const c10::optional<at::Tensor>& bias, bool int8_x) {
  return tiles_linear<Q8Tile>(x, tiles, n, bias, int8_x, "q8_linear");
}

}  // namespace distspec
