"""The CUDA kernels against the torch paths, and the measured copy bandwidth they are bounded by.

    python setup.py build_ext --inplace   # or: pip install --no-build-isolation -e . / GPTQ_JIT=1
    python scripts/bench_kernels.py [--out bench/kernels_<device>.json]

GEMV: the 4-bit kernel at batch 1, 4 and 8, ordered and act-order, fp16 and bf16, against fp16
F.linear on the dense weight. Each timing replays a CUDA graph of ITERS calls (launch overhead is
not what is measured) over enough copies of the layer that they do not fit in L2 (each call reads
from DRAM); the median of REPEATS replays. Achieved bandwidth = the bytes a call must move (packed
weight, scales, zeros, activations, output) / time, as a fraction of the device-to-device copy
bandwidth measured here (bytes read + written). Solver: seconds per layer of solver.quantize_weight
with the torch block step vs the fused block kernel. Without CUDA (device_check.sh --cpu) the same
code runs on the CPU at small sizes, with host timers, to check the script, not to measure anything.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptq_cli import kernels  # noqa: E402
from gptq_cli.format.bitpack import pack_qweight, pack_qzeros  # noqa: E402
from gptq_cli.kernels.gemv_torch import dequantize_packed, layout_4bit  # noqa: E402
from gptq_cli.quantization import solver  # noqa: E402

GEMV_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K) = (out, in) features of a 7B
BATCHES = (1, 4, 8)
GROUP_SIZE = 128
ITERS, REPEATS = 20, 5
L2_DEFEAT_BYTES = 256 << 20  # > 4x the H200's 60 MB of L2


def timed(
    fn: Callable[[], object], device: torch.device, iters: int = ITERS, repeats: int = REPEATS
) -> float:
    """Median seconds per call of `fn`: a CUDA graph of `iters` calls replayed `repeats` times
    (host timers on a CPU)."""
    fn()  # warm-up: lazy initialisation, allocator, cuBLAS heuristics, layout caches
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) / iters)
        return statistics.median(times)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, iters=5) / 1e9


def random_layer(
    N: int, K: int, act_order: bool, device: torch.device, gen: torch.Generator
) -> dict:
    G = K // GROUP_SIZE
    codes = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 17, (G, N), generator=gen, dtype=torch.int32)
    g_idx = (torch.arange(K) // GROUP_SIZE).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)].contiguous()
    scales = (torch.rand(G, N, generator=gen) * 0.01 + 1e-3).half()
    layer = {
        "qweight": pack_qweight(codes, 4),
        "scales": scales,
        "qzeros": pack_qzeros(zeros, 4, "gptq"),
        "g_idx": g_idx,
    }
    return {k: v.to(device) for k, v in layer.items()}


def bench_gemv(
    device: torch.device, shapes=GEMV_SHAPES, batches=BATCHES, copy_gbps: float | None = None
) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    for N, K in shapes:
        for act_order in (False, True):
            layer = random_layer(N, K, act_order, device, gen)
            layout = layout_4bit(layer["qweight"], layer["g_idx"])
            layer_bytes = sum(
                t.numel() * t.element_size()
                for t in (layout.qweight, layer["scales"], layer["qzeros"])
            )
            n_copies = (
                max(1, math.ceil(L2_DEFEAT_BYTES / layer_bytes)) if device.type == "cuda" else 1
            )
            copies = [{k: v.clone() for k, v in layer.items()} for _ in range(n_copies)]
            layouts = [layout_4bit(c["qweight"], c["g_idx"]) for c in copies]
            dense = dequantize_packed(**layer, dtype=torch.float16).t().contiguous()  # [N, K]
            n_dense = (
                max(1, math.ceil(L2_DEFEAT_BYTES / dense.nbytes)) if device.type == "cuda" else 1
            )
            denses = [dense.clone() for _ in range(n_dense)]
            for dtype in (torch.float16, torch.bfloat16):
                for M in batches:
                    x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
                    x16 = x.half()
                    calls = iter(range(10**12))

                    def gemv() -> torch.Tensor:
                        i = next(calls) % len(copies)
                        c = copies[i]
                        return kernels.gemv_4bit(
                            x,
                            c["qweight"],
                            c["scales"],
                            c["qzeros"],
                            c["g_idx"],
                            "gptq",
                            layouts[i],
                        )

                    def linear() -> torch.Tensor:
                        return torch.nn.functional.linear(x16, denses[next(calls) % len(denses)])

                    kernel_s, fp16_s = timed(gemv, device), timed(linear, device)
                    moved = (
                        layer_bytes
                        + x.nbytes
                        + M * N * 2
                        + (K * 4 if layout.perm is not None else 0)
                    )
                    row = {
                        "N": N,
                        "K": K,
                        "M": M,
                        "dtype": str(dtype).removeprefix("torch."),
                        "act_order": act_order,
                        "backend": kernels.backend_name(device),
                        "kernel_us": kernel_s * 1e6,
                        "fp16_linear_us": fp16_s * 1e6,
                        "speedup_vs_fp16": fp16_s / kernel_s,
                        "kernel_gbps": moved / kernel_s / 1e9,
                        "l2_copies": len(copies),
                    }
                    if copy_gbps:
                        row["fraction_of_copy_bw"] = row["kernel_gbps"] / copy_gbps
                    rows.append(row)
                    share = f", {row['fraction_of_copy_bw']:.0%} of copy" if copy_gbps else ""
                    print(
                        f"gemv {N:>6}x{K:<6} M={M} {row['dtype']:<8} act_order={act_order!s:<5} "
                        f"{row['kernel_us']:8.1f} us ({row['kernel_gbps']:6.0f} GB/s{share}) "
                        f"fp16 linear {row['fp16_linear_us']:8.1f} us",
                        flush=True,
                    )
    return rows


def bench_block(device: torch.device, shapes=((4096, 4096),), repeats: int = 3) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for N, K in shapes:
        W = (torch.randn(N, K, generator=gen) * 0.02).to(device)
        X = torch.randn(2 * K, K, generator=gen).to(device)
        H = 2 * X.t() @ X / X.shape[0]
        settings = dict(bits=4, group_size=GROUP_SIZE, desc_act=True)
        results, seconds = {}, {}
        for name, column_block_fn in (
            ("torch", solver.quantize_column_block),
            ("kernel", kernels.gptq_block),
        ):
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize() if device.type == "cuda" else None
                t0 = time.perf_counter()
                results[name] = solver.quantize_weight(
                    W, H, **settings, column_block_fn=column_block_fn
                )
                torch.cuda.synchronize() if device.type == "cuda" else None
                times.append(time.perf_counter() - t0)
            seconds[name] = statistics.median(times)
        rows.append(
            {
                "N": N,
                "K": K,
                "torch_s": seconds["torch"],
                "kernel_s": seconds["kernel"],
                "speedup": seconds["torch"] / seconds["kernel"],
                "backend": kernels.backend_name(device),
                "identical_codes": bool(
                    torch.equal(results["torch"].codes, results["kernel"].codes)
                ),
            }
        )
        print(
            f"block {N}x{K}: torch {seconds['torch']:.3f} s, kernel {seconds['kernel']:.3f} s, "
            f"identical codes {rows[-1]['identical_codes']}",
            flush=True,
        )
    return rows


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": "cpu", "torch": torch.__version__}
    props = torch.cuda.get_device_properties(device)
    return {
        "device": props.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "sms": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, help="JSON output (default bench/kernels_<device>.json)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available() or kernels.backend_name("cuda") != "cuda-ext":
        sys.exit(
            "bench_kernels.py measures the CUDA extension: it needs a GPU and gptq_cli._C built "
            "(python setup.py build_ext --inplace, or GPTQ_JIT=1)"
        )
    device = torch.device("cuda")
    info = device_info(device)
    copy = copy_bandwidth_gbps(device)
    print(
        f"{info['device']}, torch {info['torch']}, CUDA {info['cuda']}, copy bandwidth "
        f"{copy:.0f} GB/s"
    )
    report = {
        **info,
        "copy_gbps": copy,
        "gemv": bench_gemv(device, copy_gbps=copy),
        "block": bench_block(device),
    }
    name = re.sub(r"[^A-Za-z0-9]+", "_", info["device"]).strip("_")
    out = args.out or ROOT / "bench" / f"kernels_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
