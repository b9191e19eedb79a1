"""Checkpoint directories: files and configs as SPEC §2 lists them, sharding, atomic and
deterministic writes, and reading the quantization configs other tools write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gptq_cli.errors import UsageError
from gptq_cli.format.checkpoint import parse_size, quantized_to_tensors, write_checkpoint
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.reader import read_quant_config, read_tensors
from tests.tiny_models import random_quantized_weight, tiny_config


def sample_tensors() -> dict[str, torch.Tensor]:
    """Two quantized linears (one with a bias) and some unquantized tensors, in several dtypes."""
    tensors = {}
    for i, (n, k) in enumerate([(64, 96), (32, 64)]):
        qw = random_quantized_weight(n, k, bits=4, group_size=32, seed=i)
        bias = torch.randn(n).to(torch.float16) if i == 0 else None
        tensors.update(quantized_to_tensors(f"layers.{i}.proj", qw, "gptq", bias=bias))
    tensors["embed.weight"] = torch.randn(100, 64).to(torch.bfloat16)
    tensors["norm.weight"] = torch.randn(64).to(torch.float16)
    return tensors


def write(out: Path, tensors=None, **kwargs) -> Path:
    return write_checkpoint(
        out,
        sample_tensors() if tensors is None else tensors,
        tiny_config("llama"),
        QuantConfig(bits=4, group_size=32),
        **kwargs,
    )


def test_single_file_checkpoint_has_spec_files_and_round_trips(tmp_path):
    tensors = sample_tensors()
    quant = QuantConfig(bits=4, group_size=32, desc_act=True)
    out = write_checkpoint(tmp_path / "ckpt", tensors, tiny_config("llama"), quant)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "quantize_config.json",
    ]

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 256
    assert config["quantization_config"] == quant.to_hf_dict()
    assert json.loads((out / "quantize_config.json").read_text()) == quant.to_hf_dict()
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["pack_dtype"], qc["lm_head"]) == (
        "gptq",
        "gptq",
        "int32",
        False,
    )
    assert qc["meta"]["quantizer"][0].startswith("gptq_cli:")

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    read = read_tensors(out)
    assert sorted(read) == sorted(tensors)
    for key, value in tensors.items():
        assert read[key].dtype == value.dtype and torch.equal(read[key], value), key
    assert read.dtype_and_shape("layers.0.proj.qweight") == ("I32", (12, 64))


def test_sharded_checkpoint_index_covers_every_tensor(tmp_path):
    tensors = sample_tensors()
    out = write(tmp_path / "ckpt", tensors, max_shard_size="8KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and "model.safetensors" not in shards
    assert shards == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    for key, shard in index["weight_map"].items():
        with safe_open(str(out / shard), framework="pt") as f:
            assert key in f.keys() and f.metadata() == {"format": "pt"}
    # a module's tensors share one shard, so one module can be read from one file
    assert (
        len(
            {
                shard
                for key, shard in index["weight_map"].items()
                if key.startswith("layers.0.proj.")
            }
        )
        == 1
    )
    read = read_tensors(out)
    assert all(torch.equal(read[k], v) for k, v in tensors.items())


def test_same_input_gives_byte_identical_files(tmp_path):
    tensors = sample_tensors()
    reordered = dict(reversed(list(tensors.items())))
    a = write(tmp_path / "a", tensors, max_shard_size="8KB")
    b = write(tmp_path / "b", reordered, max_shard_size="8KB")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    import gptq_cli.format.checkpoint as checkpoint

    real_write = checkpoint.write_file
    calls = []

    def write_then_fail(path, *args, **kwargs):
        calls.append(path)
        real_write(path, *args, **kwargs)
        if len(calls) == 2:  # the second shard is on disk, then the disk is full
            raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_file", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path / "ckpt", max_shard_size="8KB")
    assert len(calls) == 2  # it did fail after writing two shards
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary directory


def test_existing_output_is_refused_or_replaced_whole(tmp_path):
    out = write(tmp_path / "ckpt")
    with pytest.raises(UsageError, match="already exists"):
        write(out)
    (out / "stale.txt").write_text("from an older run")
    write(out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_copies_tokenizer_and_generation_config_and_writes_extra_files(tmp_path, tiny_llama_dir):
    out = write(
        tmp_path / "ckpt",
        src_dir=tiny_llama_dir,
        extra_files={"quant_log.json": b'{"modules": []}'},
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_llama_dir / name).read_bytes(), name
    assert (out / "quant_log.json").read_bytes() == b'{"modules": []}'
    # the source's own weights and config are not copied over ours
    assert read_tensors(out).keys() == sample_tensors().keys()
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    with pytest.raises(ValueError, match="plain file names"):
        write(tmp_path / "other", extra_files={"../escape.json": b"{}"})


def test_quantized_to_tensors_keeps_bias_dtype():
    qw = random_quantized_weight(16, 32, bits=4, group_size=16)
    bias = torch.randn(16).to(torch.bfloat16)
    t = quantized_to_tensors("model.layers.0.mlp.up_proj", qw, "gptq_v2", bias=bias)
    assert sorted(t) == [
        f"model.layers.0.mlp.up_proj.{n}" for n in ("bias", "g_idx", "qweight", "qzeros", "scales")
    ]
    assert t["model.layers.0.mlp.up_proj.bias"].dtype == torch.bfloat16
    assert t["model.layers.0.mlp.up_proj.scales"].dtype == torch.float16


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


# What GPTQModel 7.7 writes (trimmed): damp_percent, static_groups, true_sequential and mse live
# under meta.
GPTQMODEL_QC = {
    "bits": 4,
    "group_size": 128,
    "desc_act": True,
    "lm_head": False,
    "method": "gptq",
    "quant_method": "gptq",
    "format": "gptq",
    "checkpoint_format": "gptq",
    "pack_dtype": "int32",
    "meta": {
        "quantizer": ["gptqmodel:7.7.0"],
        "damp_percent": 0.05,
        "damp_auto_increment": 0.01,
        "static_groups": False,
        "true_sequential": True,
        "mse": 0.0,
        "fallback": {"strategy": "rtn"},
    },
    "sym": True,
}
# What AutoGPTQ 0.7 writes: no checkpoint_format (v1 implied), its own extra keys.
AUTOGPTQ_QC = {
    "bits": 3,
    "group_size": 64,
    "damp_percent": 0.1,
    "desc_act": False,
    "static_groups": False,
    "sym": False,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "gptq_model-3bit-64g",
    "is_marlin_format": False,
    "quant_method": "gptq",
}


def test_reads_gptqmodel_quantize_config(tmp_path):
    write_json(tmp_path / "quantize_config.json", GPTQMODEL_QC)
    q = read_quant_config(tmp_path)
    assert (q.bits, q.group_size, q.desc_act, q.sym, q.checkpoint_format) == (
        4,
        128,
        True,
        True,
        "gptq",
    )
    assert (q.damp_percent, q.static_groups, q.true_sequential, q.mse) == (0.05, False, True, False)
    assert q.meta["quantizer"] == ["gptqmodel:7.7.0"]


def test_reads_autogptq_config_without_format_as_v1(tmp_path):
    write_json(tmp_path / "quantize_config.json", AUTOGPTQ_QC)
    q = read_quant_config(tmp_path)
    assert (q.bits, q.group_size, q.desc_act, q.sym, q.damp_percent) == (3, 64, False, False, 0.1)
    assert q.checkpoint_format == "gptq"  # absent = v1, even for asym (reading never relabels)


def test_reads_config_json_quantization_config(tmp_path):
    write_json(
        tmp_path / "config.json",
        {
            "model_type": "llama",
            "quantization_config": {
                "quant_method": "gptq",
                "bits": 8,
                "group_size": -1,
                "desc_act": False,
                "sym": True,
                "use_exllama": True,
                "dataset": "c4",
                "checkpoint_format": "gptq_v2",
            },
        },
    )
    q = read_quant_config(tmp_path)
    assert (q.bits, q.group_size, q.checkpoint_format) == (8, -1, "gptq_v2")


@pytest.mark.parametrize(
    "config,message",
    [
        ({"model_type": "llama"}, "not a quantized checkpoint"),
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "not GPTQ"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 5}}, "bits"),
        (
            {"quantization_config": {"quant_method": "gptq", "bits": 4, "pack_dtype": "int16"}},
            "int32",
        ),
    ],
)
def test_rejects_what_it_cannot_read(tmp_path, config, message):
    write_json(tmp_path / "config.json", config)
    with pytest.raises(UsageError, match=message):
        read_quant_config(tmp_path)


def test_parse_size():
    assert [parse_size(s) for s in ("5GB", "500MB", "2GiB", "20KB", 1234)] == [
        5 * 10**9,
        5 * 10**8,
        2 * 2**30,
        20_000,
        1234,
    ]
    with pytest.raises(UsageError, match="5GB"):
        parse_size("lots")
