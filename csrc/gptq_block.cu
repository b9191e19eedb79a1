// The fused GPTQ block step: solver.quantize_column_block in one launch instead of ~10 small kernels per column.
//
// Rows of W are independent given Hinv, so one warp owns one row: lane l keeps columns l, l+32, l+64, l+96
// of it in registers, and the block's Hinv (upper triangle only) sits in shared memory. For each column c the
// owning lane broadcasts w_c; every lane computes the same code, error and loss, and updates its own columns
// j > c. Group parameters are a warp reduction over the group's columns.
//
// The float32 arithmetic is spelled with _rn intrinsics in the order the torch twin (solver.py) performs it on
// CUDA, so that nvcc cannot fuse a multiply and an add into an FMA the twin does not have: codes, errors,
// updated weights and group parameters match the twin bit for bit. Two sums are reduced in another order
// than torch.sum: the per-row loss (Σ err², so it matches to float rounding) and the MSE clip search's error
// per shrink factor (which also uses CUDA's powf): when two shrink factors give errors within rounding of each
// other, kernel and twin may pick different ones.
#include "kernels.h"

namespace gptq {
namespace {

constexpr int kWarp = 32;
constexpr int kSlots = kMaxBlockColumns / kWarp;  // columns of its row each lane keeps
constexpr int kWarpsPerCta = 8;
constexpr int kCtasPerSm = 4;
constexpr unsigned kFullMask = 0xffffffffu;

// solver.py's constants: the float16 range every scale is clamped to, and the reference quant.py clip search.
constexpr float kFp16Tiny = 5.9604644775390625e-08f;  // 2^-24, the smallest positive float16
constexpr float kFp16Max = 65504.0f;
constexpr float kMseNorm = 2.4f;
constexpr int kMseGrid = 100;
constexpr int kMseSteps = 80;  // int(0.8 * 100) shrink factors 1 - i/100

// The shrink factors as solver.py computes them, 1 - i / 100 in double precision rounded to float32 (torch
// multiplies a float32 tensor by a Python number in float32), kept off the GPU's slow float64 units.
struct ShrinkTable {
  float factor[kMseSteps];
};
constexpr ShrinkTable make_shrink_table() {
  ShrinkTable table{};
  for (int i = 0; i < kMseSteps; ++i) table.factor[i] = static_cast<float>(1.0 - static_cast<double>(i) / kMseGrid);
  return table;
}
__constant__ const ShrinkTable kShrink = make_shrink_table();

// Offset of Hinv[r, r] in the packed upper triangle, whose row r holds columns r..B-1.
__device__ __forceinline__ int triangle_row(int r, int B) { return r * B - r * (r - 1) / 2; }

__device__ __forceinline__ float warp_min(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fminf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// A butterfly: every lane adds the same pairs in the same order, so all lanes end with the same sum.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = __fadd_rn(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

struct Quantizer {
  float maxq;  // 2^bits - 1
  bool sym;
};

// x / number where the twin divides a tensor by a Python number: torch does that on CUDA as a multiplication by
// the number's float reciprocal, on the CPU as a true division. The kernel follows CUDA; built on the CPU
// emulator it follows the CPU twin, so that the emulator tests can compare bit for bit.
__device__ __forceinline__ float divide_by_python_number(float x, float number) {
#ifdef GPTQ_CUDA_EMU
  return __fdiv_rn(x, number);
#else
  return __fmul_rn(x, __fdiv_rn(1.0f, number));
#endif
}

struct GroupParams {
  float scale, zero;
};

// solver._grid: the float16-representable scale and the zero point of the grid spanning [xmin, xmax].
__device__ __forceinline__ GroupParams grid_for(float xmin, float xmax, const Quantizer& qz) {
  float scale = divide_by_python_number(__fsub_rn(xmax, xmin), qz.maxq);
  scale = fminf(fmaxf(scale, kFp16Tiny), kFp16Max);
  scale = __half2float(__float2half_rn(scale));
  const float zero = qz.sym ? __fmul_rn(__fadd_rn(qz.maxq, 1.0f), 0.5f)
                            : fminf(fmaxf(rintf(__fdiv_rn(-xmin, scale)), 0.0f), qz.maxq);
  return {scale, zero};
}

// solver._quantize: round half to even (rintf, like torch.round), then clamp to [0, maxq].
__device__ __forceinline__ float quantize(float w, GroupParams p, float maxq) {
  return fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(w, p.scale)), p.zero), 0.0f), maxq);
}

