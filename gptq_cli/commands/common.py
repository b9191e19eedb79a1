"""What every subcommand shares: error handling and exit codes, --json output, progress on stderr."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gptq_cli.errors import GptqError, noting_interrupts

# Progress, tables and logs go to stderr so that stdout carries only the --json object.
console = Console(stderr=True)

JSON_OPTION = typer.Option(False, "--json", help="Print one machine-readable JSON object on stdout.")
QUIET_OPTION = typer.Option(False, "--quiet", "-q", help="No progress bars or tables.")
DEBUG_OPTION = typer.Option(False, "--debug", help="Show the full traceback on errors.")


def run(work: Callable[[], Any], *, debug: bool = False) -> Any:
    """Run a command body; turn our errors into one stderr line and the right exit code."""
    with noting_interrupts() as interrupted:
        try:
            return work()
        except GptqError as e:
            if debug:
                raise
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130)
        except Exception as e:
            if interrupted():  # Ctrl-C that landed in a C extension and came out as that extension's error
                console.print("[bold red]interrupted[/]")
                raise typer.Exit(130)
            if debug:
                raise
            # an unexpected failure of the work: one line unless --debug
            console.print(f"[bold red]error:[/] {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(1)


def emit_json(obj: Any) -> None:
    """The one JSON object a command prints on stdout with --json."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def show_progress(quiet: bool) -> bool:
    return not quiet and console.is_terminal


@contextmanager
def progress_bar(quiet: bool) -> Iterator[Progress]:
    """A rich progress bar on stderr, disabled when not a TTY or --quiet."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                   disable=not show_progress(quiet), transient=False)
    with bar:
        yield bar
