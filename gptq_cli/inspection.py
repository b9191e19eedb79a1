"""What is in a GPTQ checkpoint, and is it valid (SPEC §1 `gptq inspect`, §2 the format).

`inspect_checkpoint(path)` reads only headers and the small tensors (qzeros, scales, g_idx;
qweight's shape but not its data) and returns an InspectReport: the quantization config, the
declared format and what the stored zero points look like, the tool that made the checkpoint, one
row per quantized module, sizes, and the list of problems found. The command layer prints it; this
module prints nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptq_cli.format.bitpack import packed_len, unpack_last
from gptq_cli.format.compat import Verdict, read_facts, summary_line, verdicts
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.reader import (
    check_model_dir,
    quantized_module_names,
    read_quant_config,
    read_quantization_dict,
    read_tensors,
)
from gptq_cli.format.safetensors_file import FileTensors
from gptq_cli.model.arch import QUANTIZABLE, linear_weight
from gptq_cli.model.modelio import empty_model
from gptq_cli.quantization.allocate import Candidate, stored_bits

_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_FLOAT_DTYPES = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}
# quantization_config keys only a given tool writes, for checkpoints that do not name their
# quantizer.
_AUTOGPTQ_KEYS = {"model_file_base_name", "model_name_or_path", "is_marlin_format"}
_OPTIMUM_KEYS = {
    "use_exllama",
    "exllama_config",
    "dataset",
    "tokenizer",
    "model_seqlen",
    "block_name_to_quantize",
    "module_name_preceding_first_block",
    "cache_block_outputs",
    "use_cuda_fp16",
}


@dataclass
class ModuleReport:
    """One quantized linear as stored."""

    name: str
    in_features: int
    out_features: int
    bits: int
    group_size: int
    groups: int
    act_order: bool
    bias: bool
    bytes: int  # qweight + qzeros + scales + g_idx (+ bias) as stored
    fp16_bytes: int  # the same layer as an fp16 nn.Linear


@dataclass
class InspectReport:
    path: str
    architecture: str
    quant: QuantConfig
    quantization_config: dict[str, Any]  # as found in the files
    # checkpoint_format as labelled ("gptq" = v1, "gptq_v2")
    declared_format: str
    # "gptq", "gptq_v2", "mixed" or "unknown" (asymmetric zeros)
    zeros_look_like: str
    tool: str
    tool_guessed: bool
    # False when transformers could not build the architecture
    shapes_checked_against_model: bool
    modules: list[ModuleReport] = field(default_factory=list)
    total_bytes: int = 0  # every tensor in the files
    fp16_bytes: int = 0  # the whole model in fp16
    problems: list[str] = field(default_factory=list)
    loaders: list[Verdict] = field(default_factory=list)  # where it will load (format/compat.py)

    @property
    def ok(self) -> bool:
        return not self.problems

    def loaders_line(self) -> str:
        """One line: which known loaders will load it, and why not the others (format/compat.py)."""
        return summary_line(self.loaders)

    @property
    def compression_ratio(self) -> float:
        return self.fp16_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (qweight, qzeros, scales, g_idx) per weight of the quantized linears: what
        `quantize --target-bits` aims at; per-module settings (dynamic) included."""
        weights = sum(m.in_features * m.out_features for m in self.modules)
        total = sum(
            stored_bits(m.in_features, m.out_features, Candidate(m.bits, m.group_size))
            for m in self.modules
        )
        return total / weights if weights else 0.0

    def to_dict(self) -> dict[str, Any]:
        q = self.quant
        return {
            "path": self.path,
            "architecture": self.architecture,
            "ok": self.ok,
            "problems": self.problems,
            "config": {
                "bits": q.bits,
                "group_size": q.group_size,
                "desc_act": q.desc_act,
                "sym": q.sym,
                "static_groups": q.static_groups,
                "true_sequential": q.true_sequential,
                "damp_percent": q.damp_percent,
                "checkpoint_format": q.checkpoint_format,
            },
            "quantization_config": self.quantization_config,
            "format": {"declared": self.declared_format, "zeros_look_like": self.zeros_look_like},
            "tool": {"name": self.tool, "guessed": self.tool_guessed},
            "shapes_checked_against_model": self.shapes_checked_against_model,
            "size": {
                "bytes": self.total_bytes,
                "fp16_bytes": self.fp16_bytes,
                "compression_ratio": round(self.compression_ratio, 3),
                "quantized_bits_per_weight": round(self.bits_per_weight, 4),
            },
            "modules": [asdict(m) for m in self.modules],
            "loaders": [v.to_dict() for v in self.loaders],
        }


