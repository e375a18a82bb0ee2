"""CLI commands of the features area."""

import typer


def register(app: typer.Typer) -> None:
    """Adds this area's commands to the main app."""
