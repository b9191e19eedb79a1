"""Convert a GPTQ checkpoint between zero-point conventions and re-shard it (`gptq pack CHECKPOINT`,
SPEC §1-2).

Format "gptq" (v1) stores zero - 1 in qzeros, "gptq_v2" stores the zero itself. Converting unpacks
and repacks qzeros only; qweight, scales, g_idx, biases and every non-quantized tensor are copied
bit for bit. The source tool's quantization_config is kept key for key (GPTQModel's meta and
quantizer stay), with only the format label changed, and every other file beside the weights
(tokenizer, generation_config.json, quant_log.json, eval_results.json, README.md...) is copied. The
output appears atomically (write_checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gptq_cli.errors import GptqError, UsageError
from gptq_cli.format.bitpack import pack_qzeros, unpack_qzeros
from gptq_cli.format.checkpoint import parse_size, write_checkpoint
from gptq_cli.format.config import FORMATS, QuantConfig
from gptq_cli.format.reader import (
    INDEX_FILE,
    QUANTIZE_CONFIG_FILE,
    check_model_dir,
    quantized_module_names,
    read_tensors,
)
from gptq_cli.format.safetensors_file import LazyTensors
from gptq_cli.inspection import inspect_checkpoint
from gptq_cli.quantization.workdir import check_new_directory

# Files the conversion writes itself; everything else at the top level of the source is copied.
_WRITTEN_FILES = {"config.json", QUANTIZE_CONFIG_FILE, INDEX_FILE}
# AutoGPTQ's key naming its weights file; the converted checkpoint's weights are model*.safetensors.
_WEIGHTS_NAME_KEY = "model_file_base_name"


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    checkpoint_format: str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write the GPTQ checkpoint at `src` to the new directory `out` in `checkpoint_format` ("gptq"
    or "gptq_v2"; None keeps the source's), in shards of at most `max_shard_size`; return `out`.

    The source must pass `gptq inspect`'s validity check (a broken checkpoint would be converted
    into another broken one). UsageError when converting to "gptq" would have to store an
    asymmetric zero point of 0."""
    src, out = check_model_dir(src), Path(out)
    if checkpoint_format is not None and checkpoint_format not in FORMATS:
        raise UsageError(
            f"unknown format {checkpoint_format!r}; choose one of {', '.join(FORMATS)}"
        )
    parse_size(max_shard_size)  # a bad size is a usage error before any work
    check_new_directory(out, "output directory")
    report = inspect_checkpoint(src)
    if report.problems:
        raise GptqError(
            f"{src} fails the validity check ({len(report.problems)} problem(s), first: "
            f"{report.problems[0]}); see `gptq inspect {src}`"
        )
    source_format = report.quant.checkpoint_format
    target_format = checkpoint_format or source_format

    tensors = LazyTensors.holding(read_tensors(src))  # each read only while it is written
    if target_format != source_format:
        convert_all_qzeros(tensors, report.quant, source_format, target_format)

    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    quantization_config = relabel_format(report.quantization_config, target_format)
    return write_checkpoint(
        out,
        tensors,
        config,
        quantization_config,
        max_shard_size=max_shard_size,
        extra_files=_companion_files(src),
    )


def convert_qzeros(
    qzeros: torch.Tensor,
    bits: int,
    out_features: int,
    source_format: str,
    target_format: str,
    *,
    name: str = "qzeros",
) -> torch.Tensor:
    """Repack one module's qzeros from `source_format` to `target_format` (the true zero points
    unchanged)."""
    zeros = unpack_qzeros(qzeros, bits, out_features, source_format)
    if target_format == "gptq" and bool((zeros < 1).any()):
        raise UsageError(
            f"{name} has {int((zeros < 1).sum())} asymmetric zero point(s) of 0, which format "
            f"'gptq' (v1, stores zero - 1) cannot store; keep this checkpoint as --format gptq_v2"
        )
    return pack_qzeros(zeros, bits, target_format)


def convert_all_qzeros(
    tensors: LazyTensors, quant: QuantConfig, source_format: str, target_format: str
) -> None:
    """Every quantized module's qzeros in `tensors` converted (as it is written) from
    `source_format` to `target_format`, with the module's own bits (quant.module_setting) and
    width (its scales' columns)."""
    for name in quantized_module_names(tensors):
        bits, out_features = quant.module_setting(name)[0], tensors.spec(f"{name}.scales")[1][-1]
        tensors.transform(
            f"{name}.qzeros",
            lambda q, b=bits, n=out_features, m=name: convert_qzeros(
                q, b, n, source_format, target_format, name=m
            ),
        )


def relabel_format(quantization_config: dict[str, Any], checkpoint_format: str) -> dict[str, Any]:
    """A copy of the source's quantization_config with the format label(s) set to
    `checkpoint_format`."""
    relabelled = {k: v for k, v in quantization_config.items() if k != _WEIGHTS_NAME_KEY}
    relabelled["checkpoint_format"] = checkpoint_format
    if "format" in relabelled:  # GPTQModel writes the label under both names
        relabelled["format"] = checkpoint_format
    return relabelled


def _companion_files(src: Path) -> dict[str, bytes]:
    """Every top-level file of the source except the weights and the configs the conversion
    rewrites."""
    return {
        f.name: f.read_bytes()
        for f in sorted(src.iterdir())
        if f.is_file()
        and not f.name.startswith(".")
        and f.name not in _WRITTEN_FILES
        and f.suffix != ".safetensors"
    }
