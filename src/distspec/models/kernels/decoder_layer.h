// A linear layer in any of the kernels' weight formats, and a whole decoder layer built from
// them (decoder_layer.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace distspec {

// y = x @ W^T (+ b) with W as fp32 [N, K] ("fp32"), or ggml blocks: "q4" (qs, scales, mins),
// "q8" (qs, scales); int8_x: the quantized kernels' int8 activations.
class LinearOp {
 public:
  // q4, q8: parts = {tiles} (models/quantized.py) and out_features their rows; fp32: {weight}
  LinearOp(const std::string& kind, std::vector<at::Tensor> parts, c10::optional<at::Tensor> bias,
           bool int8_x, int64_t out_features = 0);
  at::Tensor operator()(const at::Tensor& x) const;

 private:
  enum class Kind { kFp32, kQ4, kQ8 };
  Kind kind_;
  std::vector<at::Tensor> parts_;
  c10::optional<at::Tensor> bias_;
  bool int8_x_;
  int64_t out_features_;
};

// h = x + wo(attend(wqkv(norm(x)))); return h + down(silu_mul(gate_up(norm(h)))), with the KV
// cache written at (slot, pos) as attend writes it. Holds references to the weights and the
// cache, no copies.
class DecoderLayer {
 public:
  DecoderLayer(at::Tensor attn_norm, at::Tensor mlp_norm, double eps, LinearOp wqkv, LinearOp wo,
               LinearOp gate_up, LinearOp down, at::Tensor k_cache, at::Tensor v_cache,
               int64_t n_q, int64_t window);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& slots, const at::Tensor& pos,
                     const c10::optional<at::Tensor>& tree) const;

 private:
  at::Tensor attn_norm_, mlp_norm_;
  double eps_;
  LinearOp wqkv_, wo_, gate_up_, down_;
  at::Tensor k_cache_, v_cache_;
  int64_t n_q_, window_;
};

// The whole cached forward after the embedding: every layer, the final norm and the head, with
// no Python between them. last > 0: logits of each sequence's last `last` positions only;
// tree: a token tree's visibility within the chunk (see attend).
class DecoderStack {
 public:
  DecoderStack(std::vector<DecoderLayer> layers, at::Tensor norm, double eps, LinearOp head);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& slots, const at::Tensor& pos, int64_t last,
                     const c10::optional<at::Tensor>& tree) const;

 private:
  std::vector<DecoderLayer> layers_;
  at::Tensor norm_;
  double eps_;
  LinearOp head_;
};

}  // namespace distspec
