// One decoder layer of a decode step, verification chunk or small batch in one call from
// Python: at one token per step the ~15 Python-level calls a layer otherwise makes (modules,
// norms, views, adds) cost more than its attention. Same kernels, same order of operations as
// models/llama.py's Block on its fp32 CPU path, so the result is bitwise the same.

#include "decoder_layer.h"
#include "ops.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace distspec {

LinearOp::LinearOp(const std::string& kind, std::vector<at::Tensor> parts,
                   c10::optional<at::Tensor> bias, bool int8_x, int64_t out_features)
    : parts_(std::move(parts)), bias_(std::move(bias)), int8_x_(int8_x),
      out_features_(out_features) {
  const size_t want = kind == "fp32" ? 1 : kind == "q4" ? 1 : kind == "q8" ? 1 : 0;
  TORCH_CHECK(want > 0, "LinearOp: kind is fp32, q4 or q8, got ", kind);
  TORCH_CHECK(parts_.size() == want, "LinearOp: ", kind, " takes ", want, " tensors, got ",
              parts_.size());
  kind_ = kind == "fp32" ? Kind::kFp32 : kind == "q4" ? Kind::kQ4 : Kind::kQ8;
}

at::Tensor LinearOp::operator()(const at::Tensor& x) const {
  switch (kind_) {
    case Kind::kFp32: {
      const at::Tensor& w = parts_[0];
      if (x.numel() <= kMaxRows * w.size(1)) return skinny_linear(x, w, bias_);
      return at::linear(x, w, bias_);  // prefill: BLAS
    }
    case Kind::kQ4:
      return q4_linear(x, parts_[0], out_features_, bias_, int8_x_);
    case Kind::kQ8:
      return q8_linear(x, parts_[0], out_features_, bias_, int8_x_);
  }
  TORCH_CHECK(false, "LinearOp: unknown kind");
}

DecoderLayer::DecoderLayer(at::Tensor attn_norm, at::Tensor mlp_norm, double eps, LinearOp wqkv,
                           LinearOp wo, LinearOp gate_up, LinearOp down, at::Tensor k_cache,
                           at::Tensor v_cache, int64_t n_q, int64_t window)
    : attn_norm_(std::move(attn_norm)),
      mlp_norm_(std::move(mlp_norm)),
      eps_(eps),
      wqkv_(std::move(wqkv)),
      wo_(std::move(wo)),
      gate_up_(std::move(gate_up)),
      down_(std::move(down)),
      k_cache_(std::move(k_cache)),
      v_cache_(std::move(v_cache)),
      n_q_(n_q),
      window_(window) {}

at::Tensor DecoderLayer::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                 const at::Tensor& slots, const at::Tensor& pos,
                                 const c10::optional<at::Tensor>& tree) const {
  TORCH_CHECK(x.dim() == 3, "DecoderLayer: x [B, T, H]");
  const int64_t B = x.size(0), T = x.size(1), D = k_cache_.size(3);
  const at::Tensor qkv = wqkv_(rms_norm(x, attn_norm_, eps_)).view({B, T, -1, D});
  const at::Tensor y = attend(qkv, cos, sin, k_cache_, v_cache_, slots, pos, n_q_, window_, tree);
  at::Tensor h = wo_(y.view({B, T, n_q_ * D}));
  h.add_(x);  // x + attention: a new tensor, x may be the caller's
  h.add_(down_(silu_mul(gate_up_(rms_norm(h, mlp_norm_, eps_)))));
  return h;
}

DecoderStack::DecoderStack(std::vector<DecoderLayer> layers, at::Tensor norm, double eps,
                           LinearOp head)
    : layers_(std::move(layers)), norm_(std::move(norm)), eps_(eps), head_(std::move(head)) {}

at::Tensor DecoderStack::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                 const at::Tensor& slots, const at::Tensor& pos,
                                 int64_t last, const c10::optional<at::Tensor>& tree) const {
  at::Tensor h = x;
  for (const DecoderLayer& layer : layers_) h = layer.forward(h, cos, sin, slots, pos, tree);
  if (last > 0) h = h.slice(1, std::max<int64_t>(0, h.size(1) - last), h.size(1));
  return head_(rms_norm(h, norm_, eps_));
}

}  // namespace distspec
