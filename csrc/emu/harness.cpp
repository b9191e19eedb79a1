// C entry points to the kernels' launchers built on the CPU emulator (cuda_emu.h), for ctypes in
// tests/test_kernels.py. Not part of the extension. Build (see the test):
//   g++ -std=c++20 -O2 -ffp-contract=off -fno-strict-aliasing -fPIC -shared -DGPTQ_CUDA_EMU -Icsrc
//       -x c++ csrc/gptq_block.cu csrc/gemv_4bit.cu -x none csrc/emu/harness.cpp -o libgptq_emu.so
// Every function returns 0 on success, else writes a message into `error` (at most error_len bytes).
#include <cstdio>
#include <exception>

#include "../kernels.h"

namespace {

int report(cudaError_t status, char* error, int error_len) {
  if (status == cudaSuccess) return 0;
  std::snprintf(error, error_len, "launch failed: %s", cudaGetErrorString(status));
  return 1;
}

template <class Launch>
int guarded(Launch launch, char* error, int error_len) {
  try {
    return report(launch(), error, error_len);
  } catch (const std::exception& e) {
    std::snprintf(error, error_len, "%s", e.what());
    return 1;
  }
}

}  // namespace

extern "C" {

void gptq_emu_set_multiprocessors(int count) { emu::multiprocessor_count() = count; }

int gptq_emu_gptq_block(float* W, const float* Hinv, int64_t hinv_row_stride, int64_t hinv_col_stride,
                        float* scales, float* zeros,
                        const int64_t* group_of_col, const bool* new_group, int32_t* codes, float* errors,
                        float* losses, int N, int B, int groups, int bits, int sym, int mse, int group_size,
                        char* error, int error_len) {
  gptq::GptqBlockArgs a{W,      Hinv, hinv_row_stride, hinv_col_stride, scales,     zeros,    group_of_col,
                        new_group, codes, errors,       losses,          N,          B,        groups,
                        bits,      group_size, sym != 0, mse != 0};
  return guarded([&] { return gptq::launch_gptq_block(a, nullptr); }, error, error_len);
}

// act: 0 float16, 1 bfloat16 (gptq::Act); perm may be null.
int gptq_emu_gemv_4bit(const void* x, const int32_t* qweight, const void* scales, const int32_t* qzeros,
                       const int32_t* perm, void* out, int M, int K, int N, int group_size, int zero_offset, int act,
                       char* error, int error_len) {
  const gptq::Layer4bit w{qweight, static_cast<const __half*>(scales), qzeros, K, N, group_size, zero_offset};
  const gptq::Gemv4bitArgs a{w, x, perm, out, M, static_cast<gptq::Act>(act)};
  return guarded([&] { return gptq::launch_gemv_4bit(a, nullptr); }, error, error_len);
}

int gptq_emu_dequantize_4bit(const int32_t* qweight, const void* scales, const int32_t* qzeros, void* out, int K,
                             int N, int group_size, int zero_offset, int act, char* error, int error_len) {
  const gptq::Layer4bit w{qweight, static_cast<const __half*>(scales), qzeros, K, N, group_size, zero_offset};
  const gptq::Dequant4bitArgs a{w, out, static_cast<gptq::Act>(act)};
  return guarded([&] { return gptq::launch_dequantize_4bit(a, nullptr); }, error, error_len);
}

}  // extern "C"
