// The kernels' entry points (skinny_linear.cpp, quant_linear.cpp, decode_ops.cpp), for the
// Python bindings and for decoder_layer.cpp, which calls them directly.
#pragma once

#include <ATen/core/Tensor.h>

namespace distspec {

extern const int64_t kMaxRows;  // skinny_linear's most rows of x
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias);
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& tiles, int64_t n,
                     const c10::optional<at::Tensor>& bias, bool int8_x);
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& tiles, int64_t n,
                     const c10::optional<at::Tensor>& bias, bool int8_x);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gu);
at::Tensor attend(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                  const at::Tensor& pos, int64_t n_q, int64_t window,
                  const c10::optional<at::Tensor>& tree);

}  // namespace distspec
