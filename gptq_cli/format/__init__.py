"""The GPTQ checkpoint format (SPEC §2): bit packing, one quantized linear, the quantization
config, and checkpoint directories on disk.

May import: errors (and the package's version).
"""

_EXPORTS = {
    "quantized_to_tensors": "checkpoint",
    "read_quant_config": "reader",
    "read_tensors": "reader",
    "write_checkpoint": "checkpoint",
    "QuantConfig": "config",
    "QuantizedWeight": "quantized",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Imported on first use: the CLI reads format.config (no torch) while parsing options, and
    torch's import (seconds, and it loads tqdm before the CLI can switch its bars off) waits for
    a command that needs it."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"gptq_cli.format.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gptq_cli.format' has no attribute {name!r}")
