"""The defaults and allowed values of quantize and eval runs, decided here once: the CLI's options
and help, the Python API's signatures, the dry run and the checks on them read these names. No
torch here: the CLI's --help imports this module.

May import: errors.
"""

from __future__ import annotations

from gptq_cli.errors import UsageError

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
    "check_at_least_one",
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
