"""GPTAQ (Li et al. 2025, asymmetric calibration) in the solver: the blocked solver against the
column-by-column reference (reference_gptq.py with dXXT), no asymmetry = plain GPTQ's bits, and
the objective it is for."""

from __future__ import annotations

import math

import pytest
import torch

from gptq_cli.quantization.gptaq import least_squares_target
from gptq_cli.quantization.solver import quantize_weight
from tests.test_solver import assert_matches_reference, one_thread  # noqa: F401 (an autouse fixture: one thread)


def asymmetric_problem(N: int, K: int, seed: int, tokens: int = 1024, drift: float = 0.15):
    """Weights, H = 2/n X̃ᵀX̃ of the quantized model's inputs X̃ [n, K], GPTAQ's dXXT = 2/n ΔXᵀX̃
    with ΔX = X − X̃ (X: the full-precision model's inputs, X̃ plus a correlated drift), and X,
    X̃ themselves."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=gen) / math.sqrt(K) + torch.eye(K)
    X = (torch.randn(tokens, K, generator=gen) @ mix) * (0.2 + 3 * torch.rand(K, generator=gen))
    noise = torch.randn(tokens, K, generator=gen) @ (
        torch.randn(K, K, generator=gen) / math.sqrt(K)
    )
    X_q = X + drift * X.std() * noise
    W = torch.randn(N, K, generator=gen) * 0.05
    return W, 2 / tokens * X_q.t() @ X_q, 2 / tokens * (X - X_q).t() @ X_q, X, X_q


@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 4, "group_size": 32, "sym": True},
        {"bits": 3, "group_size": 128, "sym": False, "block_size": 32},
        {"bits": 4, "group_size": -1, "sym": True, "desc_act": True, "block_size": 48},
        {"bits": 4, "group_size": 32, "sym": True, "act_group_aware": True, "block_size": 64},
        {"bits": 2, "group_size": 64, "sym": False, "desc_act": True, "static_groups": True},
    ],
    ids=["4g32", "3g128-asym-b32", "4-perchannel-act-b48", "4g32-gar-b64", "2g64-static-act"],
)
def test_blocked_gptaq_matches_column_by_column_reference(settings: dict) -> None:
    """The lazy blocks carry each column's asymmetry term with the value it was quantized from,
    as the column-by-column update does (the authors' code uses the quantized values across
    blocks instead)."""
    W, H, dXXT, _, _ = asymmetric_problem(N=64, K=200, seed=11)
    assert_matches_reference(W, H, dXXT=dXXT, alpha=0.5, **settings)


def test_no_asymmetry_is_plain_gptq() -> None:
    W, H, dXXT, _, _ = asymmetric_problem(N=48, K=160, seed=2)
    plain = quantize_weight(W, H, group_size=32, act_group_aware=True)
    zero = quantize_weight(W, H, group_size=32, act_group_aware=True, dXXT=torch.zeros_like(dXXT))
    for field in ("codes", "scales", "zeros", "g_idx", "row_loss"):
        assert torch.equal(getattr(plain, field), getattr(zero, field)), field


def test_dead_inputs_carry_no_asymmetry() -> None:
    """An input that is always 0 for the quantized model has its weights zeroed; its row of dXXT
    moves nothing (its w is 0) and its column is ignored, whatever it holds."""
    W, H, dXXT, _, _ = asymmetric_problem(N=32, K=96, seed=4)
    H[5, :], H[:, 5] = 0, 0
    noisy = dXXT.clone()
    noisy[:, 5] = 1e3
    a = quantize_weight(W, H, group_size=32, dXXT=dXXT.index_fill(1, torch.tensor([5]), 0))
    b = quantize_weight(W, H, group_size=32, dXXT=noisy)
    assert torch.equal(a.codes, b.codes) and bool((a.dequantize()[:, 5] == 0).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptaq_lowers_the_full_precision_target_error(seed: int) -> None:
    """What GPTAQ is for: ‖Q X̃ᵀ − W Xᵀ‖ (the quantized layer on its inputs against the
    full-precision layer on full-precision ones) below plain GPTQ's, which aims at W X̃ᵀ."""
    W, H, dXXT, X, X_q = asymmetric_problem(N=64, K=128, seed=seed)
    target = W @ X.t()

    def error(qw) -> float:
        return float((qw.dequantize() @ X_q.t() - target).square().sum())

    gptq = error(quantize_weight(W, H, bits=3, group_size=32))
    gptaq = error(quantize_weight(W, H, bits=3, group_size=32, dXXT=dXXT, alpha=1.0))
    assert gptaq < 0.99 * gptq, (gptaq, gptq)


