"""The settings of quantize and eval runs, decided here once: their defaults and allowed values,
the rules between them (a method's alpha, a seqlen within the model's context), the --config
presets, and RunSettings, one quantize run's settings resolved and checked. The CLI's options, help
and dry run, the Python API, the work dir's plan.json and the checkpoint's quantization_config all
read them. No torch here: the CLI's --help imports this module.

May import: format, errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from gptq_cli.errors import UsageError
from gptq_cli.format.config import QuantConfig

__all__ = [
    "BATCH_SIZE",
    "DATASET",
    "DEFAULT_ALPHA",
    "DEFAULT_METHOD",
    "EVAL_BATCH_SIZE",
    "EVAL_DATASET",
    "EVAL_SEQLEN",
    "GPTAQ_ALPHA",
    "METHODS",
    "MIXED_ALPHA",
    "NSAMPLES",
    "SEED",
    "SEQLEN",
    "METHOD_KEYS",
    "QUANT_KEYS",
    "RUN_KEYS",
    "RunSettings",
    "calibration_seqlen",
    "check_at_least_one",
    "check_context",
    "context_length",
    "load_preset",
    "resolve_method",
    "resolve_run",
    "run_settings",
]

# Calibration: the built-in offline text, 128 windows of 2048 tokens (the paper's; SEQLEN shrinks
# to a shorter model context), 8 windows per forward pass, sampling seed 0.
DATASET = "builtin"
NSAMPLES = 128
SEQLEN = 2048
BATCH_SIZE = 8
SEED = 0

# Evaluation: WikiText-2's test split in windows of 2048 tokens (the paper's protocol), one window
# per forward pass.
EVAL_DATASET = "wikitext2"
EVAL_SEQLEN = 2048
EVAL_BATCH_SIZE = 1

# --method: plain GPTQ; GPTAQ's asymmetric calibration (its column update); GPTQ on GPTAQ's
# least-squares target
METHODS = ("gptq", "gptaq", "gptaq-ls")
# The default, uniform or with --target-bits: GPTQ on GPTAQ's least-squares target. It beat GPTQ on
# every calibration draw at 4g128, at 4g128 act-order and, at a smaller alpha, at --target-bits
# 4.2144 (bench/methods_smollm2_*). Its alpha: 1 (the exact fit) for uniform settings; MIXED_ALPHA
# with --target-bits, where the full correction overshoots (the allocation measured each linear's
# candidates on W, not on the moved W').
DEFAULT_METHOD = "gptaq-ls"
# GPTAQ's default weight of the asymmetry correction (the authors' code and GPTQModel's)
GPTAQ_ALPHA = 0.25
DEFAULT_ALPHA = {"gptaq": GPTAQ_ALPHA, "gptaq-ls": 1.0}
MIXED_ALPHA = {"gptaq": GPTAQ_ALPHA, "gptaq-ls": 0.5}


def check_at_least_one(**values: int | None) -> None:
    """UsageError naming the option (--batch-size for batch_size) of the first value below 1; None
    (not given) passes."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def resolve_method(
    method: str | None, gptaq_alpha: float | None = None, target_bits: float | None = None
) -> tuple[str, float | None]:
    """The (method, alpha) a run uses: method None is DEFAULT_METHOD; alpha None is the method's
    DEFAULT_ALPHA, or its MIXED_ALPHA with --target-bits (None for gptq). UsageError for a method
    or alpha quantize does not take."""
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if method == "gptq":
        if gptaq_alpha is not None:
            raise UsageError(
                "--gptaq-alpha goes with --method gptaq or gptaq-ls, not gptq; drop it or use "
                "--method gptaq-ls"
            )
        return method, None
    default = (MIXED_ALPHA if target_bits is not None else DEFAULT_ALPHA)[method]
    if gptaq_alpha is None:
        return method, default
    if not 0 < gptaq_alpha <= 1:
        raise UsageError(
            f"--gptaq-alpha {gptaq_alpha}: use a number in (0, 1] (default for --method "
            f"{method}{' with --target-bits' if target_bits is not None else ''}: {default:g})"
        )
    return method, gptaq_alpha


def context_length(config) -> int | None:
    """How many positions a model's position embeddings cover, from its transformers config (None
    when the config does not say)."""
    return next(
        (
            getattr(config, k)
            for k in ("max_position_embeddings", "n_positions", "n_ctx")
            if isinstance(getattr(config, k, None), int)
        ),
        None,
    )


def check_context(config, seqlen: int, *, what: str = "--seqlen") -> None:
    """UsageError when `seqlen` tokens exceed what the model's position embeddings cover."""
    limit = context_length(config)
    if limit is not None and seqlen > limit:
        raise UsageError(
            f"{what} {seqlen} exceeds the model's context of {limit} tokens "
            f"(max_position_embeddings); use {limit} or less"
        )


def calibration_seqlen(config, seqlen: int | None) -> int:
    """The calibration seqlen for a model: the asked one, refused beyond the model's context (as
    eval refuses it); None: SEQLEN or the context when that is shorter."""
    if seqlen is None:
        return min(SEQLEN, context_length(config) or SEQLEN)
    check_context(config, seqlen)
    return seqlen


