"""Digests of the checkpoints `gptq quantize` writes for every tiny architecture and every setting
the tests use, so that a refactor can be shown to change no output byte (issue 17): run it before
and after, compare.

    python scripts/checkpoint_digests.py --out /tmp/before.json
    # exit status 1 when a digest changed
    python scripts/checkpoint_digests.py --out /tmp/after.json --compare /tmp/before.json

Each run quantizes a tiny random model (tests/tiny_models.py, saved once per architecture) on 8 x 64
random token ids (the tiny tokenizer maps real text to unknown tokens), in fp32 on the CPU, and
records the sha256 of every file of the output except quant_log.json (it holds wall times),
measurements.json's `seconds` and config.json's `_name_or_path` (the temporary directory the model
was saved to). --archs / --settings narrow the matrix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_models import TINY_CONFIGS, random_input_ids, save_tiny_model  # noqa: E402

# name -> (QuantConfig fields, quantize() keyword arguments)
SETTINGS: dict[str, tuple[dict, dict]] = {
    "4g64": (dict(bits=4, group_size=64), {}),
    "4g128-act": (dict(bits=4, group_size=128, desc_act=True), {}),
    "3g32-static-act": (dict(bits=3, group_size=32, desc_act=True, static_groups=True), {}),
    "2g64-asym-mse": (dict(bits=2, group_size=64, sym=False, mse=True), {}),
    "8-perchannel-v2": (dict(bits=8, group_size=-1, checkpoint_format="gptq_v2"), {}),
    "4g64-no-groupaware": (
        dict(bits=4, group_size=64, act_group_aware=False, true_sequential=False),
        {},
    ),
    "target-3.5": (dict(), dict(target_bits=3.5)),
}


def digests(directory: Path) -> dict[str, str]:
    out = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name != "quant_log.json":
            data = p.read_bytes()
            # all but what differs from run to run whatever the code: measurements.json's time, and
            # config.json's _name_or_path (where the model was read from: a fresh temporary
            # directory each run)
            volatile = {"measurements.json": "seconds", "config.json": "_name_or_path"}.get(p.name)
            if volatile:
                doc = json.loads(data)
                doc.pop(volatile, None)
                data = json.dumps(doc, sort_keys=True).encode()
            out[p.name] = hashlib.sha256(data).hexdigest()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="an earlier --out: exit 1 if any digest differs")
    ap.add_argument("--archs", nargs="*", default=list(TINY_CONFIGS))
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()

    import torch

    from gptq_cli.api import quantize
    from gptq_cli.format.config import QuantConfig

    torch.set_num_threads(2)
    result: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.jsonl"
        calib.write_text(
            "".join(
                json.dumps({"input_ids": r}) + "\n"
                for r in random_input_ids(8, 64, seed=3).tolist()
            )
        )
        for arch in args.archs:
            model = save_tiny_model(Path(tmp) / arch, arch)
            for name in args.settings:
                fields, kwargs = SETTINGS[name]
                out = Path(tmp) / f"{arch}-{name}"
                quantize(
                    str(model),
                    QuantConfig(**fields),
                    dataset=str(calib),
                    nsamples=8,
                    seqlen=64,
                    batch_size=4,
                    device="cpu",
                    dtype="float32",
                    output=out,
                    **{"method": "gptq", **kwargs},
                )
                result[f"{arch}/{name}"] = digests(out)
                print(f"{arch}/{name}: {len(result[f'{arch}/{name}'])} files", flush=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        changed = sorted(k for k in result if before.get(k) != result[k])
        missing = sorted(set(before) - set(result))
        print(
            f"{len(result)} checkpoints compared: {len(changed)} differ"
            + (f": {', '.join(changed)}" if changed else "")
            + (f"; not run now: {', '.join(missing)}" if missing else "")
        )
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
