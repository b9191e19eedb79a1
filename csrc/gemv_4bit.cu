// 4-bit GPTQ GEMV / small-batch GEMM (M = 1..8 rows of activations): y[m, n] = Σ_k x[m, k] · W[n, k],
// W[n, k] = scales[g_idx[k], n] · (q[k, n] − z[g_idx[k], n]), fp16 in and out, fp32 accumulation.
//
// Work split: a CTA covers 256 output columns × one slice of K. Its 64 × 4 threads: threadIdx.x picks four
// consecutive columns (one 16-byte load of qweight words per packed row, so a warp reads 512 contiguous
// bytes), threadIdx.y a quarter of the K slice. The slice's activations (as float) and g_idx sit in shared
// memory. Scales and zeros are reloaded only when the group changes from one k to the next, which is once
// per group for ordered g_idx and as often as needed for act-order; the test is warp-uniform (it depends on k
// only). The four K quarters are summed in shared memory; with several K slices (small N needs them to fill
// the GPU) each slice writes fp32 partial sums that a second kernel adds up in a fixed order, so results are
// deterministic (no atomics).
//
// A 4-bit code becomes a float without an int-to-float conversion (a quarter-rate instruction): OR-ing it into
// the mantissa of 2^23 gives exactly 2^23 + q, and subtracting 2^23 + z leaves q − z exactly.
#include "kernels.h"

namespace gptq {
namespace {

constexpr int kThreadsX = 64;                  // column threads, 4 columns each
constexpr int kThreadsY = 4;                   // K quarters
constexpr int kColumnsPerThread = 4;
constexpr int kColumnsPerCta = kThreadsX * kColumnsPerThread;
constexpr int kMaxSliceWords = 128;            // packed rows (8 values of K each) per K slice: 1024 values of K
constexpr int kCtasPerSmTarget = 2;
constexpr unsigned kMagic = 0x4B000000u;       // float 2^23
constexpr float kMagicFloat = 8388608.0f;

struct Plan {
  int slice_words;  // packed rows per K slice, a multiple of kThreadsY
  int slices;
};

int sm_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 1;
  return count;
}

// Enough K slices that the grid fills the GPU about twice; at most 1024 values of K per slice.
Plan plan_for(int K, int N) {
  const int words = K / 8;
  const int column_ctas = (N + kColumnsPerCta - 1) / kColumnsPerCta;
  int wanted = (kCtasPerSmTarget * sm_count() + column_ctas - 1) / column_ctas;
  if (wanted < 1) wanted = 1;
  int slice_words = (words + wanted - 1) / wanted;
  slice_words = (slice_words + kThreadsY - 1) / kThreadsY * kThreadsY;
  if (slice_words > kMaxSliceWords) slice_words = kMaxSliceWords;
  return {slice_words, (words + slice_words - 1) / slice_words};
}

template <int M>
__global__ void __launch_bounds__(kThreadsX * kThreadsY) gemv_4bit_kernel(const Gemv4bitArgs a, int slice_words) {
  GPTQ_DYNAMIC_SHARED(float, shared);
  const int slice_k = slice_words * 8;
  float* xs = shared;                                   // [M][slice_k]
  int* groups = reinterpret_cast<int*>(xs + M * slice_k);  // [slice_k]
  const int word_begin = blockIdx.y * slice_words;
  const int word_end = min(word_begin + slice_words, a.K / 8);
  const int k_begin = word_begin * 8, k_count = (word_end - word_begin) * 8;
  const int tid = threadIdx.y * kThreadsX + threadIdx.x;
  for (int i = tid; i < M * k_count; i += kThreadsX * kThreadsY) {
    const int m = i / k_count, k = i % k_count;
    xs[m * slice_k + k] = __half2float(a.x[static_cast<int64_t>(m) * a.K + k_begin + k]);
  }
  for (int i = tid; i < k_count; i += kThreadsX * kThreadsY) groups[i] = a.g_idx[k_begin + i];
  __syncthreads();

  const int n0 = (blockIdx.x * kThreadsX + threadIdx.x) * kColumnsPerThread;
  float acc[M][kColumnsPerThread];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int i = 0; i < kColumnsPerThread; ++i) acc[m][i] = 0.0f;

