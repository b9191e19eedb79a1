"""`quantize --dry-run`: what would be quantized, and memory and time estimates, without loading
weights.

Memory is the largest of the run's phases (capturing block 0's inputs, solving one group of a block,
writing the checkpoint), each the sum of the buffers the engine and solver hold at that moment, on
top of what this process itself already holds (Python, torch, transformers: the same imports as a
real run). Time comes from a short probe on this machine (a few seconds): matmul throughput in
float32 and in the activation dtype, one Cholesky/inverse at 2048, the lazy update, packing, and the
solver's column loop on one block of each row count the run solves, scaled to each layer's shape
(_solve_seconds).
"""

from __future__ import annotations

import math
import os
import resource
import time
from pathlib import Path

import torch

from gptq_cli.format.config import QuantConfig
from gptq_cli.format.quantized import QuantizedWeight
from gptq_cli.model.arch import (
    block_groups,
    block_linears,
    linear_weight,
    quantized_shapes,
    resolve_arch,
)
from gptq_cli.model.modelio import (
    empty_model,
    resolve_device,
    resolve_dtype,
    resolve_model,
    storage_dtype,
)
from gptq_cli.quantization.allocate import Candidate, stored_bits
from gptq_cli.settings import RunSettings

# calibration passes through a block's weights per block (early stops and shortcuts)
FORWARD_PASSES = 2.5
# GPTAQ's full-precision stream (fp_stream.py): attention and MLP twice per batch, and the partial
# passes' norms
GPTAQ_FORWARD_PASSES = 2.5
SLACK = 1.15  # allocator overhead and short-lived temporaries not modelled below
# the solver's block: a column's in-block update spans the rest of its block
PROBE_COLUMNS = 128
# the Hessian size the factorisation is timed at (smaller ones are all overhead)
PROBE_FACTOR = 2048


