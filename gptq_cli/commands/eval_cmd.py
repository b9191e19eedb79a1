"""`gptq eval MODEL [--compare MODEL...]`: perplexity with the GPTQ paper's protocol, and
tokens/s."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from gptq_cli.commands.common import (
    DEBUG_OPTION,
    JSON_OPTION,
    QUIET_OPTION,
    TRUST_REMOTE_CODE_OPTION,
    console,
    emit_json,
    progress_bar,
    run,
)
from gptq_cli.errors import UsageError
from gptq_cli.settings import EVAL_BATCH_SIZE, EVAL_DATASET, EVAL_SEQLEN

EXAMPLES = """
Examples:

\b
  gptq eval llama2-7b-gptq --dataset wikitext2
  gptq eval ./smollm2-gptq --dataset wikitext2 \\
      --dataset-path wikitext2_raw_test.txt --limit 40 --speed --save
  gptq eval meta-llama/Llama-2-7b-hf --compare llama2-7b-gptq \\
      llama2-7b-gptq-3bit --limit 40 --json
  gptq eval ./my-model --dataset notes.txt --seqlen 512
"""


def eval_command(
    models: list[str] = typer.Argument(
        ...,
        metavar="MODEL",
        help="Hub id, local HF directory, GPTQ checkpoint, .gguf file or built-in name. Several "
        "only with --compare.",
    ),
    dataset: str = typer.Option(
        EVAL_DATASET,
        "--dataset",
        help="wikitext2 (test split), c4 (the GPTQ paper's 256 validation windows), a "
        ".txt/.jsonl/.json/.parquet file, or a Hub dataset id.",
    ),
    dataset_path: str | None = typer.Option(
        None,
        "--dataset-path",
        help="Offline copy of wikitext2 or c4: a file or a directory laid out as on the Hub.",
    ),
    seqlen: int = typer.Option(EVAL_SEQLEN, "--seqlen", help="Tokens per window."),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate only the first N windows."),
    device: str | None = typer.Option(None, "--device", help="cuda if present, else cpu."),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="auto (float32 on CPU, the checkpoint's dtype on GPU), float16, bfloat16, float32.",
    ),
    batch_size: int = typer.Option(
        EVAL_BATCH_SIZE, "--batch-size", help="Windows per forward pass."
    ),
    speed: bool = typer.Option(
        False, "--speed", help="Also measure prefill and decode tokens/s (batch 1, greedy)."
    ),
    compare: bool = typer.Option(
        False,
        "--compare",
        help="Evaluate the first MODEL and every MODEL after it on identical windows; one table "
        "with each ppl ratio to the first (gptq eval BASE --compare A B).",
    ),
    save: bool = typer.Option(
        False,
        "--save",
        help="Write the results to eval_results.json inside each local "
        "model directory (gptq push puts them in the model card).",
    ),
    trust_remote_code: bool = TRUST_REMOTE_CODE_OPTION,
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Perplexity of a full-precision model or a GPTQ checkpoint, with the GPTQ paper's protocol:
    the test text tokenized once and cut into windows of --seqlen tokens, ppl = exp(mean NLL over
    all tokens)."""

    def work() -> None:
        if len(models) > 1 and not compare:
            raise UsageError(
                f"{len(models)} models given: add --compare to evaluate them on the same windows"
            )
        if compare and len(models) < 2:
            raise UsageError(
                "--compare needs a second model: gptq eval BASE --compare OTHER [OTHER...]"
            )
        if save:
            not_dirs = [m for m in models if not Path(m).is_dir()]
            if not_dirs:
                raise UsageError(
                    f"--save writes into a local model directory; {not_dirs[0]} is not one"
                )
        from gptq_cli.evaluate import compare as compare_models
        from gptq_cli.evaluate import save_eval_results

        with progress_bar(quiet) as bar:
            tasks: dict[str, int] = {}

            def on_progress(label: str, done: int, total: int) -> None:
                if label not in tasks:
                    tasks[label] = bar.add_task(f"windows · {Path(label).name}", total=total)
                bar.update(tasks[label], completed=done)

            report = compare_models(
                models,
                dataset=dataset,
                seqlen=seqlen,
                limit=limit,
                device=device,
                dtype=dtype,
                speed=speed,
                dataset_path=dataset_path,
                batch_size=batch_size,
                progress=on_progress,
                trust_remote_code=trust_remote_code,
            )
        _refuse_non_finite(report["models"])
        if save:
            for result in report["models"]:
                result["saved"] = str(save_eval_results(result["model"], result))
        if json_out:
            emit_json(report if compare else report["models"][0])
        elif not quiet:
            _print_table(report, compare)

    run(work, debug=debug)


def _refuse_non_finite(results: list[dict]) -> None:
    """A perplexity of nan or inf is no measurement: the model computes NaN/Inf (bad weights, or
    an fp16 overflow)."""
    bad = next((r for r in results if not math.isfinite(r["ppl"])), None)
    if bad is None:
        return
    hint = (
        f"`gptq inspect {bad['model']}` finds NaN/Inf scales in a GPTQ checkpoint"
        if bad["quantized"]
        else "its weights hold NaN/Inf, or float16 overflows (try --dtype float32)"
    )
    raise UsageError(
        f"{bad['model']} gives a perplexity of {bad['ppl']}: the model computes NaN/Inf; {hint}"
    )


def _print_table(report: dict, compare: bool) -> None:
    results = report["models"]
    title = f"{report['dataset']} · {report['windows']} windows × {report['seqlen']} tokens"
    table = Table(title=title)
    columns = ["model", "QuantLinear", "ppl"] + (["ratio"] if compare else [])
    if "speed" in results[0]:
        columns += ["prefill tok/s", "decode tok/s"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "QuantLinear") else "right")
    for r in results:
        row = [r["model"], r["backend"] or "— (full precision)", f"{r['ppl']:.4f}"]
        if compare:
            row.append(f"{r['ppl_ratio']:.4f}")
        if "speed" in r:
            row += [
                f"{r['speed']['prefill_tokens_per_s']:.1f}",
                f"{r['speed']['decode_tokens_per_s']:.1f}",
            ]
        table.add_row(*row)
    console.print(table)
    console.print(
        f"{results[0]['device']}, {results[0]['dtype']}, {results[0]['tokens']} "
        "predicted tokens per model",
        highlight=False,
    )
    for r in results:
        if "saved" in r:
            console.print(f"saved → {r['saved']}", highlight=False)
