"""How much the model's loss cares about each quantized linear's outputs, for `quantize
--target-bits`.

A linear's GPTQ loss is the squared error it adds to its outputs, but an error in one output moves
the model's loss far more than the same error in another: the first layers' errors travel through
every later block, q/k's pass through a softmax, and some channels feed the residual stream where
the next norm shrinks them. Second order, with the Fisher approximation of the loss's curvature (as
in OBS/OBQ, HAWQ, SqueezeLLM), an error δ on output channel i of a linear raises the expected loss
by about ½·F_i·E[δ_i²], where F_i = E_t[(∂L/∂y_t,i)²] is the mean squared gradient of the loss on
that output over the calibration tokens. So mixed.py weighs each row's GPTQ loss by F_i of its
output channel.

F is measured with one backward pass of the full-precision model, streamed like everything else: the
forward pass that measures the candidates keeps the inputs of every block for the first few
calibration batches (`fisher_batches`: within FISHER_MEMORY); the loss of the next token is taken at
the output head; then the blocks are loaded again from the last to the first, each run forward in
float32 on its kept inputs and backward from its output's gradient, which gives the gradients on its
linears' outputs and on its input (the gradient for the block before). One block is resident at a
time, as when quantizing.
"""

from __future__ import annotations

import torch
from torch import nn

from gptq_cli.model.arch import block_linears, linear_weight
from gptq_cli.model.modelio import StreamingModel

# Bytes of block inputs kept for the backward pass (all blocks together): the batches beyond it are
# not used.
FISHER_MEMORY = 1 << 30
# Modules that sit between the last block and the output head, by attribute name on the blocks'
# owner.
_FINAL_NORMS = ("norm", "final_layer_norm", "ln_f")


def fisher_batches(hidden: list[torch.Tensor], n_blocks: int) -> int:
    """How many calibration batches' block inputs fit in FISHER_MEMORY (at least one)."""
    per_batch = max(h.numel() * h.element_size() for h in hidden) * n_blocks
    return max(1, min(len(hidden), FISHER_MEMORY // max(per_batch, 1)))


def output_fisher(
    sm: StreamingModel,
    layers_path: str,
    kept: list[list[torch.Tensor]],
    final: list[torch.Tensor],
    kwargs: list[dict],
    input_ids: list[torch.Tensor],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Per quantized linear (full name): F [out_features] float32, the mean over the kept
    batches' tokens of the squared gradient of the next-token loss on each output. kept[i][b]:
    block i's input for batch b; final[b]: the last block's output; input_ids[b]: the batch's
    tokens. Empties `kept` as it goes."""
    grads = _head_gradients(sm, layers_path, final, input_ids, device)
    tokens = sum(ids.numel() for ids in input_ids)
    layers = sm.model.get_submodule(layers_path)
    fisher: dict[str, torch.Tensor] = {}
    for i in reversed(range(len(layers))):
        block, prefix = layers[i], f"{layers_path}.{i}."
        sm.materialize(prefix, device, torch.float32)
        linears = block_linears(block)
        sums = {
            name: torch.zeros(linear_weight(m).shape[0], device=device)
            for name, m in linears.items()
        }

        def on_output(name: str):
            def forward_hook(_module, _args, out):
                def grad_hook(g):
                    sums[name] += g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)

                out.register_hook(grad_hook)

            return forward_hook

        handles = [m.register_forward_hook(on_output(n)) for n, m in linears.items()]
        try:
            for b, x in enumerate(kept[i]):
                x = x.to(device=device, dtype=torch.float32).requires_grad_()
                with torch.enable_grad():
                    out = block(x, **_float32(kwargs[b]))
                    out = out[0] if isinstance(out, tuple) else out
                    torch.autograd.backward(out, grads[b])
                grads[b] = x.grad
        finally:
            for h in handles:
                h.remove()
        kept[i] = []
        sm.release(block)
        for name, s in sums.items():
            fisher[prefix + name] = (s / tokens).cpu()
    return fisher


def _head_gradients(
    sm: StreamingModel,
    layers_path: str,
    final: list[torch.Tensor],
    input_ids: list[torch.Tensor],
    device: torch.device,
) -> list[torch.Tensor]:
    """∂L/∂(last block's output) per batch, L the mean next-token cross-entropy over all the
    batches' tokens."""
    model = sm.model
    owner = model.get_submodule(layers_path.rpartition(".")[0]) if "." in layers_path else model
    norm = next(
        (m for n in _FINAL_NORMS if isinstance(m := getattr(owner, n, None), nn.Module)), None
    )
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise ValueError(
            f"no final norm ({'/'.join(_FINAL_NORMS)}) or output head found beside {layers_path}"
        )
    names = {m: n for n, m in model.named_modules()}
    for module in (norm, head):
        sm.materialize(names[module] + ".", device, torch.float32)
    if head.weight.is_meta:  # tied to the input embeddings, which the files store instead
        embed = model.get_input_embeddings()
        sm.materialize(names[embed] + ".", device, torch.float32)
        head.weight = embed.weight
    project = getattr(owner, "project_out", None)  # OPT with a narrower embedding
    if isinstance(project, nn.Module):
        sm.materialize(names[project] + ".", device, torch.float32)
    count = sum(ids[:, 1:].numel() for ids in input_ids)
    cap = getattr(model.config, "final_logit_softcapping", None)
    grads = []
    for h, ids in zip(final, input_ids):
        h = h.to(device=device, dtype=torch.float32).requires_grad_()
        for j in range(h.shape[0]):  # one sample's logits at a time (a batch's can be gigabytes)
            with torch.enable_grad():
                y = norm(h[j])
                y = project(y) if isinstance(project, nn.Module) else y
                logits = head(y)[:-1]
                if cap:  # Gemma 2's soft cap on the logits
                    logits = torch.tanh(logits / cap) * cap
                loss = (
                    nn.functional.cross_entropy(logits, ids[j, 1:].to(device), reduction="sum")
                    / count
                )
                loss.backward()
        grads.append(h.grad)
    for module in (norm, head, project, model.get_input_embeddings()):
        if isinstance(module, nn.Module):
            sm.release(module)
    return grads


def _float32(obj):
    """kwargs of a block call with every floating tensor (rotary cos/sin, float masks) in
    float32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _float32(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_float32(v) for v in obj)
    return obj
