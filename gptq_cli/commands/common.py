"""What every subcommand shares: error handling and exit codes, --json output, progress on
stderr, and keeping other libraries' logs, warnings and progress bars off the terminal."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from gptq_cli.errors import GptqError, Interrupted, describe_os_error, noting_interrupts

# Progress, tables and logs go to stderr so that stdout carries only the --json object.
# markup=False: paths, model names and messages print as typed ("x[/]" or "a[bold]b" are file names,
# not rich markup); styles come from Text.
console = Console(stderr=True, markup=False)

JSON_OPTION = typer.Option(
    False, "--json", help="Print one machine-readable JSON object on stdout."
)
TRUST_REMOTE_CODE_OPTION = typer.Option(
    False,
    "--trust-remote-code",
    help="Allow a model whose config.json names its own code (auto_map) to run that code; only "
    "for code you trust.",
)
QUIET_OPTION = typer.Option(False, "--quiet", "-q", help="No progress bars or tables.")
DEBUG_OPTION = typer.Option(
    False,
    "--debug",
    help="Show the full traceback on errors, and other libraries' warnings and logs.",
)

# Loggers of libraries that print on import or while loading (transformers' advice is for Python
# callers, e.g. "pass `dtype=torch.float32`"; torchao's failed optional kernels; datasets' retries).
# Our own output is ours.
_NOISY_LOGGERS = (
    "transformers",
    "datasets",
    "huggingface_hub",
    "torch",
    "torchao",
    "accelerate",
    "gptqmodel",
    "urllib3",
    "filelock",
    "fsspec",
)


def say(label: str, message: str, style: str = "bold red") -> None:
    """One line on stderr: a styled `label:` and the message exactly as given."""
    console.print(
        Text.assemble((f"{label}:", style), " ", message), highlight=False, soft_wrap=True
    )


def run(work: Callable[[], Any], *, debug: bool = False) -> Any:
    """Run a command body; turn our errors into one stderr line and the right exit code."""
    quiet_libraries(debug)
    with noting_interrupts() as interrupted:
        try:
            return work()
        except GptqError as e:
            if debug:
                raise
            say("error", str(e))
            raise typer.Exit(e.exit_code) from None
        except Interrupted as e:  # what was kept and how to continue
            say("error", str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print(Text("interrupted", style="bold red"))
            raise typer.Exit(130) from None
        except Exception as e:
            # Ctrl-C that landed in a C extension and came out as that extension's error
            if interrupted():
                console.print(Text("interrupted", style="bold red"))
                raise typer.Exit(130) from None
            if debug:
                raise
            # disk full, no permission...: said plainly
            if isinstance(e, OSError) and e.errno is not None:
                say("error", describe_os_error(e))
                raise typer.Exit(1) from None
            # an unexpected failure of the work: one line unless --debug
            say("error", f"{type(e).__name__}: {e} (rerun with --debug for the traceback)")
            raise typer.Exit(1) from None


def quiet_libraries(debug: bool = False) -> None:
    """Keep other libraries' log lines, Python warnings and tqdm bars off stderr: the progress
    and messages a user sees are ours (a bar on a terminal, one line per block otherwise).
    --debug leaves them all on."""
    if debug:
        return
    # Read when these libraries are imported (after this: commands import them lazily).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # bare tqdm bars, e.g. transformers' "de-quantizing GGUF tensors"
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch  # noqa: F401  (its import sets up its loggers' levels: ours must come after)

    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    # Already imported (the API used in-process): switch them off through their own settings too.
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def emit_json(obj: Any) -> None:
    """The one JSON object a command prints on stdout with --json."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def show_progress(quiet: bool) -> bool:
    return not quiet and console.is_terminal


@contextmanager
def progress_bar(quiet: bool) -> Iterator[Progress]:
    """A rich progress bar on stderr, disabled when not a TTY or --quiet."""
    bar = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show_progress(quiet),
        transient=False,
    )
    with bar:
        yield bar
