"""The CUDA kernels against the torch paths, on a GPU (it exits with a message elsewhere).

    pip install --no-build-isolation -e .          # builds gptq_cli._C (or run with GPTQ_JIT=1)
    python scripts/bench_kernels.py [--repeats 5] [--peak-gbps 3350]

Solver: seconds per layer of solver.quantize_weight (4-bit, group 128, act-order, a random positive definite
Hessian) with the torch block step vs the fused block kernel, and whether the two give identical codes.
GEMV: the 4-bit kernel at batch 1, 4 and 8 vs torch's fp16 matmul on the dense weight and vs the torch twin
(dequantize + matmul); achieved bandwidth = bytes the kernel must move (packed weight, scales, zeros, g_idx,
activations, output) / time, as a fraction of the GPU's peak memory bandwidth (from NVML or torch's device
properties, or --peak-gbps), which bounds any GEMV at these batch sizes.
Timing: CUDA events around each run, L2 flushed before every run (a buffer of twice its size is rewritten),
one warm-up, the median of --repeats runs. Writes bench/kernels_<device>.json with device, torch and CUDA
versions. All numbers are from one GPU: compare them only with numbers from the same kind of GPU.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from gptq_cli import kernels, solver
from gptq_cli.format.pack import pack_qweight, pack_qzeros
from gptq_cli.kernels.gemv_torch import dequantize_4bit, gemv_4bit_torch

ROOT = Path(__file__).resolve().parents[1]
SOLVER_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]   # (N, K) = (out, in) features
GEMV_SHAPES = SOLVER_SHAPES + [(4096, 14336), (28672, 4096)]
BATCHES = (1, 4, 8)
GROUP_SIZE = 128


def peak_bandwidth_gbps(override: float | None) -> float | None:
    """The GPU's peak memory bandwidth in GB/s: --peak-gbps, else NVML, else torch's device properties."""
    if override:
        return override
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        return 2 * clock_mhz * 1e6 * bus_bits / 8 / 1e9    # double data rate
    except Exception:   # no NVML: try the device properties next
        pass
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def cuda_median_seconds(fn: Callable[[], object], repeats: int, l2_flush: torch.Tensor) -> float:
    fn()   # warm-up: lazy initialisation, allocator, cuBLAS heuristics
    times = []
    for _ in range(repeats):
        l2_flush.add_(1)   # evict the previous run's data from L2
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bench_solver(repeats: int, l2_flush: torch.Tensor) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for N, K in SOLVER_SHAPES:
        W = torch.randn(N, K, device="cuda", generator=gen) * 0.02
        X = torch.randn(2 * K, K, device="cuda", generator=gen)
        H = 2 * X.t() @ X / X.shape[0]
        del X
        settings = dict(bits=4, group_size=GROUP_SIZE, desc_act=True)
        results = {}

        def run(name: str, block_fn: solver.BlockFn) -> Callable[[], None]:
            return lambda: results.__setitem__(name, solver.quantize_weight(W, H, **settings, block_fn=block_fn))

        torch_s = cuda_median_seconds(run("torch", solver.quantize_block), repeats, l2_flush)
        kernel_s = cuda_median_seconds(run("kernel", kernels.gptq_block), repeats, l2_flush)
        rows.append({"N": N, "K": K, "torch_s": torch_s, "kernel_s": kernel_s, "speedup": torch_s / kernel_s,
                     "identical_codes": bool(torch.equal(results["torch"].codes, results["kernel"].codes))})
        print(f"solver {N:>6}x{K:<6} torch {torch_s:8.3f} s  kernel {kernel_s:8.3f} s  "
              f"x{torch_s / kernel_s:6.1f}  identical codes: {rows[-1]['identical_codes']}", flush=True)
    return rows


def random_4bit_layer(N: int, K: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    G = K // GROUP_SIZE
    codes = torch.randint(0, 16, (K, N), device="cuda", generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 17, (G, N), device="cuda", generator=gen, dtype=torch.int32)
    g_idx = (torch.arange(K, device="cuda") // GROUP_SIZE).to(torch.int32)
    g_idx = g_idx[torch.randperm(K, device="cuda", generator=gen)].contiguous()   # act-order: the harder case
    scales = (torch.rand(G, N, device="cuda", generator=gen) * 0.01).half()
    return {"qweight": pack_qweight(codes, 4), "scales": scales, "qzeros": pack_qzeros(zeros, 4, "gptq"),
            "g_idx": g_idx}


def bench_gemv(repeats: int, l2_flush: torch.Tensor, peak_gbps: float | None) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    for N, K in GEMV_SHAPES:
        layer = random_4bit_layer(N, K, gen)
        dense = dequantize_4bit(**layer).t().contiguous().half()   # [N, K] fp16
        for M in BATCHES:
            x = torch.randn(M, K, device="cuda", generator=gen).half()
            kernel_s = cuda_median_seconds(lambda: kernels.gemv_4bit(x, **layer), repeats, l2_flush)
            fp16_s = cuda_median_seconds(lambda: torch.nn.functional.linear(x, dense), repeats, l2_flush)
            twin_s = cuda_median_seconds(lambda: gemv_4bit_torch(x, **layer), repeats, l2_flush)
            moved = sum(t.numel() * t.element_size() for t in layer.values()) + 2 * M * (K + N)
            row = {"N": N, "K": K, "M": M, "kernel_us": kernel_s * 1e6, "fp16_matmul_us": fp16_s * 1e6,
                   "torch_twin_us": twin_s * 1e6, "kernel_bytes": moved, "kernel_gbps": moved / kernel_s / 1e9,
                   "fp16_matmul_gbps": 2 * (N * K + M * (K + N)) / fp16_s / 1e9}
            if peak_gbps:
                row["kernel_fraction_of_peak"] = row["kernel_gbps"] / peak_gbps
                row["fp16_fraction_of_peak"] = row["fp16_matmul_gbps"] / peak_gbps
            rows.append(row)
            fraction = f"{row['kernel_fraction_of_peak']:5.1%} of peak" if peak_gbps else "peak unknown"
            print(f"gemv {N:>6}x{K:<6} M={M}  kernel {row['kernel_us']:8.1f} us ({row['kernel_gbps']:6.0f} GB/s, "
                  f"{fraction})  fp16 matmul {row['fp16_matmul_us']:8.1f} us  "
                  f"torch twin {row['torch_twin_us']:8.1f} us", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--peak-gbps", type=float, help="the GPU's peak memory bandwidth, if NVML cannot tell")
    parser.add_argument("--skip-solver", action="store_true", help="only the GEMV benchmark")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/kernels_<device>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py measures CUDA kernels and needs a CUDA GPU; torch.cuda.is_available() is False")
    if kernels.backend_name("cuda") != "cuda-ext":
        sys.exit("the CUDA extension is not built: pip install --no-build-isolation -e . "
                 "(or set GPTQ_JIT=1 to compile it on first use)")

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2_flush = torch.empty(max(2 * props.L2_cache_size, 1 << 20) // 4, dtype=torch.float32, device="cuda")
    peak = peak_bandwidth_gbps(args.peak_gbps)
    print(f"{props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, peak bandwidth "
          f"{f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbps)'}", flush=True)
    report = {"device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "peak_bandwidth_gbps": peak, "l2_cache_bytes": props.L2_cache_size, "repeats": args.repeats,
              "solver": [] if args.skip_solver else bench_solver(args.repeats, l2_flush),
              "gemv": bench_gemv(args.repeats, l2_flush, peak)}
    out = args.out or ROOT / "bench" / f"kernels_{re.sub(r'[^A-Za-z0-9]+', '_', props.name).strip('_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
