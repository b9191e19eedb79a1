"""`gptq pack PATH -o OUT`: turn PATH into a final GPTQ checkpoint.

PATH is dispatched on what it is: a quantize work directory (plan.json + blocks/) is assembled into
a checkpoint by the same code quantize ends with (gptq_cli.export.pack_workdir); a GPTQ checkpoint
directory (config.json with a quantization_config) is converted (zero-point format, shards) by
gptq_cli.convert. Anything else is refused with what PATH must be.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import typer
from rich.text import Text

from gptq_cli.commands.common import (
    DEBUG_OPTION,
    JSON_OPTION,
    QUIET_OPTION,
    console,
    emit_json,
    run,
    show_progress,
)
from gptq_cli.errors import UsageError
from gptq_cli.format.config import FORMATS

EXAMPLES = """
Examples:

\b
  gptq pack llama2-7b-gptq.work -o llama2-7b-gptq
  gptq pack llama2-7b-gptq-asym --format gptq_v2 -o llama2-7b-gptq-v2
  gptq pack ./TheBloke-Llama-2-7B-GPTQ --max-shard-size 2GB -o shards-2gb
  gptq pack gptqmodel-out --format gptq -o for-vllm --json
"""


def pack(
    path: Path = typer.Argument(
        ...,
        metavar="WORKDIR|CHECKPOINT",
        help="The work directory of a quantize run whose blocks are all finished, or a GPTQ "
        "checkpoint directory (ours, GPTQModel's, AutoGPTQ's) to convert.",
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="The new checkpoint directory (must not exist)."
    ),
    fmt: str | None = typer.Option(
        None,
        "--format",
        help="gptq (v1, stores zero-1: what every loader reads) or gptq_v2 (stores zero; needed "
        "for asymmetric zeros of 0). Default: keep the source's.",
    ),
    max_shard_size: str = typer.Option(
        "5GB",
        "--max-shard-size",
        help="Largest weights file, e.g. 5GB, 500MB, 2GiB; above it the weights are split into "
        "shards with an index.",
    ),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Write the checkpoint of a finished quantize work directory, or convert a GPTQ checkpoint
    to another zero-point format (gptq <-> gptq_v2) and/or re-shard it; the tokenizer, generation
    config, quant_log.json and eval_results.json come along."""

    def work() -> None:
        from gptq_cli.export import claim_output
        from gptq_cli.quantization.workdir import check_new_directory

        if fmt is not None and fmt not in FORMATS:
            raise UsageError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
        from gptq_cli.format.checkpoint import parse_size

        if parse_size(max_shard_size) < 1:
            raise UsageError(
                f"--max-shard-size {max_shard_size}: give a size above zero, like 5GB or 500MB"
            )
        check_new_directory(output, "--output")

        busy = (
            console.status(Text(f"packing {path} → {output}"))
            if show_progress(quiet or json_out)
            else nullcontext()
        )
        with claim_output(output):
            return write(busy)

    def write(busy) -> None:
        from gptq_cli.format.reader import is_quantized_checkpoint, read_quant_config, weight_files
        from gptq_cli.quantization.workdir import WorkDir, is_work_dir

        if is_work_dir(path):
            from gptq_cli.export import pack_workdir

            source_format = WorkDir(path).read_plan()["config"]["checkpoint_format"]
            with busy:
                out = pack_workdir(
                    path, output, checkpoint_format=fmt, max_shard_size=max_shard_size
                )
        elif is_quantized_checkpoint(path):
            from gptq_cli.convert import convert_checkpoint

            source_format = read_quant_config(path).checkpoint_format
            with busy:
                out = convert_checkpoint(
                    path, output, checkpoint_format=fmt, max_shard_size=max_shard_size
                )
        else:
            raise UsageError(
                f"{path} is not a GPTQ checkpoint directory (config.json with a "
                f"quantization_config, or quantize_config.json) nor a quantize work directory "
                f"(plan.json + blocks/); pass one of those"
            )
        summary = {
            "input": str(path),
            "output": str(out),
            "source_format": source_format,
            "checkpoint_format": read_quant_config(out).checkpoint_format,
            "weight_files": sorted(weight_files(out)),
            "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
        }
        if json_out:
            emit_json(summary)
        elif not quiet:
            console.print(
                f"{summary['input']} ({summary['source_format']}) → {summary['output']} "
                f"({summary['checkpoint_format']}): {len(summary['weight_files'])} weights "
                f"file(s), {summary['bytes'] / 1e6:.1f} MB",
                highlight=False,
            )

    run(work, debug=debug)
