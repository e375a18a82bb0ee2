"""The `janus-job` command. Each area (spec, features, train, checkpoint, monitor, status, deploy) registers
its subcommands."""

from __future__ import annotations

import sys

import typer

from janus_job.cli import checkpoint, deploy, features, monitor, spec, status, train
from janus_job.errors import JobError

app = typer.Typer(
    name="janus-job",
    help="Validate, render, precompute, train and monitor janus-train jobs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _group() -> None:
    """Keeps `janus-job` a command group whatever is registered."""


for area in (spec, features, train, checkpoint, monitor, status, deploy):
    area.register(app)


def main() -> None:
    try:
        app(standalone_mode=True)
    except JobError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
