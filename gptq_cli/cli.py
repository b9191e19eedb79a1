"""The `gptq` console script: a thin Typer layer over gptq_cli's Python API."""

from __future__ import annotations

import typer

from gptq_cli import __version__

app = typer.Typer(
    name="gptq",
    help="Quantize Hugging Face causal LMs with GPTQ, evaluate them, inspect and publish GPTQ "
    "checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help text, wrapped to the terminal: no markup to eat "[plot]" or a bracketed path, no
    # boxed panels that leave 20 columns for the help at a width of 80.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gptq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


# Subcommands register below, one module each under gptq_cli/commands/. short_help: the one line the
# command list shows (a docstring's first sentence would be cut to fit).
from gptq_cli.commands import eval_cmd, inspect_cmd, pack_cmd, push_cmd, quantize_cmd  # noqa: E402

app.command(
    "quantize", epilog=quantize_cmd.EXAMPLES, short_help="Quantize a model into a GPTQ checkpoint."
)(quantize_cmd.quantize)
app.command("inspect", epilog=inspect_cmd.EXAMPLES, short_help="Show and check a GPTQ checkpoint.")(
    inspect_cmd.inspect
)
app.command(
    "eval",
    epilog=eval_cmd.EXAMPLES,
    short_help="Perplexity (and tokens/s) of models and checkpoints.",
)(eval_cmd.eval_command)
app.command(
    "pack",
    epilog=pack_cmd.EXAMPLES,
    short_help="Write a work dir's checkpoint; convert checkpoints.",
)(pack_cmd.pack)
app.command(
    "push",
    epilog=push_cmd.EXAMPLES,
    short_help="Upload a GPTQ checkpoint to the Hub with a model card.",
)(push_cmd.push)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