def test_least_squares_target_aims_at_the_full_precision_output() -> None:
    """gptaq-ls: W' minimises ‖W' X̃ᵀ − W Xᵀ‖ (no asymmetry: W' = W), and GPTQ run on it lands
    nearer the full-precision output than GPTAQ's update does (bench/gptaq_synthetic.json has the
    spread)."""
    W, H, dXXT, X, X_q = asymmetric_problem(N=64, K=128, seed=5)
    torch.testing.assert_close(
        least_squares_target(W, H, torch.zeros_like(dXXT), 1.0, 0.01), W, rtol=0, atol=0
    )
    target = W @ X.t()
    W_ls = least_squares_target(W, H, dXXT, 1.0, 0.0)
    grad = (W_ls @ X_q.t() - target) @ X_q  # zero at the least-squares fit, up to float32 rounding
    assert grad.abs().max() < 1e-3 * (target @ X_q).abs().max()

    def error(Q: torch.Tensor) -> float:
        return float((Q @ X_q.t() - target).square().sum())

    gptaq = error(quantize_weight(W, H, bits=3, group_size=32, dXXT=dXXT, alpha=1.0).dequantize())
    gptaq_ls = error(
        quantize_weight(
            least_squares_target(W, H, dXXT, 1.0, 0.01), H, bits=3, group_size=32
        ).dequantize()
    )
    assert gptaq_ls < gptaq, (gptaq_ls, gptaq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulated_cross_term_is_the_float64_one_up_to_float32_rounding(dtype) -> None:
    """accumulate_cross over batches of unequal size, then cross_term(C, H): ΔX X̃ᵀ = 2/n Σ (x_fp
    − x) xᵀ of all tokens as float64 computes it from the same (16-bit) inputs, up to the float32
    summation rounding of the two sums C and H it is the difference of: bounded by 1e-6 of H's
    largest entry (measured 1.3-3.8e-7; H's entries are ~130x D's here, so relative to D that is
    ~5e-5). The same inputs in both streams give exactly 0."""
    from gptq_cli.quantization.gptaq import accumulate_cross, cross_term
    from gptq_cli.quantization.solver import accumulate_hessian, complete_hessian

    _, _, _, X, X_q = asymmetric_problem(N=8, K=96, seed=9, tokens=1500, drift=0.1)
    X, X_q = X.to(dtype), X_q.to(dtype)
    C, H, n = None, None, 0
    for lo, hi in ((0, 700), (700, 1100), (1100, 1500)):
        C = accumulate_cross(C, n, X[lo:hi], X_q[lo:hi])
        H, n = accumulate_hessian(H, n, X_q[lo:hi])
    H = complete_hessian(H)
    D = cross_term(C, H.clone())
    expected = 2 / n * (X.double() - X_q.double()).t() @ X_q.double()
    assert ((D.double() - expected).abs().max() / H.abs().max()).item() < 1e-6
    C, H, n = accumulate_cross(None, 0, X_q, X_q), *accumulate_hessian(None, 0, X_q)
    assert torch.equal(cross_term(C, complete_hessian(H), asymmetric=False), torch.zeros(96, 96))


# --- the engine: full-precision stream, ΔX X̃ᵀ per Hessian, against a naive run of whole models
# -----------------


@pytest.mark.parametrize("method", ["gptaq", "gptaq-ls"])
def test_engine_gptaq_matches_a_naive_two_model_reference(tmp_path, method):
    """Block by block and group by group, the engine's GPTAQ solves equal a naive reference that
    runs two whole models on every batch: the untouched full-precision model for X, and a copy
    holding the quantized weights so far for X̃. Same Hessians, same ΔX X̃ᵀ, same solves: the
    same packed tensors."""
    from transformers import AutoModelForCausalLM

    from gptq_cli.format.config import QuantConfig
    from gptq_cli.model.arch import block_linears, linear_weight, resolve_arch, set_linear_weight
    from gptq_cli.model.modelio import load_streaming, resolve_model
    from gptq_cli.quantization.activation_pool import BufferPool
    from gptq_cli.quantization.calibration import Calibration
    from gptq_cli.quantization.engine import capture_inputs, quantize_decoder_block, solve_weight
    from gptq_cli.quantization.gptaq import accumulate_cross, cross_term
    from gptq_cli.quantization.solver import accumulate_hessian, complete_hessian
    from tests.tiny_models import random_input_ids, save_tiny_model

    torch.set_num_threads(1)
    model_dir = save_tiny_model(tmp_path / "model", "llama", dtype=torch.float32)
    batches = [random_input_ids(4, 32, seed=s) for s in (1, 2)]
    quant = QuantConfig(bits=3, group_size=32, meta={"method": method, "gptaq_alpha": 0.5})
    cpu = torch.device("cpu")

    sm = load_streaming(resolve_model(str(model_dir)), torch.float32)
    layers_path, arch = resolve_arch(sm.model)
    calib = capture_inputs(sm, layers_path, batches, cpu, torch.float32, BufferPool())
    fp = Calibration([calib.keep(h) for h in calib.hidden], calib.kwargs, calib.pool)
    n_blocks = len(sm.model.get_submodule(layers_path))
    engine = {
        r.name: r.tensors
        for i in range(n_blocks)
        for r in quantize_decoder_block(
            sm, layers_path, i, arch, calib, quant, cpu, torch.float32, fp=fp
        )
    }

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    quantized = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    groups = [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]

    def inputs_of(model, name: str) -> list[torch.Tensor]:
        seen = []
        handle = model.get_submodule(name).register_forward_pre_hook(
            lambda _m, a: seen.append(a[0].clone())
        )
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
        handle.remove()
        return seen

    checked = 0
    for i in range(n_blocks):
        prefix = f"{layers_path}.{i}."
        linears = block_linears(quantized.get_submodule(layers_path)[i])
        for group in groups:
            X_fp, X_q = inputs_of(full, prefix + group[0]), inputs_of(quantized, prefix + group[0])
            H, D, n = None, None, 0
            for x_fp, x in zip(X_fp, X_q):
                D = accumulate_cross(D, n, x_fp, x)
                H, n = accumulate_hessian(H, n, x)
            H = complete_hessian(H)
            D = cross_term(D, H, any(not torch.equal(a, b) for a, b in zip(X_fp, X_q)))
            W = torch.cat([linear_weight(linears[g]) for g in group])
            qw = solve_weight(W, H, quant, quant.bits, quant.group_size, D)
            for g, part in zip(
                group, qw.split_rows([linear_weight(linears[g]).shape[0] for g in group])
            ):
                set_linear_weight(linears[g], part.dequantize(torch.float32))
                for key, t in part.to_tensors(quant.checkpoint_format).items():
                    assert torch.equal(engine[prefix + g][key], t), (prefix + g, key)
                checked += 1
            if i == 0 and group == groups[0]:  # block 0's first inputs are the same in both models
                assert D.abs().max() == 0
            elif group == groups[-1]:
                assert D.abs().max() > 0
    assert checked == n_blocks * 7


def test_quantize_gptaq_end_to_end(tmp_path):
    """`quantize(method="gptaq")`: recorded in quantization_config's meta, a different model than
    GPTQ's, the same bytes twice; a bad method or alpha is a usage error before any work."""
    import json

    from gptq_cli import api
    from gptq_cli.errors import UsageError
    from gptq_cli.format.config import QuantConfig
    from tests.tiny_models import random_input_ids, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", "llama", dtype=torch.float16)
    calib = tmp_path / "calib.jsonl"
    calib.write_text(
        "".join(
            json.dumps({"input_ids": r}) + "\n" for r in random_input_ids(8, 32, seed=5).tolist()
        )
    )

    def run(out, **kw):
        return api.quantize(
            str(model_dir),
            QuantConfig(bits=3, group_size=32),
            dataset=str(calib),
            nsamples=8,
            seqlen=32,
            batch_size=4,
            device="cpu",
            dtype="float32",
            output=tmp_path / out,
            **kw,
        )

    gptaq = run("a", method="gptaq")
    run("b", method="gptaq")
    run("c")
    meta = json.loads((gptaq.output / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["method"] == "gptaq" and meta["gptaq_alpha"] == 0.25
    data = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert data["a"] == data["b"] and data["a"] != data["c"]
    for bad in ({"method": "awq"}, {"method": "gptaq", "gptaq_alpha": 0.0}):
        with pytest.raises(UsageError):
            run("bad", **bad)
        assert not (tmp_path / "bad").exists()


def test_gptaq_resumed_run_writes_the_same_bytes(tmp_path):
    """An interrupted GPTAQ run continues from its work dir: the finished blocks advance both
    streams (the full-precision one through the blocks' own weights) and the result is byte for
    byte the uninterrupted one."""
    import json

    from gptq_cli import api
    from gptq_cli.errors import Interrupted
    from gptq_cli.format.config import QuantConfig
    from tests.tiny_models import random_input_ids, save_tiny_model

    model_dir = save_tiny_model(
        tmp_path / "model", "llama", dtype=torch.float16, num_hidden_layers=3
    )
    calib = tmp_path / "calib.jsonl"
    calib.write_text(
        "".join(
            json.dumps({"input_ids": r}) + "\n" for r in random_input_ids(8, 32, seed=6).tolist()
        )
    )

    def run(out, progress=None):
        return api.quantize(
            str(model_dir),
            QuantConfig(bits=3, group_size=32),
            dataset=str(calib),
            nsamples=8,
            seqlen=32,
            batch_size=4,
            device="cpu",
            dtype="float32",
            output=tmp_path / out,
            method="gptaq",
            progress=progress,
        )

    def stop_after_two(kind, *args):
        if kind == "block" and args[0] == 2:
            raise KeyboardInterrupt

    whole = run("whole")
    with pytest.raises(Interrupted):
        run("resumed", stop_after_two)
    assert (tmp_path / "resumed.work").exists() and not (tmp_path / "resumed").exists()
    events = []
    resumed = run("resumed", lambda kind, *args: events.append((kind, *args)))
    assert ("resume", 2, 3, tmp_path / "resumed.work") in [e[:4] for e in events]
    assert (whole.output / "model.safetensors").read_bytes() == (
        resumed.output / "model.safetensors"
    ).read_bytes()


def test_target_bits_with_gptaq_solves_the_same_allocation_with_gptaq(tmp_path):
    """`--target-bits` with `--method gptaq-ls`: the allocation comes from the same measurement
    (full-precision Hessians, where GPTAQ's asymmetry is zero, so the method does not change it);
    the real run then solves every linear, at its own bits and group size, with GPTAQ. Same
    modules' settings as GPTQ's mixed run, other weights, the method in the meta, the same bytes
    twice; with no --method, gptaq-ls at MIXED_ALPHA."""
    import json

    from gptq_cli import api
    from gptq_cli.format.config import QuantConfig
    from gptq_cli.inspection import inspect_checkpoint
    from gptq_cli.settings import MIXED_ALPHA
    from tests.tiny_models import random_input_ids, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", "llama", dtype=torch.float16)
    calib = tmp_path / "calib.jsonl"
    calib.write_text(
        "".join(
            json.dumps({"input_ids": r}) + "\n" for r in random_input_ids(8, 32, seed=7).tolist()
        )
    )

    def run(out, **kw):
        return api.quantize(
            str(model_dir),
            QuantConfig(),
            dataset=str(calib),
            nsamples=8,
            seqlen=32,
            batch_size=4,
            device="cpu",
            dtype="float32",
            output=tmp_path / out,
            target_bits=3.5,
            **kw,
        )

    gptq = run("gptq", method="gptq")
    measured = gptq.output / "measurements.json"
    # the default method with --target-bits: gptaq-ls at MIXED_ALPHA
    ls = run("ls", measurements=measured)
    again = run(
        "again", method="gptaq-ls", gptaq_alpha=MIXED_ALPHA["gptaq-ls"], measurements=measured
    )
    settings = [
        {m.name: (m.bits, m.group_size) for m in inspect_checkpoint(r.output).modules}
        for r in (gptq, ls)
    ]
    # mixed, and the same mix
    assert settings[0] == settings[1] and len({s for s in settings[0].values()}) > 1
    meta = json.loads((ls.output / "config.json").read_text())["quantization_config"]["meta"]
    assert (
        meta["method"] == "gptaq-ls" and meta["gptaq_alpha"] == 0.5 and meta["target_bits"] == 3.5
    )
    data = [(r.output / "model.safetensors").read_bytes() for r in (gptq, ls, again)]
    assert data[1] == data[2] and data[1] != data[0]


def test_full_precision_stream_runs_attention_and_mlp_twice_per_batch(tmp_path, monkeypatch):
    """The full-precision stream's shortcuts (fp_stream.py): per block and batch it runs
    attention for q/k/v's and o_proj's inputs and the MLP for gate/up's and down_proj's; the
    later groups and its advance take the recorded outputs. Counted as the real forwards GPTAQ
    calls beyond GPTQ's (without the shortcuts: 5 and 3)."""
    from transformers.models.llama import modeling_llama

    from gptq_cli.format.config import QuantConfig
    from gptq_cli.model.arch import resolve_arch
    from gptq_cli.model.modelio import load_streaming, resolve_model
    from gptq_cli.quantization.activation_pool import BufferPool
    from gptq_cli.quantization.calibration import Calibration
    from gptq_cli.quantization.engine import capture_inputs, quantize_decoder_block
    from tests.tiny_models import random_input_ids, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", "llama", dtype=torch.float32)
    batches = [random_input_ids(2, 16, seed=s) for s in (1, 2, 3)]
    counts = {"attention": 0, "mlp": 0}
    for cls, key in (
        (modeling_llama.LlamaAttention, "attention"),
        (modeling_llama.LlamaMLP, "mlp"),
    ):

        def counted(self, *args, _real=cls.forward, _key=key, **kwargs):
            counts[_key] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)

    def real_forwards(method: str) -> dict[str, int]:
        counts.update(attention=0, mlp=0)
        sm = load_streaming(resolve_model(str(model_dir)), torch.float32)
        layers_path, arch = resolve_arch(sm.model)
        cpu = torch.device("cpu")
        calib = capture_inputs(sm, layers_path, batches, cpu, torch.float32, BufferPool())
        fp = (
            Calibration([calib.keep(h) for h in calib.hidden], calib.kwargs, calib.pool)
            if method != "gptq"
            else None
        )
        quant = QuantConfig(bits=4, group_size=32, meta={"method": method})
        for i in range(len(sm.model.get_submodule(layers_path))):
            quantize_decoder_block(
                sm, layers_path, i, arch, calib, quant, cpu, torch.float32, fp=fp
            )
        return dict(counts)

    gptq, gptaq = real_forwards("gptq"), real_forwards("gptaq")
    blocks_times_batches = 2 * len(batches)
    assert gptaq["attention"] - gptq["attention"] == 2 * blocks_times_batches
    assert gptaq["mlp"] - gptq["mlp"] == 2 * blocks_times_batches
