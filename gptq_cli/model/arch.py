"""Where the decoder blocks of a model are and which linears inside a block are solved together.

One declarative table for the architectures we know, and a generic fallback that finds the decoder
ModuleList and orders its linears by a traced forward pass. A "sequential group" is a set of linears
that read the same input; with true-sequential quantization each group is solved before the next
group's inputs are collected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:  # GPT-2 style models use a transposed linear
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

QUANTIZABLE = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)

_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class Arch:
    layers: str  # attribute path of the nn.ModuleList of decoder blocks
    groups: tuple[tuple[str, ...], ...]  # sequential groups of linear names inside one block


ARCHS: dict[str, Arch] = {
    "llama": Arch("model.layers", _LLAMA_GROUPS),
    "mistral": Arch("model.layers", _LLAMA_GROUPS),
    "qwen2": Arch("model.layers", _LLAMA_GROUPS),
    "qwen3": Arch("model.layers", _LLAMA_GROUPS),
    "gemma": Arch("model.layers", _LLAMA_GROUPS),
    "gemma2": Arch("model.layers", _LLAMA_GROUPS),
    "gemma3_text": Arch("model.layers", _LLAMA_GROUPS),
    "phi3": Arch(
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
    # Sparse MoE, experts defused by moe.py; "*" stands for every expert index. Every expert's
    # gate/up read the same (all-token) input during calibration, so they share one Hessian and are
    # solved as one matrix.
    "mixtral": Arch(
        "model.layers",
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.o_proj",),
            ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
            ("mlp.experts.*.down_proj",),
        ),
    ),
    "opt": Arch(
        "model.decoder.layers",
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
    "gpt2": Arch(
        "transformer.h", (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))
    ),
}


def find_layers_path(model: nn.Module) -> str:
    """The decoder ModuleList (generic fallback): the longest ModuleList whose blocks contain
    linears and which is not inside another such list (a block's list of MoE experts can be
    longer than the list of blocks)."""
    lists = [
        (name, len(mod))
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod)
        and any(isinstance(m, QUANTIZABLE) for m in mod[0].modules())
    ]
    outer = [
        (name, n)
        for name, n in lists
        if not any(name.startswith(other + ".") for other, _ in lists)
    ]
    if not outer:
        raise ValueError(
            "no decoder block list found: the model has no nn.ModuleList of blocks with linears"
        )
    return max(outer, key=lambda item: item[1])[0]


def resolve_arch(model: nn.Module) -> tuple[str, Arch | None]:
    """(layers path, registered Arch or None when the generic fallback must trace the groups)."""
    arch = ARCHS.get(getattr(model.config, "model_type", ""))
    if arch is not None:
        try:
            model.get_submodule(arch.layers)
            return arch.layers, arch
        except AttributeError:
            pass  # a variant with another layout: fall back to discovery
    return find_layers_path(model), None


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The linears of a block that get quantized: all but those whose outputs cannot be packed
    (SPEC §2 packs zero points along N, 32/bits to a word, so N must be a multiple of 32 for
    3-bit): in practice the 1-output gates of some MoE blocks (Qwen2-MoE's shared_expert_gate),
    which GPTQModel leaves unquantized too."""
    return {
        name: m
        for name, m in block.named_modules()
        if isinstance(m, QUANTIZABLE) and linear_weight(m).shape[0] % 32 == 0
    }


def quantized_shapes(model: nn.Module, layers_path: str) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every linear quantize will quantize, by full name, in model
    order."""
    shapes = {}
    for i, block in enumerate(model.get_submodule(layers_path)):
        for name, module in block_linears(block).items():
            n, k = linear_weight(module).shape
            shapes[f"{layers_path}.{i}.{name}"] = (k, n)
    return shapes


def block_groups(
    block: nn.Module, arch: Arch | None, run_block, true_sequential: bool = True
) -> list[list[str]]:
    """Sequential groups of one block's linears, in forward order.

    With a registered architecture the table decides; otherwise `run_block()` is traced once and
    linears that read the very same input tensor form one group, in the order they are first called.
    """
    linears = block_linears(block)
    table = (
        [[n for pattern in g for n in _expand(pattern, linears)] for g in arch.groups]
        if arch
        else []
    )
    if arch is not None and all(table) and all(n in linears for g in table for n in g):
        groups = table
        covered = {n for g in groups for n in g}
        # e.g. extra projections some variants add
        groups += [[n] for n in linears if n not in covered]
    else:
        groups = _trace_groups(block, linears, run_block)
    return groups if true_sequential else [[n for g in groups for n in g]]


def _expand(pattern: str, linears: dict[str, nn.Module]) -> list[str]:
    """The linears a table entry names: itself, or with "*" every index there, in numeric order."""
    if "*" not in pattern:
        return [pattern]
    head, _, tail = pattern.partition("*")
    found = [
        (int(idx), n)
        for n in linears
        if n.startswith(head)
        and n.endswith(tail)
        and (idx := n[len(head) : len(n) - len(tail)]).isdigit()
    ]
    return [n for _, n in sorted(found)]


class StopForward(Exception):
    """Raised by a hook once it has what it needs, so the rest of the forward pass is skipped
    (this trace, the engine's capture of block 0's inputs, the calibration passes)."""


def _trace_groups(block: nn.Module, linears: dict[str, nn.Module], run_block) -> list[list[str]]:
    # holding the inputs keeps `is` comparisons meaningful
    order: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, mod in linears.items():

        def hook(_m, args, _name=name):
            if all(n != _name for n, _ in order):
                order.append((_name, args[0]))
            if len(order) == len(linears):
                raise StopForward

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        run_block()
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    for name, inp in order:
        if groups and inp is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = inp
    # never called: still quantized
    groups += [[n] for n in linears if all(n not in g for g in groups)]
    return groups


def linear_weight(mod: nn.Module) -> torch.Tensor:
    """The weight in nn.Linear orientation [out, in] (Conv1D stores [in, out])."""
    return mod.weight.t() if Conv1D and isinstance(mod, Conv1D) else mod.weight


def set_linear_weight(mod: nn.Module, w: torch.Tensor) -> None:
    w = w.t() if Conv1D and isinstance(mod, Conv1D) else w
    mod.weight.data = w.to(mod.weight.dtype).contiguous()
