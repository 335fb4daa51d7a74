// The small fp32 ops of a decoder layer, one call each where PyTorch takes 3-10: at one token
// per step their dispatch costs more than their arithmetic (the weights aside).
//   rms_norm:  y = x / sqrt(mean(x^2) + eps) * w, per row
//   silu_mul:  y = silu(g) * u for gu = [g | u] along the last dim
//   attend:    from a fused q/k/v projection: RoPE on q and k (y = x * cos + roll(x, D/2) *
//              signed_sin, signed_sin's first half negated), k and v written into the static KV
//              cache at (slot, position), then softmax(q k^T / sqrt(D)) v reading each
//              sequence's cache rows in place (no gather, no mask tensor): a query at position
//              p sees keys [max(0, p - window + 1), p]. A token tree (tree [B, T, T]: query t
//              sees chunk key u where tree[b, t, u]) replaces the chunk's causal order: a
//              query sees the keys before the chunk and its ancestors' in the chunk, the
//              window counted from its depth in the tree (the position RoPE gave it).

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace distspec {

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
inline void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// e^x for x <= 0, 8 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial in r times 2^n; within 2 ulp of std::exp); below -87 it flushes to ~0
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// 1 / (1 + e^-x) from e = e^-|x| (never overflows): 1 / (1 + e) for x >= 0, else e / (1 + e)
inline __m256 sigmoid(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 e = exp_nonpositive(_mm256_or_ps(x, sign));  // e^-|x|
  const __m256 r = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  return _mm256_blendv_ps(r, _mm256_mul_ps(e, r), x);  // x's sign bit picks e / (1 + e)
}

// w[u] = exp(w[u] - mx) for u < n (w has room for 8 more); returns their sum
inline float exp_shifted(float* w, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t u = 0;
  for (; u + 8 <= n; u += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(w + u), m));
    _mm256_storeu_ps(w + u, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  if (u < n) {  // the tail through the same lanes (padded), summed in order
    alignas(32) float tail[8];
    std::fill_n(tail, 8, mx);
    std::copy(w + u, w + n, tail);
    _mm256_store_ps(tail, exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(tail), m)));
    for (int64_t v = u; v < n; ++v) sum += (w[v] = tail[v - u]);
  }
  return sum;
}

// the dot products of q (in registers) with 4 keys, reduced together: [4] sums
template <int ND>
inline __m128 dot4(const __m256* q, const float* k0, const float* k1, const float* k2,
                   const float* k3) {
  __m256 a0 = _mm256_mul_ps(q[0], _mm256_loadu_ps(k0)), a1 = _mm256_mul_ps(q[0], _mm256_loadu_ps(k1));
  __m256 a2 = _mm256_mul_ps(q[0], _mm256_loadu_ps(k2)), a3 = _mm256_mul_ps(q[0], _mm256_loadu_ps(k3));
  for (int d = 1; d < ND; ++d) {
    a0 = _mm256_fmadd_ps(q[d], _mm256_loadu_ps(k0 + 8 * d), a0);
    a1 = _mm256_fmadd_ps(q[d], _mm256_loadu_ps(k1 + 8 * d), a1);
    a2 = _mm256_fmadd_ps(q[d], _mm256_loadu_ps(k2 + 8 * d), a2);
    a3 = _mm256_fmadd_ps(q[d], _mm256_loadu_ps(k3 + 8 * d), a3);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// softmax(q k^T * scale) v for one query over the keys keys[0..n) of one head (rows of D =
// 8 ND floats); w: room for n + 8 scores; y: D outputs. q and y stay in registers.
template <int ND>
void attend_row(const float* qr, const float* k, const float* v, const int64_t* keys, int64_t n,
                float scale, float* w, float* yr) {
  constexpr int D = 8 * ND;
  __m256 q[ND];
  for (int d = 0; d < ND; ++d) q[d] = _mm256_loadu_ps(qr + 8 * d);
  int64_t u = 0;
  const __m128 sc = _mm_set1_ps(scale);
  for (; u + 4 <= n; u += 4) {
    const __m128 s = dot4<ND>(q, k + keys[u] * D, k + keys[u + 1] * D, k + keys[u + 2] * D,
                              k + keys[u + 3] * D);
    _mm_storeu_ps(w + u, _mm_mul_ps(s, sc));
  }
  for (; u < n; ++u) {  // the last keys through the same reduction, against themselves
    const float* kk = k + keys[u] * D;
    w[u] = _mm_cvtss_f32(_mm_mul_ps(dot4<ND>(q, kk, kk, kk, kk), sc));
  }
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, w[j]);
  const float sum = exp_shifted(w, n, mx);
  __m256 y[ND];
  for (int d = 0; d < ND; ++d) y[d] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 wj = _mm256_set1_ps(w[j]);
    const float* vr = v + keys[j] * D;
    for (int d = 0; d < ND; ++d) y[d] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(vr + 8 * d), y[d]);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (int d = 0; d < ND; ++d) _mm256_storeu_ps(yr + 8 * d, _mm256_mul_ps(y[d], inv));
}

