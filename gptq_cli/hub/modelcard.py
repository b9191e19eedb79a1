"""The model card (README.md) `gptq push` writes for a GPTQ checkpoint (SPEC §1 `gptq push`).

YAML front matter for the Hub (base_model, library_name, license, tags), then: the quantization
settings, the command that made the checkpoint (quant_log.json's "command", else one rebuilt from
the settings), the evaluation results found in eval_results.json, and how to load the model.
Everything comes from files in the checkpoint directory (and, for the licence, the base model's card
when it is on disk); nothing is fetched.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from gptq_cli.inspection import InspectReport

QUANT_LOG_FILE = "quant_log.json"
EVAL_RESULTS_FILE = "eval_results.json"


def build_model_card(report: InspectReport, repo_id: str) -> str:
    """The README.md text for the checkpoint `report` describes, to be published as `repo_id`."""
    checkpoint = Path(report.path)
    quant_log = read_json(checkpoint / QUANT_LOG_FILE)
    base_model = base_model_of(checkpoint, quant_log)
    metadata = card_metadata(report, base_model, find_license(checkpoint, quant_log, base_model))
    sections = [
        _intro(report, repo_id, base_model),
        _settings_table(report, quant_log),
        _command_section(report, quant_log, base_model, repo_id),
        _eval_section(read_json(checkpoint / EVAL_RESULTS_FILE)),
        _usage_section(report, repo_id),
    ]
    front_matter = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    return f"---\n{front_matter}---\n\n" + "\n".join(s for s in sections if s)


def card_metadata(
    report: InspectReport, base_model: str | None, license_id: str | None
) -> dict[str, Any]:
    """The card's YAML front matter, in the keys and spelling the Hub reads."""
    metadata: dict[str, Any] = {}
    if base_model:
        metadata["base_model"] = base_model
        metadata["base_model_relation"] = "quantized"
    metadata["library_name"] = "transformers"
    if license_id:
        metadata["license"] = license_id
    metadata["tags"] = ["gptq", f"{report.quant.bits}-bit", "quantized", "gptq_cli"]
    return metadata


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; {} when the file is absent or is not a JSON object (optional
    inputs)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def is_hub_id(name: object) -> bool:
    """Whether `name` reads as a Hub repo id "owner/name" (and is not a local path)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1 or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def base_model_of(checkpoint: Path, quant_log: dict[str, Any]) -> str | None:
    """The Hub id the checkpoint was quantized from: quant_log.json's "model", else config.json's
    _name_or_path, when either is a Hub id (a local path or built-in name is not)."""
    config = read_json(checkpoint / "config.json")
    for candidate in (quant_log.get("model"), config.get("_name_or_path")):
        if is_hub_id(candidate):
            return candidate
    return None


def find_license(checkpoint: Path, quant_log: dict[str, Any], base_model: str | None) -> str | None:
    """The base model's licence when it is known without a network: a "license" in the
    checkpoint's or the local source model's config.json, the source model's README.md front
    matter, or the base model's card in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    source = quant_log.get("model")
    source_dir = Path(source) if isinstance(source, str) and Path(source).is_dir() else None
    configs = [checkpoint / "config.json"] + ([source_dir / "config.json"] if source_dir else [])
    for config in configs:
        license_id = read_json(config).get("license")
        if isinstance(license_id, str):
            return license_id
    cards = [source_dir / "README.md"] if source_dir else []
    if base_model:
        cached = try_to_load_from_cache(base_model, "README.md")
        if isinstance(cached, str):
            cards.append(Path(cached))
    for card in cards:
        license_id = _front_matter(card).get("license")
        if isinstance(license_id, str):
            return license_id
    return None


def _front_matter(card: Path) -> dict[str, Any]:
    """The YAML metadata block at the top of a model card; {} when there is none or it does not
    parse."""
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    block = text[3:].split("\n---", 1)[0]
    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def quantize_command(
    report: InspectReport, quant_log: dict[str, Any], base_model: str | None, output: str
) -> tuple[str, bool]:
    """(the `gptq quantize` command line, whether it was recorded): quant_log.json's "command"
    when present, else a command rebuilt from the checkpoint's settings and the calibration
    recorded in quant_log.json."""
    recorded = quant_log.get("command")
    if isinstance(recorded, list) and all(isinstance(a, str) for a in recorded):
        return shlex.join(recorded), True
    if isinstance(recorded, str) and recorded.strip():
        return recorded.strip(), True
    q = report.quant
    model = base_model or (
        quant_log.get("model") if isinstance(quant_log.get("model"), str) else "MODEL"
    )
    args = [
        "gptq",
        "quantize",
        model,
        "--bits",
        str(q.bits),
        "--group-size",
        str(q.group_size),
        "--desc-act" if q.desc_act else "--no-desc-act",
        "--sym" if q.sym else "--asym",
    ]
    if q.static_groups:
        args.append("--static-groups")
    if not q.true_sequential:
        args.append("--no-true-sequential")
    args += ["--damp-percent", f"{q.damp_percent:g}"] + (["--mse"] if q.mse else [])
    method, alpha = _method(q)
    args += ["--method", method] + ([] if alpha is None else ["--gptaq-alpha", f"{alpha:g}"])
    calibration = (
        quant_log.get("calibration") if isinstance(quant_log.get("calibration"), dict) else {}
    )
    for key in ("dataset", "nsamples", "seqlen", "seed"):
        if calibration.get(key) is not None:
            args += [f"--{key}", str(calibration[key])]
    args += ["--format", q.checkpoint_format, "-o", output]
    return shlex.join(args), False


