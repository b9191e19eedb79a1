"""What `gptq quantize` prints when it is done: the dry run's estimate, the end-of-run summary (it
runs the checkpoint's validity check) and the per-module table, or the same as --json."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from gptq_cli.commands.common import console, emit_json
from gptq_cli.format.config import QuantConfig

if TYPE_CHECKING:
    from gptq_cli.api import QuantizeResult

__all__ = ["print_module_table", "print_dry_run", "print_summary", "run_summary"]

WORST_SHOWN = 3  # modules with the largest loss named in the summary


def print_dry_run(report: dict, json_out: bool, quiet: bool) -> None:
    if json_out:
        emit_json(report)
        return
    table = Table(title="gptq quantize --dry-run", show_header=False)
    mixed = report.get("target_bits", {})
    for k, v in report.items():
        if k != "target_bits":
            table.add_row(k, str(v))
    for k, v in mixed.items():  # the per-module choice is in --json; the table gives its totals
        table.add_row(
            f"target_bits.{k}",
            str({a: b for a, b in v.items() if a != "modules"}) if isinstance(v, dict) else str(v),
        )
    console.print(table)


def run_summary(model: str, result: QuantizeResult, quant: QuantConfig) -> dict:
    """What the end of a run reports (--json prints it whole): where the checkpoint is, its size
    against fp16, the time, the modules with the largest loss, the validity check, and the
    commands to run next."""
    from gptq_cli.inspection import inspect_checkpoint

    report = inspect_checkpoint(result.output)
    rows = result.modules
    out = shlex.quote(str(result.output))
    return {
        "model": model,
        "output": str(result.output),
        "seconds": round(result.seconds, 2),
        "phases": result.phases,
        # --target-bits: the allocated one
        "config": result.plan.get("config", quant.to_hf_dict()),
        "modules": len(rows),
        "bits_per_weight": round(report.bits_per_weight, 4),
        "mean_loss": sum(r["loss"] for r in rows) / max(len(rows), 1),
        "worst_modules": [
            {"name": r["name"], "loss": r["loss"]}
            for r in sorted(rows, key=lambda r: r["loss"], reverse=True)[:WORST_SHOWN]
        ],
        "bytes": report.total_bytes,
        "fp16_bytes": report.fp16_bytes,
        "compression_ratio": round(report.compression_ratio, 3),
        "problems": report.problems,
        "loaders": report.loaders_line(),
        "notes": result.notes,
        "quant_log": str(result.output / "quant_log.json"),
        "next": [
            f"gptq eval {shlex.quote(model)} --compare {out} --limit 40",
            f"gptq inspect {out}",
            f"gptq push {out} ORG/NAME",
        ],
    }


def print_summary(summary: dict) -> None:
    """A few lines that fit a terminal: the result stays on screen (the per-module table is
    --table's)."""
    config = summary["config"]
    group = "per channel" if config["group_size"] == -1 else f"group {config['group_size']}"
    worst = ", ".join(f"{m['name']} {m['loss']:.4g}" for m in summary["worst_modules"])
    check = (
        Text("ok", style="green")
        if not summary["problems"]
        else Text(
            f"{len(summary['problems'])} problem(s): gptq inspect {summary['output']}",
            style="bold red",
        )
    )
    phases = ", ".join(
        f"{name} {summary['phases'].get(name, 0):.1f}"
        for name in ("load", "forward", "hessian", "solve", "pack", "write")
    )
    lines = [
        ("quantized", f"{summary['model']} → {summary['output']} in {summary['seconds']:.1f} s"),
        ("seconds", phases),
        (
            "size",
            f"{_mb(summary['bytes'])} vs {_mb(summary['fp16_bytes'])} in fp16 "
            f"({summary['compression_ratio']:.2f}x smaller)",
        ),
        (
            "modules",
            f"{summary['modules']} quantized, "
            + (
                f"mixed ({len(config['dynamic'])} with their own bits/group), most common "
                if config.get("dynamic")
                else ""
            )
            + f"{config['bits']}-bit {group}, {summary['bits_per_weight']} "
            f"bits/weight, {config['checkpoint_format']}; mean loss {summary['mean_loss']:.4g}",
        ),
        ("worst loss", worst),
        ("full table", f"{summary['quant_log']} (or --table)"),
        ("check", check),
        ("loaders", summary["loaders"]),
    ]
    for label, value in lines:
        console.print(
            Text.assemble((f"{label:>10}  ", "bold"), value), highlight=False, soft_wrap=True
        )
    console.print(
        Text("next:", style="bold"),
        *(f"\n  {c}" for c in summary["next"]),
        sep="",
        highlight=False,
        soft_wrap=True,
    )


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def print_module_table(result: QuantizeResult) -> None:
    table = Table(title=f"quantized → {result.output}  ({result.seconds:.1f} s)")
    for col in ("module", "loss", "damp", "seconds"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for r in result.modules:
        table.add_row(r["name"], f"{r['loss']:.4g}", f"{r['damp']:.3g}", f"{r['seconds']:.2f}")
    console.print(table)