__device__ __forceinline__ float dequantize(float code, GroupParams p) {
  return __fmul_rn(p.scale, __fsub_rn(code, p.zero));
}

__device__ __forceinline__ bool in_range(int j, int begin, int end) { return j >= begin && j < end; }

// solver._clip_error, summed over the lanes' columns in [begin, end).
__device__ __forceinline__ float clip_error(const float (&w)[kSlots], int lane, int begin, int end,
                                           GroupParams p, const Quantizer& qz) {
  float sum = 0.0f;
#pragma unroll
  for (int t = 0; t < kSlots; ++t) {
    if (in_range(lane + t * kWarp, begin, end)) {
      const float q = dequantize(quantize(w[t], p, qz.maxq), p);
      sum = __fadd_rn(sum, powf(fabsf(__fsub_rn(q, w[t])), kMseNorm));
    }
  }
  return warp_sum(sum);
}

// solver.find_params for this warp's row over columns [begin, end) of the block.
__device__ __forceinline__ GroupParams find_params(const float (&w)[kSlots], int lane, int begin, int end,
                                                   bool mse, const Quantizer& qz) {
  float lo = INFINITY, hi = -INFINITY;
#pragma unroll
  for (int t = 0; t < kSlots; ++t) {
    if (in_range(lane + t * kWarp, begin, end)) {
      lo = fminf(lo, w[t]);
      hi = fmaxf(hi, w[t]);
    }
  }
  float xmin = fminf(warp_min(lo), 0.0f);  // the range always includes 0
  float xmax = fmaxf(warp_max(hi), 0.0f);
  if (qz.sym) {
    xmax = fmaxf(-xmin, xmax);
    xmin = -xmax;
  }
  if (xmin == 0.0f && xmax == 0.0f) {  // an all-zero row: the reference's [-1, 1]
    xmin = -1.0f;
    xmax = 1.0f;
  }
  GroupParams best = grid_for(xmin, xmax, qz);
  if (!mse) return best;
  float best_error = clip_error(w, lane, begin, end, best, qz);
  for (int i = 1; i < kMseSteps; ++i) {
    const float shrink = kShrink.factor[i];
    const GroupParams p = grid_for(__fmul_rn(shrink, xmin), __fmul_rn(shrink, xmax), qz);
    const float error = clip_error(w, lane, begin, end, p, qz);
    if (error < best_error) {
      best_error = error;
      best = p;
    }
  }
  return best;
}

