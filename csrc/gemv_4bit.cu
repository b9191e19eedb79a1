// 4-bit GPTQ GEMV / small-batch GEMM (M = 1..8): y[m, n] = Σ_k x[m, k] · W[n, k], fp16 or bf16 in and out,
// fp32 accumulation, one launch; and the dequantization of a whole layer (for larger M: then one matmul).
//
// Layout (kernels.h, Layer4bit): qweight's rows are in kernel order, so with act-order every group's rows are
// contiguous and a step of kUnroll packed rows (32 values of K) lies in one group: its scales and zeros are
// loaded once per step, never per k. The input is gathered through `perm` in that case.
//
// Work split, for a memory-bound loop: a CTA owns 32 output columns and all of K. Its 16 warps × 4 K-lanes
// are 64 K-slots, each a contiguous range of packed rows; the 8 column lanes of a K-lane read 4 columns each
// with one 16-byte load, 128 contiguous bytes per packed row. Each thread keeps two steps of kUnroll 16-byte
// loads in flight (the next step's words are loaded before the current step is computed). The K-lanes are
// summed with warp shuffles and the 16 warps through 16 KB of shared memory, in a fixed order: the result is
// deterministic and there is no second launch.
//
// Dequantization by bit tricks, no int-to-float conversion:
// - fp16: (word >> 4p) & 0x000F000F | 0x64006400 is the half2 (1024 + q_p, 1024 + q_{p+4}); subtracting the
//   half2 (1024 + z) (built the same way from z's bits) leaves q - z exactly, and one HMUL2 by the scale gives
//   the weight rounded to fp16 once (= the twin's fp16 weight). Products: HFMA2 over one packed row (8 values
//   of K, as two 4-term fp16 partial sums), then added into the fp32 accumulator.
// - bf16: the same with 0x43004300, the bf16 pair (128 + q_p, 128 + q_{p+4}), widened to two floats by a shift
//   and a mask; fmaf(128 + q, s, -(128 + z)·s) is s·(q - z) exactly (every term fits in 24 bits: the scale and
//   the zero are folded into one FMA), and the products are fp32 FMAs (bf16 products would lose too much).
#include "kernels.h"

namespace gptq {
namespace {

constexpr int kWarp = 32;
constexpr int kColumnLanes = 8;                         // lanes across N, 4 columns (one int4) each
constexpr int kKLanes = kWarp / kColumnLanes;           // lanes across K within a warp
constexpr int kColumnsPerCta = kColumnLanes * 4;
// 16 warps (64 K-slots) while the registers allow; for M > 4 the accumulators need more than 128 per thread.
__host__ __device__ constexpr int warps_for(int M) { return M <= 4 ? 16 : 8; }
constexpr int kUnroll = 4;                              // packed rows per step: 32 values of K
constexpr unsigned kFullMask = 0xffffffffu;
constexpr unsigned kHalfMagic = 0x64006400u;            // half2 (1024, 1024)
constexpr unsigned kBf16Magic = 0x43004300u;            // bf16x2 (128, 128)

__device__ __forceinline__ unsigned nibble_pair(unsigned word, int p, unsigned magic) {
  return ((word >> (4 * p)) & 0x000F000Fu) | magic;     // nibbles p and p + 4 in the low bits of each half
}

__device__ __forceinline__ __half2 as_half2(unsigned bits) { return *reinterpret_cast<const __half2*>(&bits); }
__device__ __forceinline__ float bf16_low(unsigned bits) { return __uint_as_float(bits << 16); }
__device__ __forceinline__ float bf16_high(unsigned bits) { return __uint_as_float(bits & 0xFFFF0000u); }

// float -> bf16 bits, round to nearest even (NaN stays NaN), as torch rounds.
__device__ __forceinline__ unsigned short bf16_bits(float f) {
  const unsigned u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);
  return static_cast<unsigned short>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// One step's group parameters of a thread's 4 columns.
struct HalfGroup { __half2 scale[4], zero[4]; };    // zero = (1024 + z, 1024 + z)
struct FloatGroup { float scale[4], offset[4]; };   // offset = -(128 + z) * scale

__device__ __forceinline__ void group_words(const Layer4bit& w, int g, int n0, uint2* s, unsigned* z) {
  *s = __ldg(reinterpret_cast<const uint2*>(w.scales + static_cast<int64_t>(g) * w.N + n0));
  *z = unsigned(__ldg(w.qzeros + static_cast<int64_t>(g) * ((w.N + 7) / 8) + n0 / 8)) >> ((n0 % 8) * 4);
}

__device__ __forceinline__ HalfGroup half_group(const Layer4bit& w, int g, int n0) {
  uint2 s;
  unsigned z;
  group_words(w, g, n0, &s, &z);
  HalfGroup out;
  const unsigned sw[2] = {s.x, s.y};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const unsigned zc = 0x6400u | (((z >> (4 * c)) & 0xFu) + unsigned(w.zero_offset));  // half(1024 + z), z <= 16
    out.zero[c] = as_half2(zc | (zc << 16));
    const unsigned sc = (sw[c / 2] >> (16 * (c % 2))) & 0xFFFFu;
    out.scale[c] = as_half2(sc | (sc << 16));
  }
  return out;
}

__device__ __forceinline__ FloatGroup float_group(const Layer4bit& w, int g, int n0) {
  uint2 s;
  unsigned z;
  group_words(w, g, n0, &s, &z);
  const __half* s4 = reinterpret_cast<const __half*>(&s);
  FloatGroup out;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    out.scale[c] = __half2float(s4[c]);
    out.offset[c] = -__fmul_rn(static_cast<float>(128 + ((z >> (4 * c)) & 0xF) + w.zero_offset), out.scale[c]);
  }
  return out;
}

