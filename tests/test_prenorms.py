"""Pre-norms computed once per calibration batch (quantization/prenorms.py): answered only for the
very same, unchanged block input and an unchanged output; the checkpoint's bytes do not change."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from gptq_cli.quantization import calibration
from gptq_cli.quantization.prenorms import PreNorms, linear_free_children
from tests.test_quantize import calib_file, run_quantize  # noqa: F401 (a fixture)
from tests.tiny_models import save_tiny_model


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(8), nn.Linear(8, 8)


def answering(x: torch.Tensor) -> tuple[Block, PreNorms, list[int], list[torch.Tensor]]:
    torch.manual_seed(0)
    block, calls, given = Block(), [], []
    real = block.norm.forward
    block.norm.forward = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    children = linear_free_children(block, {"proj": block.proj})
    assert children == [block.norm]
    return block, PreNorms(children, lambda: [x], torch.clone, given.append), calls, given


@torch.no_grad()
def test_the_same_unchanged_input_is_answered_and_anything_else_runs() -> None:
    x = torch.randn(2, 3, 8)
    block, prenorms, calls, given = answering(x)
    first = block.norm(x)
    assert block.norm(x) is first and len(calls) == 1
    torch.testing.assert_close(first, nn.functional.layer_norm(x, (8,), block.norm.weight))
    block.norm(x.clone())  # equal values, not the block's input
    assert len(calls) == 2
    first.mul_(2)  # the answer changed in place: computed again
    again = block.norm(x)
    assert len(calls) == 3 and again is not first and given == [first]
    x.add_(1)  # the input changed in place
    torch.testing.assert_close(block.norm(x), nn.functional.layer_norm(x, (8,), block.norm.weight))
    assert len(calls) == 4
    prenorms.close()
    assert len(given) == 3  # every answer handed back


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "phi3"])
def test_prenorms_skip_recomputation_and_change_no_byte(arch, tmp_path, calib_file, monkeypatch):  # noqa: F811
    model_dir = save_tiny_model(tmp_path / "model", arch)
    calls = []
    real_layer_norm = nn.functional.layer_norm
    monkeypatch.setattr(
        nn.functional, "layer_norm", lambda *a, **kw: calls.append(1) or real_layer_norm(*a, **kw)
    )
    real_rsqrt = torch.rsqrt  # the RMSNorms' one call each
    monkeypatch.setattr(torch, "rsqrt", lambda *a, **kw: calls.append(1) or real_rsqrt(*a, **kw))
    digests, norm_calls = [], []
    for use in (True, False):
        if not use:
            monkeypatch.setattr(calibration, "linear_free_children", lambda *a: [])
        calls.clear()
        out = run_quantize(model_dir, tmp_path / f"out-{use}", calib_file, bits=4, group_size=32)
        norm_calls.append(len(calls))
        digests.append(
            hashlib.sha256(
                b"".join(f.read_bytes() for f in sorted(out.output.glob("*.safetensors")))
            ).digest()
        )
    assert digests[0] == digests[1]
    assert norm_calls[0] < norm_calls[1], norm_calls
