"""load_quantized_model against the same model computed with plain nn.Linear weights set to the
dequantized values (no packing, no QuantLinear), for several architectures and formats; and its
one-line errors."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import gptq_cli
from gptq_cli.errors import GptqError, UsageError
from gptq_cli.format.checkpoint import write_checkpoint
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.reader import is_quantized_checkpoint, read_tensors
from gptq_cli.model.loader import load_quantized_model
from gptq_cli.model.quant_linear import QuantLinear
from tests.tiny_models import random_input_ids, save_tiny_model, write_random_gptq_checkpoint


def logits(model, dtype=torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return model(random_input_ids(2, 12)).logits.to(dtype)


def test_loads_act_order_checkpoint_exactly(tiny_gptq_checkpoint):
    ckpt = tiny_gptq_checkpoint
    model = load_quantized_model(ckpt.path, dtype=torch.float32)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == set(ckpt.weights) and len(quantized) == 14
    assert not model.training and model.model.embed_tokens.weight.dtype == torch.float32
    torch.testing.assert_close(logits(model), logits(ckpt.reference_model()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "arch,quant",
    [
        # biases; asym -> gptq_v2; K % 100 != 0
        ("qwen2", QuantConfig(bits=3, group_size=100, sym=False)),
        ("gpt2", QuantConfig(bits=8, group_size=-1, desc_act=True)),  # Conv1D layers, per-channel
        # lm_head tied to the embeddings
        ("gemma", QuantConfig(bits=2, group_size=64)),
    ],
)
def test_loads_other_architectures_and_formats(tmp_path, arch, quant):
    src = save_tiny_model(tmp_path / "src", arch)
    ckpt = write_random_gptq_checkpoint(tmp_path / "ckpt", src, quant, max_shard_size="300KB")
    # sharded, read through the index
    assert len(list(ckpt.path.glob("model-*.safetensors"))) > 1
    model = load_quantized_model(ckpt.path, dtype=torch.float32)
    assert {n for n, m in model.named_modules() if isinstance(m, QuantLinear)} == set(ckpt.weights)
    torch.testing.assert_close(logits(model), logits(ckpt.reference_model()), rtol=1e-4, atol=1e-5)


def test_default_dtype_is_the_checkpoints(tiny_gptq_checkpoint):
    model = load_quantized_model(tiny_gptq_checkpoint.path)
    # the tiny model was saved in fp16
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert model.config.quantization_config["bits"] == 4
    out = logits(model, torch.float32)
    torch.testing.assert_close(
        out, logits(tiny_gptq_checkpoint.reference_model()), rtol=0.05, atol=0.02
    )


def rewrite(src: Path, out: Path, drop: str | None = None, add: dict | None = None) -> Path:
    """A copy of the checkpoint at src with one tensor dropped or extra tensors added."""
    tensors = {k: v for k, v in read_tensors(src).items() if k != drop}
    config = json.loads((src / "config.json").read_text())
    quant = QuantConfig.from_hf_dict(config.pop("quantization_config"))
    return write_checkpoint(out, {**tensors, **(add or {})}, config, quant)


def test_incomplete_or_foreign_tensors_are_errors(tmp_path, tiny_gptq_checkpoint):
    with pytest.raises(GptqError, match="lacks .*model.norm.weight"):
        load_quantized_model(
            rewrite(tiny_gptq_checkpoint.path, tmp_path / "a", drop="model.norm.weight")
        )
    with pytest.raises(GptqError, match="lacks model.layers.0.mlp.up_proj.scales"):
        load_quantized_model(
            rewrite(
                tiny_gptq_checkpoint.path, tmp_path / "b", drop="model.layers.0.mlp.up_proj.scales"
            )
        )
    with pytest.raises(GptqError, match="no place for.*model.extra.weight"):
        load_quantized_model(
            rewrite(
                tiny_gptq_checkpoint.path,
                tmp_path / "c",
                add={"model.extra.weight": torch.zeros(3)},
            )
        )


def test_bad_paths_are_one_line_usage_errors(tmp_path, tiny_llama_dir, tiny_gptq_checkpoint):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path / "file.txt": "not a directory",
        tmp_path / "empty": "not a model directory",
        tiny_llama_dir: "not a quantized checkpoint",
    }
    for path, message in cases.items():
        with pytest.raises(UsageError, match=message) as info:
            load_quantized_model(path)
        assert "\n" not in str(info.value)
    assert is_quantized_checkpoint(tiny_gptq_checkpoint.path)
    assert not any(is_quantized_checkpoint(p) for p in cases)


def test_package_never_imports_gptqmodel():
    """gptq_cli must stand alone: GPTQModel (and AutoGPTQ) are only the tests' independent
    references."""
    offenders = []
    for path in Path(gptq_cli.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.name}: {n}" for n in names if n.split(".")[0] in ("gptqmodel", "auto_gptq")
            ]
    assert offenders == []


@pytest.mark.cuda
def test_loads_onto_cuda(tiny_gptq_checkpoint):
    model = load_quantized_model(tiny_gptq_checkpoint.path, device="cuda", dtype=torch.float16)
    assert next(model.parameters()).device.type == "cuda"
    with torch.no_grad():
        out = model(random_input_ids(2, 12).cuda()).logits.float().cpu()
    torch.testing.assert_close(
        out, logits(tiny_gptq_checkpoint.reference_model()), rtol=0.05, atol=0.02
    )