// The 8 weights (values of K 8r..8r+7) of one column from its packed word, as pairs (k = p, p + 4).
__device__ __forceinline__ void dequant_half(unsigned word, __half2 scale, __half2 zero, __half2 out[4]) {
#pragma unroll
  for (int p = 0; p < 4; ++p) out[p] = __hmul2(__hsub2(as_half2(nibble_pair(word, p, kHalfMagic)), zero), scale);
}

// The same in float, in K order (exact: s * (q - z)).
__device__ __forceinline__ void dequant_float(unsigned word, float scale, float offset, float out[8]) {
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const unsigned pair = nibble_pair(word, p, kBf16Magic);
    out[p] = fmaf(bf16_low(pair), scale, offset);
    out[p + 4] = fmaf(bf16_high(pair), scale, offset);
  }
}

// x[m, k] for the 8 values of K of packed row r (kernel order), as 8 raw 16-bit values in K order.
__device__ __forceinline__ uint4 load_x(const unsigned short* x, const int32_t* perm, int K, int m, int r) {
  const int64_t base = static_cast<int64_t>(m) * K;
  if (perm == nullptr) return __ldg(reinterpret_cast<const uint4*>(x + base + 8 * r));
  const int4 p0 = __ldg(reinterpret_cast<const int4*>(perm + 8 * r));
  const int4 p1 = __ldg(reinterpret_cast<const int4*>(perm + 8 * r + 4));
  const int idx[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
  unsigned v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    v[i] = unsigned(__ldg(x + base + idx[2 * i])) | (unsigned(__ldg(x + base + idx[2 * i + 1])) << 16);
  return uint4{v[0], v[1], v[2], v[3]};
}

template <int M, Act A>
__global__ void __launch_bounds__(warps_for(M) * kWarp) gemv_4bit_kernel(const Gemv4bitArgs a) {
  constexpr int kWarps = warps_for(M), kThreads = kWarps * kWarp, kSlots = kWarps * kKLanes;
  GPTQ_DYNAMIC_SHARED(float, partial);   // [kWarps][M][kColumnsPerCta]
  const Layer4bit& w = a.w;
  const unsigned short* x = static_cast<const unsigned short*>(a.x);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int column_lane = lane % kColumnLanes, k_lane = lane / kColumnLanes;
  const int n0 = blockIdx.x * kColumnsPerCta + column_lane * 4;
  const int rows = w.K / 8;
  const int group_rows = w.group_size / 8 > 0 ? w.group_size / 8 : 1;
  int per_slot = (rows + kSlots - 1) / kSlots;
  per_slot = (per_slot + kUnroll - 1) / kUnroll * kUnroll;
  const int r_begin = (warp * kKLanes + k_lane) * per_slot;
  const int r_end = n0 < w.N ? min(r_begin + per_slot, rows) : r_begin;   // columns past N: no rows

  float acc[M][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[m][c] = 0.0f;

  int4 cur[kUnroll], next[kUnroll];
  auto load_step = [&](int r0, int4* words) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      words[u] = r0 + u < r_end ? __ldg(reinterpret_cast<const int4*>(w.qweight + static_cast<int64_t>(r0 + u) * w.N + n0))
                                : int4{0, 0, 0, 0};
  };
  if (r_begin < r_end) load_step(r_begin, cur);
  for (int r0 = r_begin; r0 < r_end; r0 += kUnroll) {
    if (r0 + kUnroll < r_end) load_step(r0 + kUnroll, next);   // in flight while this step is computed
    const int g = r0 / group_rows;
    if constexpr (A == Act::kHalf) {
      const HalfGroup grp = half_group(w, g, n0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r0 + u >= r_end) continue;
        const unsigned words[4] = {unsigned(cur[u].x), unsigned(cur[u].y), unsigned(cur[u].z), unsigned(cur[u].w)};
        __half2 wt[4][4];
#pragma unroll
        for (int c = 0; c < 4; ++c) dequant_half(words[c], grp.scale[c], grp.zero[c], wt[c]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const uint4 xv = load_x(x, a.perm, w.K, m, r0 + u);
          const __half2 xp[4] = {as_half2(__byte_perm(xv.x, xv.z, 0x5410)), as_half2(__byte_perm(xv.x, xv.z, 0x7632)),
                                 as_half2(__byte_perm(xv.y, xv.w, 0x5410)), as_half2(__byte_perm(xv.y, xv.w, 0x7632))};
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            __half2 sum = __hmul2(xp[0], wt[c][0]);
#pragma unroll
            for (int p = 1; p < 4; ++p) sum = __hfma2(xp[p], wt[c][p], sum);
            const float2 f = __half22float2(sum);
            acc[m][c] += f.x + f.y;
          }
        }
      }
    } else {
      const FloatGroup grp = float_group(w, g, n0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r0 + u >= r_end) continue;
        const unsigned words[4] = {unsigned(cur[u].x), unsigned(cur[u].y), unsigned(cur[u].z), unsigned(cur[u].w)};
        float wt[4][8];
#pragma unroll
        for (int c = 0; c < 4; ++c) dequant_float(words[c], grp.scale[c], grp.offset[c], wt[c]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const uint4 xv = load_x(x, a.perm, w.K, m, r0 + u);
          const unsigned xw[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float xj = j % 2 == 0 ? bf16_low(xw[j / 2]) : bf16_high(xw[j / 2]);
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[m][c] = fmaf(xj, wt[c][j], acc[m][c]);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) cur[u] = next[u];
  }

  // K-lanes of a warp: shuffles; then the warps, in order, through shared memory.
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c)
#pragma unroll
      for (int offset = kColumnLanes; offset < kWarp; offset *= 2)
        acc[m][c] += __shfl_xor_sync(kFullMask, acc[m][c], offset);
  if (k_lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int c = 0; c < 4; ++c) partial[(warp * M + m) * kColumnsPerCta + column_lane * 4 + c] = acc[m][c];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < M * kColumnsPerCta; e += kThreads) {
    const int m = e / kColumnsPerCta, column = e % kColumnsPerCta;
    const int n = blockIdx.x * kColumnsPerCta + column;
    if (n >= w.N) continue;
    float sum = 0.0f;
    for (int v = 0; v < kWarps; ++v) sum += partial[(v * M + m) * kColumnsPerCta + column];
    const int64_t at = static_cast<int64_t>(m) * w.N + n;
    if constexpr (A == Act::kHalf)
      static_cast<__half*>(a.out)[at] = __float2half_rn(sum);
    else
      static_cast<unsigned short*>(a.out)[at] = bf16_bits(sum);
  }
}

