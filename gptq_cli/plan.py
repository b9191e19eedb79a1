"""`quantize --dry-run`: what would be quantized, and rough memory and time estimates, without loading weights."""
from __future__ import annotations

import torch

from gptq_cli.arch import block_linears, linear_weight, resolve_arch
from gptq_cli.format.config import QuantConfig
from gptq_cli.modelio import resolve_device, resolve_dtype, resolve_model, storage_dtype
from gptq_cli.moe import defuse_experts

# Sustained matmul throughput assumed for the time estimate (FLOP/s); measured on this project's machines
# (2-core AMX CPU: ~400 GFLOP/s bf16, ~80 fp32) or a conservative share of a datacenter GPU's peak.
THROUGHPUT = {("cpu", torch.bfloat16): 4e11, ("cpu", torch.float32): 8e10, ("cpu", torch.float16): 2e10,
              ("cuda", torch.float16): 1.5e14, ("cuda", torch.bfloat16): 1.5e14, ("cuda", torch.float32): 3e13}
FORWARDS_PER_BLOCK = 3.0  # true-sequential group passes (stopped early) plus the pass for the next block


def make_plan(model: str, quant: QuantConfig, *, device: str | None, dtype: str, dataset: str, nsamples: int,
              seqlen: int, batch_size: int, seed: int) -> dict:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    ref = resolve_model(model)
    dev = resolve_device(device)
    cdtype = resolve_dtype(dtype, dev, storage_dtype(ref))
    kwargs = {"gguf_file": ref.gguf_file} if ref.gguf_file else {}
    config = AutoConfig.from_pretrained(ref.path, **kwargs)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    defuse_experts(skeleton)
    layers_path, arch = resolve_arch(skeleton)
    layers = skeleton.get_submodule(layers_path)
    linears = block_linears(layers[0])
    shapes = {n: tuple(linear_weight(m).shape) for n, m in linears.items()}
    block_params = sum(p.numel() for p in layers[0].parameters())
    quant_params = sum(n * k for n, k in shapes.values()) * len(layers)
    hidden = getattr(config, "hidden_size", None) or max(k for _, k in shapes.values())
    tokens = nsamples * seqlen
    elt = torch.tensor([], dtype=cdtype).element_size()
    unique_inputs = {k for _, k in shapes.values()}
    hessian_bytes = sum(k * k * 4 for _, k in shapes.values())
    activation_bytes = 2 * tokens * hidden * elt
    g = quant.group_size if quant.group_size != -1 else None
    out_bytes = sum(n * k * quant.bits / 8 + (-(-k // g) if g else 1) * n * (2 + quant.bits / 8)
                    for n, k in shapes.values()) * len(layers)
    flops = len(layers) * (FORWARDS_PER_BLOCK * 2 * block_params * tokens
                           + sum(2 * k * k * tokens for k in unique_inputs) * 2)
    seconds = flops / THROUGHPUT.get((dev.type, cdtype), 1e11)
    return {
        "model": model, "architecture": getattr(config, "model_type", "?"),
        "registry": "registered" if arch else "generic fallback", "blocks": len(layers),
        "linears_per_block": len(linears), "linear_shapes": {n: f"{s[0]}x{s[1]}" for n, s in shapes.items()},
        "quantized_parameters": quant_params, "config": quant.to_hf_dict(),
        "calibration": {"dataset": dataset, "nsamples": nsamples, "seqlen": seqlen, "batch_size": batch_size,
                        "seed": seed},
        "device": str(dev), "activation_dtype": str(cdtype).removeprefix("torch."),
        "peak_device_memory_gb": round((block_params * elt + hessian_bytes + activation_bytes) / 1e9, 2),
        "quantized_weights_gb": round(out_bytes / 1e9, 3),
        "estimated_minutes": round(seconds / 60, 1),
    }
