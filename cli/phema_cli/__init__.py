"""The ``phema`` command-line interface (typer + rich)."""