// One thread per (packed row, 4 columns): the 8 x 4 weights, written as 8 rows of 4 values (8-byte stores,
// consecutive threads writing consecutive columns) to out[8r + j, n0 .. n0 + 3].
template <Act A>
__global__ void __launch_bounds__(256) dequantize_4bit_kernel(const Dequant4bitArgs a) {
  const Layer4bit& w = a.w;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int quads = w.N / 4;
  if (item >= static_cast<int64_t>(w.K / 8) * quads) return;
  const int r = static_cast<int>(item / quads), n0 = static_cast<int>(item % quads) * 4;
  const int g = r / (w.group_size / 8 > 0 ? w.group_size / 8 : 1);
  const int4 packed = __ldg(reinterpret_cast<const int4*>(w.qweight + static_cast<int64_t>(r) * w.N + n0));
  const unsigned words[4] = {unsigned(packed.x), unsigned(packed.y), unsigned(packed.z), unsigned(packed.w)};
  unsigned row_bits[8][4];   // [row j][column c]: the 16-bit value of W[8r + j, n0 + c]
  if constexpr (A == Act::kHalf) {
    const HalfGroup grp = half_group(w, g, n0);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      __half2 wt[4];
      dequant_half(words[c], grp.scale[c], grp.zero[c], wt);
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const unsigned pair = *reinterpret_cast<const unsigned*>(&wt[p]);
        row_bits[p][c] = pair & 0xFFFFu;
        row_bits[p + 4][c] = pair >> 16;
      }
    }
  } else {
    const FloatGroup grp = float_group(w, g, n0);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float wt[8];
      dequant_float(words[c], grp.scale[c], grp.offset[c], wt);
#pragma unroll
      for (int j = 0; j < 8; ++j) row_bits[j][c] = bf16_bits(wt[j]);
    }
  }
  uint2* out = static_cast<uint2*>(a.out);
