"""`gptq inspect CHECKPOINT`: what is in a GPTQ checkpoint, and a validity check (exit 1 on
problems)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table
from rich.text import Text

from gptq_cli.commands.common import (
    DEBUG_OPTION,
    JSON_OPTION,
    QUIET_OPTION,
    console,
    emit_json,
    run,
    say,
)
from gptq_cli.errors import GptqError

# imported in the command: `gptq --help` loads no torch (whose import loads tqdm, too early)
if TYPE_CHECKING:
    from gptq_cli.inspection import InspectReport

EXAMPLES = """
Examples:

\b
  gptq inspect llama2-7b-gptq
  gptq inspect ./TheBloke-Llama-2-7B-GPTQ --json | jq .problems
  gptq inspect smollm2-gptq --json | jq '.loaders[] | select(.loads | not)'
  gptq inspect smollm2-gptq --plot losses.png --quiet
"""


def inspect(
    checkpoint: Path = typer.Argument(
        ...,
        metavar="CHECKPOINT",
        help="Directory of a GPTQ checkpoint (ours, GPTQModel's, AutoGPTQ's).",
    ),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Draw the per-module quantization loss from "
        "quant_log.json to this PNG file (needs matplotlib).",
    ),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Show a GPTQ checkpoint's config, format, maker, modules and size, check that it is valid,
    and say which known loaders (transformers, GPTQModel, AutoGPTQ, vLLM, ExLlama) will load it
    and why not."""

    def work() -> None:
        from gptq_cli.inspection import inspect_checkpoint
        from gptq_cli.losses import plot_losses, read_quant_log

        report = inspect_checkpoint(checkpoint)
        if json_out:
            emit_json(report.to_dict())
        elif not quiet:
            _print_report(report)
        for problem in report.problems:
            say("problem", problem)
        if plot is not None:
            out = plot_losses(read_quant_log(checkpoint), plot, title=Path(report.path).name)
            if not quiet:
                console.print(f"loss plot written to {out}", highlight=False)
        if report.problems:
            raise GptqError(f"{len(report.problems)} problem(s) found in {checkpoint}")

    run(work, debug=debug)


def _size(nbytes: int) -> str:
    value, unit = float(nbytes), "B"
    for bigger in ("KB", "MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"


def _print_report(report: InspectReport) -> None:
    q = report.quant
    summary = Table(title=f"GPTQ checkpoint {report.path}", show_header=False)
    summary.add_row("architecture", report.architecture)
    summary.add_row("made by", report.tool + (" (guessed)" if report.tool_guessed else ""))
    declared = bool(report.quantization_config.get("desc_act", q.desc_act))  # what loaders read
    order = " (solved in act-order)" if q.desc_act and not declared else ""
    summary.add_row(
        "config",
        f"bits={q.bits} group_size={q.group_size} desc_act={declared}{order} sym={q.sym} "
        f"static_groups={q.static_groups} true_sequential={q.true_sequential} "
        f"damp_percent={q.damp_percent}",
    )
    summary.add_row(
        "format", f"{report.declared_format} (zero points look like: {report.zeros_look_like})"
    )
    summary.add_row("quantized modules", str(len(report.modules)))
    settings = sorted({(m.bits, m.group_size) for m in report.modules})
    summary.add_row(
        "bits per weight",
        f"{report.bits_per_weight:.3f} (qweight, qzeros, scales, g_idx)"
        + (
            f"; mixed: {', '.join(f'{b}-bit g{g}' for b, g in settings)}"
            if len(settings) > 1
            else ""
        ),
    )
    summary.add_row(
        "size",
        f"{_size(report.total_bytes)} vs {_size(report.fp16_bytes)} in fp16 "
        f"(compression {report.compression_ratio:.2f}x)",
    )
    check = (
        Text("ok", style="green")
        if report.ok
        else Text(f"{len(report.problems)} problem(s)", style="red")
    )
    if not report.shapes_checked_against_model:
        check.append(
            " (transformers cannot build this architecture: shapes checked against each other only)"
        )
    summary.add_row("check", check)
    console.print(summary)

    modules = Table(title="quantized modules")
    modules.add_column("module", overflow="fold")
    for column in ("bits", "group", "in x out", "act-order", "bias", "bytes"):
        modules.add_column(column, justify="right", no_wrap=True)
    for m in report.modules:
        modules.add_row(
            m.name,
            str(m.bits),
            str(m.group_size),
            f"{m.in_features} x {m.out_features}",
            "yes" if m.act_order else "no",
            "yes" if m.bias else "no",
            _size(m.bytes),
        )
    console.print(modules)
    _print_loaders(report)


def _print_loaders(report: InspectReport) -> None:
    """Which known loader will load it, and each reason against (rules and sources:
    format/compat.py)."""
    table = Table(title="where it loads (--json gives each rule's source)")
    table.add_column("loader", no_wrap=True)
    table.add_column("loads", no_wrap=True)
    table.add_column("why not / caveats", overflow="fold")
    for v in report.loaders:
        loads = Text("yes", style="green") if v.loads else Text("no", style="red")
        table.add_row(
            v.loader,
            loads,
            "\n".join(
                ("" if r["severity"] == "fails" else "(caveat) ") + r["reason"] for r in v.reasons
            ),
        )
    console.print(table)
