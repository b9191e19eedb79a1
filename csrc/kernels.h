// Host-side entry points of the CUDA kernels: raw pointers in, launch on `stream`, the launch error out.
// ext.cpp validates torch tensors and calls these; csrc/emu/harness.cpp calls them on the CPU emulator.
#pragma once

#include <cstdint>

#include "cuda_compat.h"

namespace gptq {

// solver.quantize_column_block's contract (docs/DESIGN.md, "The solver's block step"), all pointers on one device.
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

// 4-bit GPTQ layers in the kernels' layout: qweight [K/8, N] packed along K with its rows in "kernel order"
// (for act-order checkpoints, the rows of the checkpoint's qweight permuted once at load time so that each
// group's rows are contiguous; perm[k] = the input column that kernel-order row k holds), scales [G, N],
// qzeros [G, N/8]; kernel-order row k belongs to group k / group_size. W[n, k] = scales[g, n] * (q - z).
enum class Act { kHalf = 0, kBFloat16 = 1 };   // the activations' (and output's) dtype

struct Layer4bit {
  const int32_t* qweight;   // [K / 8, N], 16-byte aligned
  const __half* scales;     // [G, N] float16, 8-byte aligned
  const int32_t* qzeros;    // [G, N / 8] (stored value + zero_offset = z)
  int K, N, group_size;     // group_size: a multiple of 32, or K (one group)
  int zero_offset;          // 1 for checkpoint format "gptq" (v1 stores z - 1), 0 for "gptq_v2"
};

// y [M, N] = x [M, K] @ W^T, M = 1..8, fp32 accumulation, one launch.
struct Gemv4bitArgs {
  Layer4bit w;
  const void* x;            // [M, K] in `act`, 16-byte aligned rows (K % 8 == 0)
  const int32_t* perm;      // [K] or null: x's column read for kernel-order row k is perm[k]
  void* out;                // [M, N] in `act`
  int M;
  Act act;
};

// W in kernel order, [K, N] row-major in `act`: exactly the torch twin's dequantize_4bit (bit for bit).
struct Dequant4bitArgs {
  Layer4bit w;
  void* out;
  Act act;
};

constexpr int kGemvMaxBatch = 8;

// Requirements on the shapes (the alignment of the pointers is the caller's to check).
inline bool layer_4bit_supported(int K, int N, int group_size) {
  return K >= 8 && K % 8 == 0 && N >= 4 && N % 4 == 0 && group_size >= 1 &&
         (group_size == K || group_size % 32 == 0);
}

cudaError_t launch_gemv_4bit(const Gemv4bitArgs& args, cudaStream_t stream);
cudaError_t launch_dequantize_4bit(const Dequant4bitArgs& args, cudaStream_t stream);

}  // namespace gptq
