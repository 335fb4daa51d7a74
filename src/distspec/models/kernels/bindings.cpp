// The Python module of distspec's CPU kernels (one library, every kernel file).

#include <torch/extension.h>

namespace distspec {
extern const int64_t kMaxRows;
torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& weight,
                            const c10::optional<torch::Tensor>& bias);
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& qs,
                        const torch::Tensor& scales, const torch::Tensor& mins,
                        const c10::optional<torch::Tensor>& bias);
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& qs,
                        const torch::Tensor& scales, const c10::optional<torch::Tensor>& bias);
}  // namespace distspec

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using pybind11::arg;
  m.def("skinny_linear", &distspec::skinny_linear, "x @ W^T (+ b), fp32, up to 16 rows of x",
        arg("x"), arg("weight"), arg("bias") = pybind11::none());
  m.def("q4_linear", &distspec::q4_linear,
        "x @ W^T (+ b) for a 4-bit W (groups of 32: q * scale + min), fp32 x, any rows",
        arg("x"), arg("qs"), arg("scales"), arg("mins"), arg("bias") = pybind11::none());
  m.def("q8_linear", &distspec::q8_linear,
        "x @ W^T (+ b) for an 8-bit W (groups of 32: q * scale), fp32 x, any rows", arg("x"),
        arg("qs"), arg("scales"), arg("bias") = pybind11::none());
  m.attr("MAX_ROWS") = distspec::kMaxRows;
}