void check_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, what, ": float32 CPU tensor");
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float(x, "rms_norm x");
  check_float(weight, "rms_norm weight");
  const int64_t H = weight.numel();
  TORCH_CHECK(x.size(-1) == H && weight.is_contiguous(), "rms_norm: weight of ", x.size(-1));
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t M = xc.numel() / std::max<int64_t>(H, 1);
  const float *xp = xc.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = xp + m * H;
      float* yr = yp + m * H;
      const float r = 1.0f / std::sqrt(dot(xr, xr, H) / H + static_cast<float>(eps));
      for (int64_t i = 0; i < H; ++i) yr[i] = wp[i] * (xr[i] * r);
    }
  });
  return y;
}

// y = x * cos + roll(x, D/2) * signed_sin for one head (the products and the sum rounded as
// PyTorch's separate ops round them)
inline void rope_row(const float* x, const float* c, const float* s, float* y, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    y[i] = x[i] * c[i] + x[i + half] * s[i];
    y[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
  }
}

at::Tensor silu_mul(const at::Tensor& gu) {
  check_float(gu, "silu_mul");
  const at::Tensor g2 = gu.contiguous();
  const int64_t I = g2.size(-1) / 2, M = g2.numel() / std::max<int64_t>(2 * I, 1);
  std::vector<int64_t> shape(g2.sizes().begin(), g2.sizes().end());
  shape.back() = I;
  at::Tensor y = at::empty(shape, g2.options());
  const float* gp = g2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float *g = gp + m * 2 * I, *u = g + I;
      float* yr = yp + m * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid(gv)),
                                               _mm256_loadu_ps(u + i)));
      }
      for (; i < I; ++i) yr[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
  return y;
}

