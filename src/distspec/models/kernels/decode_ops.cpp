// The small fp32 ops of a decoder layer, one call each where PyTorch takes 3-10: at one token
// per step their dispatch costs more than their arithmetic (the weights aside).
//   rms_norm:  y = x / sqrt(mean(x^2) + eps) * w, per row
//   rope:      y = x * cos + roll(x, D/2) * signed_sin (signed_sin's first half negated)
//   silu_mul:  y = silu(g) * u for gu = [g | u] along the last dim
//   attention: writes the new keys and values into the static KV cache at (slot, position),
//              then softmax(q k^T / sqrt(D)) v reading each sequence's cache rows in place (no
//              gather, no mask tensor): query at position p sees keys [max(0, p - window + 1), p].

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace distspec {

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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

// x: [B, T, H, D] (any strides over B, T, H; D contiguous); cos, sin: [B, T, 1, D]
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_float(x, "rope x");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rope: x [B, T, H, D], D contiguous");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  const at::Tensor c = cos.expand({B, T, 1, D}).contiguous();
  const at::Tensor s = sin.expand({B, T, 1, D}).contiguous();
  at::Tensor y = at::empty({B, T, H, D}, x.options());
  const float *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const float* cr = cp + (b * T + t) * D;
      const float* sr = sp + (b * T + t) * D;
      for (int64_t h = 0; h < H; ++h) {
        const float* xr = xp + b * sb + t * st + h * sh;
        float* yr = yp + ((b * T + t) * H + h) * D;
        for (int64_t i = 0; i < half; ++i) {
          yr[i] = xr[i] * cr[i] + xr[i + half] * sr[i];
          yr[i + half] = xr[i + half] * cr[i + half] + xr[i] * sr[i + half];
        }
      }
    }
  return y;
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
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < I; ++i) {
      const float g = gp[m * 2 * I + i];
      yp[m * I + i] = g / (1.0f + std::exp(-g)) * gp[m * 2 * I + I + i];
    }
  return y;
}

// q: [B, T, Hq, D], k, v: [B, T, Hkv, D] (D contiguous); k_cache, v_cache: [S, Hkv, L, D]
// contiguous; slots: [B]; pos: [B, T]. Returns [B, T, Hq, D].
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& slots, const at::Tensor& pos, int64_t window) {
  check_float(q, "attention q");
  check_float(k_cache, "attention k_cache");
  check_float(v_cache, "attention v_cache");
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1, "attention: q [B, T, Hq, D], D contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4,
              "attention: contiguous caches [S, Hkv, L, D]");
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), L = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hq % Hkv == 0, "attention: head shapes do not fit");
  const at::Tensor sl = slots.to(at::kLong).contiguous();
  const at::Tensor ps = pos.to(at::kLong).contiguous();
  TORCH_CHECK(sl.numel() == B && ps.numel() == B * T, "attention: slots [B] and pos [B, T]");
  const int64_t *slp = sl.data_ptr<int64_t>(), *pp = ps.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i) TORCH_CHECK(pp[i] >= 0 && pp[i] < L, "attention: position out of the cache");
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(slp[b] >= 0 && slp[b] < k_cache.size(0), "attention: bad slot");
  check_float(k, "attention k");
  check_float(v, "attention v");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == B && k.size(1) == T &&
                  k.size(2) == Hkv && k.size(3) == D && v.sizes() == k.sizes() &&
                  k.stride(3) == 1 && v.stride(3) == 1,
              "attention: new k, v [B, T, Hkv, D], D contiguous");
  {
    float *kcp = k_cache.data_ptr<float>(), *vcp = v_cache.data_ptr<float>();
    const float *knp = k.data_ptr<float>(), *vnp = v.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < Hkv; ++h) {
          const int64_t dst = ((slp[b] * Hkv + h) * L + pp[b * T + t]) * D;
          std::copy_n(knp + b * k.stride(0) + t * k.stride(1) + h * k.stride(2), D, kcp + dst);
          std::copy_n(vnp + b * v.stride(0) + t * v.stride(1) + h * v.stride(2), D, vcp + dst);
        }
  }
  at::Tensor y = at::zeros({B, T, Hq, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t group = Hq / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * Hq * T, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> w(L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (Hq * T), h = (i / T) % Hq, t = i % T;
      const int64_t p = pp[b * T + t];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
      const float* qr = qp + b * q.stride(0) + t * q.stride(1) + h * q.stride(2);
      const int64_t kv = (slp[b] * Hkv + h / group) * L * D;
      float mx = -INFINITY;
      for (int64_t j = lo; j <= p; ++j) {
        w[j] = dot(qr, kp + kv + j * D, D) * scale;
        mx = std::max(mx, w[j]);
      }
      float sum = 0.0f;
      for (int64_t j = lo; j <= p; ++j) sum += (w[j] = std::exp(w[j] - mx));
      float* yr = yp + ((b * T + t) * Hq + h) * D;
      for (int64_t j = lo; j <= p; ++j) axpy(w[j], vp + kv + j * D, yr, D);
      const float inv = 1.0f / sum;
      for (int64_t d = 0; d < D; ++d) yr[d] *= inv;
    }
  });
  return y;
}

}  // namespace distspec
