"""The plain C libraries setup.py builds beside the package (gptq_cli._cpu_columns, _cpu_xtx):
optional, so every caller has a route for when one is missing."""

from __future__ import annotations

import ctypes
import importlib.util

__all__ = ["load_function"]


def load_function(
    library: str, name: str, argtypes: list, restype: object = None
) -> ctypes._CFuncPtr | None:
    """Function `name` of the library gptq_cli.<library>, typed; None where the library was not
    built, does not load, or lacks the function."""
    spec = importlib.util.find_spec(f"gptq_cli.{library}")
    if spec is None or spec.origin is None:
        return None
    try:
        fn = getattr(ctypes.CDLL(spec.origin), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn
