// A small CPU emulator of the CUDA features the kernels in csrc/ use, so that their exact source runs (and is
// tested against the torch twins) on machines without a GPU. Not a general CUDA implementation.
//
// Every CUDA thread of a block is a ucontext fiber on one OS thread; blocks run one after another. A fiber
// runs until it reaches a warp-level sync (__shfl_*, __syncwarp) or __syncthreads, then yields; a barrier is
// released when every thread it concerns has arrived, so shuffles see all 32 lanes' values as on a GPU.
// Arithmetic follows IEEE float32 round-to-nearest, like the _rn intrinsics (build with -ffp-contract=off).
// Dynamic shared memory is filled with 0xFF bytes (NaN floats, -1 ints) to expose reads of unwritten data.
#pragma once

#include <ucontext.h>

#include <math.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };

using __half = _Float16;  // IEEE binary16; conversions round to nearest even like __float2half_rn
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return static_cast<__half>(f); }

// half2 arithmetic: each result is the exact value rounded once to binary16 (computed in double, where a
// product of two halves and a sum of two halves are exact); __hfma2's sum can round twice only when a product
// of subnormals meets a large addend, which the tests do not produce.
struct alignas(4) __half2 { __half x, y; };
struct float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline __half round_half(double v) { return static_cast<__half>(v); }
inline __half2 __hsub2(__half2 a, __half2 b) {
  return {round_half(double(a.x) - double(b.x)), round_half(double(a.y) - double(b.y))};
}
inline __half2 __hmul2(__half2 a, __half2 b) {
  return {round_half(double(a.x) * double(b.x)), round_half(double(a.y) * double(b.y))};
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return {round_half(double(a.x) * double(b.x) + double(c.x)), round_half(double(a.y) * double(b.y) + double(c.y))};
}
inline float2 __half22float2(__half2 h) { return {float(h.x), float(h.y)}; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, sizeof u); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, sizeof f); return f; }
// Byte i of the result is byte (selector nibble i) of the 8 bytes {a, b}, as PRMT (default mode).
inline unsigned __byte_perm(unsigned a, unsigned b, unsigned s) {
  const uint64_t both = uint64_t(a) | (uint64_t(b) << 32);
  unsigned out = 0;
  for (int i = 0; i < 4; ++i) out |= unsigned((both >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return out;
}

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, sizeof f); return f; }
template <class T> inline T __ldg(const T* p) { return *p; }

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }

namespace emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 64 * 1024;

// Few SMs, so that grid-stride loops and split-K paths really take several iterations in the tests.
inline int& multiprocessor_count() { static int n = 3; return n; }

enum class Wait { kNone, kWarp, kBlock };

struct Thread {
  ucontext_t context;
  dim3 index;
  Wait wait = Wait::kNone;
  bool done = false;
  unsigned warp_syncs = 0;  // warp barriers passed: picks the shuffle buffer of the next one
};

struct Block {
  dim3 grid_dim, block_dim, block_index;
  std::vector<Thread> threads;
  std::vector<char> stacks;
  std::vector<unsigned char> shared;
  // Two buffers per warp: a lane that has read the values of one shuffle can already write the next one.
  std::vector<uint64_t> shuffle_values;  // [warp][2][lane]
  ucontext_t scheduler;
  size_t current = 0;
  std::function<void()> body;
};

inline Block*& block() { static Block* b = nullptr; return b; }
inline Thread& self() { return block()->threads[block()->current]; }
inline void* dynamic_shared() { return block()->shared.data(); }

inline void yield(Wait why) {
  Thread& t = self();
  t.wait = why;
  swapcontext(&t.context, &block()->scheduler);
}

inline void fiber_main() {
  block()->body();
  self().done = true;  // returning resumes the scheduler through uc_link
}

