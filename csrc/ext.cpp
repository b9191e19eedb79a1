// torch bindings of the CUDA kernels: the operators torch.ops.gptq_cli.gptq_block and
// torch.ops.gptq_cli.gemv_4bit (CUDA dispatch key), plus an empty Python module so that the library can be
// built and imported as `gptq_cli._C`. Every tensor is checked here (device, dtype, contiguity, shape, alignment)
// before any raw pointer reaches a kernel; the checks raise RuntimeError with what was expected.
//
// Only light ATen headers are included (not torch/extension.h): this file compiles about 3x faster.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "kernels.h"

namespace {

void check_cuda_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the other inputs are on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_launch(cudaError_t status, const char* kernel) {
  TORCH_CHECK(status == cudaSuccess, kernel, " launch failed: ", cudaGetErrorString(status));
}

// solver.quantize_block on the GPU; W, scales and zeros are updated in place (see docs/DESIGN.md).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gptq_block(at::Tensor W, const at::Tensor& Hinv, at::Tensor scales,
                                                           at::Tensor zeros, const at::Tensor& group_of_col,
                                                           const at::Tensor& new_group, int64_t bits, bool sym,
                                                           bool mse, int64_t group_size) {
  const at::Device device = W.device();
  check_cuda_tensor(W, "W", at::kFloat, device);
  check_cuda_tensor(Hinv, "Hinv", at::kFloat, device);
  check_cuda_tensor(scales, "scales", at::kFloat, device);
  check_cuda_tensor(zeros, "zeros", at::kFloat, device);
  check_cuda_tensor(group_of_col, "group_of_col", at::kLong, device);
  check_cuda_tensor(new_group, "new_group", at::kBool, device);
  check_contiguous(W, "W");
  check_contiguous(scales, "scales");
  check_contiguous(zeros, "zeros");
  check_contiguous(group_of_col, "group_of_col");
  check_contiguous(new_group, "new_group");
  TORCH_CHECK(W.dim() == 2, "W must be [N, B], got ", W.sizes());
  const int64_t N = W.size(0), B = W.size(1);
  TORCH_CHECK(B >= 1 && B <= gptq::kMaxBlockColumns, "the block must have 1 to ", gptq::kMaxBlockColumns,
              " columns, got ", B);
  TORCH_CHECK(N <= INT32_MAX, "W has too many rows: ", N);
  TORCH_CHECK(Hinv.dim() == 2 && Hinv.size(0) == B && Hinv.size(1) == B, "Hinv must be [", B, ", ", B, "], got ",
              Hinv.sizes());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) >= 1,
              "scales must be [N, groups] with N = ", N, ", got ", scales.sizes());
  TORCH_CHECK(zeros.sizes() == scales.sizes(), "zeros must have the shape of scales ", scales.sizes(), ", got ",
              zeros.sizes());
  TORCH_CHECK(group_of_col.dim() == 1 && group_of_col.size(0) == B, "group_of_col must be [", B, "]");
  TORCH_CHECK(new_group.dim() == 1 && new_group.size(0) == B, "new_group must be [", B, "]");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(group_size >= 1, "group_size must be at least 1, got ", group_size);

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor codes = at::empty({N, B}, W.options().dtype(at::kInt));
  at::Tensor errors = at::empty({N, B}, W.options());
  at::Tensor losses = at::empty({N}, W.options());
  gptq::GptqBlockArgs args;
  args.W = W.data_ptr<float>();
  args.Hinv = Hinv.data_ptr<float>();
  args.hinv_row_stride = Hinv.stride(0);
  args.hinv_col_stride = Hinv.stride(1);
  args.scales = scales.data_ptr<float>();
  args.zeros = zeros.data_ptr<float>();
  args.group_of_col = group_of_col.data_ptr<int64_t>();
  args.new_group = new_group.data_ptr<bool>();
  args.codes = codes.data_ptr<int32_t>();
  args.errors = errors.data_ptr<float>();
  args.losses = losses.data_ptr<float>();
  args.N = static_cast<int>(N);
  args.B = static_cast<int>(B);
  args.groups = static_cast<int>(scales.size(1));
  args.bits = static_cast<int>(bits);
  args.group_size = static_cast<int>(group_size < INT32_MAX / 2 ? group_size : INT32_MAX / 2);
  args.sym = sym;
  args.mse = mse;
  check_launch(gptq::launch_gptq_block(args, c10::cuda::getCurrentCUDAStream(device.index()).stream()),
               "gptq_block");
  return {codes, errors, losses};
}

