"""End-to-end `quantize` on tiny random models of every registered architecture (issue 3).

Each quantized checkpoint is loaded back and compared with an independent reference: the original
model with every quantized linear's weight replaced by the dequantization of the
codes/scales/zeros/g_idx read from the checkpoint file (plain torch, no QuantLinear)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from gptq_cli import api, export
from gptq_cli.format.bitpack import unpack_qweight, unpack_qzeros
from gptq_cli.format.config import QuantConfig
from gptq_cli.model.arch import (
    QUANTIZABLE,
    block_linears,
    linear_weight,
    resolve_arch,
    set_linear_weight,
)
from gptq_cli.model.loader import load_quantized_model
from gptq_cli.model.modelio import load_streaming, resolve_model
from gptq_cli.quantization.calibration import collect_hessians
from gptq_cli.quantization.engine import capture_inputs
from gptq_cli.quantization.quantizer import quantize_rtn
from gptq_cli.quantization.solver import (
    accumulate_hessian,
    complete_hessian,
    quantize_weight,
)
from tests.reference_gptq import quantization_loss
from tests.tiny_models import make_tiny_model, random_input_ids, save_tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "opt", "gpt2"]
NSAMPLES, SEQLEN = 8, 32


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    rows = random_input_ids(NSAMPLES, SEQLEN, seed=11).tolist()
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return path


def run_quantize(model_dir, out, calib_file, **quant):
    return api.quantize(
        str(model_dir),
        QuantConfig(**quant),
        dataset=str(calib_file),
        nsamples=NSAMPLES,
        seqlen=SEQLEN,
        batch_size=4,
        device="cpu",
        dtype="float32",
        output=out,
    )


def reference_from_file(model_dir, ckpt):
    """The float model with each quantized linear's weight set from the checkpoint's tensors, by
    hand."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tensors = {}
    for f in ckpt.glob("*.safetensors"):
        tensors.update(load_file(f))
    cfg = json.loads((ckpt / "quantize_config.json").read_text())
    bits, fmt = cfg["bits"], cfg["checkpoint_format"]
    count = 0
    for name, module in model.named_modules():
        if f"{name}.qweight" not in tensors:
            continue
        n, k = linear_weight(module).shape
        codes = unpack_qweight(tensors[f"{name}.qweight"], bits, k).float()  # [K, N]
        zeros = unpack_qzeros(tensors[f"{name}.qzeros"], bits, n, fmt).float()  # [G, N]
        g = tensors[f"{name}.g_idx"].long()
        w = tensors[f"{name}.scales"].float()[g] * (codes - zeros[g])  # [K, N]
        set_linear_weight(module, w.t())  # [N, K]
        count += 1
    assert count > 0
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_checkpoint_matches_reference(arch, tmp_path, calib_file):
    model_dir = save_tiny_model(tmp_path / "model", arch, dtype=torch.float16)
    result = run_quantize(model_dir, tmp_path / "out", calib_file, bits=4, group_size=64)
    ours = load_quantized_model(result.output, dtype=torch.float32)
    ref = reference_from_file(model_dir, result.output)
    ids = random_input_ids(2, 24, seed=3)
    with torch.no_grad():
        a, b = ours(ids).logits.flatten(), ref(ids).logits.flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9999
    # every linear of every block is quantized, nothing else is
    n_blocks = len(make_tiny_model(arch).get_submodule(resolve_arch(make_tiny_model(arch))[0]))
    log = json.loads((result.output / "quant_log.json").read_text())
    per_block = len(
        block_linears(
            make_tiny_model(arch).get_submodule(resolve_arch(make_tiny_model(arch))[0])[0]
        )
    )
    assert len(log["modules"]) == n_blocks * per_block
    assert all(m["loss"] >= 0 and m["tokens"] == NSAMPLES * SEQLEN for m in log["modules"])
    assert not any("lm_head" in m["name"] or "embed" in m["name"] for m in log["modules"])