// Release every barrier whose threads have all arrived; true if any was released.
inline bool release_barriers(Block& b) {
  bool released = false;
  const size_t n = b.threads.size();
  for (size_t w = 0; w < n / kWarpSize; ++w) {
    bool all = true;
    for (size_t i = w * kWarpSize; i < (w + 1) * kWarpSize; ++i) all = all && b.threads[i].wait == Wait::kWarp;
    if (all) {
      for (size_t i = w * kWarpSize; i < (w + 1) * kWarpSize; ++i) b.threads[i].wait = Wait::kNone;
      released = true;
    }
  }
  bool any = false, all = true;
  for (const Thread& t : b.threads) {
    if (t.done) continue;
    any = true;
    all = all && t.wait == Wait::kBlock;
  }
  if (any && all) {
    for (Thread& t : b.threads) t.wait = Wait::kNone;
    released = true;
  }
  return released;
}

inline void run_block(Block& b) {
  const size_t n = b.threads.size();
  for (size_t i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t = Thread{};
    t.index = dim3(i % b.block_dim.x, i / b.block_dim.x % b.block_dim.y, i / (b.block_dim.x * b.block_dim.y));
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = b.stacks.data() + i * kStackBytes;
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &b.scheduler;
    makecontext(&t.context, fiber_main, 0);
  }
  std::fill(b.shared.begin(), b.shared.end(), 0xFF);
  for (;;) {
    bool ran = false, finished = true;
    for (size_t i = 0; i < n; ++i) {
      if (b.threads[i].done) continue;
      finished = false;
      if (b.threads[i].wait != Wait::kNone) continue;
      b.current = i;
      swapcontext(&b.scheduler, &b.threads[i].context);
      ran = true;
    }
    if (finished) return;
    if (!release_barriers(b) && !ran)
      throw std::runtime_error("emulated kernel deadlocked: a barrier or shuffle that not all threads reach");
  }
}

// The emulated `kernel<<<grid, block, shared_bytes>>>(args...)`.
template <class Kernel>
struct Launch {
  dim3 grid, threads;
  size_t shared_bytes;
  Kernel kernel;
  Launch(dim3 g, dim3 t, size_t s, Kernel k) : grid(g), threads(t), shared_bytes(s), kernel(k) {}

  template <class... Args>
  void operator()(Args... args) const {
    const size_t n = size_t(threads.x) * threads.y * threads.z;
    if (n == 0 || n % kWarpSize != 0) throw std::invalid_argument("emulator: block size must be a multiple of 32");
    Block b;
    b.grid_dim = grid;
    b.block_dim = threads;
    b.threads.resize(n);
    b.stacks.resize(n * kStackBytes);
    b.shared.resize(shared_bytes + 16);
    b.shuffle_values.assign(n / kWarpSize * 2 * kWarpSize, 0);
    b.body = [&] { kernel(args...); };
    block() = &b;
    try {
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            b.block_index = dim3(x, y, z);
            run_block(b);
          }
    } catch (...) {
      block() = nullptr;
      throw;
    }
    block() = nullptr;
  }
};

template <class T>
inline T shuffle(T value, int lane_or_mask, bool xor_lanes) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  Block& b = *block();
  Thread& t = self();
  const size_t warp = b.current / kWarpSize, lane = b.current % kWarpSize;
  uint64_t* values = &b.shuffle_values[(warp * 2 + t.warp_syncs++ % 2) * kWarpSize];
  std::memcpy(&values[lane], &value, sizeof(T));
  yield(Wait::kWarp);
  const size_t source = (xor_lanes ? lane ^ unsigned(lane_or_mask) : unsigned(lane_or_mask)) % kWarpSize;
  T out;
  std::memcpy(&out, &values[source], sizeof(T));
  return out;
}

}  // namespace emu

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emu::multiprocessor_count();
  return cudaSuccess;
}

#define threadIdx (::emu::self().index)
#define blockIdx (::emu::block()->block_index)
#define blockDim (::emu::block()->block_dim)
#define gridDim (::emu::block()->grid_dim)

inline void __syncthreads() { emu::yield(emu::Wait::kBlock); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  ++emu::self().warp_syncs;
  emu::yield(emu::Wait::kWarp);
}
template <class T> inline T __shfl_sync(unsigned, T value, int lane) { return emu::shuffle(value, lane, false); }
template <class T> inline T __shfl_xor_sync(unsigned, T value, int mask) { return emu::shuffle(value, mask, true); }
