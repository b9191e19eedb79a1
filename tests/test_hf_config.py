"""config.json read alike by transformers 4.x and 5.x (format/hf_config.py).

transformers 4.x is not installed here (the main venv has 5.x); `read_as_transformers4`
re-implements how 4.x reads the keys that matter, from its sources:
- transformers 4.49.0 configuration_utils.py PretrainedConfig.__init__: `self.torch_dtype =
  kwargs.pop("torch_dtype", None)` (no `dtype`);
- 4.49.0 models/{llama,mistral,qwen2,gemma,gemma2,phi3,mixtral,qwen2_moe}/configuration_*.py
  __init__: `rope_theta=<class default>`, `rope_scaling=None`, `if "type" in rope_scaling:
  rope_scaling["rope_type"] = rope_scaling["type"]`; Phi3 also `partial_rotary_factor=1.0`,
  `original_max_position_embeddings=4096` top-level, and rope_scaling with exactly the keys
  type/short_factor/long_factor (_rope_scaling_validation);
- for the architectures 4.49 lacks, 4.57.6 models/qwen3/configuration_qwen3.py (as Llama's) and
  4.50.0 models/gemma3/configuration_gemma3.py: Gemma3TextConfig `rope_theta=1_000_000.0`,
  `rope_local_base_freq=10_000.0`, `sliding_window_pattern=6`; 4.50.0 modeling_gemma3: a layer
  slides when `(layer_idx + 1) % sliding_window_pattern`, local layers use plain RoPE with base
  rope_local_base_freq;
- 4.49 modeling_gemma2: `is_sliding = not bool(layer_idx % 2)`.
scripts/check_autogptq.sh checks the same against the real 4.49 (every architecture it knows); the
real 4.57.6 was checked by hand for Qwen3 and Gemma3 (same dtype and rotary frequencies).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import transformers

from gptq_cli.format.checkpoint import write_checkpoint
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.hf_config import transformers4_gaps, with_legacy_keys
from tests.tiny_models import tiny_config

# 4.x class defaults of rope_theta (used when config.json has no rope_theta: the silent failure this
# prevents)
ROPE_THETA_4X = {"mixtral": 1e6, "gemma3_text": 1e6}
SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "ffn_dim",
    "word_embed_proj_dim",
    "sliding_window",
)
LONGROPE = dict(
    rope_type="longrope",
    short_factor=[1.0 + i / 64 for i in range(32)],
    long_factor=[2.0 + i / 64 for i in range(32)],
)
# Every registered architecture, with a non-default RoPE base (as SmolLM2's 100000) and, where the
# architecture has one in practice, a scaled RoPE.
VARIANTS = {
    "llama": dict(
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
    ),
    "llama-plain": dict(rope_parameters=dict(rope_type="default", rope_theta=100000.0)),
    "mistral": dict(rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "qwen2": dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0)),
    "qwen3": dict(rope_parameters=dict(rope_type="linear", rope_theta=1e6, factor=2.0)),
    "qwen2_moe": dict(rope_parameters=dict(rope_type="dynamic", rope_theta=20000.0, factor=2.0)),
    "gemma": dict(rope_parameters=dict(rope_type="default", rope_theta=20000.0)),
    "gemma2": dict(rope_parameters=dict(rope_type="default", rope_theta=30000.0)),
    "gemma3": dict(
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=2e6),
            "sliding_attention": dict(rope_type="default", rope_theta=20000.0),
        },
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi3": dict(
        rope_parameters=dict(**LONGROPE, rope_theta=10000.0, partial_rotary_factor=1.0),
        original_max_position_embeddings=64,
    ),
    "mixtral": dict(rope_parameters=dict(rope_type="default", rope_theta=5e5)),
    "opt": {},
    "gpt2": {},
}


def variant_config(name: str, dtype: torch.dtype) -> transformers.PretrainedConfig:
    base = tiny_config(name.split("-")[0])
    config = type(base)(**{**base.to_dict(), **VARIANTS[name]})
    config.dtype = dtype
    return config


def read_as_transformers4(d: dict) -> dict:
    """What transformers 4.x makes of a config.json dict (the rules cited in the module
    docstring)."""
    model_type = d["model_type"]
    out = {
        "dtype": d.get("torch_dtype"),
        "sizes": {k: d[k] for k in SIZE_KEYS if k in d},
        "rope": {},
    }
    if model_type in ("opt", "gpt2"):
        return out
    scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else None
    if scaling is not None:
        scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type"))
        if model_type == "phi3":
            # else 4.x raises
            assert set(d["rope_scaling"]) == {"type", "short_factor", "long_factor"}
            scaling["original_max_position_embeddings"] = d.get(
                "original_max_position_embeddings", 4096
            )
    partial = d.get("partial_rotary_factor", 1.0) if model_type == "phi3" else 1.0
    out["rope"]["full_attention"] = (
        d.get("rope_theta", ROPE_THETA_4X.get(model_type, 10000.0)),
        scaling,
        partial,
    )
    n = d["num_hidden_layers"]
    if model_type == "gemma3_text":
        out["rope"]["sliding_attention"] = (d.get("rope_local_base_freq", 10000.0), None, 1.0)
        pattern = d.get("sliding_window_pattern", 6)
        out["layer_types"] = [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)
        ]
    elif model_type == "gemma2":
        out["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)
        ]
    return out


def read_as_transformers5(path) -> dict:
    """What the installed transformers 5 makes of the config.json in `path`, in
    read_as_transformers4's terms."""
    config = transformers.AutoConfig.from_pretrained(path)
    d = config.to_dict()
    out = {"dtype": d.get("dtype"), "sizes": {k: d[k] for k in SIZE_KEYS if k in d}, "rope": {}}
    rope = d.get("rope_parameters") or {}
    for layer, params in (
        rope.items() if "full_attention" in rope else [("full_attention", rope)] if rope else []
    ):
        scaling = {
            k: v
            for k, v in params.items()
            if k not in ("rope_theta", "partial_rotary_factor", "type")
        }
        out["rope"][layer] = (
            params["rope_theta"],
            None if scaling == {"rope_type": "default"} else scaling,
            params.get("partial_rotary_factor", 1.0),
        )
    if d["model_type"] in ("gemma2", "gemma3_text"):
        out["layer_types"] = d["layer_types"]
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_transformers4_reads_the_model_transformers5_reads(tmp_path, name, dtype):
    config = variant_config(name, dtype)
    written = with_legacy_keys(config.to_dict())
    (tmp_path / "config.json").write_text(json.dumps(written))
    as4, as5 = read_as_transformers4(written), read_as_transformers5(tmp_path)
    assert as5["dtype"] == str(dtype).removeprefix("torch.")
    assert as4 == as5
    assert transformers4_gaps(config.to_dict()) == []
    # and without the legacy keys 4.x reads another model (the bug): dtype always, RoPE base where
    # non-default
    bare = read_as_transformers4(config.to_dict())
    assert bare["dtype"] is None and (
        bare["rope"] != as5["rope"] or not as5["rope"] or name == "gemma2"
    )