#pragma unroll
  for (int j = 0; j < 8; ++j)
    out[(static_cast<int64_t>(8 * r + j) * w.N + n0) / 4] =
        uint2{row_bits[j][0] | (row_bits[j][1] << 16), row_bits[j][2] | (row_bits[j][3] << 16)};
}

template <int M>
cudaError_t launch_batch(const Gemv4bitArgs& a, cudaStream_t stream) {
  const dim3 grid((a.w.N + kColumnsPerCta - 1) / kColumnsPerCta);
  const size_t shared_bytes = sizeof(float) * warps_for(M) * M * kColumnsPerCta;
  const dim3 block(warps_for(M) * kWarp);
  if (a.act == Act::kHalf)
    GPTQ_LAUNCH((gemv_4bit_kernel<M, Act::kHalf>), grid, block, shared_bytes, stream)(a);
  else
    GPTQ_LAUNCH((gemv_4bit_kernel<M, Act::kBFloat16>), grid, block, shared_bytes, stream)(a);
  return cudaGetLastError();
}

bool valid(const Layer4bit& w) {
  return layer_4bit_supported(w.K, w.N, w.group_size) && (w.zero_offset == 0 || w.zero_offset == 1);
}

}  // namespace

cudaError_t launch_gemv_4bit(const Gemv4bitArgs& a, cudaStream_t stream) {
  if (!valid(a.w) || a.M < 1 || a.M > kGemvMaxBatch) return cudaErrorInvalidValue;
  switch (a.M) {
    case 1: return launch_batch<1>(a, stream);
    case 2: return launch_batch<2>(a, stream);
    case 3: return launch_batch<3>(a, stream);
    case 4: return launch_batch<4>(a, stream);
    case 5: return launch_batch<5>(a, stream);
    case 6: return launch_batch<6>(a, stream);
    case 7: return launch_batch<7>(a, stream);
    default: return launch_batch<8>(a, stream);
  }
}

cudaError_t launch_dequantize_4bit(const Dequant4bitArgs& a, cudaStream_t stream) {
  if (!valid(a.w)) return cudaErrorInvalidValue;
  const int64_t items = static_cast<int64_t>(a.w.K / 8) * (a.w.N / 4);
  const dim3 grid(static_cast<unsigned>((items + 255) / 256));
  if (a.act == Act::kHalf)
    GPTQ_LAUNCH(dequantize_4bit_kernel<Act::kHalf>, grid, dim3(256), 0, stream)(a);
  else
    GPTQ_LAUNCH(dequantize_4bit_kernel<Act::kBFloat16>, grid, dim3(256), 0, stream)(a);
  return cudaGetLastError();
}

}  // namespace gptq