def test_gptq_loss_below_rtn_on_same_calibration(tmp_path, calib_file):
    """On block 0's real calibration Hessians, GPTQ's proxy loss beats round-to-nearest for every
    linear."""
    model_dir = save_tiny_model(tmp_path / "model", "llama", dtype=torch.float32)
    sm = load_streaming(resolve_model(str(model_dir)), torch.float32)
    layers_path, _ = resolve_arch(sm.model)
    batches = [random_input_ids(4, SEQLEN, seed=s) for s in (1, 2)]
    calib = capture_inputs(sm, layers_path, batches, torch.device("cpu"), torch.float32)
    block = sm.model.get_submodule(layers_path)[0]
    sm.materialize(f"{layers_path}.0.", torch.device("cpu"), torch.float32)
    linears = block_linears(block)
    checked = 0
    passes = [lambda x=x, kw=kw: block(x, **kw) for x, kw in zip(calib.hidden, calib.kwargs)]
    for names, H, _ in collect_hessians(linears, passes)[0]:
        for name in names:
            W = linear_weight(linears[name]).float()
            for bits in (3, 4):
                gptq = quantize_weight(W, H, bits=bits, group_size=64)
                rtn = quantize_rtn(W, bits=bits, group_size=64, sym=True)
                assert quantization_loss(W, H, gptq) < quantization_loss(W, H, rtn), (name, bits)
                checked += 1
    assert checked == 2 * len(linears)


def test_collect_hessians_stops_at_first_of_shared_input(tmp_path):
    """q/k/v (and gate/up) read one tensor: once the first pass has shown that, later passes stop
    at q, so q and k run in the first pass only, and the Hessians are exactly those of each
    module's own inputs."""
    model_dir = save_tiny_model(tmp_path / "model", "llama", dtype=torch.float32)
    sm = load_streaming(resolve_model(str(model_dir)), torch.float32)
    layers_path, _ = resolve_arch(sm.model)
    batches = [random_input_ids(2, SEQLEN, seed=s) for s in (1, 2, 3)]
    calib = capture_inputs(sm, layers_path, batches, torch.device("cpu"), torch.float32)
    block = sm.model.get_submodule(layers_path)[0]
    sm.materialize(f"{layers_path}.0.", torch.device("cpu"), torch.float32)
    linears = block_linears(block)
    passes = [lambda x=x, kw=kw: block(x, **kw) for x, kw in zip(calib.hidden, calib.kwargs)]
    for group in (
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
    ):
        inputs: dict[str, list[torch.Tensor]] = {n: [] for n in group}
        handles = [
            linears[n].register_forward_pre_hook(lambda _m, a, n=n: inputs[n].append(a[0]))
            for n in group
        ]
        for run_pass in passes:
            run_pass()
        for h in handles:
            h.remove()
        calls = {n: 0 for n in group}
        handles = [
            linears[n].register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
            for n in group
        ]
        hessians, _ = collect_hessians({n: linears[n] for n in group}, passes)
        for h in handles:
            h.remove()
        # the first pass only, cut at the last
        assert calls == {n: int(n != group[-1]) for n in group}, calls
        [(names, H, n)] = hessians
        assert names == group and n == 3 * 2 * SEQLEN
        for name in group:
            ref = (None, 0)
            for x in inputs[name]:
                ref = accumulate_hessian(*ref, x)
            assert torch.equal(H, complete_hessian(ref[0])), name


