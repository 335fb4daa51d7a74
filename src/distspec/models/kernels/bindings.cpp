// The Python module of distspec's CPU kernels (one library, every kernel file). Every call
// releases the GIL while it computes (arguments are converted before, results after): a
// drafter thread and the target's thread then really run at once (PEARL), not in turn.

#include <torch/extension.h>

#include "decoder_layer.h"
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using pybind11::arg;
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("skinny_linear", &distspec::skinny_linear, nogil, "x @ W^T (+ b), fp32, up to 16 rows of x",
        arg("x"), arg("weight"), arg("bias") = pybind11::none());
  m.def("q4_linear", &distspec::q4_linear, nogil,
        "x @ W^T (+ b) for a 4-bit W of n rows in tiles (models/quantized.py Q4Tiles), fp32 "
        "x (int8_x: x quantized to int8 per group of 32 first), any rows",
        arg("x"), arg("tiles"), arg("n"), arg("bias") = pybind11::none(),
        arg("int8_x") = false);
  m.def("q8_linear", &distspec::q8_linear, nogil,
        "x @ W^T (+ b) for an 8-bit W of n rows in tiles (models/quantized.py Q8Tiles), fp32 x "
        "(int8_x: as q4_linear)",
        arg("x"), arg("tiles"), arg("n"), arg("bias") = pybind11::none(),
        arg("int8_x") = false);
  m.def("rms_norm", &distspec::rms_norm, nogil, "x / sqrt(mean(x^2) + eps) * weight, fp32");
  m.def("silu_mul", &distspec::silu_mul, nogil, "silu(g) * u for gu = [g | u] on the last dim");
  m.def("attend", &distspec::attend, nogil,
        "RoPE on q and k of a fused qkv [B, T, Hq + 2 Hkv, D], k and v into the KV cache at "
        "(slot, pos), then attention over each sequence's cached keys at positions <= its own "
        "(tree [B, T, T] bool: within the chunk, only the keys tree[b, t] marks)",
        arg("qkv"), arg("cos"), arg("sin"), arg("k_cache"), arg("v_cache"), arg("slots"),
        arg("pos"), arg("n_q"), arg("window") = 0, arg("tree") = pybind11::none());
  pybind11::class_<distspec::LinearOp>(m, "LinearOp",
                                       "a linear layer's weight in one of the kernels' formats")
      .def(pybind11::init<const std::string&, std::vector<at::Tensor>, c10::optional<at::Tensor>,
                          bool, int64_t>(),
           arg("kind"), arg("parts"), arg("bias") = pybind11::none(), arg("int8_x") = false,
           arg("out_features") = 0)
      .def("__call__", &distspec::LinearOp::operator(), nogil, arg("x"));
  pybind11::class_<distspec::DecoderLayer>(m, "DecoderLayer",
                                           "a decoder layer's cached forward in one call")
      .def(pybind11::init<at::Tensor, at::Tensor, double, distspec::LinearOp, distspec::LinearOp,
                          distspec::LinearOp, distspec::LinearOp, at::Tensor, at::Tensor, int64_t,
                          int64_t>(),
           arg("attn_norm"), arg("mlp_norm"), arg("eps"), arg("wqkv"), arg("wo"), arg("gate_up"),
           arg("down"), arg("k_cache"), arg("v_cache"), arg("n_q"), arg("window") = 0)
      .def("forward", &distspec::DecoderLayer::forward, nogil, arg("x"), arg("cos"), arg("sin"),
           arg("slots"), arg("pos"), arg("tree") = pybind11::none());
  pybind11::class_<distspec::DecoderStack>(m, "DecoderStack",
                                           "every layer, the final norm and the head in one call")
      .def(pybind11::init<std::vector<distspec::DecoderLayer>, at::Tensor, double,
                          distspec::LinearOp>(),
           arg("layers"), arg("norm"), arg("eps"), arg("head"))
      .def("forward", &distspec::DecoderStack::forward, nogil, arg("x"), arg("cos"), arg("sin"),
           arg("slots"), arg("pos"), arg("last") = 0, arg("tree") = pybind11::none());
  m.attr("MAX_ROWS") = distspec::kMaxRows;
}
