"""Mixture of experts (SPEC §3): a tiny random Mixtral, whose experts transformers 5 keeps fused, is
quantized expert by expert, streamed from its files, and loaded back with every expert quantized.

The reference is independent of gptq_cli.model.moe: transformers' own fused Mixtral with each
expert's gate_up_proj / down_proj slices set from the dequantized checkpoint tensors."""

from __future__ import annotations

import json

import pytest
import torch

from gptq_cli import api
from gptq_cli.format.bitpack import unpack_qweight, unpack_qzeros
from gptq_cli.format.config import QuantConfig
from gptq_cli.model.loader import load_quantized_model
from gptq_cli.model.modelio import load_streaming, resolve_model
from gptq_cli.model.moe import ExpertMLPs, defuse_experts
from tests.tiny_models import make_tiny_model, random_input_ids, save_tiny_model

NSAMPLES, SEQLEN, EXPERTS = 8, 32, 4


def _set_calibrate_all(model, value: bool) -> None:
    for m in model.modules():
        if isinstance(m, ExpertMLPs):
            m.calibrate_all = value


def test_defused_experts_compute_what_the_fused_ones_do():
    model = make_tiny_model("mixtral")
    ids = random_input_ids(2, 16, seed=0)
    with torch.no_grad():
        fused = model(ids).logits
        assert defuse_experts(model, calibrate_all=True) == 2
        calibrating = model(ids).logits
        _set_calibrate_all(model, False)
        routed = model(ids).logits
    assert torch.equal(fused, routed)
    # every expert on every token: the same products, but each expert's matmul has more rows, and on
    # some CPUs (MKL on an Intel Xeon with AMX) BLAS then picks another kernel: float32 rounding
    # apart (seen 7e-7 of 1.3)
    torch.testing.assert_close(calibrating, fused, rtol=1e-5, atol=1e-5)


