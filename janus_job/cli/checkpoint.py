"""CLI commands of the checkpoint area: list a job's complete checkpoints, pin the step it resumes from."""

from __future__ import annotations

import typer

checkpoint_app = typer.Typer(help="Inspect a job's checkpoints and choose the one it resumes from.",
                             no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Adds this area's commands to the main app."""
    app.add_typer(checkpoint_app, name="checkpoint")


def _manager(url: str):
    from janus_job.train.checkpoint import CheckpointManager

    return CheckpointManager(url, 1, 1, rank=0, world_size=1)


@checkpoint_app.command("list")
def list_checkpoints(url: str = typer.Argument(..., help="The job's training.checkpoint.url.")) -> None:
    """Complete checkpoints, oldest first: step, world size, bytes, URL."""
    for ref in _manager(url).complete_checkpoints():
        size = ref.manifest.get("total_bytes", 0)
        typer.echo(f"{ref.step:>10}  world={ref.world_size:<4} bytes={size:<14} {ref.url}")


@checkpoint_app.command("resume-from")
def resume_from(
    url: str = typer.Argument(..., help="The job's training.checkpoint.url."),
    step: int = typer.Argument(..., help="The step the job resumes from at its next start."),
) -> None:
    """Retire every checkpoint newer than STEP, so that the job resumes from STEP."""
    retired = _manager(url).retire_newer_than(step)
    typer.echo(f"the job resumes from step {step}; retired: {retired or 'none'}")
