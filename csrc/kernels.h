// Host-side entry points of the CUDA kernels: raw pointers in, launch on `stream`, the launch error out.
// ext.cpp validates torch tensors and calls these; csrc/emu/harness.cpp calls them on the CPU emulator.
#pragma once

#include <cstdint>

#include "cuda_compat.h"

namespace gptq {

// solver.quantize_block's contract (docs/DESIGN.md, "The solver's block step"), all pointers on one device.
struct GptqBlockArgs {
  float* W;                     // [N, B] row-major: the block's weights, updated in place
  const float* Hinv;            // [B, B] with any strides: the block's upper Cholesky factor of H^-1
  int64_t hinv_row_stride;      // torch.linalg.cholesky(upper=True) returns a column-major view
  int64_t hinv_col_stride;
  float* scales;                // [N, groups] row-major: read, and written where a group starts
  float* zeros;                 // [N, groups]
  const int64_t* group_of_col;  // [B] group id of each column
  const bool* new_group;        // [B] find the group's parameters when this column is reached
  int32_t* codes;               // [N, B] out: integer codes in [0, 2^bits)
  float* errors;                // [N, B] out: (w - q) / Hinv[c, c] of each column
  float* losses;                // [N] out: sum over columns of err^2 / 2
  int N, B, groups, bits, group_size;
  bool sym, mse;
};

constexpr int kMaxBlockColumns = 128;  // four columns per lane of the warp that owns a row

cudaError_t launch_gptq_block(const GptqBlockArgs& args, cudaStream_t stream);

// y = x @ dequantize(qweight)ᵀ for a 4-bit GPTQ linear; W[n, k] = scales[g, n] * (q[k, n] - z[g, n]), g = g_idx[k].
struct Gemv4bitArgs {
  const __half* x;          // [M, K] activations
  const int32_t* qweight;   // [K / 8, N] codes packed along K, 16-byte aligned
  const __half* scales;     // [G, N], 8-byte aligned
  const int32_t* qzeros;    // [G, N / 8] zero points packed along N (stored value + zero_offset = z)
  const int32_t* g_idx;     // [K] group of each input column, trusted to be in [0, G)
  __half* out;              // [M, N]
  float* workspace;         // gemv_4bit_workspace_floats(M, K, N) floats (may be null when that is 0)
  int M, K, N;
  int zero_offset;          // 1 for checkpoint format "gptq" (v1 stores z - 1), 0 for "gptq_v2"
};

constexpr int kGemvMaxBatch = 8;

// Requirements of launch_gemv_4bit on the shapes (the alignment of the pointers is the caller's to check).
inline bool gemv_4bit_supports(int M, int K, int N) {
  return M >= 1 && M <= kGemvMaxBatch && K >= 8 && K % 8 == 0 && N >= 4 && N % 4 == 0;
}

// Floats of fp32 scratch the launch needs for partial sums over K slices (0 when K is not split).
int64_t gemv_4bit_workspace_floats(int M, int K, int N);

cudaError_t launch_gemv_4bit(const Gemv4bitArgs& args, cudaStream_t stream);

}  // namespace gptq