__global__ void __launch_bounds__(kWarpsPerCta * kWarp) gptq_block_kernel(const GptqBlockArgs a) {
  GPTQ_DYNAMIC_SHARED(float, shared);
  const int B = a.B;
  float* hinv = shared;                                          // packed upper triangle of Hinv
  int* group = reinterpret_cast<int*>(hinv + B * (B + 1) / 2);  // [B]
  int* starts = group + B;                                       // [B]
  const bool column_major = a.hinv_col_stride > a.hinv_row_stride;  // read global memory in its own order
  for (int i = threadIdx.x; i < B * B; i += blockDim.x) {
    const int r = column_major ? i % B : i / B, j = column_major ? i / B : i % B;
    if (j >= r) hinv[triangle_row(r, B) + j - r] = a.Hinv[r * a.hinv_row_stride + j * a.hinv_col_stride];
  }
  for (int i = threadIdx.x; i < B; i += blockDim.x) {
    group[i] = static_cast<int>(a.group_of_col[i]);
    starts[i] = a.new_group[i] ? 1 : 0;
  }
  __syncthreads();

  const int lane = threadIdx.x % kWarp;
  Quantizer qz;
  qz.maxq = static_cast<float>((1 << a.bits) - 1);
  qz.sym = a.sym;

  // Whole warps take rows, so every lane of a warp runs the same iterations (shuffles need all 32).
  for (int row = blockIdx.x * kWarpsPerCta + threadIdx.x / kWarp; row < a.N; row += gridDim.x * kWarpsPerCta) {
    float* w_row = a.W + static_cast<int64_t>(row) * B;
    float* scale_row = a.scales + static_cast<int64_t>(row) * a.groups;
    float* zero_row = a.zeros + static_cast<int64_t>(row) * a.groups;
    float w[kSlots], errors[kSlots];
    int codes[kSlots];
#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      const int j = lane + t * kWarp;
      w[t] = j < B ? w_row[j] : 0.0f;
      errors[t] = 0.0f;
      codes[t] = 0;
    }
    float loss = 0.0f;
    int current_group = -1;
    GroupParams p{1.0f, 0.0f};

#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      for (int owner = 0; owner < kWarp; ++owner) {
        const int c = t * kWarp + owner;
        if (c >= B) break;
        const int g = group[c];
        if (starts[c]) {
          const int end = c + a.group_size < B ? c + a.group_size : B;
          p = find_params(w, lane, c, end, a.mse, qz);
          current_group = g;
          if (lane == 0) {
            scale_row[g] = p.scale;
            zero_row[g] = p.zero;
          }
          __syncwarp();  // later columns of this group may reload them from memory
        } else if (g != current_group) {
          p = GroupParams{scale_row[g], zero_row[g]};
          current_group = g;
        }
        const float wc = __shfl_sync(kFullMask, w[t], owner);
        const float d = hinv[triangle_row(c, B)];
        const float code = quantize(wc, p, qz.maxq);
        const float diff = __fsub_rn(wc, dequantize(code, p));
        const float err = divide_by_python_number(diff, d);
        loss = __fadd_rn(loss, __fmul_rn(err, err));  // (w - q)^2 / Hinv[c, c]^2, halved at the end
        if (lane == owner) {
          codes[t] = static_cast<int>(code);
          errors[t] = err;
        }
        const float* h_row = hinv + triangle_row(c, B) - c;  // h_row[j] = Hinv[c, j] for j >= c
#pragma unroll
        for (int t2 = t; t2 < kSlots; ++t2) {  // W[:, c+1:] -= err * Hinv[c, c+1:], this lane's columns
          const int j = lane + t2 * kWarp;
          if (j > c && j < B) w[t2] = __fsub_rn(w[t2], __fmul_rn(err, h_row[j]));
        }
      }
    }

    int32_t* code_row = a.codes + static_cast<int64_t>(row) * B;
    float* error_row = a.errors + static_cast<int64_t>(row) * B;
#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      const int j = lane + t * kWarp;
      if (j < B) {
        w_row[j] = w[t];
        code_row[j] = codes[t];
        error_row[j] = errors[t];
      }
    }
    if (lane == 0) a.losses[row] = __fmul_rn(loss, 0.5f);
  }
}

}  // namespace

cudaError_t launch_gptq_block(const GptqBlockArgs& args, cudaStream_t stream) {
  if (args.N <= 0) return cudaSuccess;
  if (args.B < 1 || args.B > kMaxBlockColumns || args.bits < 2 || args.bits > 8 || args.group_size < 1)
    return cudaErrorInvalidValue;
  int device = 0, sm_count = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
  const int rows_per_cta = kWarpsPerCta;
  int ctas = (args.N + rows_per_cta - 1) / rows_per_cta;
  // Each CTA loads the whole Hinv triangle: more CTAs than fit at once only repeat that load.
  if (ctas > sm_count * kCtasPerSm) ctas = sm_count * kCtasPerSm;
  const size_t shared_bytes = sizeof(float) * args.B * (args.B + 1) / 2 + 2 * sizeof(int) * args.B;
  GPTQ_LAUNCH(gptq_block_kernel, dim3(ctas), dim3(kWarpsPerCta * kWarp), shared_bytes, stream)(args);
  return cudaGetLastError();
}

}  // namespace gptq