  if (n0 < a.N) {
    const int quarter = (word_end - word_begin + kThreadsY - 1) / kThreadsY;
    const int w_begin = word_begin + threadIdx.y * quarter;
    const int w_end = min(w_begin + quarter, word_end);
    const int zero_words = (a.N + 7) / 8;
    const int zero_shift = (n0 % 8) * 4;
    int current_group = -1;
    float scale[kColumnsPerThread], offset[kColumnsPerThread];  // offset = 2^23 + z
    for (int w = w_begin; w < w_end; ++w) {
      const int4 packed = __ldg(reinterpret_cast<const int4*>(a.qweight + static_cast<int64_t>(w) * a.N + n0));
      const unsigned words[kColumnsPerThread] = {unsigned(packed.x), unsigned(packed.y), unsigned(packed.z),
                                                 unsigned(packed.w)};
      const int k_local = (w - word_begin) * 8;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int g = groups[k_local + j];
        if (g != current_group) {
          current_group = g;
          const uint2 s = __ldg(reinterpret_cast<const uint2*>(a.scales + static_cast<int64_t>(g) * a.N + n0));
          const __half* s4 = reinterpret_cast<const __half*>(&s);
          const unsigned z = unsigned(__ldg(a.qzeros + static_cast<int64_t>(g) * zero_words + n0 / 8)) >> zero_shift;
#pragma unroll
          for (int i = 0; i < kColumnsPerThread; ++i) {
            scale[i] = __half2float(s4[i]);
            offset[i] = kMagicFloat + static_cast<float>(((z >> (4 * i)) & 0xF) + a.zero_offset);
          }
        }
#pragma unroll
        for (int i = 0; i < kColumnsPerThread; ++i) {
          const float q_minus_z = __int_as_float(((words[i] >> (4 * j)) & 0xF) | kMagic) - offset[i];
          const float weight = q_minus_z * scale[i];
#pragma unroll
          for (int m = 0; m < M; ++m) acc[m][i] = fmaf(weight, xs[m * slice_k + k_local + j], acc[m][i]);
        }
      }
    }
  }

  __syncthreads();  // the activations are no longer needed: reuse shared memory for the K-quarter sums
  float* partial = shared;  // [kThreadsY][M][kColumnsPerCta]
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int i = 0; i < kColumnsPerThread; ++i)
      partial[(threadIdx.y * M + m) * kColumnsPerCta + threadIdx.x * kColumnsPerThread + i] = acc[m][i];
  __syncthreads();
  for (int e = tid; e < M * kColumnsPerCta; e += kThreadsX * kThreadsY) {
    const int m = e / kColumnsPerCta, column = e % kColumnsPerCta;
    const int n = blockIdx.x * kColumnsPerCta + column;
    if (n >= a.N) continue;
    float sum = 0.0f;
#pragma unroll
    for (int y = 0; y < kThreadsY; ++y) sum += partial[(y * M + m) * kColumnsPerCta + column];
    if (gridDim.y == 1)
      a.out[static_cast<int64_t>(m) * a.N + n] = __float2half_rn(sum);
    else
      a.workspace[(static_cast<int64_t>(blockIdx.y) * M + m) * a.N + n] = sum;
  }
}

// out[m, n] = Σ_slices workspace[slice, m, n], slices added in order.
__global__ void sum_slices_kernel(const float* workspace, __half* out, int slices, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float sum = 0.0f;
  for (int s = 0; s < slices; ++s) sum += workspace[s * count + i];
  out[i] = __float2half_rn(sum);
}

template <int M>
cudaError_t launch_batch(const Gemv4bitArgs& a, const Plan& plan, cudaStream_t stream) {
  const dim3 grid((a.N + kColumnsPerCta - 1) / kColumnsPerCta, plan.slices);
  const size_t slice_bytes = (M + 1) * sizeof(float) * plan.slice_words * 8;
  const size_t sum_bytes = sizeof(float) * kThreadsY * M * kColumnsPerCta;
  const size_t shared_bytes = slice_bytes > sum_bytes ? slice_bytes : sum_bytes;
  GPTQ_LAUNCH(gemv_4bit_kernel<M>, grid, dim3(kThreadsX, kThreadsY), shared_bytes, stream)(a, plan.slice_words);
  return cudaGetLastError();
}

}  // namespace

int64_t gemv_4bit_workspace_floats(int M, int K, int N) {
  if (!gemv_4bit_supports(M, K, N)) return 0;
  const Plan plan = plan_for(K, N);
  return plan.slices > 1 ? static_cast<int64_t>(plan.slices) * M * N : 0;
}

cudaError_t launch_gemv_4bit(const Gemv4bitArgs& a, cudaStream_t stream) {
  if (!gemv_4bit_supports(a.M, a.K, a.N) || (a.zero_offset != 0 && a.zero_offset != 1)) return cudaErrorInvalidValue;
  const Plan plan = plan_for(a.K, a.N);
  if (plan.slices > 1 && a.workspace == nullptr) return cudaErrorInvalidValue;
  cudaError_t status = cudaErrorInvalidValue;
  switch (a.M) {
    case 1: status = launch_batch<1>(a, plan, stream); break;
    case 2: status = launch_batch<2>(a, plan, stream); break;
    case 3: status = launch_batch<3>(a, plan, stream); break;
    case 4: status = launch_batch<4>(a, plan, stream); break;
    case 5: status = launch_batch<5>(a, plan, stream); break;
    case 6: status = launch_batch<6>(a, plan, stream); break;
    case 7: status = launch_batch<7>(a, plan, stream); break;
    case 8: status = launch_batch<8>(a, plan, stream); break;
  }
  if (status != cudaSuccess || plan.slices == 1) return status;
  const int64_t count = static_cast<int64_t>(a.M) * a.N;
  const int threads = 256;
  GPTQ_LAUNCH(sum_slices_kernel, dim3(static_cast<unsigned>((count + threads - 1) / threads)), dim3(threads), 0,
              stream)(a.workspace, a.out, plan.slices, count);
  return cudaGetLastError();
}

}  // namespace gptq