_PACKAGE = Path(__file__).resolve().parent
# The --config presets: shipped inside the package by setup.py's build_py (a wheel install), else
# the source tree's configs/ (a checkout or an editable install).
CONFIG_DIR = next(
    (d for d in (_PACKAGE / "presets", _PACKAGE.parent / "configs") if d.is_dir()),
    _PACKAGE / "presets",
)
# what a preset or the flags may set: QuantConfig's fields, and the calibration's
QUANT_KEYS = (
    "bits",
    "group_size",
    "desc_act",
    "sym",
    "static_groups",
    "act_group_aware",
    "true_sequential",
    "damp_percent",
    "mse",
)
RUN_KEYS = ("dataset", "nsamples", "seqlen", "batch_size", "seed")
METHOD_KEYS = ("method", "gptaq_alpha")


def load_preset(config: str) -> dict:
    """A preset by name (configs/NAME.json) or by path."""
    path = Path(config)
    if not path.is_file():
        path = CONFIG_DIR / f"{config.removesuffix('.json')}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json"))) or "none found"
        raise UsageError(f"--config {config}: no such file or preset (presets: {known})")
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"--config {path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    unknown = set(preset) - set(QUANT_KEYS) - set(RUN_KEYS) - set(METHOD_KEYS) - {"format"}
    if unknown:
        raise UsageError(f"--config {path}: unknown keys {sorted(unknown)}")
    return preset


@dataclass(frozen=True)
class RunSettings:
    """One quantize run's settings, resolved and checked (run_settings, resolve_run): the
    quantization itself, the calibration, the method with its alpha, and --target-bits.
    seqlen None: SEQLEN, or the model's context when that is shorter (for_model; an explicit one
    beyond the context is refused there, with the model known)."""

    quant: QuantConfig
    dataset: str = DATASET
    nsamples: int = NSAMPLES
    seqlen: int | None = None
    batch_size: int = BATCH_SIZE
    seed: int = SEED
    method: str = DEFAULT_METHOD
    gptaq_alpha: float | None = DEFAULT_ALPHA[DEFAULT_METHOD]
    target_bits: float | None = None

    def calibration(self) -> dict:
        """The calibration settings by name (RUN_KEYS)."""
        return {k: getattr(self, k) for k in RUN_KEYS}

    def api_arguments(self) -> dict:
        """The keyword arguments of api.quantize that carry these settings (all but quant)."""
        return {
            **self.calibration(),
            "method": self.method,
            "gptaq_alpha": self.gptaq_alpha,
            "target_bits": self.target_bits,
        }

    def for_model(self, config) -> RunSettings:
        """These settings with the seqlen the model's transformers config allows
        (calibration_seqlen): UsageError for one beyond its context."""
        return replace(self, seqlen=calibration_seqlen(config, self.seqlen))

    def quantization_meta(self) -> dict:
        """What quantization_config's meta records of the method and the target (plain GPTQ and
        uniform settings add nothing)."""
        meta = {}
        if self.method != "gptq":
            meta.update(method=self.method, gptaq_alpha=self.gptaq_alpha)
        if self.target_bits is not None:
            meta.update(target_bits=self.target_bits)
        return meta


def run_settings(
    quant: QuantConfig | None = None,
    *,
    dataset: str = DATASET,
    nsamples: int = NSAMPLES,
    seqlen: int | None = None,
    batch_size: int = BATCH_SIZE,
    seed: int = SEED,
    method: str | None = None,
    gptaq_alpha: float | None = None,
    target_bits: float | None = None,
) -> RunSettings:
    """RunSettings from values given one by one (api.quantize's arguments), checked: counts at
    least 1, the method and its alpha (resolve_method). quant None: QuantConfig's defaults."""
    check_at_least_one(nsamples=nsamples, seqlen=seqlen, batch_size=batch_size)
    method, gptaq_alpha = resolve_method(method, gptaq_alpha, target_bits)
    return RunSettings(
        quant or QuantConfig(),
        dataset,
        nsamples,
        seqlen,
        batch_size,
        seed,
        method,
        gptaq_alpha,
        target_bits,
    )


def resolve_run(preset: str | None, flags: dict) -> RunSettings:
    """The preset (name or path, load_preset) overlaid with the flags that were given (None: not
    given; keys QUANT_KEYS, RUN_KEYS, METHOD_KEYS, "format" and "target_bits"), over the defaults
    above and QuantConfig's. UsageError for a value or combination the run cannot take."""
    merged = load_preset(preset) if preset else {}
    merged.update({k: v for k, v in flags.items() if v is not None})
    try:
        quant = QuantConfig(
            **{k: merged[k] for k in QUANT_KEYS if k in merged},
            checkpoint_format=merged.get("format"),
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    return run_settings(
        quant,
        **{k: merged[k] for k in (*RUN_KEYS, *METHOD_KEYS, "target_bits") if k in merged},
    )
