"""One module per subcommand; each holds the Typer-annotated function that cli.py registers."""
