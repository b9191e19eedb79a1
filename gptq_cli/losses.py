"""The per-module GPTQ loss log of a checkpoint (quant_log.json, or GPTQModel's quant_log.csv)
and its plot (`gptq inspect --plot`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from gptq_cli.errors import UsageError


def read_quant_log(path: str | Path) -> list[dict[str, Any]]:
    """Per-module quantization log rows ({"name", "loss", ...}) from quant_log.json (ours) or
    GPTQModel's quant_log.csv; UsageError when the checkpoint has neither."""
    path = Path(path)
    if (path / "quant_log.json").is_file():
        modules = json.loads((path / "quant_log.json").read_text()).get("modules")
        if not isinstance(modules, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("name"), str)
            and isinstance(m.get("loss"), (int, float))
            for m in modules
        ):
            raise UsageError(
                f'{path / "quant_log.json"} has no "modules" list of {{name, loss}} rows; '
                f"it is not a gptq quantization log"
            )
        return modules
    if (path / "quant_log.csv").is_file():
        with open(path / "quant_log.csv", newline="") as f:
            return [
                {"name": f"{row['layer']}.{row['module']}", "loss": float(row["loss"])}
                for row in csv.DictReader(f)
            ]
    raise UsageError(
        f"{path} has no quant_log.json (nor GPTQModel's quant_log.csv) to plot; it is written by "
        f"`gptq quantize`"
    )


def plot_losses(rows: list[dict[str, Any]], out_file: str | Path, title: str = "") -> Path:
    """Draw the per-module GPTQ loss (log scale, in quantization order, coloured by module kind)
    to a PNG."""
    try:
        import matplotlib
    except ImportError as e:
        raise UsageError("--plot needs matplotlib: pip install 'gptq-cli[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["name"].rsplit(".", 1)[-1] for r in rows})
    colors = {kind: plt.get_cmap("tab10")(i % 10) for i, kind in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.08 * len(rows)), 30.0), 4.0))
    for kind in kinds:
        points = [
            (i, r["loss"]) for i, r in enumerate(rows) if r["name"].rsplit(".", 1)[-1] == kind
        ]
        ax.bar(
            [i for i, _ in points],
            [max(loss, 1e-12) for _, loss in points],
            color=colors[kind],
            label=kind,
        )
    ax.set_yscale("log")
    ax.set_xlabel("module (quantization order)")
    ax.set_ylabel("GPTQ loss")
    ax.set_title(title or "per-module quantization loss")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out_file = Path(out_file)
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file