def inspect_checkpoint(path: str | Path) -> InspectReport:
    """Report on the GPTQ checkpoint at `path`; UsageError if it is missing, not a model, or not
    quantized."""
    path = check_model_dir(path)
    qdict = read_quantization_dict(path)
    quant = read_quant_config(path)
    tensors = read_tensors(path)
    config = json.loads((path / "config.json").read_text())
    tool, guessed = detect_tool(path, qdict or {})
    model_shapes = _model_linear_shapes(path)
    report = InspectReport(
        path=str(path),
        architecture=(config.get("architectures") or ["unknown"])[0],
        quant=quant,
        quantization_config=qdict or {},
        declared_format=quant.checkpoint_format,
        zeros_look_like="unknown",
        tool=tool,
        tool_guessed=guessed,
        shapes_checked_against_model=model_shapes is not None,
    )
    names = quantized_module_names(tensors)
    if not names:
        report.problems.append(
            "the config says GPTQ but no tensor ends in .qweight: no quantized module found"
        )
    zero_styles = set()
    for name in names:
        module, style = _check_module(
            name,
            tensors,
            quant,
            (model_shapes or {}).get(name),
            report.problems,
            bool((qdict or {}).get("desc_act", quant.desc_act)),
        )
        report.modules.append(module)
        zero_styles.add(style)
    known = zero_styles - {"unknown"}
    report.zeros_look_like = known.pop() if len(known) == 1 else ("mixed" if known else "unknown")
    _add_sizes(report, tensors)
    report.loaders = verdicts(
        read_facts(
            quant,
            {m.name: (m.in_features, m.out_features) for m in report.modules},
            config,
            qdict or {},
            "lm_head.weight" in tensors,
        )
    )
    return report


def detect_tool(path: Path, qdict: dict[str, Any]) -> tuple[str, bool]:
    """(the tool that made the checkpoint, guessed?): meta.quantizer when written, else from
    telltale keys."""
    meta = qdict.get("meta") if isinstance(qdict.get("meta"), dict) else {}
    quantizer = meta.get("quantizer")
    if quantizer:
        return ", ".join(quantizer) if isinstance(quantizer, list) else str(quantizer), False
    keys = set(qdict)
    config_file = path / "config.json"
    if config_file.is_file():
        keys |= set(json.loads(config_file.read_text()).get("quantization_config") or {})
    if keys & _AUTOGPTQ_KEYS or any(path.glob("gptq_model-*.safetensors")):
        return "AutoGPTQ", True
    if keys & _OPTIMUM_KEYS:
        return "transformers/optimum", True
    return "unknown", True


def _model_linear_shapes(path: Path) -> dict[str, tuple[int, int]] | None:
    """(in_features, out_features) of every linear of the architecture in config.json, built on
    the meta device; None when transformers cannot build it (then shapes are only checked against
    each other)."""
    from transformers import AutoConfig

    try:
        # never asks, never runs it
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = empty_model(config)
    # an architecture this transformers does not know, custom code...: fall back, not fail
    except Exception:
        return None
    return {
        name: tuple(linear_weight(m).shape)[::-1]
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZABLE)
    }