def test_an_expert_the_router_never_picks_still_sees_every_token_while_calibrating():
    torch.manual_seed(0)
    experts = make_tiny_model("mixtral").model.layers[0].mlp.experts
    model = torch.nn.Module()
    model.experts = experts
    defuse_experts(model, calibrate_all=True)
    defused = model.experts
    tokens = 10
    x = torch.randn(tokens, 256)
    top_k_index = torch.tensor([[0, 1], [1, 2]] * (tokens // 2))  # expert 3 never chosen
    top_k_weights = torch.full((tokens, 2), 0.5)
    seen = {}
    for e, expert in enumerate(defused):
        expert.gate_proj.register_forward_pre_hook(
            lambda _m, a, e=e: seen.setdefault(e, []).append(a[0].shape[0])
        )
    with torch.no_grad():
        out = defused(x, top_k_index, top_k_weights)
        assert seen == {e: [tokens] for e in range(EXPERTS)}
        seen.clear()
        defused.calibrate_all = False
        assert torch.equal(defused(x, top_k_index, top_k_weights), out)
    assert seen == {0: [5], 1: [10], 2: [5]}  # inference runs only the routed tokens


def _quantize(model_dir, out):
    calib = out.parent / "calib.jsonl"
    calib.write_text(
        "".join(
            json.dumps({"input_ids": r}) + "\n"
            for r in random_input_ids(NSAMPLES, SEQLEN, seed=11).tolist()
        )
    )
    return api.quantize(
        str(model_dir),
        QuantConfig(bits=4, group_size=64, desc_act=True),
        dataset=str(calib),
        nsamples=NSAMPLES,
        seqlen=SEQLEN,
        batch_size=4,
        device="cpu",
        dtype="float32",
        output=out,
    ).output


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    model_dir = save_tiny_model(root / "model", "mixtral", dtype=torch.float16)
    return model_dir, _quantize(model_dir, root / "out")


def test_a_rerun_writes_the_same_bytes(quantized, tmp_path):
    model_dir, out = quantized
    again = _quantize(model_dir, tmp_path / "out")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_the_original_per_expert_files_stream(quantized):
    """The files name experts as the original release did (block_sparse_moe.experts.E.w1/w2/w3):
    still lazy."""
    model_dir, _ = quantized
    sm = load_streaming(resolve_model(str(model_dir)), torch.float32)
    assert sm.source is not None
    assert (
        sm.key_of["model.layers.0.mlp.experts.3.up_proj.weight"]
        == "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    )
    assert (
        sm.key_of["model.layers.1.mlp.gate.weight"] == "model.layers.1.block_sparse_moe.gate.weight"
    )


def test_qwen2_moe_through_the_generic_fallback(tmp_path):
    """Not in the table: the fallback finds the decoder blocks (not the longer list of experts
    inside them), quantizes shared and routed experts, and leaves the 1-output shared_expert_gate
    unquantized."""
    model_dir = save_tiny_model(tmp_path / "model", "qwen2_moe", dtype=torch.float16)
    out = _quantize(model_dir, tmp_path / "out")
    names = [
        m["name"].removeprefix("model.layers.0.")
        for m in json.loads((out / "quant_log.json").read_text())["modules"]
        if m["name"].startswith("model.layers.0.")
    ]
    assert len(names) == 4 + 3 + EXPERTS * 3 and "mlp.shared_expert.down_proj" in names
    assert "mlp.experts.3.up_proj" in names and "mlp.shared_expert_gate" not in names
    model = load_quantized_model(out, dtype=torch.float32)
    assert isinstance(model.model.layers[1].mlp.experts, ExpertMLPs)
    assert model.model.layers[0].mlp.shared_expert_gate.weight.dtype == torch.float32


def test_every_expert_is_quantized_with_every_calibration_token(quantized):
    _, out = quantized
    modules = json.loads((out / "quant_log.json").read_text())["modules"]
    experts = [m for m in modules if ".experts." in m["name"]]
    assert len(experts) == 2 * EXPERTS * 3
    assert all(m["tokens"] == NSAMPLES * SEQLEN and m["loss"] > 0 for m in experts)
    names = {m["name"] for m in modules}
    assert "model.layers.1.mlp.experts.3.down_proj" in names and not any(
        ".mlp.gate" in n for n in names
    )


def test_loaded_moe_checkpoint_matches_the_fused_reference(quantized):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir, out = quantized
    tensors = load_file(out / "model.safetensors")

    def dequantized(name: str) -> torch.Tensor:  # [N, K], plain torch from the file
        codes = unpack_qweight(
            tensors[f"{name}.qweight"], 4, tensors[f"{name}.g_idx"].numel()
        ).float()
        zeros = unpack_qzeros(
            tensors[f"{name}.qzeros"], 4, tensors[f"{name}.scales"].shape[1], "gptq"
        ).float()
        g = tensors[f"{name}.g_idx"].long()
        return (tensors[f"{name}.scales"].float()[g] * (codes - zeros[g])).t()

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).weight.copy_(
                    dequantized(f"model.layers.{i}.self_attn.{proj}")
                )
            experts = layer.mlp.experts
            for e in range(EXPERTS):
                p = f"model.layers.{i}.mlp.experts.{e}"
                experts.gate_up_proj[e] = torch.cat(
                    [dequantized(f"{p}.gate_proj"), dequantized(f"{p}.up_proj")]
                )
                experts.down_proj[e] = dequantized(f"{p}.down_proj")
        ids = random_input_ids(2, 24, seed=3)
        ours = load_quantized_model(out, dtype=torch.float32)(ids).logits
        expected = reference(ids).logits
    assert not any(
        isinstance(m, ExpertMLPs) and m.calibrate_all for m in load_quantized_model(out).modules()
    )
    assert torch.nn.functional.cosine_similarity(ours.flatten(), expected.flatten(), dim=0) > 0.9999