def _method(q) -> tuple[str, float | None]:
    """(--method, --gptaq-alpha) a checkpoint was made with, from quantization_config's meta
    (files without it, ours before GPTAQ or other tools': plain GPTQ)."""
    method = q.meta.get("method", "gptq") if isinstance(q.meta.get("method"), str) else "gptq"
    alpha = q.meta.get("gptaq_alpha")
    return method, float(alpha) if method != "gptq" and isinstance(alpha, (int, float)) else None


def _method_text(q) -> str:
    method, alpha = _method(q)
    return method if alpha is None else f"{method}, alpha {alpha:g}"


def _intro(report: InspectReport, repo_id: str, base_model: str | None) -> str:
    q = report.quant
    source = f"[{base_model}](/{base_model})" if base_model else "its base model"
    return (
        f"# {repo_id.split('/')[-1]}\n\n{q.bits}-bit GPTQ quantization of {source} "
        f"({report.architecture}), made with {report.tool}. "
        "The weights are in the GPTQ checkpoint format (`checkpoint_format: "
        f"{q.checkpoint_format}`) that transformers, GPTQModel and vLLM load.\n"
    )


def _settings_table(report: InspectReport, quant_log: dict[str, Any]) -> str:
    q = report.quant
    yes_no = {True: "yes", False: "no"}
    stored = (
        "v1: qzeros store zero - 1"
        if q.checkpoint_format == "gptq"
        else "v2: qzeros store the zero"
    )
    rows = [
        ("bits", q.bits),
        ("group size", "per channel" if q.group_size == -1 else q.group_size),
        ("act-order (desc_act)", yes_no[q.desc_act]),
        ("symmetric", yes_no[q.sym]),
        ("static groups", yes_no[q.static_groups]),
        ("true sequential", yes_no[q.true_sequential]),
        ("damp percent", f"{q.damp_percent:g}"),
        ("MSE clip search", yes_no[q.mse]),
        ("method", _method_text(q)),
        ("checkpoint format", f"{q.checkpoint_format} ({stored})"),
        ("quantized modules", len(report.modules)),
    ]
    calibration = (
        quant_log.get("calibration") if isinstance(quant_log.get("calibration"), dict) else {}
    )
    if calibration:
        rows.append(
            (
                "calibration",
                f"{calibration.get('dataset', '?')}: {calibration.get('nsamples', '?')} samples "
                f"× {calibration.get('seqlen', '?')} tokens, seed {calibration.get('seed', '?')}",
            )
        )
    rows.append(
        (
            "size",
            f"{report.total_bytes / 1e6:.1f} MB ({report.compression_ratio:.2f}x smaller than "
            f"fp16)",
        )
    )
    rows.append(("quantizer", report.tool))
    lines = ["## Quantization settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def _command_section(
    report: InspectReport, quant_log: dict[str, Any], base_model: str | None, repo_id: str
) -> str:
    command, recorded = quantize_command(report, quant_log, base_model, repo_id.split("/")[-1])
    lead = (
        "Made with:"
        if recorded
        else "The command was not recorded; this `gptq` command uses the same settings:"
    )
    return f"## How it was made\n\n{lead}\n\n```bash\n{command}\n```\n"


def _eval_section(eval_results: dict[str, Any]) -> str:
    results = [r for r in eval_results.get("results", []) if isinstance(r, dict) and "ppl" in r]
    if not results:
        return ""
    with_speed = any(isinstance(r.get("speed"), dict) for r in results)
    header = (
        ["dataset", "seqlen", "windows", "perplexity"]
        + (["prefill tok/s", "decode tok/s"] if with_speed else [])
        + ["device"]
    )
    lines = [
        "## Evaluation",
        "",
        "Perplexity with the GPTQ paper's protocol (`gptq eval`):",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in results:
        row = [
            r.get("dataset", "?"),
            r.get("seqlen", "?"),
            r.get("windows", "?"),
            f"{float(r['ppl']):.4f}",
        ]
        if with_speed:
            speed = r.get("speed") if isinstance(r.get("speed"), dict) else {}
            row += [
                f"{speed[k]:.1f}" if isinstance(speed.get(k), (int, float)) else ""
                for k in ("prefill_tokens_per_s", "decode_tokens_per_s")
            ]
        row.append(f"{r.get('device', '?')} {r.get('dtype', '')}".strip())
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _usage_section(report: InspectReport, repo_id: str) -> str:
    note = (
        ""
        if report.quant.checkpoint_format == "gptq"
        else "\nvLLM reads format `gptq` (v1) only: when every zero point is at least 1, "
        "`gptq pack LOCAL_COPY --format gptq -o OUT` converts a downloaded copy.\n"
    )
    return (
        "## Use it\n\nWith transformers (its GPTQ support needs `pip install optimum "
        "gptqmodel`):\n\n```python\nfrom transformers import AutoModelForCausalLM, "
        "AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", '
        f'device_map="auto")\ntokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n```\n\n'
        f"With gptq_cli (`pip install gptq-cli`): `gptq eval {repo_id} --dataset "
        "wikitext2`.\n" + note
    )
