"""`quantize --target-bits` end to end on a tiny random Llama (issue 20): the budget holds,
settings really differ per module, the checkpoint reads back (our loader, pack v1 <-> v2,
inspect) with the logits of a hand-built reference, resume and reruns give the same bytes,
measurements are reusable, bad input exits 2. GPTQModel reading the file is in
test_interop_gptqmodel.py."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from gptq_cli import api, export
from gptq_cli.cli import app
from gptq_cli.convert import convert_checkpoint
from gptq_cli.errors import Interrupted, UsageError
from gptq_cli.format.bitpack import unpack_qweight, unpack_qzeros
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.reader import read_quant_config, read_tensors
from gptq_cli.inspection import inspect_checkpoint
from gptq_cli.model.arch import linear_weight, set_linear_weight
from gptq_cli.model.loader import load_quantized_model
from gptq_cli.quantization import mixed
from gptq_cli.quantization.allocate import parse_candidates
from tests.tiny_models import random_input_ids

CANDIDATES = "2g64,3g128,4g64,8g128"
TARGET = 4.0


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text(
        "".join(
            json.dumps({"input_ids": r}) + "\n" for r in random_input_ids(8, 32, seed=5).tolist()
        )
    )
    return path


def run(model_dir, calib_file, out, target=TARGET, **kwargs):
    return api.quantize(
        str(model_dir),
        QuantConfig(),
        dataset=str(calib_file),
        nsamples=8,
        seqlen=32,
        batch_size=4,
        device="cpu",
        dtype="float32",
        output=out,
        target_bits=target,
        candidates=parse_candidates(CANDIDATES),
        **kwargs,
    )


@pytest.fixture(scope="module")
def mixed_ckpt(tmp_path_factory, tiny_llama_dir, calib_file):
    return run(tiny_llama_dir, calib_file, tmp_path_factory.mktemp("mixed") / "out").output


def digests(directory):
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.iterdir())
        if f.name != "quant_log.json"
    }


def reference_logits(model_dir, ckpt, ids):
    """The float model with every quantized linear set, by hand, from the file's tensors and its
    own setting."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    quant, tensors = read_quant_config(ckpt), read_tensors(ckpt)
    for name, module in model.named_modules():
        if f"{name}.qweight" in tensors:
            bits = quant.module_setting(name)[0]
            n, k = linear_weight(module).shape
            codes = unpack_qweight(tensors[f"{name}.qweight"], bits, k).float()
            zeros = unpack_qzeros(
                tensors[f"{name}.qzeros"], bits, n, quant.checkpoint_format
            ).float()
            g = tensors[f"{name}.g_idx"].long()
            set_linear_weight(
                module, (tensors[f"{name}.scales"].float()[g] * (codes - zeros[g])).t()
            )
    with torch.no_grad():
        return model(ids).logits


def test_budget_holds_and_settings_differ(mixed_ckpt):
    config = json.loads((mixed_ckpt / "config.json").read_text())["quantization_config"]
    assert config["dynamic"] and all(
        k.startswith("+:^") and k.endswith("$") for k in config["dynamic"]
    )
    report = inspect_checkpoint(mixed_ckpt)
    assert report.ok, report.problems
    assert report.bits_per_weight <= TARGET
    settings = {(m.bits, m.group_size) for m in report.modules}
    assert len(settings) > 1
    # the top level is the most common setting
    counts = {s: sum((m.bits, m.group_size) == s for m in report.modules) for s in settings}
    assert counts[(config["bits"], config["group_size"])] == max(counts.values())
    assert (
        config["meta"]["target_bits"] == TARGET and (mixed_ckpt / mixed.MEASUREMENTS_FILE).is_file()
    )


