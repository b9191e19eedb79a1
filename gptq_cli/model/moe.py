"""Mixture-of-experts blocks as linears GPTQ can quantize one expert at a time.

transformers 5 keeps a sparse MoE block's experts fused: one module with 3-D parameters gate_up_proj
[E, 2I, H] and down_proj [E, H, I] (MixtralExperts and its kind). GPTQ works on linears, and the
GPTQ files every loader reads name each expert's own linears (`mlp.experts.3.gate_proj.qweight`, as
GPTQModel writes), so the fused module is replaced by `ExpertMLPs`: the same computation over a
ModuleList of per-expert gate/up/down nn.Linear.

Calibration (`calibrate_all=True`): every expert's linears see every token, so that an expert the
router sends few or no calibration tokens still gets a full Hessian instead of an empty one (which
would zero its weights as dead columns); the block's output still mixes only the routed experts, so
the next block's inputs are what the model computes. This is llm-compressor's "calibrate all
experts". Inference (`calibrate_all=False`) runs each expert on its routed tokens only.
"""

from __future__ import annotations

import torch
from torch import nn

# Checkpoint names the files of these model types use for a defused expert's parameters: the
# original Mixtral release calls the MoE block `block_sparse_moe` and gate/up/down w1/w3/w2.
LEGACY_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": (
        (".mlp.", ".block_sparse_moe."),
        (".gate_proj.", ".w1."),
        (".up_proj.", ".w3."),
        (".down_proj.", ".w2."),
    ),
}


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, device, dtype):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertMLPs(nn.ModuleList):
    """What a fused experts module computes, with one ExpertMLP per expert (see the module
    docstring)."""

    def __init__(self, experts: list[ExpertMLP], calibrate_all: bool):
        super().__init__(experts)
        self.calibrate_all = calibrate_all

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, top_k_pos = torch.where(top_k_index == e)
            if self.calibrate_all:
                y = expert(hidden_states)[token_idx]
            elif token_idx.numel():
                y = expert(hidden_states[token_idx])
            else:
                continue
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    p = dict(module.named_parameters(recurse=False))
    return (
        "gate_up_proj" in p
        and "down_proj" in p
        and p["gate_up_proj"].dim() == 3
        and hasattr(module, "act_fn")
        and not getattr(module, "has_bias", False)
    )


def defuse_experts(model: nn.Module, calibrate_all: bool = False) -> int:
    """Replace every fused experts module of `model` by ExpertMLPs (on meta stays on meta, real
    weights are split); returns how many were replaced."""
    fused = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    for name, m in fused:
        gate_up, down = m.gate_up_proj, m.down_proj  # [E, 2I, H], [E, H, I]
        n_experts, two_i, hidden = gate_up.shape
        experts = [
            ExpertMLP(hidden, two_i // 2, m.act_fn, gate_up.device, gate_up.dtype)
            for _ in range(n_experts)
        ]
        if not gate_up.is_meta:
            with torch.no_grad():
                for e, expert in enumerate(experts):
                    # the fused forward's .chunk(2, dim=-1) of the output
                    gate, up = gate_up[e].chunk(2, dim=0)
                    expert.gate_proj.weight.copy_(gate)
                    expert.up_proj.weight.copy_(up)
                    expert.down_proj.weight.copy_(down[e])
        parent, _, attr = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model,
            attr,
            ExpertMLPs(experts, calibrate_all),
        )
    return len(fused)


def checkpoint_names(model_type: str, name: str) -> list[str]:
    """`name` and what the files of `model_type` may call it instead."""
    legacy = name
    for new, old in LEGACY_NAMES.get(model_type, ()):
        legacy = legacy.replace(new, old)
    return [name] if legacy == name else [name, legacy]
