"""Per-module GPTQ losses of our checkpoint beside GPTQModel's, for the same model, settings and
calibration ids (issue 32: where does a perplexity difference at identical settings come from?).

GPTQModel's quant_log.csv holds sum((w - q)^2 / Hinv_ii^2) / 2 / tokens per module; our
quant_log.json holds the same sum without the division (and the tokens beside it), so ours / tokens
is compared with theirs.

    python scripts/compare_losses.py OURS_CKPT GPTQMODEL_CKPT \\
        --out bench/losses_vs_gptqmodel_smollm2_4g128.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path


def geo_mean(values: list[float]) -> float:
    return math.exp(statistics.mean(math.log(v) for v in values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours", type=Path)
    ap.add_argument("theirs", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--note", default="", help="what else to record (e.g. the perplexities measured)"
    )
    args = ap.parse_args()

    theirs = {
        f"model.layers.{r['layer']}.{r['module']}": float(r["loss"])
        for r in csv.DictReader(open(args.theirs / "quant_log.csv"))
    }
    log = json.loads((args.ours / "quant_log.json").read_text())
    ours = {m["name"]: m["loss"] / m["tokens"] for m in log["modules"]}
    ratios = {n: ours[n] / theirs[n] for n in ours if theirs.get(n, 0) > 0}
    by_kind: dict[str, list[float]] = {}
    by_layer: dict[int, list[float]] = {}
    for name, r in ratios.items():
        by_kind.setdefault(name.rsplit(".", 1)[1], []).append(r)
        by_layer.setdefault(int(name.split(".")[2]), []).append(r)
    report = {
        "ours": str(args.ours),
        "theirs": str(args.theirs),
        "config": log["config"],
        "calibration": log["calibration"],
        "dtype": log["dtype"],
        "modules": len(ratios),
        "ratio_ours_to_theirs": {
            "geo_mean": round(geo_mean(list(ratios.values())), 4),
            "median": round(statistics.median(ratios.values()), 4),
            "min": round(min(ratios.values()), 4),
            "max": round(max(ratios.values()), 4),
        },
        "by_kind": {
            k: {"geo_mean": round(geo_mean(v), 4), "min": round(min(v), 4), "max": round(max(v), 4)}
            for k, v in sorted(by_kind.items())
        },
        "by_layer_geo_mean": {
            layer: round(geo_mean(v), 4) for layer, v in sorted(by_layer.items())
        },
        "total_loss": {"ours": sum(ours.values()), "theirs": sum(theirs.values())},
        "note": args.note,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        json.dumps(
            {k: report[k] for k in ("ratio_ours_to_theirs", "by_kind", "total_loss")}, indent=1
        )
    )


if __name__ == "__main__":
    main()
