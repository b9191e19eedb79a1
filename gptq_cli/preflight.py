"""What a quantize run tells before any work: settings that cannot be applied as asked become a
note saying what is done instead (a short calibration corpus, a group size that does not divide a
layer's width; settings.py refuses those that cannot be run at all). The notes go to the user and
into quant_log.json."""

from __future__ import annotations

from math import gcd

import torch

from gptq_cli.format.config import QuantConfig


def calibration_notes(samples: list[torch.Tensor], nsamples: int, seqlen: int) -> list[str]:
    """What the calibration data gave instead of `nsamples` samples of `seqlen` tokens, if it
    differs."""
    lengths = [s.shape[-1] for s in samples]
    if len(samples) == nsamples and min(lengths) == seqlen:
        return []
    shape = f"{len(samples)} sample(s) of {min(lengths)}" + (
        f" to {max(lengths)}" if min(lengths) != max(lengths) else ""
    )
    return [
        f"the calibration data holds {shape} tokens, not --nsamples {nsamples} x --seqlen "
        f"{seqlen}: quantizing with those ({sum(lengths)} tokens, recorded in quant_log.json); "
        f"more text gives what was asked"
    ]


def group_size_notes(shapes: dict[str, tuple[int, int]], group_size: int) -> list[str]:
    """A note when the group size does not divide some quantized linears' input width K
    (`shapes`: (in, out) by name, arch.quantized_shapes): GPTQ handles a short last group, but
    fast kernels (vLLM's Marlin, GPTQModel's CPU kernels) need K % group_size == 0."""
    widths = [k for k, _ in shapes.values()]
    uneven = sorted({k for k in widths if group_size > 0 and k % group_size})
    if not uneven:
        return []
    common = 0
    for k in set(widths):
        common = gcd(common, k)
    fits = [g for g in (128, 64, 32, 16) if common % g == 0]
    advice = (
        f"--group-size {fits[0]} divides them all"
        if fits
        else f"a group size dividing {common} avoids it"
    )
    count = sum(1 for k in widths if k % group_size)
    return [
        f"--group-size {group_size} does not divide the input width "
        f"({', '.join(map(str, uneven))}) of {count} of {len(widths)} linears: their last group "
        f"is shorter, which GPTQ handles but vLLM and GPTQModel's fast kernels do not (they need "
        f"in_features % group_size == 0); {advice}"
    ]


def act_order_notes(quant: QuantConfig) -> list[str]:
    """A note when act-order with groups gives g_idx other than k // group_size (desc_act true in
    the file), which vLLM 0.32 refuses to serve (format/compat.py)."""
    if quant.trivial_g_idx:
        return []
    return [
        "--desc-act without --static-groups writes desc_act true (groups follow the act-order), "
        "which vLLM 0.32 refuses to serve; add --static-groups for a file it serves (the same "
        "act-order solve, groups of original columns; on SmolLM2 4g128 as good or better: "
        "bench/act_order_smollm2_*.json)"
    ]
