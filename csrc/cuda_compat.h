// The few CUDA spellings the kernels use that differ between nvcc and the CPU emulator (csrc/emu/).
//
// Built by nvcc (setup.py, JIT, the compile test) this is plain CUDA. Built by g++ with GPTQ_CUDA_EMU
// defined, csrc/emu/cuda_emu.h supplies threads, warps, shuffles and shared memory on the CPU, so that the
// exact kernel source can be executed and compared with the torch twins on a machine without a GPU.
#pragma once

#ifdef GPTQ_CUDA_EMU
#include "emu/cuda_emu.h"
// kernel<<<grid, block, smem, stream>>>(args) cannot be parsed by a host compiler.
#define GPTQ_LAUNCH(kernel, grid, block, smem, stream) ::emu::Launch((grid), (block), (smem), (kernel))
#define GPTQ_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::emu::dynamic_shared())
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define GPTQ_LAUNCH(kernel, grid, block, smem, stream) kernel<<<(grid), (block), (smem), (stream)>>>
#define GPTQ_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
