"""Quantize one model with GPTQModel (the baseline we compare against) and report time and peak RSS
as JSON.

Runs in its own process so that peak RSS belongs to this run alone:

    GPTQMODEL_CPU_WORKERS=2 python scripts/gptqmodel_run.py MODEL_DIR OUT_DIR \
        --bits 4 --group-size 128 --dtype bfloat16 \
        --calib ../shared/data/calib_smollm2_c4_128x512.jsonl

Settings both tools have are set explicitly (bits, group size, desc_act, sym, damp 0.01,
true-sequential, no MSE, no static groups); features only GPTQModel has stay at its defaults, as its
users get them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--desc-act", action="store_true")
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--damp-percent", type=float, default=0.01)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--nsamples", type=int, default=128)
    args = ap.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

    import torch
    from gptqmodel import GPTQModel, QuantizeConfig, __version__

    with open(args.calib) as f:
        rows = [json.loads(line)["input_ids"] for line in f if line.strip()][: args.nsamples]
    calibration = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in rows]

    # GPTQModel's group-aware reordering (its default without act-order) refuses per-channel
    # quantization.
    extra = {"act_group_aware": False} if args.group_size == -1 else {}
    qcfg = QuantizeConfig(
        bits=args.bits,
        group_size=args.group_size,
        desc_act=args.desc_act,
        sym=not args.asym,
        damp_percent=args.damp_percent,
        true_sequential=True,
        static_groups=False,
        mse=0.0,
        **extra,
    )
    t0 = time.perf_counter()
    model = GPTQModel.load(args.model, qcfg, dtype=getattr(torch, args.dtype), device="cpu")
    t_load = time.perf_counter() - t0
    model.quantize(calibration, batch_size=1)
    t_quant = time.perf_counter() - t0 - t_load
    model.save(args.out)
    wall = time.perf_counter() - t0
    json.dump(
        {
            "tool": "gptqmodel",
            "version": __version__,
            "torch": torch.__version__,
            "bits": args.bits,
            "group_size": args.group_size,
            "desc_act": args.desc_act,
            "sym": not args.asym,
            "damp_percent": args.damp_percent,
            "act_group_aware": qcfg.act_group_aware,
            "dtype": args.dtype,
            "nsamples": len(calibration),
            "seqlen": len(rows[0]),
            "load_s": round(t_load, 2),
            "quantize_s": round(t_quant, 2),
            "wall_s": round(wall, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "out": args.out,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
