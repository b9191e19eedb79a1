"""Load a GPTQ checkpoint (ours, GPTQModel's, AutoGPTQ's) as a transformers model whose quantized
linears are gptq_cli QuantLinear modules. Needs only transformers + accelerate: no gptqmodel, no
optimum.

The model skeleton is built with its parameters on the meta device (buffers such as rotary
frequencies are computed for real), every module that has a `<name>.qweight` tensor in the files is
swapped for a QuantLinear, and then each tensor is read once from the safetensors files into its
place.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gptq_cli.errors import GptqError, UsageError
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.reader import (
    PACKED_NAMES,
    check_model_dir,
    quantized_module_names,
    read_quant_config,
    read_tensors,
)
from gptq_cli.format.safetensors_file import FileTensors
from gptq_cli.model.arch import QUANTIZABLE, linear_weight
from gptq_cli.model.modelio import check_config_json, empty_model
from gptq_cli.model.quant_linear import QuantLinear

# Tensors old checkpoints carry that current transformers models compute instead of loading.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def load_quantized_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A transformers causal LM with the checkpoint's weights, quantized linears as QuantLinear, in
    eval mode.

    dtype: for the non-quantized weights (embeddings, norms, lm_head); default the checkpoint's
    config dtype. Scales and biases of quantized linears keep their stored dtype; QuantLinear
    computes in the input's dtype.
    trust_remote_code: a checkpoint whose config.json names its own code (auto_map) may run it.
    """
    from transformers import AutoConfig

    path = check_model_dir(path)
    check_config_json(path / "config.json", trust_remote_code)
    quant = read_quant_config(path)
    tensors = read_tensors(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        quantization_config = getattr(config, "quantization_config", None)
        if hasattr(config, "quantization_config"):
            # else transformers would hand the model to its own GPTQ backend
            del config.quantization_config
        dtype = dtype or _config_dtype(config)
        # MoE experts as their own linears, as a GPTQ file stores them
        model = empty_model(config, dtype, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        reason = " ".join(str(e).split())  # transformers' messages span lines; ours are one line
        raise UsageError(
            f"{path}: transformers cannot build this model ({type(e).__name__}: {reason})"
        ) from e

    consumed = _swap_quantized_modules(model, tensors, quant)
    _load_remaining(model, tensors, consumed, dtype)
    if quantization_config is not None:
        model.config.quantization_config = quantization_config
    return model.to(torch.device(device)).eval().requires_grad_(False)


def _config_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float16


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D (arch.linear_weight's
    orientation)."""
    if not isinstance(module, QUANTIZABLE):
        raise GptqError(f"cannot replace a {type(module).__name__} with a quantized linear")
    n, k = linear_weight(module).shape
    return k, n


def _swap_quantized_modules(model: nn.Module, tensors: FileTensors, quant: QuantConfig) -> set[str]:
    """Replace each module with a `.qweight` in the files by a loaded QuantLinear; return the
    keys used."""
    consumed: set[str] = set()
    for name in quantized_module_names(tensors):
        try:
            original = model.get_submodule(name)
        except AttributeError as e:
            raise GptqError(
                f"the checkpoint quantizes {name}, which this {type(model).__name__} does not have "
                f"(transformers may fuse it, e.g. MoE experts)"
            ) from e
        missing = [f"{name}.{p}" for p in PACKED_NAMES if f"{name}.{p}" not in tensors]
        if missing:
            raise GptqError(f"the checkpoint lacks {', '.join(missing)}")
        in_features, out_features = _linear_shape(original)
        packed = {p: tensors[f"{name}.{p}"] for p in PACKED_NAMES}
        bias = tensors[f"{name}.bias"] if f"{name}.bias" in tensors else None
        bits, group_size = quant.module_setting(name)
        qlinear = QuantLinear(
            in_features,
            out_features,
            bits,
            group_size,
            bias=bias is not None,
            checkpoint_format=quant.checkpoint_format,
            scales_dtype=packed["scales"].dtype,
            bias_dtype=bias.dtype if bias is not None else torch.float16,
        )
        try:
            qlinear.load_packed(packed, bias=bias)
        except ValueError as e:
            raise GptqError(f"{name}: {e}") from e
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, qlinear)
        consumed.update(f"{name}.{p}" for p in PACKED_NAMES)
        if bias is not None:
            consumed.add(f"{name}.bias")
    return consumed


def _load_remaining(
    model: nn.Module, tensors: FileTensors, consumed: set[str], dtype: torch.dtype
) -> None:
    """Read every other tensor into its parameter or buffer (floats cast to dtype); tie what the
    files omit."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    unexpected = []
    for key in tensors:
        if key in consumed:
            continue
        if key not in params and key not in buffers:
            if not key.endswith(_IGNORED_SUFFIXES):
                unexpected.append(key)
            continue
        value = tensors[key]
        value = value.to(dtype) if value.is_floating_point() else value
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if key in params:
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[attr] = value
    if unexpected:
        raise GptqError(
            f"the checkpoint has {len(unexpected)} tensor(s) this model has no place for, "
            f"e.g. {unexpected[0]}"
        )
    if any(p.is_meta for p in model.parameters()):
        model.tie_weights()  # e.g. lm_head tied to the embeddings and not stored
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise GptqError(
            f"the checkpoint lacks {len(still_empty)} weight(s) the model needs, e.g. "
            f"{still_empty[0]}"
        )
