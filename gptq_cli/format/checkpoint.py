"""Writing GPTQ checkpoint directories: safetensors shards + index, configs, tokenizer files (SPEC
§2); reader.py reads them.

Writing is atomic (everything goes into a temporary sibling directory that is renamed into place
only when complete) and deterministic (sorted keys everywhere, fixed safetensors metadata), so the
same tensors and settings always give byte-identical files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from gptq_cli.errors import UsageError, naming_the_file
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.hf_config import with_legacy_keys
from gptq_cli.format.quantized import QuantizedWeight
from gptq_cli.format.reader import INDEX_FILE, QUANTIZE_CONFIG_FILE, SINGLE_FILE
from gptq_cli.format.safetensors_file import LazyTensors, nbytes, write_file

SAFETENSORS_METADATA = {"format": "pt"}
# Files copied from the source model: the tokenizer in its various on-disk forms and the generation
# defaults.
SOURCE_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
)

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (decimal units as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise UsageError(f"cannot read the size {size!r}; write it like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def quantized_to_tensors(
    prefix: str, qw: QuantizedWeight, checkpoint_format: str, bias: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear, keyed `<prefix>.qweight` etc.; the bias
    keeps its dtype, which should be the model's (fp16 for fp16 models)."""
    out = {f"{prefix}.{name}": t for name, t in qw.to_tensors(checkpoint_format).items()}
    if bias is not None:
        out[f"{prefix}.bias"] = bias.detach().contiguous()
    return out


def write_checkpoint(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    model_config: Any,
    quant: QuantConfig | Mapping[str, Any],
    *,
    max_shard_size: int | str = "5GB",
    extra_files: Mapping[str, bytes | Callable[[], bytes]] | None = None,
    src_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete GPTQ checkpoint directory atomically and return its path.

    tensors: a LazyTensors (each produced only while it is written) or any mapping of tensors.
    model_config: a transformers PretrainedConfig or its dict; it gets `quantization_config` added.
    quant: the settings, or a quantization_config dict written as is (conversion keeps the source
    tool's keys).
    extra_files: more files to write, by plain file name (e.g. quant_log.json), after the tensors:
        their bytes, or a function that gives them then.
    src_dir: the source model directory, whose tokenizer files and generation_config.json are
    copied.
    overwrite: replace an existing out_dir (only once the new checkpoint is complete).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UsageError(f"{out_dir} already exists; remove it or choose another output directory")
    for name in extra_files or {}:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"extra file names must be plain file names, got {name!r}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if src_dir is not None:
            _copy_source_files(Path(src_dir), tmp)
        _write_config_files(tmp, model_config, quant)
        lazy = tensors if isinstance(tensors, LazyTensors) else LazyTensors.holding(tensors)
        _write_safetensors(tmp, lazy, parse_size(max_shard_size))
        for name, data in sorted((extra_files or {}).items()):
            (tmp / name).write_bytes(data() if callable(data) else data)
        _apply_umask(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise naming_the_file(e, out_dir) from e
    return out_dir


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _copy_source_files(src_dir: Path, dst: Path) -> None:
    """The tokenizer and generation files, and the model's own code when its config.json names it
    (auto_map: a model that needs --trust-remote-code is loaded from the checkpoint with the same
    code)."""
    try:
        runs_own_code = bool(json.loads((src_dir / "config.json").read_text()).get("auto_map"))
    except (OSError, ValueError, AttributeError):
        runs_own_code = False
    for pattern in SOURCE_FILE_PATTERNS + (("*.py",) if runs_own_code else ()):
        for f in sorted(src_dir.glob(pattern)):
            if f.is_file():
                shutil.copyfile(f, dst / f.name)


def _write_config_files(
    dst: Path, model_config: Any, quant: QuantConfig | Mapping[str, Any]
) -> None:
    config = dict(model_config) if isinstance(model_config, Mapping) else model_config.to_dict()
    # transformers 4.x readers (AutoGPTQ, optimum 1.x) read the same model
    config = with_legacy_keys(config)
    qdict = dict(quant) if isinstance(quant, Mapping) else quant.to_hf_dict()
    config["quantization_config"] = qdict
    (dst / "config.json").write_bytes(_json_bytes(config))
    (dst / QUANTIZE_CONFIG_FILE).write_bytes(_json_bytes(qdict))


def _shard_plan(tensors: LazyTensors, max_bytes: int) -> list[list[str]]:
    """Keys per shard, in sorted order; a module's tensors (same prefix) never straddle two
    shards."""
    modules: dict[str, list[str]] = {}
    for key in sorted(tensors):
        modules.setdefault(key.rpartition(".")[0], []).append(key)
    shards: list[list[str]] = [[]]
    size = 0
    for keys in modules.values():
        module_bytes = sum(nbytes(tensors.spec(k)) for k in keys)
        if shards[-1] and size + module_bytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(keys)
        size += module_bytes
    return shards


def _write_safetensors(dst: Path, tensors: LazyTensors, max_bytes: int) -> None:
    """The weights as model.safetensors, or as numbered shards with their index; one tensor in
    memory at a time."""
    shards = _shard_plan(tensors, max_bytes)
    if len(shards) == 1:
        write_file(dst / SINGLE_FILE, tensors, shards[0], SAFETENSORS_METADATA)
        return
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_file(dst / name, tensors, keys, SAFETENSORS_METADATA)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(nbytes(tensors.spec(k)) for k in tensors)
    (dst / INDEX_FILE).write_bytes(
        _json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


def _apply_umask(directory: Path) -> None:
    """Give the directory and its files the modes a plain mkdir / open would: mkdtemp makes the
    directory 0700 and safetensors writes 0600 files, but a checkpoint is for sharing, as the
    user's umask says."""
    umask = os.umask(0)  # the only portable way to read it: set, then put back at once
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temporary directory to out_dir; an existing out_dir is replaced only
    now."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old / out_dir.name, out_dir)  # put the previous checkpoint back
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
