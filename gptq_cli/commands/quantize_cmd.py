"""`gptq quantize MODEL`: solve + pack into a GPTQ checkpoint."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import typer

from gptq_cli.commands.common import (
    DEBUG_OPTION,
    JSON_OPTION,
    QUIET_OPTION,
    TRUST_REMOTE_CODE_OPTION,
    console,
    emit_json,
    progress_bar,
    run,
    say,
    show_progress,
)
from gptq_cli.commands.quantize_report import (
    print_dry_run,
    print_module_table,
    print_summary,
    run_summary,
)
from gptq_cli.errors import UsageError
from gptq_cli.settings import (
    BATCH_SIZE,
    DATASET,
    DEFAULT_ALPHA,
    DEFAULT_METHOD,
    METHODS,
    MIXED_ALPHA,
    NSAMPLES,
    SEED,
    SEQLEN,
    resolve_run,
)

EXAMPLES = """
Examples:

\b
  gptq quantize smollm2-135m --nsamples 128 --seqlen 512 -o smollm2-gptq
  gptq quantize meta-llama/Llama-2-7b-hf --bits 4 --desc-act --static-groups \\
      -o llama2-7b-gptq
  gptq quantize ./my-model --config llama-3bit-g128 --dataset calib.jsonl \\
      --dry-run
  gptq quantize meta-llama/Llama-2-70b-hf -o llama2-70b-gptq --resume
  gptq quantize ./my-model --target-bits 3.5 -o my-model-mixed
  gptq quantize ./my-model --target-bits 4.25 --dry-run \\
      --measurements my-model-mixed/measurements.json
