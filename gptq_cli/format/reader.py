"""Reading GPTQ checkpoint directories (ours, GPTQModel's and AutoGPTQ's): which safetensors files
hold the weights, the tensors themselves (lazily), the quantization config, and what a directory
is (SPEC §2). checkpoint.py writes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gptq_cli.errors import UsageError
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.safetensors_file import FileTensors

# a quantized linear's tensors, `<module>.<name>`
PACKED_NAMES = ("qweight", "qzeros", "scales", "g_idx")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
QUANTIZE_CONFIG_FILE = "quantize_config.json"


def weight_files(ckpt_dir: str | Path) -> dict[str, Path]:
    """The safetensors files of a checkpoint: the index's shards, model.safetensors, or (AutoGPTQ's
    gptq_model-4bit-128g.safetensors style) whatever .safetensors files are there."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        names = sorted(set(_index_shards(ckpt_dir, index)))
    elif (ckpt_dir / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    else:
        names = sorted(f.name for f in ckpt_dir.glob("*.safetensors"))
    if not names:
        hint = (
            " (only PyTorch .bin weights: convert them to safetensors)"
            if any(ckpt_dir.glob("*.bin"))
            else ""
        )
        raise UsageError(f"{ckpt_dir} has no .safetensors weights{hint}; pass a model directory")
    missing = [n for n in names if not (ckpt_dir / n).is_file()]
    if missing:
        raise UsageError(
            f"{ckpt_dir} is incomplete: {missing[0]} listed in {INDEX_FILE} is missing"
        )
    return {n: ckpt_dir / n for n in names}


def _index_shards(ckpt_dir: Path, index: Path) -> list[str]:
    """The shard names of a model.safetensors.index.json, each a plain file name in `ckpt_dir`
    that stays there (a symlink may lead into the Hub cache's blobs/ of the same repository, as
    snapshots are made); a UsageError naming the entry otherwise: an index must not make us read
    files outside the checkpoint."""
    try:
        names = list(json.loads(index.read_text())["weight_map"].values())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(
            f"{index} is not a valid index ({type(e).__name__}: {e}); fix or re-download it"
        ) from e
    home = ckpt_dir.resolve()
    allowed = [home] + ([home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [])
    for name in names:
        plain = (
            isinstance(name, str)
            and name not in ("", ".", "..")
            and not any(c in name for c in "/\\\0")
        )
        if plain and (ckpt_dir / name).is_symlink():
            target = (ckpt_dir / name).resolve()
            plain = any(target.is_relative_to(a) for a in allowed)
        if not plain:
            raise UsageError(
                f"{index} names the shard {name!r}, which is not a file inside {ckpt_dir}; shards "
                "must be plain file names in the checkpoint directory: fix or "
                "re-download it"
            )
    return names


def check_model_dir(path: str | Path) -> Path:
    """The path as a Path if it is a model directory; a one-line UsageError saying what is wrong
    if not."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass the directory of a GPTQ checkpoint")
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory; pass the directory of a GPTQ checkpoint")
    if not (path / "config.json").is_file():
        raise UsageError(
            f"{path} is not a model directory (no config.json); pass the directory of "
            "a GPTQ checkpoint"
        )
    return path


def is_quantized_checkpoint(path: str | Path) -> bool:
    """True when `path` is a directory with a GPTQ quantization config (quantize_config.json or
    config.json's quantization_config with quant_method gptq)."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        d = read_quantization_dict(path)
    except UsageError:
        return False
    return d is not None and str(d.get("quant_method", d.get("method", "gptq"))).lower() == "gptq"


def quantized_module_names(keys: Iterable[str]) -> list[str]:
    """Names of the quantized modules in a checkpoint: every `<name>` with a `<name>.qweight`
    tensor."""
    return sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))


def read_tensors(ckpt_dir: str | Path) -> FileTensors:
    """All tensors of a checkpoint directory as a lazy mapping (headers read and checked; data on
    access)."""
    return FileTensors(weight_files(ckpt_dir))


def read_quantization_dict(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The raw quantization config dict: quantize_config.json (GPTQModel, AutoGPTQ) or else
    config.json's quantization_config (transformers/optimum); None when the directory has
    neither."""
    ckpt_dir = Path(ckpt_dir)
    for path, key in (
        (ckpt_dir / QUANTIZE_CONFIG_FILE, None),
        (ckpt_dir / "config.json", "quantization_config"),
    ):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UsageError(f"{path} is not valid JSON ({e}); fix or re-download it") from e
            data = data.get(key) if key and isinstance(data, dict) else data
            if isinstance(data, dict) and data:
                return data
    return None


def read_quant_config(ckpt_dir: str | Path) -> QuantConfig:
    """The QuantConfig of a GPTQ checkpoint (ours, GPTQModel's or AutoGPTQ's); UsageError when
    the directory is not a GPTQ checkpoint or uses settings this tool does not support."""
    d = read_quantization_dict(ckpt_dir)
    if d is None:
        raise UsageError(
            f"{ckpt_dir} is not a quantized checkpoint (no quantize_config.json and no "
            "quantization_config in config.json); quantize it first with `gptq quantize`"
        )
    method = str(d.get("quant_method", d.get("method", "gptq"))).lower()
    if method != "gptq":
        raise UsageError(
            f"{ckpt_dir} is quantized with {method!r}, not GPTQ; this tool reads GPTQ "
            "checkpoints only"
        )
    if d.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
        raise UsageError(
            f"{ckpt_dir} packs into {d['pack_dtype']}; only int32 packing is supported"
        )
    try:
        return QuantConfig.from_hf_dict(d)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{ckpt_dir}: unsupported quantization config: {e}") from e