// x [M, K] fp16 (M <= 8) times a 4-bit GPTQ weight -> [M, N] fp16. zero_offset: 1 for format gptq, 0 for v2.
at::Tensor gemv_4bit(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& qzeros, const at::Tensor& g_idx, int64_t zero_offset) {
  const at::Device device = x.device();
  check_cuda_tensor(x, "x", at::kHalf, device);
  check_cuda_tensor(qweight, "qweight", at::kInt, device);
  check_cuda_tensor(scales, "scales", at::kHalf, device);
  check_cuda_tensor(qzeros, "qzeros", at::kInt, device);
  check_cuda_tensor(g_idx, "g_idx", at::kInt, device);
  check_contiguous(x, "x");
  check_contiguous(qweight, "qweight");
  check_contiguous(scales, "scales");
  check_contiguous(qzeros, "qzeros");
  check_contiguous(g_idx, "g_idx");
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && scales.dim() == 2 && qzeros.dim() == 2 && g_idx.dim() == 1,
              "expected x [M, K], qweight [K/8, N], scales [G, N], qzeros [G, N/8], g_idx [K]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(1), G = scales.size(0);
  TORCH_CHECK(K <= INT32_MAX && N <= INT32_MAX, "the layer is too large: K = ", K, ", N = ", N);
  TORCH_CHECK(gptq::gemv_4bit_supports(static_cast<int>(M), static_cast<int>(K), static_cast<int>(N)),
              "gemv_4bit needs 1 <= M <= ", gptq::kGemvMaxBatch, ", K % 8 == 0 and N % 4 == 0; got M = ", M,
              ", K = ", K, ", N = ", N);
  TORCH_CHECK(qweight.size(0) == K / 8, "qweight must be [", K / 8, ", ", N, "] for K = ", K, ", got ",
              qweight.sizes());
  TORCH_CHECK(scales.size(1) == N && G >= 1, "scales must be [G, ", N, "], got ", scales.sizes());
  TORCH_CHECK(qzeros.size(0) == G && qzeros.size(1) == (N + 7) / 8, "qzeros must be [", G, ", ", (N + 7) / 8,
              "], got ", qzeros.sizes());
  TORCH_CHECK(g_idx.size(0) == K, "g_idx must have K = ", K, " entries, got ", g_idx.size(0));
  TORCH_CHECK(zero_offset == 0 || zero_offset == 1, "zero_offset must be 1 (gptq) or 0 (gptq_v2), got ",
              zero_offset);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0, "qweight must be 16-byte aligned");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(scales.data_ptr()) % 8 == 0, "scales must be 8-byte aligned");

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({M, N}, x.options());
  const int64_t workspace_floats =
      gptq::gemv_4bit_workspace_floats(static_cast<int>(M), static_cast<int>(K), static_cast<int>(N));
  at::Tensor workspace = at::empty({workspace_floats}, x.options().dtype(at::kFloat));
  gptq::Gemv4bitArgs args;
  args.x = reinterpret_cast<const __half*>(x.data_ptr<at::Half>());
  args.qweight = qweight.data_ptr<int32_t>();
  args.scales = reinterpret_cast<const __half*>(scales.data_ptr<at::Half>());
  args.qzeros = qzeros.data_ptr<int32_t>();
  args.g_idx = g_idx.data_ptr<int32_t>();
  args.out = reinterpret_cast<__half*>(out.data_ptr<at::Half>());
  args.workspace = workspace_floats > 0 ? workspace.data_ptr<float>() : nullptr;
  args.M = static_cast<int>(M);
  args.K = static_cast<int>(K);
  args.N = static_cast<int>(N);
  args.zero_offset = static_cast<int>(zero_offset);
  check_launch(gptq::launch_gemv_4bit(args, c10::cuda::getCurrentCUDAStream(device.index()).stream()),
               "gemv_4bit");
  return out;
}

}  // namespace

TORCH_LIBRARY(gptq_cli, m) {
  m.def("gptq_block(Tensor(a!) W, Tensor Hinv, Tensor(b!) scales, Tensor(c!) zeros, Tensor group_of_col, "
        "Tensor new_group, int bits, bool sym, bool mse, int group_size) -> (Tensor, Tensor, Tensor)");
  m.def("gemv_4bit(Tensor x, Tensor qweight, Tensor scales, Tensor qzeros, Tensor g_idx, int zero_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptq_cli, CUDA, m) {
  m.impl("gptq_block", &gptq_block);
  m.impl("gemv_4bit", &gemv_4bit);
}

// `import gptq_cli._C` loads this library, whose static initialisers above register the operators.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "CUDA kernels of gptq_cli (see torch.ops.gptq_cli)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