def estimate(
    model: str,
    run: RunSettings,
    *,
    device: str | None,
    dtype: str,
    candidates: list[Candidate] | None = None,
    measurements: str | Path | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """What a quantize run with these settings would do, as api.quantize would run them (the seqlen
    the model allows: RunSettings.for_model); with run.target_bits, also what mixed.dry_run says
    of its allocation. GPTAQ's methods add a second stream of activations, its passes and each
    solve's ΔX X̃ᵀ."""
    from transformers import AutoConfig

    ref = resolve_model(model, trust_remote_code)
    dev = resolve_device(device)
    cdtype = resolve_dtype(dtype, dev, storage_dtype(ref))
    config = AutoConfig.from_pretrained(ref.path, **ref.load_kwargs)
    run = run.for_model(config)
    quant, nsamples, seqlen, batch_size = run.quant, run.nsamples, run.seqlen, run.batch_size
    skeleton = empty_model(config, trust_remote_code=trust_remote_code)
    layers_path, arch = resolve_arch(skeleton)
    layers = skeleton.get_submodule(layers_path)
    linears = block_linears(layers[0])
    shapes = {n: tuple(linear_weight(m).shape) for n, m in linears.items()}
    solves = _solves(layers[0], arch, shapes, quant.true_sequential)
    n_blocks = len(layers)
    block_params = sum(p.numel() for p in layers[0].parameters())
    outside = [
        p.numel() for n, p in skeleton.named_parameters() if not n.startswith(layers_path + ".")
    ]
    embed = skeleton.get_input_embeddings().weight.numel()
    hidden = getattr(config, "hidden_size", None) or max(k for _, k in shapes.values())
    tokens = nsamples * seqlen
    elt = torch.tensor([], dtype=cdtype).element_size()
    setting = Candidate(quant.bits, quant.group_size)
    out_bytes = sum(stored_bits(k, n, setting) for n, k in shapes.values()) * n_blocks / 8

    # Bytes held in each phase (the solver's working set is one K×K buffer besides the group's
    # Hessian).
    activations = tokens * hidden * elt * (1 + 1 / max(1, math.ceil(nsamples / batch_size)))
    widest = max(k for _, k in shapes.values())
    # the tail shortcuts' inputs (attention out, MLP down)
    recorded = tokens * (hidden + widest) * elt
    block = block_params * elt + activations + recorded + batch_size * seqlen * widest * elt * 4
    gptaq = run.method != "gptq"
    # the full-precision model's block inputs, one group's linear inputs, its attention's outputs
    if gptaq:
        block += tokens * (2 * hidden + widest) * elt
    # One solve: the group's Hessian and the solver's K×K buffer, W in float32, its codes, the lazy
    # update's product, W stacked in the model dtype; with the packed results of the block's earlier
    # solves, kept until the block is stored. GPTAQ: ΔX X̃ᵀ and its correction (or the least-squares
    # target's product), K×K each.
    solve, held = 0, 0
    for n, k in solves:
        solve = max(solve, held + (4 if gptaq else 2) * k * k * 4 + n * k * (12 + elt))
        held += n * k * quant.bits / 8
    capture = embed * (elt + 2) + activations
    # the checkpoint is written one tensor at a time (export.py): the largest, read and possibly
    # converted
    write = 2 * max(outside, default=0) * storage_dtype(ref).itemsize
    work = max(capture, block + solve, write)
    baseline = _own_peak_rss()  # this process: the same imports
    on_gpu = dev.type == "cuda"
    host = baseline + SLACK * (max(capture, write) if on_gpu else work)

    startup = _seconds_since_start()  # imports and reading the config, as a real run does them too
    rates = probe(dev, cdtype, [n for n, _ in solves])
    passes = FORWARD_PASSES + (GPTAQ_FORWARD_PASSES if gptaq else 0)
    seconds = startup + n_blocks * (
        _forward_seconds(block_params, tokens, rates, passes)
        + sum(_solve_seconds(n, k, tokens, quant, rates, gptaq) for n, k in solves)
    )
    report = {
        "model": model,
        "architecture": getattr(config, "model_type", "?"),
        "registry": "registered" if arch else "generic fallback",
        "blocks": n_blocks,
        "linears_per_block": len(linears),
        "linear_shapes": {n: f"{s[0]}x{s[1]}" for n, s in shapes.items()},
        "quantized_parameters": sum(n * k for n, k in shapes.values()) * n_blocks,
        "config": quant.to_hf_dict(),
        "method": run.method,
        "forward_passes_per_block": passes,
        "calibration": run.calibration(),
        "device": str(dev),
        "activation_dtype": str(cdtype).removeprefix("torch."),
        "peak_host_memory_gb": round(host / 1e9, 2),
        "peak_device_memory_gb": round(SLACK * (block + solve) / 1e9, 2) if on_gpu else None,
        "quantized_weights_gb": round(out_bytes / 1e9, 3),
        "estimated_minutes": round(seconds / 60, 1),
        "estimated_seconds": round(seconds, 1),
        "probe": {
            k: (
                {n: float(f"{t:.3g}") for n, t in v.items()}
                if isinstance(v, dict)
                else float(f"{v:.3g}")
            )
            for k, v in rates.items()
        },
    }
    if run.target_bits is not None:
        from gptq_cli.quantization.mixed import dry_run as mixed_dry_run

        report["target_bits"] = mixed_dry_run(
            quantized_shapes(skeleton, layers_path), candidates, run.target_bits, measurements
        )
    return report


def _solves(
    block, arch, shapes: dict[str, tuple[int, int]], true_sequential: bool
) -> list[tuple[int, int]]:
    """(rows, columns) of each solve of a block: linears of one sequential group that read the
    same input (same width K) share a Hessian and are solved as one stacked matrix. Without a
    registered architecture the groups need a traced forward, which a weightless model cannot
    run: every linear is then its own."""
    try:
        groups = block_groups(block, arch, None, true_sequential)
    except Exception:  # the trace of the fallback cannot run on meta weights
        groups = [[n] for n in shapes]
    solves = []
    for group in groups:
        by_width: dict[int, int] = {}
        for name in group:
            n, k = shapes[name]
            by_width[k] = by_width.get(k, 0) + n
        solves += [(n, k) for k, n in by_width.items()]
    return solves


def probe(
    device: torch.device, cdtype: torch.dtype, rows: list[int]
) -> dict[str, float | dict[int, float]]:
    """Throughputs of this machine as the solver and the calibration passes will use it (a few
    seconds): flops_f32 / flops_act: matmul FLOP/s in float32 and in the activation dtype;
    flops_hessian: the Hessian accumulation's (two FLOPs per product it computes); chol_s: the
    Cholesky and inverse of a PROBE_FACTOR² Hessian; flops_lazy: the lazy block update's rate;
    pack_s: seconds per weight to dequantize and pack a result; column_s[N]: seconds per column
    of the solver's column loop on N rows, timed on one block of each row count the run solves
    (its cost per row grows once a block's N×128 floats leave the cache, so a smaller probe would
    not tell)."""
    from gptq_cli.quantization.engine import column_block_function
    from gptq_cli.quantization.solver import (
        accumulate_hessian,
        inverse_hessian_factor,
        single_thread_on_cpu,
    )

    gptq_block = column_block_function(
        device
    )  # the block step the engine solves with on this device

    def timed(fn, repeat: int = 3) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / repeat

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(512, 1024, generator=gen).to(device)
    b = torch.randn(1024, 1024, generator=gen).to(device)
    flops = 2 * 512 * 1024 * 1024
    rates = {
        "flops_f32": flops / timed(lambda: a @ b),
        "flops_act": flops / timed(lambda: a.to(cdtype) @ b.to(cdtype)),
    }
    acts = torch.randn(2048, 1024, generator=gen).to(device=device, dtype=cdtype)
    rates["flops_hessian"] = (
        2 * 2048 * _hessian_products(1024) / timed(lambda: accumulate_hessian(None, 0, acts))
    )
    x = torch.randn(PROBE_FACTOR, 256, generator=gen).to(device)
    H = torch.eye(PROBE_FACTOR, device=device).addmm_(x, x.t(), alpha=1 / 256)
    rates["chol_s"] = timed(lambda: inverse_hessian_factor(H, 0.01), repeat=1)
    # the lazy update as the solver does it: a thin product into a temporary, then a pass over W
    W, Err = (
        torch.zeros(2048, 1024 + 128, device=device),
        torch.randn(2048, 128, generator=gen).to(device),
    )
    rates["flops_lazy"] = (
        2 * 2048 * 128 * 1024 / timed(lambda: W[:, 128:].sub_(Err @ H[:128, 128:1152]))
    )
    # what follows a solve, per weight: the dequantized weight put in place and the packed tensors
    codes = torch.randint(0, 16, (1024, 1024), generator=gen, dtype=torch.int32).to(device)
    qw = QuantizedWeight(
        codes,
        torch.ones(8, 1024, dtype=torch.float16, device=device),
        torch.full((8, 1024), 8, dtype=torch.int32, device=device),
        torch.arange(1024, device=device, dtype=torch.int32) // 128,
        4,
        128,
    )
    rates["pack_s"] = (
        timed(lambda: (qw.dequantize(cdtype), qw.to_tensors("gptq")), repeat=1) / codes.numel()
    )
    # as the solver
    Hinv = inverse_hessian_factor(H[:PROBE_COLUMNS, :PROBE_COLUMNS], 0.01)[0].contiguous()
    group = torch.zeros(PROBE_COLUMNS, dtype=torch.long, device=device)
    new = torch.zeros(PROBE_COLUMNS, dtype=torch.bool, device=device)
    new[0] = True
    rates["column_s"] = {}
    for n in sorted(set(rows)):
        W = torch.randn(n, PROBE_COLUMNS, generator=gen).to(device)
        scales, zeros = torch.ones(n, 1, device=device), torch.full((n, 1), 8.0, device=device)
        with single_thread_on_cpu(device):
            rates["column_s"][n] = (
                timed(
                    lambda: gptq_block(
                        W.clone(),
                        Hinv,
                        scales,
                        zeros,
                        group,
                        new,
                        bits=4,
                        sym=True,
                        mse=False,
                        group_size=PROBE_COLUMNS,
                    ),
                    repeat=1,
                )
                / PROBE_COLUMNS
            )
    return rates


def _seconds_since_start() -> float:
    """How long this process has run (Linux /proc; 0 elsewhere)."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rpartition(")")[2].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def _hessian_products(k: int) -> int:
    """Products per token that accumulate_hessian computes for width k: its lower panels, about
    k²/2."""
    from gptq_cli.quantization.solver import hessian_panels

    return sum((k - start) * (end - start) for start, end in hessian_panels(k))


def _forward_seconds(
    block_params: int, tokens: int, rates: dict[str, float], passes: float
) -> float:
    return passes * 2 * block_params * tokens / rates["flops_act"]


def _solve_seconds(
    n: int, k: int, tokens: int, quant: QuantConfig, rates: dict[str, float], gptaq: bool = False
) -> float:
    """One stacked solve: its Hessian (2·tokens times the products of its lower panels, at the
    rate of the route the activations take: solver.accumulate_hessian), the factorisation (K³,
    from the probe's at PROBE_FACTOR), the lazy block updates (N·K² FLOPs), the column loop, the
    clip search when asked for, and the dequantization and packing of the result. GPTAQ adds X
    X̃ᵀ, a whole K×K product by the Hessian's route."""
    hessian = 2 * tokens * _hessian_products(k) / rates["flops_hessian"]
    if gptaq:
        hessian += 2 * tokens * k * k / rates["flops_hessian"]
    # K³ at the probe's rate, which rises with K (BLAS works on bigger panels; measured ~K/2048-fold
    # to 5632) up to the matmul rate
    rate = min(rates["flops_f32"], PROBE_FACTOR**3 / rates["chol_s"] * max(1.0, k / PROBE_FACTOR))
    factor = k**3 / rate if k > PROBE_FACTOR else rates["chol_s"] * (k / PROBE_FACTOR) ** 3
    lazy = n * k * k / rates["flops_lazy"]
    columns = k * rates["column_s"][n]
    pack = n * k * rates["pack_s"]
    # 80 shrink steps over all of W, each like one pass over it
    clip = 80 * columns if quant.mse else 0.0
    return hessian + factor + lazy + columns + clip + pack


def _own_peak_rss() -> int:
    """This process's peak RSS in bytes since it started its program. Not ru_maxrss: Linux
    carries that across exec, so a process forked from a large one (a test runner, a notebook)
    would report its parent's size."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
