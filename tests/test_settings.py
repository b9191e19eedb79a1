"""The run's settings are decided in gptq_cli/settings.py alone: the Python API's signatures, the
CLI's option defaults and the help text state the same defaults, and the CLI, the API and the dry
run read one resolved RunSettings."""

import inspect
import json
import re
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from gptq_cli import settings
from gptq_cli.cli import app
from gptq_cli.errors import UsageError
from gptq_cli.format.config import QuantConfig
from tests.tiny_models import save_tiny_model


def signature_default(fn, name):
    return inspect.signature(fn).parameters[name].default


def help_text(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    # one line, without rich's box borders; rich wraps after a hyphen ("gptaq-" / "ls"): rejoined
    text = re.sub(r"-[ │]*\n[ │]*", "-", result.output)
    return re.sub(r"[\s│]+", " ", text)


def test_the_api_signatures_take_their_defaults_from_settings():
    from gptq_cli import api, evaluate
    from gptq_cli.data import textdata

    expected = {
        (api.quantize, "dataset"): settings.DATASET,
        (api.quantize, "nsamples"): settings.NSAMPLES,
        (api.quantize, "batch_size"): settings.BATCH_SIZE,
        (api.quantize, "seed"): settings.SEED,
        (textdata.calibration_samples, "nsamples"): settings.NSAMPLES,
        (textdata.calibration_samples, "seqlen"): settings.SEQLEN,
        (textdata.eval_windows, "seqlen"): settings.EVAL_SEQLEN,
        (evaluate.evaluate, "dataset"): settings.EVAL_DATASET,
        (evaluate.evaluate, "seqlen"): settings.EVAL_SEQLEN,
        (evaluate.evaluate, "batch_size"): settings.EVAL_BATCH_SIZE,
        (evaluate.compare, "seqlen"): settings.EVAL_SEQLEN,
        (evaluate.compare, "batch_size"): settings.EVAL_BATCH_SIZE,
    }
    wrong = {
        f"{fn.__module__}.{fn.__name__}({name})": signature_default(fn, name)
        for (fn, name), value in expected.items()
        if signature_default(fn, name) != value
    }
    assert not wrong


def test_quantize_help_states_the_defaults_the_run_uses():
    text = help_text("quantize")
    for phrase in (
        f"Calibration samples (default {settings.NSAMPLES})",
        f"Tokens per calibration sample (default {settings.SEQLEN})",
        f"Samples per forward pass (default {settings.BATCH_SIZE})",
        f"Calibration sampling seed (default {settings.SEED})",
        f"{settings.DATASET} (default, offline)",
        f"(default {settings.DEFAULT_METHOD})",
        f"default for gptaq-ls {settings.DEFAULT_ALPHA['gptaq-ls']:g}, the exact fit, or "
        f"{settings.MIXED_ALPHA['gptaq-ls']:g} with --target-bits; "
        f"{settings.DEFAULT_ALPHA['gptaq']:g} for gptaq",
    ):
        assert phrase in text, phrase


def test_eval_options_default_to_the_settings():
    from gptq_cli.commands.eval_cmd import eval_command

    for name, value in (
        ("dataset", settings.EVAL_DATASET),
        ("seqlen", settings.EVAL_SEQLEN),
        ("batch_size", settings.EVAL_BATCH_SIZE),
    ):
        assert signature_default(eval_command, name).default == value, name


def test_at_least_one_names_the_option():
    settings.check_at_least_one(nsamples=1, seqlen=None)
    with pytest.raises(UsageError, match="--batch-size must be at least 1, got 0"):
        settings.check_at_least_one(nsamples=3, batch_size=0)


def test_asymmetric_quantization_is_written_v2_and_refused_as_v1_in_one_rule():
    assert QuantConfig().checkpoint_format == "gptq"
    assert QuantConfig(sym=False).checkpoint_format == "gptq_v2"
    assert QuantConfig(sym=False, checkpoint_format="gptq_v2").checkpoint_format == "gptq_v2"
    with pytest.raises(ValueError, match="--asym needs --format gptq_v2"):
        QuantConfig(sym=False, checkpoint_format="gptq")
    # the API and the CLI meet the same rule (the CLI turns it into one usage line, exit 2)
    result = CliRunner().invoke(app, ["quantize", "m", "--asym", "--format", "gptq"])
    assert result.exit_code == 2 and "--asym needs --format gptq_v2" in result.output


def test_the_api_refuses_a_batch_size_below_one_before_any_work(tmp_path):
    from gptq_cli import api

    with pytest.raises(UsageError, match="--batch-size must be at least 1, got 0"):
        api.quantize("no-such-model", batch_size=0, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resolve_run_lays_the_flags_over_a_preset_over_the_defaults(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text('{"bits": 3, "group_size": 64, "nsamples": 32}')
    run = settings.resolve_run(str(preset), {"group_size": 32, "seed": None, "batch_size": 4})
    assert (run.quant.bits, run.quant.group_size) == (3, 32)  # preset, then the flag
    assert run.calibration() == {
        "dataset": settings.DATASET,
        "nsamples": 32,
        "seqlen": None,
        "batch_size": 4,
        "seed": settings.SEED,
    }
    plain = settings.resolve_run(None, {})
    assert plain.quant == QuantConfig() and plain.nsamples == settings.NSAMPLES
    with pytest.raises(UsageError, match="--nsamples must be at least 1"):
        settings.resolve_run(str(preset), {"nsamples": 0})
    with pytest.raises(UsageError, match="bits must be one of"):
        settings.resolve_run(None, {"bits": 5})


def test_run_settings_resolve_the_method_and_survive_a_trip_through_the_api_arguments():
    run = settings.run_settings()
    default = settings.DEFAULT_METHOD
    assert (run.method, run.gptaq_alpha) == (default, settings.DEFAULT_ALPHA[default])
    mixed = settings.run_settings(method="gptaq-ls", target_bits=3.5)
    assert (
        mixed.gptaq_alpha == settings.MIXED_ALPHA["gptaq-ls"] != settings.DEFAULT_ALPHA["gptaq-ls"]
    )
    assert mixed.quantization_meta() == {
        "method": "gptaq-ls",
        "gptaq_alpha": settings.MIXED_ALPHA["gptaq-ls"],
        "target_bits": 3.5,
    }
    plain = settings.run_settings(QuantConfig(bits=3), seed=4, method="gptq")
    assert plain.quantization_meta() == {} and plain.gptaq_alpha is None
    # the CLI resolves once and hands api.quantize the result, which resolves it to itself again
    for r in (run, mixed, plain):
        assert settings.run_settings(r.quant, **r.api_arguments()) == r


def test_a_preset_may_choose_the_method_and_a_flag_overrides_it(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text('{"method": "gptaq", "gptaq_alpha": 0.5}')
    run = settings.resolve_run(str(preset), {})
    assert (run.method, run.gptaq_alpha) == ("gptaq", 0.5)
    with pytest.raises(UsageError, match="--gptaq-alpha goes with --method gptaq or gptaq-ls"):
        settings.resolve_run(str(preset), {"method": "gptq"})
    run = settings.resolve_run(None, {"method": "gptq", "target_bits": 3.5})
    assert (run.method, run.gptaq_alpha, run.target_bits) == ("gptq", None, 3.5)


def test_the_calibration_seqlen_is_decided_against_the_models_context():
    short = SimpleNamespace(max_position_embeddings=256)
    assert settings.run_settings().for_model(short).seqlen == 256
    assert settings.run_settings(seqlen=128).for_model(short).seqlen == 128
    assert settings.run_settings().for_model(SimpleNamespace()).seqlen == settings.SEQLEN
    with pytest.raises(UsageError, match="--seqlen 512 exceeds the model's context of 256"):
        settings.run_settings(seqlen=512).for_model(short)


def test_the_dry_run_plans_the_settings_the_run_would_use(tmp_path):
    # A tiny llama's context is 256 tokens: the real run calibrates on 256-token samples and
    # refuses --seqlen 512, and the dry run says the same (it planned 2048 and passed 512).
    model = str(save_tiny_model(tmp_path / "m", "llama"))
    result = CliRunner().invoke(app, ["quantize", model, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["calibration"] == {
        "dataset": settings.DATASET,
        "nsamples": settings.NSAMPLES,
        "seqlen": 256,
        "batch_size": settings.BATCH_SIZE,
        "seed": settings.SEED,
    }
    assert plan["method"] == settings.DEFAULT_METHOD
    result = CliRunner().invoke(app, ["quantize", model, "--dry-run", "--seqlen", "512"])
    assert result.exit_code == 2 and "exceeds the model's context of 256" in result.output
