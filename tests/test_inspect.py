"""`gptq inspect`: a good checkpoint passes with the right facts; each kind of corruption is
reported as the right problem with exit 1; bad paths are one-line usage errors with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from gptq_cli import __version__
from gptq_cli.cli import app
from gptq_cli.format.bitpack import pack_last, unpack_last
from gptq_cli.format.checkpoint import write_checkpoint
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.reader import read_tensors

Q_PROJ = "model.layers.0.self_attn.q_proj"


def gptq(*args: str):
    return CliRunner().invoke(app, ["inspect", *map(str, args)])


def rewrite(src: Path, out: Path, change=None, extra_files=None) -> Path:
    """A copy of the checkpoint at src whose tensors dict went through change(tensors) first."""
    tensors = dict(read_tensors(src).items())
    if change:
        change(tensors)
    config = json.loads((src / "config.json").read_text())
    quant = QuantConfig.from_hf_dict(config.pop("quantization_config"))
    return write_checkpoint(out, tensors, config, quant, extra_files=extra_files)


def stored_bytes(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def test_good_checkpoint_passes_with_the_right_facts(tiny_gptq_checkpoint, tiny_llama_dir):
    result = gptq(tiny_gptq_checkpoint.path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["problems"] == []
    assert report["architecture"] == "LlamaForCausalLM"
    assert report["tool"] == {"name": f"gptq_cli:{__version__}", "guessed": False}
    assert report["format"] == {"declared": "gptq", "zeros_look_like": "gptq"}
    assert (
        report["config"]["bits"],
        report["config"]["group_size"],
        report["config"]["desc_act"],
    ) == (4, 128, True)
    modules = {m["name"]: m for m in report["modules"]}
    assert set(modules) == set(tiny_gptq_checkpoint.weights)
    down = modules["model.layers.1.mlp.down_proj"]
    assert (down["in_features"], down["out_features"], down["groups"], down["act_order"]) == (
        768,
        256,
        6,
        True,
    )
    # sizes against the files themselves: the fp16 source model and the checkpoint
    size = report["size"]
    assert size["fp16_bytes"] == stored_bytes(tiny_llama_dir / "model.safetensors")
    assert size["bytes"] == stored_bytes(tiny_gptq_checkpoint.path / "model.safetensors")
    assert size["compression_ratio"] == pytest.approx(size["fp16_bytes"] / size["bytes"], abs=1e-3)

    human = gptq(tiny_gptq_checkpoint.path)
    assert human.exit_code == 0 and "compression" in human.stderr and "down_proj" in human.stderr


def shrink_qweight(t):
    t[f"{Q_PROJ}.qweight"] = t[f"{Q_PROJ}.qweight"][:-1].contiguous()


def g_idx_out_of_range(t):
    t[f"{Q_PROJ}.g_idx"] = t[f"{Q_PROJ}.g_idx"].clone()
    t[f"{Q_PROJ}.g_idx"][5] = 7  # K = 256, group 128: valid groups are 0 and 1


def nan_scale(t):
    t[f"{Q_PROJ}.scales"] = t[f"{Q_PROJ}.scales"].clone()
    t[f"{Q_PROJ}.scales"][1, 3] = float("nan")


def v2_zeros_under_v1_label(t):
    """Store every zero point as z (the v2 convention: 0x88888888) while the config still says
    v1."""
    for key in [k for k in t if k.endswith(".qzeros")]:
        n = t[key.replace(".qzeros", ".scales")].shape[1]
        t[key] = pack_last(unpack_last(t[key], 4, n) + 1, 4)


@pytest.mark.parametrize(
    "corrupt,expected,count",
    [
        (shrink_qweight, f"{Q_PROJ}.qweight: shape [31, 256], expected [32, 256]", 1),
        (g_idx_out_of_range, f"{Q_PROJ}.g_idx: 1 value(s) outside [0, 2)", 1),
        (nan_scale, f"{Q_PROJ}.scales: 1 NaN/Inf", 1),
        (
            v2_zeros_under_v1_label,
            f"{Q_PROJ}.qzeros: labelled checkpoint_format 'gptq' but zero points are stored as 8",
            14,
        ),
    ],
)
def test_corruptions_are_reported(tmp_path, tiny_gptq_checkpoint, corrupt, expected, count):
    bad = rewrite(tiny_gptq_checkpoint.path, tmp_path / "bad", corrupt)
    result = gptq(bad, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert not report["ok"] and len(report["problems"]) == count
    assert any(p.startswith(expected) for p in report["problems"]), report["problems"]
    assert f"problem: {expected}" in result.stderr and "problem(s) found" in result.stderr


def test_zero_look_of_v1_label_on_v2_zeros(tmp_path, tiny_gptq_checkpoint):
    bad = rewrite(tiny_gptq_checkpoint.path, tmp_path / "bad", v2_zeros_under_v1_label)
    report = json.loads(gptq(bad, "--json").stdout)
    assert report["format"] == {"declared": "gptq", "zeros_look_like": "gptq_v2"}


def test_bad_paths_exit_2_with_one_line(tmp_path, tiny_llama_dir):
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path / "empty": "not a model directory",
        tiny_llama_dir: "not a quantized checkpoint",
    }
    for path, message in cases.items():
        result = gptq(path)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (
            result.stderr
        )
        assert result.stdout == ""


def test_plot_draws_the_loss_log(tmp_path, tiny_gptq_checkpoint):
    log = {
        "modules": [
            {"name": name, "loss": 0.001 * (i + 1), "damp": 0.01, "seconds": 0.1, "samples": 8}
            for i, name in enumerate(sorted(tiny_gptq_checkpoint.weights))
        ]
    }
    ckpt = rewrite(
        tiny_gptq_checkpoint.path,
        tmp_path / "ckpt",
        extra_files={"quant_log.json": json.dumps(log).encode()},
    )
    png = tmp_path / "loss.png"
    result = gptq(ckpt, "--plot", png, "--quiet")
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    no_log = gptq(tiny_gptq_checkpoint.path, "--plot", tmp_path / "x.png", "--quiet")
    assert no_log.exit_code == 2 and "no quant_log.json" in no_log.stderr
    assert not (tmp_path / "x.png").exists()


def test_help_has_examples():
    result = CliRunner().invoke(app, ["inspect", "--help"])
    assert result.exit_code == 0 and "Examples" in result.output and "--plot" in result.output


def test_act_order_g_idx_under_desc_act_false_is_a_problem_whatever_meta_says(
    tmp_path, tiny_gptq_checkpoint
):
    """Loaders read desc_act, not our meta's solving order: a file saying desc_act false whose
    g_idx is not k // group_size computes another model in the loaders that skip g_idx (vLLM 0.32
    never reads it)."""
    import shutil

    bad = shutil.copytree(tiny_gptq_checkpoint.path, tmp_path / "bad")
    for name, key in (("config.json", "quantization_config"), ("quantize_config.json", None)):
        doc = json.loads((bad / name).read_text())
        qdict = doc[key] if key else doc
        qdict["desc_act"] = False
        qdict.setdefault("meta", {})["act_order"] = True  # as we write static-groups act-order
        (bad / name).write_text(json.dumps(doc))
    report = json.loads(gptq(bad, "--json").stdout)
    assert not report["ok"] and any(
        "not k // group_size although desc_act is false" in p for p in report["problems"]
    ), report["problems"]