"""


def quantize(
    model: str = typer.Argument(
        ...,
        metavar="MODEL",
        help="Hub id, local HF directory, .gguf file, or a built-in name (smollm2-135m).",
    ),
    bits: int | None = typer.Option(None, "--bits", help="2, 3, 4 or 8 (default 4)."),
    group_size: int | None = typer.Option(
        None, "--group-size", help="Columns per group, -1 = per channel (default 128)."
    ),
    desc_act: bool | None = typer.Option(
        None,
        "--desc-act/--no-desc-act",
        help="Act-order: quantize columns by decreasing Hessian diagonal (default off).",
    ),
    sym: bool | None = typer.Option(
        None, "--sym/--asym", help="Symmetric (default) or asymmetric; asym is written as gptq_v2."
    ),
    static_groups: bool | None = typer.Option(
        None,
        "--static-groups/--no-static-groups",
        help="Find every group's scale and zero on the original weights, before any error update "
        "(as AutoGPTQ/GPTQModel); with act-order, groups of original columns.",
    ),
    act_group_aware: bool | None = typer.Option(
        None,
        "--act-group-aware/--no-act-group-aware",
        help="Without --desc-act: solve groups (and columns in them) by decreasing Hessian "
        "diagonal, keeping g_idx = k // g (per channel: act-order at no cost; default on).",
    ),
    true_sequential: bool | None = typer.Option(
        None,
        "--true-sequential/--no-true-sequential",
        help="Quantize q/k/v → o → gate/up → down in turn (default on).",
    ),
    damp_percent: float | None = typer.Option(
        None,
        "--damp-percent",
        help="Relative damping (default 0.01), raised automatically when the Hessian is not "
        "positive definite.",
    ),
    mse: bool | None = typer.Option(
        None, "--mse/--no-mse", help="Search clipping ranges that minimise error."
    ),
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        help=f"{DATASET} (default, offline), c4, wikitext2, a .txt/.jsonl/.json/.parquet path, "
        "or a Hub dataset id. A .jsonl of input_ids rows is used as-is.",
    ),
    dataset_path: str | None = typer.Option(
        None, "--dataset-path", help="Offline copy of a named dataset."
    ),
    nsamples: int | None = typer.Option(
        None, "--nsamples", help=f"Calibration samples (default {NSAMPLES})."
    ),
    seqlen: int | None = typer.Option(
        None, "--seqlen", help=f"Tokens per calibration sample (default {SEQLEN})."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help=f"Samples per forward pass (default {BATCH_SIZE})."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help=f"Calibration sampling seed (default {SEED})."
    ),
    device: str | None = typer.Option(None, "--device", help="cuda if present, else cpu."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="Activation dtype: auto, float16, bfloat16, float32."
    ),
    fmt: str | None = typer.Option(
        None, "--format", help="gptq (v1, default) or gptq_v2 (forced for asym)."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Output directory (default <model>-gptq-<bits>bit-g<group>)."
    ),
    work_dir: Path | None = typer.Option(
        None,
        "--work-dir",
        help="Where finished blocks are kept until the checkpoint is written (default "
        "<output>.work); a rerun with the same settings continues from it.",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue an interrupted run; an error when there is no work dir to continue (a "
        "plain rerun continues too, or starts afresh).",
    ),
    config: str | None = typer.Option(
        None, "--config", help="A preset from configs/ (name or path); flags override it."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print what would be quantized, with memory and time estimates, and exit.",
    ),
    table: bool = typer.Option(
        False,
        "--table",
        help="Also print every module's loss, damp and seconds (always in "
        "the output's quant_log.json).",
    ),
    target_bits: float | None = typer.Option(
        None,
        "--target-bits",
        help="Mixed precision: choose each linear's bits and group size so that the quantized "
        "linears average at most this many stored bits per weight (scales, zeros, g_idx "
        "counted), least loss first. Replaces --bits/--group-size.",
    ),
    candidates: str | None = typer.Option(
        None,
        "--candidates",
        help="With --target-bits: the settings to "
        'choose from, "4g128,3g64" (g-1: per channel) or "bits=3,4 group=64,128" (default '
        "bits 2,3,4,8 x group 32,64,128).",
    ),
    measurements: Path | None = typer.Option(
        None,
        "--measurements",
        help="With --target-bits: the measurements.json an earlier --target-bits run left beside "
        "its checkpoint (same model, calibration, settings): no new measurement; with "
        "--dry-run, prints the allocation.",
    ),
    method: str | None = typer.Option(
        None,
        "--method",
        help=f"One of {', '.join(METHODS)} (default {DEFAULT_METHOD}). gptaq-ls: each layer aims "
        "at the full-precision model's output on full-precision inputs, by GPTQ run on the "
        "least-squares fit of that output (one more stream of calibration activations, about "
        "twice the time); gptaq: the same aim by GPTAQ's own update (Li et al. 2025); gptq: "
        "each layer's own output on the quantized model's inputs. Same file format.",
    ),
    gptaq_alpha: float | None = typer.Option(
        None,
        "--gptaq-alpha",
        help="With --method gptaq or gptaq-ls: the weight of the full-precision aim, in (0, 1] "
        f"(default for gptaq-ls {DEFAULT_ALPHA['gptaq-ls']:g}, the exact fit, or "
        f"{MIXED_ALPHA['gptaq-ls']:g} with --target-bits; {DEFAULT_ALPHA['gptaq']:g} for gptaq, "
        "the authors').",
    ),
    trust_remote_code: bool = TRUST_REMOTE_CODE_OPTION,
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Quantize a causal LM with GPTQ and write a GPTQ checkpoint that transformers, GPTQModel
    and vLLM load."""
    flags = dict(
        bits=bits,
        group_size=group_size,
        desc_act=desc_act,
        sym=sym,
        static_groups=static_groups,
        act_group_aware=act_group_aware,
        true_sequential=true_sequential,
        damp_percent=damp_percent,
        mse=mse,
        dataset=dataset,
        nsamples=nsamples,
        seqlen=seqlen,
        batch_size=batch_size,
        seed=seed,
        format=fmt,
        method=method,
        gptaq_alpha=gptaq_alpha,
        target_bits=target_bits,
    )

    def work():
        run = resolve_run(config, flags)
        cands = _mixed_options(
            target_bits, candidates, measurements, {k: v for k, v in flags.items() if v is not None}
        )
        if dry_run:
            from gptq_cli.quantization.dry_run import estimate

            report = estimate(
                model,
                run,
                device=device,
                dtype=dtype,
                candidates=cands,
                measurements=measurements,
                trust_remote_code=trust_remote_code,
            )
            print_dry_run(report, json_out, quiet)
            return
        from gptq_cli.api import quantize as api_quantize

        with progress_bar(quiet or json_out) as bar:
            blocks = bar.add_task("blocks", total=None)

            # a log, not a terminal: a line a block
            plain_lines = not (quiet or json_out or show_progress(quiet))
            t0 = time.perf_counter()

            def on_progress(kind, *args):
                if kind == "block":
                    bar.update(blocks, completed=args[0], total=args[1])
                    if plain_lines and args[0]:
                        console.print(
                            f"block {args[0]}/{args[1]} quantized "
                            f"({time.perf_counter() - t0:.0f} s)",
                            highlight=False,
                        )
                elif kind == "measure":
                    bar.update(
                        blocks, description="measuring candidates", completed=args[0], total=args[1]
                    )
                    if plain_lines:
                        console.print(
                            f"block {args[0]}/{args[1]} measured ({time.perf_counter() - t0:.0f} "
                            "s)",
                            highlight=False,
                        )
                elif kind == "module":
                    bar.update(blocks, description=f"blocks · {args[0].name}")
                elif kind == "resume" and not (quiet or json_out):
                    console.print(
                        f"continuing {args[2]}: {args[0]} of {args[1]} blocks already quantized",
                        highlight=False,
                    )
                elif kind == "note":  # a setting not applied as asked: said even with --quiet
                    say("note", args[0], style="bold yellow")

            # What the user typed, under the console script's name however Python was started; None
            # when the command was invoked programmatically (sys.argv is then some other program's).
            command = shlex.join(["gptq", *sys.argv[1:]]) if "quantize" in sys.argv[1:] else None
            result = api_quantize(
                model,
                run.quant,
                dataset_path=dataset_path,
                device=device,
                dtype=dtype,
                output=output,
                work_dir=work_dir,
                resume=resume,
                command=command,
                progress=on_progress,
                candidates=cands,
                measurements=measurements,
                trust_remote_code=trust_remote_code,
                **run.api_arguments(),
            )
        if not result.writer:  # another torchrun rank: rank 0 reports the checkpoint it wrote
            return
        summary = run_summary(model, result, run.quant)
        if json_out:
            emit_json(summary)
        elif not quiet:
            if table:
                print_module_table(result)
            print_summary(summary)

    run(work, debug=debug)


def _mixed_options(
    target_bits: float | None, candidates: str | None, measurements: Path | None, settings: dict
) -> list | None:
    """The candidate list for --target-bits (None without it); usage errors for options that
    contradict it."""
    if target_bits is None:
        if candidates is not None or measurements is not None:
            raise UsageError(
                "--candidates and --measurements go with --target-bits; add --target-bits B"
            )
        return None
    given = [f"--{k.replace('_', '-')}" for k in ("bits", "group_size") if k in settings]
    if given:
        raise UsageError(
            "--target-bits chooses bits and group size per module: leave out "
            f"{' and '.join(given)} (use --candidates to restrict the choice)"
        )
    if measurements is not None and not measurements.is_file():
        raise UsageError(
            f"--measurements {measurements}: no such file; pass the measurements.json a "
            f"--target-bits run left beside its checkpoint"
        )
    from gptq_cli.quantization.allocate import parse_candidates

    return parse_candidates(candidates)
