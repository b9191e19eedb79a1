"""The plain Python API under the CLI: `quantize(...)` (and `evaluate`, re-exported from evaluate.py).

    from gptq_cli import api
    from gptq_cli.format.config import QuantConfig
    result = api.quantize("smollm2-135m", QuantConfig(bits=4, group_size=128), dataset="builtin",
                          nsamples=128, seqlen=512, output="smollm2-gptq")
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gptq_cli import __version__
from gptq_cli.arch import resolve_arch
from gptq_cli.engine import ModuleResult, capture_inputs, quantize_blocks
from gptq_cli.errors import UsageError
from gptq_cli.format.config import QuantConfig
from gptq_cli.modelio import (ModelRef, StreamingModel, load_streaming, load_tokenizer, resolve_device,
                             resolve_dtype, resolve_model)

# Progress events: ("calibrate", done, total), ("block", done, total), ("module", ModuleResult)
ProgressFn = Callable[..., None]


@dataclass
class QuantizeResult:
    output: Path
    modules: list[dict] = field(default_factory=list)   # quant_log.json's per-module rows
    seconds: float = 0.0
    plan: dict = field(default_factory=dict)


def default_output(model: str, quant: QuantConfig) -> Path:
    name = Path(model).stem if model.endswith(".gguf") else Path(model.rstrip("/")).name
    return Path(f"{name}-gptq-{quant.bits}bit-g{quant.group_size}")


def batch_samples(samples: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack equal-length samples into batches (samples of another length go in their own batches)."""
    batches, current = [], []
    for s in samples:
        if current and (len(current) == batch_size or current[0].shape[-1] != s.shape[-1]):
            batches.append(torch.cat(current))
            current = []
        current.append(s.reshape(1, -1))
    if current:
        batches.append(torch.cat(current))
    return batches


def quantize(model: str, quant: QuantConfig | None = None, *, dataset: str = "builtin",
             dataset_path: str | None = None, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
             batch_size: int = 8, device: str | None = None, dtype: str = "auto",
             output: str | Path | None = None, progress: ProgressFn | None = None) -> QuantizeResult:
    """Quantize `model` (Hub id, local dir, .gguf or built-in name) with GPTQ and write a GPTQ checkpoint."""
    from gptq_cli.format.checkpoint import write_checkpoint
    from gptq_cli.textdata import calibration_samples

    quant = quant or QuantConfig()
    out = Path(output) if output else default_output(model, quant)
    if out.exists():
        raise UsageError(f"output {out} already exists; remove it or choose another --output")
    dev, cdtype = resolve_device(device), resolve_dtype(dtype, resolve_device(device))
    torch.manual_seed(seed)
    t_start = time.perf_counter()

    ref = resolve_model(model)
    tokenizer = load_tokenizer(ref)
    samples = calibration_samples(tokenizer, dataset, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                  dataset_path=dataset_path)
    sm = load_streaming(ref, cdtype)
    layers_path, arch = resolve_arch(sm.model)
    calib = capture_inputs(sm, layers_path, batch_samples(samples, batch_size), dev, cdtype)

    n_blocks = len(sm.model.get_submodule(layers_path))
    tensors: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    for i, results in quantize_blocks(sm, layers_path, arch, calib, quant, dev, cdtype,
                                      on_module=(lambda r: progress("module", r)) if progress else None):
        for r in results:
            for key, value in r.qw.to_tensors(quant.checkpoint_format).items():
                tensors[f"{r.name}.{key}"] = value
            rows.append(_log_row(r, len(samples)))
        if progress:
            progress("block", i + 1, n_blocks)

    tensors.update(_unquantized_tensors(sm, ref, {r["name"] for r in rows}))
    quant.meta.update(damp_auto_increment=0.01, static_groups=quant.static_groups)
    seconds = time.perf_counter() - t_start
    log = {"model": model, "tool": f"gptq_cli:{__version__}", "config": quant.to_hf_dict(),
           "calibration": {"dataset": dataset, "nsamples": len(samples), "seqlen": seqlen, "seed": seed,
                           "tokens": int(sum(s.numel() for s in samples))},
           "device": str(dev), "dtype": str(cdtype).removeprefix("torch."), "torch": torch.__version__,
           "platform": platform.platform(), "seconds": round(seconds, 2), "modules": rows}
    write_checkpoint(out, tensors, sm.model.config, quant, src_dir=_tokenizer_dir(ref, tokenizer),
                     extra_files={"quant_log.json": json.dumps(log, indent=2).encode()})
    return QuantizeResult(out, rows, seconds)


def _log_row(r: ModuleResult, nsamples: int) -> dict:
    return {"name": r.name, "loss": float(r.qw.loss), "damp": float(r.qw.damp), "seconds": round(r.seconds, 4),
            "samples": nsamples, "tokens": r.tokens}


def _unquantized_tensors(sm: StreamingModel, ref: ModelRef, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the original that is not a quantized linear's weight, in the model's own dtype
    (as stored in its files; fp16 for a GGUF source). Biases of quantized linears are stored as fp16."""
    out = {}
    tied = getattr(sm.model.config, "tie_word_embeddings", False)
    if sm.source is not None:
        items = ((name, lambda k=key: sm.source.get(k)) for name, key in sm.key_of.items())
    else:
        state = sm.model.state_dict()
        items = ((name, lambda t=t: t.to(torch.float16) if t.is_floating_point() else t)
                 for name, t in state.items() if not (tied and name == "lm_head.weight"))
    for name, load in items:
        module, _, leaf = name.rpartition(".")
        if module in quantized:
            if leaf == "bias":
                out[name] = load().to(torch.float16).contiguous()
            continue
        out[name] = load().contiguous()
    return out


def _tokenizer_dir(ref: ModelRef, tokenizer) -> Path:
    """A directory holding the tokenizer files (a GGUF source has none on disk: save them to a temp dir)."""
    if ref.gguf_file is None:
        return ref.path
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="gptq-tok-"))
    tokenizer.save_pretrained(tmp)
    return tmp
