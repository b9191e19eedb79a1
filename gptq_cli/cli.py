"""The `gptq` console script: a thin Typer layer over gptq_cli's Python API."""
from __future__ import annotations

import typer

from gptq_cli import __version__

app = typer.Typer(
    name="gptq",
    help="Quantize Hugging Face causal LMs with GPTQ, evaluate them, inspect and publish GPTQ checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gptq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


# Subcommands register below, one module each under gptq_cli/commands/.
from gptq_cli.commands import inspect_cmd, quantize_cmd  # noqa: E402

app.command("quantize", epilog=quantize_cmd.EXAMPLES)(quantize_cmd.quantize)
app.command("inspect", epilog=inspect_cmd.EXAMPLES)(inspect_cmd.inspect)
from gptq_cli.commands import eval_cmd  # noqa: E402
app.command("eval", epilog=eval_cmd.EXAMPLES)(eval_cmd.eval_command)
from gptq_cli.commands import pack_cmd, push_cmd  # noqa: E402
app.command("pack", epilog=pack_cmd.EXAMPLES)(pack_cmd.pack)
app.command("push", epilog=push_cmd.EXAMPLES)(push_cmd.push)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