@pytest.mark.parametrize("name", ["llama", "gemma3", "phi3", "qwen2"])
def test_transformers5_reads_its_own_rope_parameters_back(tmp_path, name):
    config = variant_config(name, torch.float16)
    (tmp_path / "config.json").write_text(json.dumps(with_legacy_keys(config.to_dict())))
    back = transformers.AutoConfig.from_pretrained(tmp_path).to_dict()["rope_parameters"]
    # 4.x's spelling of the type, which transformers 5 keeps as an alias of rope_type
    if name == "phi3":
        assert back.pop("type") == back["rope_type"]
    assert back == config.to_dict()["rope_parameters"]


def test_checkpoint_config_json_carries_both_spellings(tmp_path):
    config = variant_config("llama-plain", torch.bfloat16)  # SmolLM2's RoPE base
    out = write_checkpoint(tmp_path / "ckpt", {"x.weight": torch.zeros(2)}, config, QuantConfig())
    written = json.loads((out / "config.json").read_text())
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    assert (written["rope_theta"], written["rope_scaling"]) == (100000.0, None)
    assert (written["dtype"], written["torch_dtype"]) == ("bfloat16", "bfloat16")
    assert json.loads((out / "quantize_config.json").read_text()) == written["quantization_config"]


def test_pack_rewrites_an_old_config_with_both_spellings(tmp_path, tiny_gptq_checkpoint):
    from gptq_cli.convert import convert_checkpoint

    old = tmp_path / "old"
    shutil.copytree(tiny_gptq_checkpoint.path, old)
    config = json.loads((old / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "torch_dtype"):
        config.pop(key)
    (old / "config.json").write_text(json.dumps(config))
    new = json.loads((convert_checkpoint(old, tmp_path / "new") / "config.json").read_text())
    assert (new["rope_theta"], new["torch_dtype"]) == (
        config["rope_parameters"]["rope_theta"],
        config["dtype"],
    )


def test_existing_keys_and_nested_text_config():
    d = {
        "model_type": "x",
        "dtype": "float16",
        "torch_dtype": "float16",
        "rope_theta": 5.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5.0},
        "text_config": {
            "model_type": "gemma3_text",
            "dtype": "bfloat16",
            "num_hidden_layers": 12,
            "layer_types": ["sliding_attention"] * 5
            + ["full_attention"]
            + ["sliding_attention"] * 5
            + ["full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        },
    }
    before = copy.deepcopy(d)
    out = with_legacy_keys(d)
    assert d == before  # the input is not modified
    assert out["rope_theta"] == 5.0 and out["rope_scaling"] is None
    text = out["text_config"]
    assert (
        text["torch_dtype"],
        text["rope_theta"],
        text["rope_local_base_freq"],
        text["sliding_window_pattern"],
    ) == ("bfloat16", 1e6, 1e4, 6)


def test_gaps_name_what_transformers4_cannot_express():
    gemma3 = variant_config("gemma3", torch.float16).to_dict()
    gemma3["rope_parameters"]["sliding_attention"] = {
        "rope_type": "linear",
        "factor": 2.0,
        "rope_theta": 1e4,
    }
    assert any("sliding" in g for g in transformers4_gaps(gemma3))
    llama = {
        "model_type": "llama",
        "rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4},
    }
    assert any("'proportional'" in g for g in transformers4_gaps(llama))
    gemma2 = {"model_type": "gemma2", "layer_types": ["full_attention", "sliding_attention"]}
    assert any("Gemma2" in g for g in transformers4_gaps(gemma2))
    phi3 = variant_config("phi3", torch.float16).to_dict()
    phi3["rope_parameters"]["attention_factor"] = 1.2
    assert any("attention_factor" in g for g in transformers4_gaps(phi3))