def _check_module(
    name: str,
    tensors: FileTensors,
    quant: QuantConfig,
    model_shape: tuple[int, int] | None,
    problems: list[str],
    declared_desc_act: bool,
) -> tuple[ModuleReport, str]:
    """Validate one quantized module; append problems; return its report row and the zero-point
    style."""
    bits, gs = quant.module_setting(name)
    info = {
        p: tensors.dtype_and_shape(f"{name}.{p}")
        for p in ("qweight", "qzeros", "scales", "g_idx", "bias")
        if f"{name}.{p}" in tensors
    }
    for missing in ("qzeros", "scales", "g_idx"):
        if missing not in info:
            problems.append(f"{name}: no {missing} tensor")
    if model_shape is not None:
        k, n = model_shape
    else:  # trust g_idx for K and scales for N, the tensors whose shapes state them directly
        k = info["g_idx"][1][0] if "g_idx" in info else info["qweight"][1][0] * 32 // bits
        n = info["scales"][1][-1] if "scales" in info else info["qweight"][1][-1]
    groups = math.ceil(k / (k if gs == -1 else gs))
    expected = {
        "qweight": ("I32", (packed_len(k, bits), n)),
        "qzeros": ("I32", (groups, packed_len(n, bits))),
        "scales": ("F16|BF16|F32", (groups, n)),
        "g_idx": ("I32", (k,)),
        "bias": ("F16|BF16|F32", (n,)),
    }
    good = set()
    for p, (dtype, shape) in info.items():
        want_dtype, want_shape = expected[p]
        if dtype not in want_dtype.split("|"):
            problems.append(
                f"{name}.{p}: dtype {dtype}, expected {want_dtype.replace('|', ' or ')}"
            )
        elif shape != want_shape:
            problems.append(
                f"{name}.{p}: shape {list(shape)}, expected {list(want_shape)} for "
                f"in_features={k}, out_features={n}, bits={bits}, group_size={gs}"
            )
        else:
            good.add(p)

    act_order = False
    if "g_idx" in good:
        g_idx = tensors[f"{name}.g_idx"].long()
        act_order = not torch.equal(g_idx, torch.arange(k) // (k if gs == -1 else gs))
        bad = int(((g_idx < 0) | (g_idx >= groups)).sum())
        if bad:
            problems.append(
                f"{name}.g_idx: {bad} value(s) outside [0, {groups}) (range {int(g_idx.min())}.."
                f"{int(g_idx.max())})"
            )
        # what the file tells loaders, not the solving order
        elif act_order and not declared_desc_act:
            problems.append(
                f"{name}.g_idx: not k // group_size although desc_act is false; kernels that "
                f"ignore g_idx without act-order would compute wrong results"
            )
    if "scales" in good:
        scales = tensors[f"{name}.scales"]
        bad = int((~torch.isfinite(scales)).sum())
        if bad:
            problems.append(f"{name}.scales: {bad} NaN/Inf value(s)")
    style = _check_zeros(name, tensors, quant, bits, n, problems) if "qzeros" in good else "unknown"

    nbytes = sum(_DTYPE_BYTES.get(d, 4) * math.prod(s) for d, s in info.values())
    report = ModuleReport(
        name,
        k,
        n,
        bits,
        gs,
        groups,
        act_order,
        "bias" in info,
        nbytes,
        2 * (k * n + (n if "bias" in info else 0)),
    )
    return report, style


def _check_zeros(
    name: str, tensors: FileTensors, quant: QuantConfig, bits: int, n: int, problems: list[str]
) -> str:
    """Check the stored zero points against the declared format; return which convention they
    follow.

    Symmetric quantization has zero 2^(b-1) everywhere: v1 ("gptq") stores it minus one
    (0x77777777 for 4 bits), v2 stores it as is (0x88888888). Asymmetric v1 cannot store a zero
    of 0: a stored 2^b - 1 means the zero underflowed into its neighbour."""
    maxq = (1 << bits) - 1
    stored = unpack_last(tensors[f"{name}.qzeros"], bits, n)
    v1_value, v2_value = (maxq + 1) // 2 - 1, (maxq + 1) // 2
    declared = quant.checkpoint_format
    if not quant.sym:
        if declared == "gptq" and bool((stored == maxq).any()):
            problems.append(
                f"{name}.qzeros: {int((stored == maxq).sum())} zero point(s) stored as {maxq}, "
                f"i.e. zero {maxq + 1} in format 'gptq' (zero - 1): out of range (an asymmetric "
                f"zero of 0 underflowed?); asymmetric checkpoints must be written as gptq_v2"
            )
        return "unknown"
    style = (
        "gptq"
        if bool((stored == v1_value).all())
        else "gptq_v2"
        if bool((stored == v2_value).all())
        else "unknown"
    )
    if style == declared:
        return style
    want = v1_value if declared == "gptq" else v2_value
    if style == "unknown":
        values = sorted(set(stored.flatten().tolist()))[:6]
        problems.append(
            f"{name}.qzeros: symmetric {bits}-bit zero points must all be stored as {want} in "
            f"format {declared!r}; found values {values}"
        )
    else:
        problems.append(
            f"{name}.qzeros: labelled checkpoint_format {declared!r} but zero points are stored "
            f"as {v2_value if style == 'gptq_v2' else v1_value} ({style} convention; {declared} "
            f"stores {want}); loaders will dequantize with wrong zeros (vLLM outputs garbage): "
            f"relabel or repack the checkpoint as {style}"
        )
    return style


def _add_sizes(report: InspectReport, tensors: FileTensors) -> None:
    """Bytes of all stored tensors, and of the same model in fp16 (quantized layers as fp16
    linears)."""
    quantized = {m.name for m in report.modules}
    report.fp16_bytes = sum(m.fp16_bytes for m in report.modules)
    for key in tensors:
        dtype, shape = tensors.dtype_and_shape(key)
        report.total_bytes += _DTYPE_BYTES.get(dtype, 4) * math.prod(shape)
        if key.rpartition(".")[0] not in quantized:
            report.fp16_bytes += (
                2 if dtype in _FLOAT_DTYPES else _DTYPE_BYTES.get(dtype, 4)
            ) * math.prod(shape)