def test_act_order_static_groups_monotone_g_idx(tmp_path, calib_file):
    model_dir = save_tiny_model(tmp_path / "model", "llama")
    out = run_quantize(
        model_dir,
        tmp_path / "out",
        calib_file,
        bits=4,
        group_size=64,
        desc_act=True,
        static_groups=True,
    ).output
    from safetensors.torch import load_file

    tensors = load_file(next(out.glob("*.safetensors")))
    g_idx = [t for k, t in tensors.items() if k.endswith(".g_idx")]
    assert g_idx and all(
        torch.equal(g, torch.arange(g.numel(), dtype=torch.int32) // 64) for g in g_idx
    )
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    # g_idx is k // group: the file tells loaders desc_act false (vLLM 0.32 serves it), meta the
    # solving order
    assert (
        cfg["desc_act"] is False
        and cfg["static_groups"] is True
        and cfg["meta"]["act_order"] is True
    )


def test_deterministic_bytes(tmp_path, calib_file):
    model_dir = save_tiny_model(tmp_path / "model", "llama")
    digests = []
    for run in ("a", "b"):
        out = run_quantize(
            model_dir, tmp_path / run, calib_file, bits=4, group_size=64, desc_act=True
        ).output
        digests.append(
            {
                f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(out.iterdir())
                if f.name != "quant_log.json"
            }
        )
    assert digests[0] == digests[1]
    assert any(name.endswith(".safetensors") for name in digests[0])


def test_cpu_math_is_initialized_before_any_module_runs(
    tmp_path, calib_file, tiny_llama_dir, monkeypatch
):
    """The first parallel call of MKL's vector math in a process can compute wrong values (a race
    in its lazy start; kernels.initialize_cpu_math): quantize and evaluate make that first call
    themselves, in one thread, before a model's forward (in which the rotary cos would otherwise
    be it)."""
    from gptq_cli import evaluate as evaluate_mod
    from gptq_cli import kernels

    events: list[str] = []
    monkeypatch.setattr(kernels, "initialize_cpu_math", lambda: events.append("initialize"))
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: events.append("forward")
    )
    try:
        run_quantize(tiny_llama_dir, tmp_path / "q", calib_file, bits=4, group_size=64)
        assert events[0] == "initialize" and "forward" in events
        events.clear()
        words = Path(__file__).parent / "fixtures" / "words.txt"
        evaluate_mod.evaluate(str(tmp_path / "q"), dataset=str(words), seqlen=64, limit=1)
        assert events[0] == "initialize" and "forward" in events
    finally:
        hook.remove()


def test_first_vector_math_call_after_initialization_is_exact():
    """Fresh processes (the race needs one) compute a rotary cos split over 2 threads right after
    initialize_cpu_math: the first result equals the second. Without the initialisation 3-7% of
    processes differ on the 2-core Xeon (scripts/repro_vml_first_call.py,
    bench/vml_first_call_*.json)."""
    import subprocess
    import sys

    from scripts.repro_vml_first_call import TRIAL

    for _ in range(4):
        out = subprocess.run(
            [sys.executable, "-c", TRIAL, "initialized"], capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout.strip().splitlines()[-1])["differ"] == 0