def test_loader_gives_the_reference_logits_also_after_pack_v2_and_back(
    mixed_ckpt, tiny_llama_dir, tmp_path
):
    ids = random_input_ids(2, 16, seed=0)
    reference = reference_logits(tiny_llama_dir, mixed_ckpt, ids)
    with torch.no_grad():
        ours = load_quantized_model(mixed_ckpt, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    v2 = convert_checkpoint(mixed_ckpt, tmp_path / "v2", checkpoint_format="gptq_v2")
    back = convert_checkpoint(v2, tmp_path / "v1", checkpoint_format="gptq")
    assert inspect_checkpoint(v2).ok and inspect_checkpoint(v2).zeros_look_like == "gptq_v2"
    with torch.no_grad():
        torch.testing.assert_close(
            load_quantized_model(v2, dtype=torch.float32)(ids).logits,
            reference,
            rtol=1e-4,
            atol=1e-4,
        )
    original, again = read_tensors(mixed_ckpt), read_tensors(back)
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_interrupted_run_resumes_to_the_same_bytes(
    mixed_ckpt, tiny_llama_dir, calib_file, tmp_path, monkeypatch
):
    real = api.quantize_decoder_block
    calls = []

    def one_block_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the first block is stored, then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "quantize_decoder_block", one_block_then_ctrl_c)
    with pytest.raises(Interrupted):
        run(tiny_llama_dir, calib_file, tmp_path / "out")
    monkeypatch.setattr(api, "quantize_decoder_block", real)
    monkeypatch.setattr(mixed, "measure", lambda *a, **k: pytest.fail("resume measured again"))
    assert digests(run(tiny_llama_dir, calib_file, tmp_path / "out").output) == digests(mixed_ckpt)


def test_measurements_are_reused_for_another_budget_and_the_dry_run_shows_that_allocation(
    mixed_ckpt, tiny_llama_dir, calib_file, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        mixed, "measure", lambda *a, **k: pytest.fail("measured although --measurements given")
    )
    measurements = mixed_ckpt / mixed.MEASUREMENTS_FILE
    out = run(
        tiny_llama_dir, calib_file, tmp_path / "out", target=3.0, measurements=measurements
    ).output
    config = json.loads((out / "quantize_config.json").read_text())
    assert inspect_checkpoint(out).bits_per_weight <= 3.0
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            str(tiny_llama_dir),
            "--target-bits",
            "3",
            "--candidates",
            CANDIDATES,
            "--measurements",
            str(measurements),
            "--dry-run",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    allocation = json.loads(result.stdout)["target_bits"]["allocation"]
    quant = QuantConfig.from_hf_dict(config)
    assert {n: quant.module_setting(n) for n in allocation["modules"]} == {
        n: (int(s.split("g")[0]), int(s.split("g")[1])) for n, s in allocation["modules"].items()
    }
    assert allocation["bits_per_weight"] == pytest.approx(
        inspect_checkpoint(out).bits_per_weight, abs=1e-4
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target-bits", "1.5"], "outside what the candidates"),
        (["--target-bits", "9"], "outside what the candidates"),
        (["--target-bits", "4", "--bits", "3"], "leave out --bits"),
        (["--candidates", "4g128"], "go with --target-bits"),
        (["--target-bits", "4", "--candidates", "4bit"], "--candidates"),
    ],
)
def test_bad_input_exits_2(tiny_llama_dir, tmp_path, args, message):
    result = CliRunner().invoke(
        app, ["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "o"), *args]
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.work").exists()


def test_measurements_of_other_settings_or_candidates_are_refused(
    mixed_ckpt, tiny_llama_dir, calib_file, tmp_path
):
    measurements = mixed_ckpt / mixed.MEASUREMENTS_FILE
    with pytest.raises(UsageError, match="made with another sym"):
        api.quantize(
            str(tiny_llama_dir),
            QuantConfig(sym=False),
            dataset=str(calib_file),
            nsamples=8,
            seqlen=32,
            batch_size=4,
            device="cpu",
            dtype="float32",
            output=tmp_path / "a",
            target_bits=TARGET,
            candidates=parse_candidates(CANDIDATES),
            measurements=measurements,
        )
    with pytest.raises(UsageError, match="no losses for 4g32"):
        api.quantize(
            str(tiny_llama_dir),
            QuantConfig(),
            dataset=str(calib_file),
            nsamples=8,
            seqlen=32,
            batch_size=4,
            device="cpu",
            dtype="float32",
            output=tmp_path / "b",
            target_bits=4.5,
            candidates=parse_candidates("4g32,4g64"),
            measurements=measurements,
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pack_of_a_finished_mixed_work_dir_writes_what_quantize_writes(
    mixed_ckpt, tiny_llama_dir, calib_file, tmp_path, monkeypatch
):
    import gptq_cli.format.checkpoint as checkpoint

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_checkpoint", interrupted)
    with pytest.raises(Interrupted):
        run(tiny_llama_dir, calib_file, tmp_path / "out")
    monkeypatch.undo()
    packed = export.pack_workdir(tmp_path / "out.work", tmp_path / "packed")
    assert digests(packed) == digests(mixed_ckpt)
