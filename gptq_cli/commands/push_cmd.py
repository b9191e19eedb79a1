"""`gptq push CHECKPOINT REPO_ID`: check, then upload a GPTQ checkpoint with a model card to the
Hub."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from gptq_cli.commands.common import (
    DEBUG_OPTION,
    JSON_OPTION,
    QUIET_OPTION,
    console,
    emit_json,
    run,
    say,
    show_progress,
)
from gptq_cli.hub.push import HUB_TIMEOUT

if TYPE_CHECKING:
    from gptq_cli.hub.push import Upload

EXAMPLES = """
Examples:

\b
  gptq push llama2-7b-gptq my-org/Llama-2-7b-GPTQ-4bit-g128
  gptq push smollm2-gptq me/SmolLM2-135M-GPTQ --private --dry-run
  HF_TOKEN=hf_... gptq push ./ckpt my-org/model --revision 4bit-g128 \\
      --commit-message "4-bit, group 128" --json
"""


def push(
    checkpoint: Path = typer.Argument(
        ..., metavar="CHECKPOINT", help="Directory of the GPTQ checkpoint to publish."
    ),
    repo_id: str = typer.Argument(
        ..., metavar="REPO_ID", help="OWNER/NAME on the Hub; created if it does not exist."
    ),
    private: bool = typer.Option(
        False, "--private", help="Create the repo private (an existing repo keeps its visibility)."
    ),
    revision: str | None = typer.Option(
        None, "--revision", help="Branch to commit to (created from main if needed; default main)."
    ),
    commit_message: str | None = typer.Option(
        None,
        "--commit-message",
        help='Commit summary (default: "Upload N-bit GPTQ checkpoint with gptq_cli VERSION").',
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="List the files and sizes and print the model card; send nothing (no token needed).",
    ),
    timeout: float = typer.Option(
        HUB_TIMEOUT,
        "--timeout",
        help="Seconds to wait to connect and for each answer of the Hub before giving up.",
        min=1,
    ),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Upload a GPTQ checkpoint to the Hugging Face Hub after `gptq inspect`'s validity check, with
    a model card.

    The card (README.md: YAML metadata, quantization settings, the quantize command,
    eval_results.json, how to load it) is generated unless the checkpoint already has a README.md,
    which is then sent unchanged.
    Token: HF_TOKEN or `hf auth login`. Server: HF_ENDPOINT (default the Hugging Face Hub)."""

    def work() -> None:
        from gptq_cli.hub.push import (
            CheckpointRefused,
            check_repo_id,
            hub_token,
            prepare_upload,
            push_checkpoint,
        )

        check_repo_id(repo_id)
        token = None if dry_run else hub_token()
        try:
            upload = prepare_upload(checkpoint, repo_id)
        except CheckpointRefused as e:
            for problem in e.problems:
                say("problem", problem)
            raise
        if dry_run:
            if json_out:
                emit_json({"dry_run": True, **upload.to_dict()})
            elif not quiet:
                _print_upload(upload)
            return
        with Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not show_progress(quiet or json_out),
        ) as bar:
            task = bar.add_task(f"pushing to {repo_id}", total=upload.total_bytes)
            result = push_checkpoint(
                upload,
                token=token,
                private=private,
                revision=revision,
                commit_message=commit_message,
                timeout=timeout,
                on_file=lambda f: bar.update(task, advance=f.size, description=f.path_in_repo),
            )
        if json_out:
            emit_json(result)
        elif not quiet:
            console.print(
                f"pushed {len(result['files'])} files ({result['bytes'] / 1e6:.1f} MB) to "
                f"{result['url']} @ {result['revision']}: {result['commit_url']}",
                highlight=False,
                soft_wrap=True,
            )

    run(work, debug=debug)


def _print_upload(upload: Upload) -> None:
    table = Table(title=f"dry run: would push {upload.checkpoint} to {upload.repo_id}")
    table.add_column("file", overflow="fold")
    table.add_column("bytes", justify="right")
    for f in upload.files:
        table.add_row(
            f.path_in_repo + ("  (generated card)" if f.content is not None else ""), f"{f.size:,}"
        )
    table.add_row("total", f"{upload.total_bytes:,}")
    console.print(table)
    kept = "README.md (the checkpoint's own, kept)"
    console.rule("README.md (generated)" if upload.card_generated else kept)
    console.print(upload.card, markup=False, highlight=False, soft_wrap=True)
