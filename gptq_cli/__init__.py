"""gptq: a CLI-first GPTQ toolchain for Hugging Face causal language models.

From Python:

    import gptq_cli

    quant = gptq_cli.QuantConfig(bits=4)
    gptq_cli.quantize("smollm2-135m", quant, nsamples=128, seqlen=512, output="out")
"""

__version__ = "0.1.0"

_API = {"quantize": "gptq_cli.api", "QuantConfig": "gptq_cli.format.config"}


def __getattr__(name: str):
    """The Python API, imported on first use so that `gptq --help` does not pay for torch and
    transformers."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gptq_cli' has no attribute {name!r}")