def test_singular_hessian_from_duplicated_and_dead_inputs(tmp_path, calib_file):
    """Block 0's attention inputs get a dead column (norm weight 0) and two identical columns:
    the damping rises where needed and the result is finite and loads."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 4] = emb[:, 3]
        norm = model.model.layers[0].input_layernorm.weight
        norm[4] = norm[3]
        norm[7] = 0.0
    model_dir = tmp_path / "model"
    model.half().save_pretrained(model_dir)
    from tests.tiny_models import make_tiny_tokenizer

    make_tiny_tokenizer().save_pretrained(model_dir)
    out = run_quantize(
        model_dir, tmp_path / "out", calib_file, bits=4, group_size=64, damp_percent=0.001
    ).output
    log = {m["name"]: m for m in json.loads((out / "quant_log.json").read_text())["modules"]}
    q = log["model.layers.0.self_attn.q_proj"]
    assert q["damp"] >= 0.001 and torch.isfinite(torch.tensor(q["loss"]))
    with torch.no_grad():
        logits = load_quantized_model(out, dtype=torch.float32)(random_input_ids(1, 16)).logits
    assert torch.isfinite(logits).all()


def test_config_describes_the_stored_files(tmp_path, calib_file):
    """Quantized in float32 activations from an fp16 model: config.json still says float16 (what
    the files hold) and names the model class."""
    model_dir = save_tiny_model(tmp_path / "model", "llama", dtype=torch.float16)
    out = run_quantize(model_dir, tmp_path / "out", calib_file, bits=4, group_size=64).output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_package_level_python_api(tmp_path, calib_file):
    """`gptq_cli.quantize` and `gptq_cli.api.evaluate` are the plain Python API under the CLI."""
    import gptq_cli
    from gptq_cli.api import evaluate

    model_dir = save_tiny_model(tmp_path / "model", "llama")
    result = gptq_cli.quantize(
        str(model_dir),
        gptq_cli.QuantConfig(bits=8, group_size=128),
        dataset=str(calib_file),
        nsamples=NSAMPLES,
        seqlen=SEQLEN,
        device="cpu",
        output=tmp_path / "out",
    )
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{i % 400}" for i in range(700)))
    full = evaluate(str(model_dir), dataset=str(text), seqlen=64, device="cpu", dtype="float32")
    quantized = evaluate(
        str(result.output), dataset=str(text), seqlen=64, device="cpu", dtype="float32"
    )
    assert quantized["quantized"] and not full["quantized"]
    assert abs(quantized["ppl"] / full["ppl"] - 1) < 0.05  # 8-bit: close to the original


def test_a_gguf_sources_tokenizer_files_are_staged_in_a_directory_that_is_removed(tmp_path):
    """A GGUF file carries its tokenizer inside: its files are saved to a temporary directory for
    the checkpoint writer to copy, and that directory is gone afterwards."""
    from gptq_cli.model.modelio import ModelRef
    from tests.tiny_models import make_tiny_tokenizer

    with export.tokenizer_dir(
        ModelRef(path=tmp_path, gguf_file="model.gguf"), make_tiny_tokenizer()
    ) as staged:
        assert staged != tmp_path and (staged / "tokenizer_config.json").is_file()
    assert not staged.exists()
    with export.tokenizer_dir(ModelRef(path=tmp_path), make_tiny_tokenizer()) as plain:
        assert plain == tmp_path  # a directory source already has its tokenizer files


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "phi3"])
def test_tail_shortcuts_skip_recomputation_and_change_no_byte(
    arch, tmp_path, calib_file, monkeypatch
):
    """Once an attention or MLP submodule's last linear is quantized, later passes compute that
    submodule as one matmul on its recorded inputs (calibration.py): fewer linear calls,
    byte-identical checkpoint."""
    from gptq_cli.quantization import calibration

    model_dir = save_tiny_model(tmp_path / "model", arch)
    calls = []
    counting = torch.nn.modules.module.register_module_forward_hook(
        lambda m, _a, _o: calls.append(1) if isinstance(m, QUANTIZABLE) else None
    )
    digests, linear_calls = [], []
    try:
        for use in (True, False):
            if not use:
                # no tail records
                monkeypatch.setattr(calibration, "fits_in_memory", lambda *a: False)
            calls.clear()
            out = run_quantize(
                model_dir, tmp_path / f"out-{use}", calib_file, bits=4, group_size=32
            ).output
            linear_calls.append(len(calls))
            digests.append(
                hashlib.sha256(
                    b"".join(f.read_bytes() for f in sorted(out.glob("*.safetensors")))
                ).digest()
            )
    finally:
        counting.remove()
    assert digests[0] == digests[1]
    assert linear_calls[0] < linear_calls[1], linear_calls


def test_solver_errors_reach_the_user_in_the_clis_words():
    """The solver raises plain ValueErrors; the engine says what they mean for a quantize run
    (exit 1)."""
    from gptq_cli.errors import GptqError
    from gptq_cli.quantization.engine import solve_weight

    W, quant = torch.randn(4, 8), QuantConfig(group_size=-1)
    H = torch.eye(8)
    H[2, 3] = float("nan")
    with pytest.raises(
        GptqError,
        match=r"^the Hessian has NaN/Inf entries: the calibration activations overflowed; "
        r"try --dtype float32 or check the calibration data$",
    ):
        solve_weight(W, H, quant, 4, -1)
    with pytest.raises(
        GptqError,
        match=r"^the Hessian is not positive definite even with damp_percent 0\.99; the layer's "
        r"calibration inputs are degenerate: use more or different",
    ):
        solve_weight(W, -torch.eye(8), quant, 4, -1)