// qkv: [B, T, Hq + 2 Hkv, D] (a fused projection's output, D contiguous); cos, sin: [B or 1,
// T or 1, 1, D]; k_cache, v_cache: [S, Hkv, L, D] contiguous; slots: [B]; pos: [B, T].
// Rotates q and k, writes k and v at (slot, pos), attends. Returns [B, T, Hq, D].
at::Tensor attend(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                  const at::Tensor& pos, int64_t n_q, int64_t window,
                  const c10::optional<at::Tensor>& tree) {
  check_float(qkv, "attend qkv");
  check_float(cos, "attend cos");
  check_float(sin, "attend sin");
  check_float(k_cache, "attend k_cache");
  check_float(v_cache, "attend v_cache");
  TORCH_CHECK(qkv.dim() == 4 && qkv.stride(3) == 1, "attend: qkv [B, T, H, D], D contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  v_cache.sizes() == k_cache.sizes(),
              "attend: contiguous caches [S, Hkv, L, D]");
  const int64_t B = qkv.size(0), T = qkv.size(1), D = qkv.size(3), Hq = n_q;
  const int64_t S = k_cache.size(0), Hkv = k_cache.size(1), L = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hq > 0 && Hq % Hkv == 0 && qkv.size(2) == Hq + 2 * Hkv,
              "attend: head counts do not fit (qkv ", qkv.sizes(), ", cache ", k_cache.sizes(), ")");
  TORCH_CHECK(cos.dim() == 4 && cos.sizes() == sin.sizes() && cos.size(3) == D &&
                  cos.stride(3) == 1 && cos.strides() == sin.strides(),
              "attend: cos, sin [B or 1, T or 1, 1, D] alike, D contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && pos.scalar_type() == at::kLong,
              "attend: int64 slots and positions");
  const at::Tensor sl = slots.is_contiguous() ? slots : slots.contiguous();
  const at::Tensor ps = pos.is_contiguous() ? pos : pos.contiguous();
  TORCH_CHECK(sl.numel() == B && ps.numel() == B * T, "attend: slots [B] and pos [B, T]");
  const int64_t *slp = sl.data_ptr<int64_t>(), *pp = ps.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i)
    TORCH_CHECK(pp[i] >= 0 && pp[i] < L, "attend: position out of the cache");
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(slp[b] >= 0 && slp[b] < S, "attend: bad slot");
  const bool* tp = nullptr;  // tree[b, t, u], and each query's depth in it
  std::vector<int64_t> depth;
  at::Tensor tr;
  if (tree.has_value()) {
    tr = tree->contiguous();
    TORCH_CHECK(tr.scalar_type() == at::kBool && tr.dim() == 3 && tr.size(0) == B &&
                    tr.size(1) == T && tr.size(2) == T,
                "attend: tree [B, T, T] bool");
    tp = tr.data_ptr<bool>();
    depth.assign(B * T, -1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        TORCH_CHECK(pp[b * T + t] == pp[b * T] + t, "attend: a tree's chunk has consecutive positions");
        for (int64_t u = 0; u < T; ++u) depth[b * T + t] += tp[(b * T + t) * T + u];
      }
  }

  // rope on q (into a buffer) and k (into the cache), v into the cache
  at::Tensor q = at::empty({B, T, Hq, D}, qkv.options());
  float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  const float *xp = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), ct = cos.size(1) == 1 ? 0 : cos.stride(1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const float* x = xp + b * qkv.stride(0) + t * qkv.stride(1);
      const float *c = cp + b * cb + t * ct, *sn = snp + b * cb + t * ct;
      for (int64_t h = 0; h < Hq; ++h)
        rope_row(x + h * qkv.stride(2), c, sn, qp + ((b * T + t) * Hq + h) * D, D);
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t dst = ((slp[b] * Hkv + h) * L + pp[b * T + t]) * D;
        rope_row(x + (Hq + h) * qkv.stride(2), c, sn, kp + dst, D);
        std::copy_n(x + (Hq + Hkv + h) * qkv.stride(2), D, vp + dst);
      }
    }

  at::Tensor y = at::empty({B, T, Hq, D}, qkv.options());
  float* yp = y.data_ptr<float>();
  const int64_t group = Hq / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  int64_t work = 0;  // key dot products; a short decode step is not worth waking a thread
  for (int64_t i = 0; i < B * T; ++i) work += (pp[i] + 1) * Hq;
  const int64_t grain = work * D < (1 << 16) ? B * Hq * T : 1;
  at::parallel_for(0, B * Hq * T, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> w(L + 8);
    std::vector<int64_t> keys(L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (Hq * T), h = (i / T) % Hq, t = i % T;
      const int64_t p = pp[b * T + t], start = pp[b * T];
      const int64_t rope_p = tp ? start + depth[b * T + t] : p;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, rope_p - window + 1) : 0;
      const bool* row = tp ? tp + (b * T + t) * T : nullptr;
      // the keys it sees: all of [lo, p]; with a tree, those before the chunk and its
      // ancestors' (within the window)
      int64_t n = 0;
      for (int64_t j = lo; j <= p; ++j)
        if (!row || j < start || (row[j - start] && start + depth[b * T + j - start] >= lo))
          keys[n++] = j;
      const float* qr = qp + ((b * T + t) * Hq + h) * D;
      const int64_t kv = (slp[b] * Hkv + h / group) * L * D;
      float* yr = yp + ((b * T + t) * Hq + h) * D;
      const float *kh = kp + kv, *vh = vp + kv;
      switch (D) {  // the head sizes models use: q and the output kept in registers
        case 64: attend_row<8>(qr, kh, vh, keys.data(), n, scale, w.data(), yr); break;
        case 128: attend_row<16>(qr, kh, vh, keys.data(), n, scale, w.data(), yr); break;
        case 32: attend_row<4>(qr, kh, vh, keys.data(), n, scale, w.data(), yr); break;
        case 16: attend_row<2>(qr, kh, vh, keys.data(), n, scale, w.data(), yr); break;
        default: {
          float mx = -INFINITY;
          for (int64_t u = 0; u < n; ++u) {
            w[u] = dot(qr, kh + keys[u] * D, D) * scale;
            mx = std::max(mx, w[u]);
          }
          const float sum = exp_shifted(w.data(), n, mx);
          std::fill_n(yr, D, 0.0f);
          for (int64_t u = 0; u < n; ++u) axpy(w[u], vh + keys[u] * D, yr, D);
          const float inv = 1.0f / sum;
          for (int64_t d = 0; d < D; ++d) yr[d] *= inv;
        }
      }
    }
  });
  return y;
}

}  // namespace distspec
