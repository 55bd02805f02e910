"""Sub-command groups of the `simsearch` command, each a Typer app registered by cli.py."""
