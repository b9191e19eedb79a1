// torch bindings of the CUDA kernels: the operators torch.ops.gptq_cli.gptq_block, torch.ops.gptq_cli.gemv_4bit
// and torch.ops.gptq_cli.dequantize_4bit (CUDA dispatch key), plus an empty Python module so that the library
// can be built and imported as `gptq_cli._C`. Every tensor is checked here (device, dtype, contiguity, shape,
// alignment) before any raw pointer reaches a kernel; the checks raise RuntimeError with what was expected.
//
// Only light ATen headers are included (not torch/extension.h): this file compiles about 3x faster.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
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

// solver.quantize_column_block on the GPU; W, scales and zeros are updated in place (see docs/DESIGN.md).
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

// The checks shared by the 4-bit ops: a layer in the kernels' layout (kernels.h, Layer4bit).
gptq::Layer4bit check_layer_4bit(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& qzeros,
                                 int64_t group_size, int64_t zero_offset) {
  const at::Device device = qweight.device();
  check_cuda_tensor(qweight, "qweight", at::kInt, device);
  check_cuda_tensor(scales, "scales", at::kHalf, device);
  check_cuda_tensor(qzeros, "qzeros", at::kInt, device);
  check_contiguous(qweight, "qweight");
  check_contiguous(scales, "scales");
  check_contiguous(qzeros, "qzeros");
  TORCH_CHECK(qweight.dim() == 2 && scales.dim() == 2 && qzeros.dim() == 2,
              "expected qweight [K/8, N], scales [G, N], qzeros [G, N/8]");
  const int64_t K = qweight.size(0) * 8, N = qweight.size(1), G = scales.size(0);
  TORCH_CHECK(K <= INT32_MAX && N <= INT32_MAX && group_size <= INT32_MAX, "the layer is too large: K = ", K,
              ", N = ", N);
  TORCH_CHECK(gptq::layer_4bit_supported(static_cast<int>(K), static_cast<int>(N), static_cast<int>(group_size)),
              "the 4-bit kernels need N % 4 == 0 and a group size that is K or a multiple of 32; got K = ", K,
              ", N = ", N, ", group_size = ", group_size);
  TORCH_CHECK(G == (K + group_size - 1) / group_size && scales.size(1) == N, "scales must be [",
              (K + group_size - 1) / group_size, ", ", N, "], got ", scales.sizes());
  TORCH_CHECK(qzeros.size(0) == G && qzeros.size(1) == (N + 7) / 8, "qzeros must be [", G, ", ", (N + 7) / 8,
              "], got ", qzeros.sizes());
  TORCH_CHECK(zero_offset == 0 || zero_offset == 1, "zero_offset must be 1 (gptq) or 0 (gptq_v2), got ",
              zero_offset);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0, "qweight must be 16-byte aligned");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(scales.data_ptr()) % 8 == 0, "scales must be 8-byte aligned");
  return {qweight.data_ptr<int32_t>(), reinterpret_cast<const __half*>(scales.data_ptr<at::Half>()),
          qzeros.data_ptr<int32_t>(), static_cast<int>(K), static_cast<int>(N), static_cast<int>(group_size),
          static_cast<int>(zero_offset)};
}

gptq::Act act_of(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "activations must be float16 or bfloat16, got ", dtype);
  return dtype == at::kHalf ? gptq::Act::kHalf : gptq::Act::kBFloat16;
}

// x [M, K] fp16 or bf16 (M <= 8) times a 4-bit layer in kernel order -> [M, N] in x's dtype. perm: the input
// column of each kernel-order row (act-order), or None.
at::Tensor gemv_4bit(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& qzeros, int64_t group_size, int64_t zero_offset,
                     const std::optional<at::Tensor>& perm) {
  const gptq::Layer4bit layer = check_layer_4bit(qweight, scales, qzeros, group_size, zero_offset);
  const at::Device device = qweight.device();
  const gptq::Act act = act_of(x.scalar_type());
  check_cuda_tensor(x, "x", x.scalar_type(), device);
  check_contiguous(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == layer.K, "x must be [M, ", layer.K, "], got ", x.sizes());
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= gptq::kGemvMaxBatch, "gemv_4bit takes 1 to ", gptq::kGemvMaxBatch, " rows, got ", M);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
  const int32_t* perm_ptr = nullptr;
  if (perm.has_value()) {
    check_cuda_tensor(*perm, "perm", at::kInt, device);
    check_contiguous(*perm, "perm");
    TORCH_CHECK(perm->dim() == 1 && perm->size(0) == layer.K, "perm must have K = ", layer.K, " entries");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(perm->data_ptr()) % 16 == 0, "perm must be 16-byte aligned");
    perm_ptr = perm->data_ptr<int32_t>();
  }
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({M, layer.N}, x.options());
  const gptq::Gemv4bitArgs args{layer, x.data_ptr(), perm_ptr, out.data_ptr(), static_cast<int>(M), act};
  check_launch(gptq::launch_gemv_4bit(args, c10::cuda::getCurrentCUDAStream(device.index()).stream()),
               "gemv_4bit");
  return out;
}

// W [K, N] (kernel order) in float16 (act 0) or bfloat16 (act 1): the torch twin's dequantize_4bit.
at::Tensor dequantize_4bit(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& qzeros,
                           int64_t group_size, int64_t zero_offset, int64_t act) {
  const gptq::Layer4bit layer = check_layer_4bit(qweight, scales, qzeros, group_size, zero_offset);
  TORCH_CHECK(act == 0 || act == 1, "act must be 0 (float16) or 1 (bfloat16), got ", act);
  const at::Device device = qweight.device();
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({layer.K, layer.N}, qweight.options().dtype(act == 0 ? at::kHalf : at::kBFloat16));
  const gptq::Dequant4bitArgs args{layer, out.data_ptr(), static_cast<gptq::Act>(act)};
  check_launch(gptq::launch_dequantize_4bit(args, c10::cuda::getCurrentCUDAStream(device.index()).stream()),
               "dequantize_4bit");
  return out;
}

}  // namespace

TORCH_LIBRARY(gptq_cli, m) {
  m.def("gptq_block(Tensor(a!) W, Tensor Hinv, Tensor(b!) scales, Tensor(c!) zeros, Tensor group_of_col, "
        "Tensor new_group, int bits, bool sym, bool mse, int group_size) -> (Tensor, Tensor, Tensor)");
  m.def("gemv_4bit(Tensor x, Tensor qweight, Tensor scales, Tensor qzeros, int group_size, int zero_offset, "
        "Tensor? perm) -> Tensor");
  m.def("dequantize_4bit(Tensor qweight, Tensor scales, Tensor qzeros, int group_size, int zero_offset, int act) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(gptq_cli, CUDA, m) {
  m.impl("gptq_block", &gptq_block);
  m.impl("gemv_4bit", &gemv_4bit);
  m.impl("dequantize_4bit", &dequantize_4bit);
}

// `import gptq_cli._C` loads this library, whose static initialisers above register the operators.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "CUDA kernels of gptq_cli (see torch.ops.gptq_cli)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
