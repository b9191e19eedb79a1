"""Where a checkpoint will load (format/compat.py): each rule fires on the fact it is about and
only for its loaders; `gptq inspect --json` carries the verdicts; `gptq quantize` ends with the
one-line verdict. The facts behind the rules were checked against the loaders themselves where we
can run them: scripts/check_autogptq.sh (bench/interop_autogptq.json) for AutoGPTQ 0.7.1 and
transformers 4.49 + optimum."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptq_cli.cli import app
from gptq_cli.format.compat import (
    AUTOGPTQ,
    EXLLAMA,
    EXLLAMAV2,
    GPTQMODEL,
    LOADERS,
    RULES,
    TF4,
    TF5,
    VLLM_CPU,
    VLLM_CUDA,
    Facts,
    read_facts,
    summary_line,
    verdicts,
)
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.hf_config import with_legacy_keys
from tests.tiny_models import random_input_ids, save_tiny_model

LLAMA_CONFIG = with_legacy_keys(
    {
        "model_type": "llama",
        "dtype": "float16",
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    }
)
GOOD = Facts(
    bits=4,
    group_size=128,
    desc_act=False,
    sym=True,
    checkpoint_format="gptq",
    model_type="llama",
    config=LLAMA_CONFIG,
    shapes={
        "model.layers.0.mlp.down_proj": (768, 256),
        **{f"model.layers.0.self_attn.{p}_proj": (256, 256) for p in "qkv"},
    },
    tied_head_missing=False,
)


def loads(facts: Facts) -> dict[str, bool]:
    return {v.loader: v.loads for v in verdicts(facts)}


def refused_by(facts: Facts) -> set[str]:
    return {loader for loader, ok in loads(facts).items() if not ok}


def test_every_rule_names_known_loaders_and_a_source():
    for rule in RULES:
        assert rule.loaders and set(rule.loaders) <= set(LOADERS), rule.source
        assert rule.source.strip() and rule.severity in ("fails", "caveat")


def test_a_plain_4bit_llama_loads_everywhere():
    assert all(loads(GOOD).values())
    assert all(v.reasons == [] for v in verdicts(GOOD))


def test_k_not_multiple_of_group_smollm2_shape():
    smol = replace(GOOD, shapes={"model.layers.0.self_attn.q_proj": (576, 576)})
    assert refused_by(smol) == {AUTOGPTQ, TF4, VLLM_CUDA, VLLM_CPU, EXLLAMA}
    reason = next(v for v in verdicts(smol) if v.loader == AUTOGPTQ).reasons[0]
    assert "576" in reason["reason"] and "qlinear_cuda_old" in reason["source"]
    # act-order takes AutoGPTQ to its g_idx kernel, which reads the same tensors; vLLM still refuses
    assert refused_by(replace(smol, desc_act=True)) == {VLLM_CUDA, VLLM_CPU, EXLLAMA}


def test_tied_head_without_lm_head_weight():
    assert refused_by(replace(GOOD, tied_head_missing=True)) == {AUTOGPTQ, EXLLAMA}


def test_asymmetric_v2():
    asym = replace(GOOD, sym=False, checkpoint_format="gptq_v2")
    assert refused_by(asym) == {AUTOGPTQ, TF4, VLLM_CUDA, VLLM_CPU, EXLLAMA}
    # asym stored v1: a caveat everywhere
    v1 = {v.loader: v for v in verdicts(replace(GOOD, sym=False))}
    assert all(
        any("zero of 0" in r["reason"] and r["severity"] == "caveat" for r in v.reasons)
        for v in v1.values()
    )


def test_config_without_legacy_keys_fails_transformers4_readers():
    bare = replace(
        GOOD,
        config={k: v for k, v in LLAMA_CONFIG.items() if k not in ("rope_theta", "torch_dtype")},
    )
    assert refused_by(bare) == {AUTOGPTQ, TF4, EXLLAMA}
    reason = next(v for v in verdicts(bare) if v.loader == TF4).reasons[0]["reason"]
    assert "rope_theta" in reason and "torch_dtype" in reason


@pytest.mark.parametrize(
    "change,refused",
    [
        (dict(bits=3), {VLLM_CUDA, VLLM_CPU, EXLLAMA, EXLLAMAV2}),
        (dict(bits=8), {VLLM_CPU, EXLLAMA, EXLLAMAV2}),  # vLLM's CPU kernel takes 4-bit only
        # K = 256, 768: no multiple
        (dict(group_size=512), {VLLM_CUDA, VLLM_CPU, EXLLAMA, AUTOGPTQ, TF4}),
        # vLLM 0.32: act-order with groups refused
        (dict(desc_act=True), {VLLM_CUDA, VLLM_CPU}),
        # per channel: act-order is a no-op there
        (dict(desc_act=True, group_size=-1), set()),
        (dict(dtype="float32"), {VLLM_CUDA, VLLM_CPU}),
        (dict(group_size=-1, shapes={"m.o_proj": (200, 256)}), {VLLM_CPU}),  # CPUWNA16: K % 32
        (dict(group_size=-1, shapes={"m.down_proj": (256, 200)}), {VLLM_CPU}),  # CPUWNA16: N % 32
        (
            dict(shapes={"m.q_proj": (256, 256)}),
            {VLLM_CUDA, VLLM_CPU},
        ),  # k_proj, v_proj not quantized
        (dict(dynamic=True), {AUTOGPTQ, TF4, EXLLAMA, EXLLAMAV2, TF5}),  # TF5: measured in issue 20
        (dict(model_type="qwen3"), {AUTOGPTQ, TF4, EXLLAMA}),
        (dict(model_type="gpt2"), {TF5, EXLLAMA}),
    ],
)
def test_rules_fire_for_their_loaders_only(change, refused):
    assert refused_by(replace(GOOD, **change)) == refused


def test_summary_line_groups_loaders_by_reason():
    line = summary_line(verdicts(replace(GOOD, shapes={"m": (576, 576)}, model_type="qwen2")))
    assert (
        line.startswith(f"loads in: {TF5}, {GPTQMODEL}, {EXLLAMAV2}; not in: ") and "\n" not in line
    )
    assert f"{AUTOGPTQ}, {TF4} (m has in_features 576" in line
    assert f"{VLLM_CUDA}, {VLLM_CPU} (m (4-bit, group 128, in_features 576" in line
    assert f"{EXLLAMA} (architecture 'qwen2'" in line


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    """A tiny Llama with tied embeddings quantized by the CLI, with its stderr."""
    root = tmp_path_factory.mktemp("compat")
    src = save_tiny_model(root / "llama", "llama", num_hidden_layers=1, tie_word_embeddings=True)
    calib = root / "calib.jsonl"
    calib.write_text(
        "".join(
            json.dumps({"input_ids": r}) + "\n" for r in random_input_ids(4, 32, seed=3).tolist()
        )
    )
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            str(src),
            "--dataset",
            str(calib),
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "-o",
            str(root / "q"),
        ],
    )
    assert result.exit_code == 0, result.output
    return root / "q", result.stderr


def test_quantize_ends_with_the_verdict_line(tied_checkpoint):
    _, stderr = tied_checkpoint
    line = next(
        line for line in stderr.splitlines() if line.strip().startswith("loaders  loads in: ")
    )
    assert (
        f"not in: {AUTOGPTQ} (tied embeddings without lm_head.weight" in line
        and f"{EXLLAMA} (tied" in line
    )


def test_inspect_json_carries_the_verdicts(tied_checkpoint):
    path, _ = tied_checkpoint
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    found = {v["loader"]: v for v in json.loads(result.stdout)["loaders"]}
    assert list(found) == list(LOADERS)
    assert not found[AUTOGPTQ]["loads"] and found[GPTQMODEL]["loads"] and found[VLLM_CPU]["loads"]
    assert all(r["source"] for v in found.values() for r in v["reasons"])
    human = CliRunner().invoke(app, ["inspect", str(path)])
    assert "where it loads" in human.stderr and "lm_head.weight" in human.stderr


def mixed(rules: dict) -> Facts:
    shapes = {
        f"model.layers.0.{m}": (256, 256)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        )
    }
    return replace(GOOD, shapes=shapes, dynamic=True, rules=rules)


def test_vllm_reads_per_module_rules_by_fused_names():
    """vLLM builds q/k/v as qkv_proj and gate/up as gate_up_proj and matches the dynamic rules on
    those names: a rule on one part is never seen, and the part is built at the top-level
    setting."""
    own = mixed({r"+:^model\.layers\.0\.self_attn\.o_proj$": {"bits": 8, "group_size": 64}})
    assert not {VLLM_CUDA} & refused_by(own)
    part = mixed({r"+:^model\.layers\.0\.self_attn\.q_proj$": {"bits": 8, "group_size": 128}})
    assert {VLLM_CUDA, VLLM_CPU} <= refused_by(part)
    reason = next(v for v in verdicts(part) if v.loader == VLLM_CUDA).reasons[0]["reason"]
    assert (
        "q_proj is stored at 8-bit group 128, but vLLM builds model.layers.0.self_attn.qkv_proj "
        "at 4-bit"
    ) in reason
    # a rule that names the fused layer too reaches every part
    fused = mixed(
        {r"+:^model\.layers\.0\.self_attn\.(q|k|v|qkv)_proj$": {"bits": 8, "group_size": 64}}
    )
    assert VLLM_CUDA not in refused_by(fused) and VLLM_CPU in refused_by(fused)  # CPU: 4-bit only
    skipped = replace(
        mixed({r"-:^model\.layers\.0\.mlp\.up_proj$": {}}),
        shapes={n: s for n, s in own.shapes.items() if not n.endswith("up_proj")},
    )
    # gate_proj quantized, up_proj not: one fused layer
    assert {VLLM_CUDA, VLLM_CPU} <= refused_by(skipped)


def test_static_groups_act_order_is_written_as_desc_act_false_and_read_back():
    """g_idx is k // group_size with static groups: the file says desc_act false (vLLM 0.32
    serves it) and keeps the solving order in meta; reading it back gives the same settings."""
    quant = QuantConfig(bits=4, group_size=64, desc_act=True, static_groups=True)
    d = quant.to_hf_dict()
    assert d["desc_act"] is False and d["meta"]["act_order"] is True
    assert (
        QuantConfig.from_hf_dict(d).desc_act is True
        and QuantConfig.from_hf_dict(d).static_groups is True
    )
    assert QuantConfig(desc_act=True).to_hf_dict()["desc_act"] is True
    facts = read_facts(QuantConfig.from_hf_dict(d), {"m": (256, 256)}, LLAMA_CONFIG, d, True)
    assert facts.desc_act is False and not refused_by(facts)


INTEROP_VLLM = Path(__file__).parent.parent / "bench" / "interop_vllm.json"


def test_every_vllm_verdict_agrees_with_what_vllm_did():
    """bench/interop_vllm.json (scripts/check_vllm.sh): what vLLM 0.32's CPU build did with each
    checkpoint, and the facts inspect judges from. Today's rules must predict every load and
    every refusal."""
    doc = json.loads(INTEROP_VLLM.read_text())
    assert doc["vllm"].startswith("0.32") and len(doc["checkpoints"]) >= 8
    for row in doc["checkpoints"]:
        f = row["facts"]
        qdict = f["quantization_config"]
        facts = read_facts(
            QuantConfig.from_hf_dict(qdict),
            {k: tuple(v) for k, v in f["shapes"].items()},
            f["config"],
            qdict,
            f["has_lm_head"],
        )
        verdict = next(v for v in verdicts(facts) if v.loader == VLLM_CPU)
        assert verdict.loads == row["vllm"]["loaded"], (
            row["checkpoint"],
            verdict.reasons,
            row["vllm"],
        )
        if row["vllm"]["loaded"]:  # and it serves the same model
            assert row["compare"]["tokens_agree"] >= 0.75 * row["compare"]["tokens"], row
            assert row["compare"]["max_abs_logprob_diff_on_prefix"] < 0.1, row
