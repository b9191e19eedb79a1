"""sensitivity.output_fisher (the streamed backward pass behind --target-bits) against plain
autograd on the whole float model: the same mean squared gradient of the next-token loss on every
quantized linear's outputs."""

from __future__ import annotations

import pytest
import torch

from gptq_cli.model.arch import block_linears, resolve_arch
from gptq_cli.model.modelio import load_streaming, resolve_model
from gptq_cli.quantization.calibration import advance
from gptq_cli.quantization.engine import capture_inputs
from gptq_cli.quantization.sensitivity import output_fisher
from tests.tiny_models import random_input_ids, save_tiny_model


def reference_fisher(model_dir, batches):
    """Every linear's output gradient from one autograd pass of the whole model, squared, summed
    over tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers_path, _ = resolve_arch(model)
    sums, handles = {}, []
    for i, block in enumerate(model.get_submodule(layers_path)):
        for name, m in block_linears(block).items():
            full = f"{layers_path}.{i}.{name}"

            def hook(_m, _a, out, full=full):
                out.register_hook(
                    lambda g: sums.__setitem__(
                        full, sums.get(full, 0) + g.pow(2).reshape(-1, g.shape[-1]).sum(0)
                    )
                )

            handles.append(m.register_forward_hook(hook))
    count = sum(ids[:, 1:].numel() for ids in batches)
    for ids in batches:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = (
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            / count
        )
        loss.backward()
    tokens = sum(ids.numel() for ids in batches)
    return {k: v / tokens for k, v in sums.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma2"])
def test_streamed_fisher_equals_autograd_on_the_whole_model(tmp_path, arch):
    model_dir = save_tiny_model(tmp_path / arch, arch)
    batches = [random_input_ids(2, 16, seed=s) for s in range(2)]
    sm = load_streaming(resolve_model(str(model_dir)), torch.float32)
    layers_path, _ = resolve_arch(sm.model)
    calib = capture_inputs(sm, layers_path, batches, torch.device("cpu"), torch.float32)
    kept = []
    with torch.no_grad():
        for i, block in enumerate(sm.model.get_submodule(layers_path)):
            kept.append(list(calib.hidden))
            sm.materialize(f"{layers_path}.{i}.", torch.device("cpu"), torch.float32)
            advance(calib, block)
            sm.release(block)
    ours = output_fisher(
        sm, layers_path, kept, calib.hidden, calib.kwargs, batches, torch.device("cpu")
    )
    reference = reference_fisher(model_dir, batches)
    assert set(ours) == set(reference) and len(ours) >= 8
    for name, f in ours.items():
        assert f.shape == reference[name].shape
        assert f.min() >= 0 and f.max() > 0, name
        torch.testing.assert_close(
            f, reference[name], rtol=1e-3, atol=1e-12 * float(reference[name].max()), msg=name
        )
    assert all(not block for block in kept)  # emptied as it went
