"""`gptq pack CHECKPOINT`: zero-point format conversion (v1 stores zero-1, v2 stores zero) and
re-sharding.

References are independent of the conversion code: the fixture's known QuantizedWeights (true zero
points, reference model with plain nn.Linear weights), SPEC §2's literal words (symmetric 4-bit
qzeros are 0x77777777 in v1 and 0x88888888 in v2), and the source files' bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptq_cli.cli import app
from gptq_cli.convert import convert_checkpoint
from gptq_cli.format.bitpack import unpack_last
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.reader import INDEX_FILE, read_quantization_dict, read_tensors
from gptq_cli.model.loader import load_quantized_model
from tests.tiny_models import random_input_ids, write_random_gptq_checkpoint

V1_SYM4_WORD = 0x77777777  # zero 8 stored as 7 in every nibble
V2_SYM4_WORD = 0x88888888 - (1 << 32)  # zero 8 stored as 8, as a signed int32


def pack_cli(*args: object):
    return CliRunner().invoke(app, ["pack", *map(str, args)])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(random_input_ids(2, 16, seed=3)).logits.float()


@pytest.fixture
def checkpoint(tiny_gptq_checkpoint, tmp_path) -> Path:
    """A copy of the session checkpoint with the side files a real one carries (quant_log, eval
    results)."""
    path = shutil.copytree(tiny_gptq_checkpoint.path, tmp_path / "src")
    (path / "quant_log.json").write_text(json.dumps({"model": "org/base", "modules": []}))
    (path / "eval_results.json").write_text(
        json.dumps({"results": [{"dataset": "wikitext2", "ppl": 12.5}]})
    )
    return path


def test_v1_to_v2_to_v1_is_byte_identical(checkpoint, tiny_gptq_checkpoint, tmp_path):
    v2 = convert_checkpoint(checkpoint, tmp_path / "v2", checkpoint_format="gptq_v2")
    back = convert_checkpoint(v2, tmp_path / "v1", checkpoint_format="gptq")

    assert (back / "model.safetensors").read_bytes() == (
        checkpoint / "model.safetensors"
    ).read_bytes()
    source, converted = read_tensors(checkpoint), read_tensors(v2)
    for name, qw in tiny_gptq_checkpoint.weights.items():
        assert bool((source[f"{name}.qzeros"] == V1_SYM4_WORD).all())
        assert bool((converted[f"{name}.qzeros"] == V2_SYM4_WORD).all())
        assert torch.equal(unpack_last(converted[f"{name}.qzeros"], 4, qw.zeros.shape[1]), qw.zeros)
    for key in source:  # nothing but qzeros changes
        if not key.endswith(".qzeros"):
            assert (
                torch.equal(converted[key], source[key])
                and converted[key].dtype == source[key].dtype
            ), key


def test_conversion_relabels_both_configs_and_copies_the_other_files(checkpoint, tmp_path):
    out = convert_checkpoint(checkpoint, tmp_path / "v2", checkpoint_format="gptq_v2")

    before = read_quantization_dict(checkpoint)
    for config in (
        json.loads((out / "config.json").read_text())["quantization_config"],
        json.loads((out / "quantize_config.json").read_text()),
    ):
        assert config == {**before, "checkpoint_format": "gptq_v2"}
    model_config = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in model_config.items() if k != "quantization_config"} == {
        k: v
        for k, v in json.loads((checkpoint / "config.json").read_text()).items()
        if k != "quantization_config"
    }
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "quant_log.json",
        "eval_results.json",
    ):
        assert (out / name).read_bytes() == (checkpoint / name).read_bytes(), name
    # no temporary directory left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "v2"]


def test_converted_checkpoint_loads_with_the_same_logits(
    checkpoint, tiny_gptq_checkpoint, tmp_path
):
    out = convert_checkpoint(checkpoint, tmp_path / "v2", checkpoint_format="gptq_v2")

    converted = logits(load_quantized_model(out, dtype=torch.float32))
    assert torch.equal(converted, logits(load_quantized_model(checkpoint, dtype=torch.float32)))
    reference = logits(tiny_gptq_checkpoint.reference_model(torch.float32))
    torch.testing.assert_close(converted, reference, rtol=1e-4, atol=1e-4)


def test_asymmetric_zero_of_zero_is_refused_for_v1(tiny_llama_dir, tmp_path):
    asym = write_random_gptq_checkpoint(
        tmp_path / "asym", tiny_llama_dir, QuantConfig(bits=4, group_size=64, sym=False)
    )
    assert asym.quant.checkpoint_format == "gptq_v2"
    assert any(bool((qw.zeros == 0).any()) for qw in asym.weights.values())

    result = pack_cli(asym.path, "--format", "gptq", "-o", tmp_path / "v1")
    assert result.exit_code == 2
    assert "zero point(s) of 0" in one_error_line(result) and "gptq_v2" in one_error_line(result)
    # no output, not even a temporary one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asym"]


def test_asymmetric_v1_from_an_older_tool_converts_to_v2(tiny_llama_dir, tmp_path):
    quant = QuantConfig(bits=4, group_size=64, sym=False)
    # asym labelled v1, zeros >= 1: what AutoGPTQ wrote; readable, never written by us
    quant.checkpoint_format = "gptq"
    old = write_random_gptq_checkpoint(tmp_path / "old", tiny_llama_dir, quant)

    out = convert_checkpoint(old.path, tmp_path / "v2", checkpoint_format="gptq_v2")
    tensors = read_tensors(out)
    for name, qw in old.weights.items():
        assert torch.equal(unpack_last(tensors[f"{name}.qzeros"], 4, qw.zeros.shape[1]), qw.zeros)
    torch.testing.assert_close(
        logits(load_quantized_model(out, dtype=torch.float32)),
        logits(old.reference_model(torch.float32)),
        rtol=1e-4,
        atol=1e-4,
    )


def test_small_max_shard_size_gives_an_index_and_the_same_tensors(checkpoint, tmp_path):
    limit = 200_000
    out = convert_checkpoint(checkpoint, tmp_path / "sharded", max_shard_size="200KB")

    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    source, sharded = read_tensors(checkpoint), read_tensors(out)
    assert sorted(index["weight_map"]) == sorted(source) == sorted(sharded)
    for key in source:
        assert torch.equal(sharded[key], source[key]) and sharded[key].dtype == source[key].dtype, (
            key
        )
    sizes = {
        name: sum(
            sharded[k].numel() * sharded[k].element_size()
            for k, f in index["weight_map"].items()
            if f == name
        )
        for name in shards
    }
    modules = {k.rpartition(".")[0] for k in source}
    largest_module = max(
        sum(
            source[k].numel() * source[k].element_size()
            for k in source
            if k.rpartition(".")[0] == m
        )
        for m in modules
    )
    assert all(size <= max(limit, largest_module) for size in sizes.values()), sizes
    assert index["metadata"]["total_size"] == sum(sizes.values())
    # format kept when not asked to change
    assert read_quantization_dict(out)["checkpoint_format"] == "gptq"


def test_gptqmodel_checkpoint_keeps_its_config_and_loads(
    checkpoint, tiny_gptq_checkpoint, tmp_path
):
    """GPTQModel 7 writes the format under both "format" and "checkpoint_format", its settings
    under "meta", and names itself in meta.quantizer: all of it must survive, with both labels
    changed."""
    gptqmodel_config = {
        "bits": 4,
        "group_size": 128,
        "desc_act": True,
        "lm_head": False,
        "method": "gptq",
        "quant_method": "gptq",
        "format": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "sym": True,
        "meta": {
            "quantizer": ["gptqmodel:7.7.0"],
            "uri": "https://github.com/modelcloud/gptqmodel",
            "damp_percent": 0.05,
            "static_groups": False,
            "true_sequential": True,
            "mse": 0.0,
        },
    }
    (checkpoint / "quantize_config.json").write_text(json.dumps(gptqmodel_config, indent=2))
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(
        json.dumps({**config, "quantization_config": gptqmodel_config})
    )
    (checkpoint / "quant_log.csv").write_text("layer,module,loss\n0,self_attn.q_proj,0.1\n")

    result = pack_cli(checkpoint, "--format", "gptq_v2", "-o", tmp_path / "v2", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["source_format"], summary["checkpoint_format"]) == ("gptq", "gptq_v2")
    out = Path(summary["output"])
    assert json.loads((out / "quantize_config.json").read_text()) == {
        **gptqmodel_config,
        "format": "gptq_v2",
        "checkpoint_format": "gptq_v2",
    }
    assert (out / "quant_log.csv").read_bytes() == (checkpoint / "quant_log.csv").read_bytes()
    torch.testing.assert_close(
        logits(load_quantized_model(out, dtype=torch.float32)),
        logits(tiny_gptq_checkpoint.reference_model(torch.float32)),
        rtol=1e-4,
        atol=1e-4,
    )


def test_a_checkpoint_failing_the_validity_check_is_not_converted(checkpoint, tmp_path):
    # v1 zero points labelled v2: the mislabelling that makes loaders dequantize with wrong zeros
    (checkpoint / "quantize_config.json").write_text(
        json.dumps({**read_quantization_dict(checkpoint), "checkpoint_format": "gptq_v2"})
    )
    result = pack_cli(checkpoint, "--format", "gptq", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "fails the validity check" in one_error_line(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "gptq_v3"], "--format gptq_v3: choose one of gptq, gptq_v2"),
        (["--max-shard-size", "lots"], "cannot read the size 'lots'"),
    ],
)
def test_bad_options_are_usage_errors(checkpoint, tmp_path, args, message):
    result = pack_cli(checkpoint, *args, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_pack_refuses_what_is_not_a_checkpoint(tiny_llama_dir, checkpoint, tmp_path):
    for path in (tiny_llama_dir, tmp_path / "missing"):
        result = pack_cli(path, "-o", tmp_path / "out")
        assert result.exit_code == 2 and "is not a GPTQ checkpoint directory" in one_error_line(
            result
        )
    result = pack_cli(checkpoint, "-o", checkpoint)
    assert result.exit_code == 2 and "already exists" in one_error_line(result)
