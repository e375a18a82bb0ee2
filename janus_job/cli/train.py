"""CLI commands of the train area: launch (the PyTorchJob entrypoint), train (one rank), export, demo."""

import typer


def register(app: typer.Typer) -> None:
    """Adds this area's commands to the main app."""

    @app.command()
    def launch(spec: str = typer.Option(..., "--spec", help="Job spec YAML (the pod's mounted spec).")) -> None:
        """PyTorchJob entrypoint: read the operator's PET_* variables and exec torchrun, one rank per GPU."""
        from janus_job.deploy.launch import launch as launch_job

        launch_job(spec)

    @app.command()
    def train(spec: str = typer.Option(..., "--spec", help="Job spec YAML.")) -> None:
        """Run one training rank (under torchrun), or a single-process job without it."""
        from janus_job.train.trainer import run

        run(spec)

    @app.command()
    def export(
        spec: str = typer.Argument(..., help="Job spec YAML of the job whose checkpoint is exported."),
        step: int = typer.Option(None, "--step", min=1, help="Checkpoint step (default: the newest complete one)."),
        out: str = typer.Option(None, "--out", help="Target directory or URL (default: "
                                "<training.checkpoint.url>/export/step-XXXXXXXX)."),
    ) -> None:
        """Write a JanusVLN checkpoint directory from a complete checkpoint (any ZeRO stage and world size),
        on this machine's CPU."""
        from janus_job.config.load import load_spec
        from janus_job.train.export import export_from_checkpoint

        export_from_checkpoint(load_spec(spec), step=step, out=out,
                               progress=lambda line: typer.echo(line))

    @app.command()
    def demo(
        workdir: str = typer.Option(None, "--workdir", help="Where to write the demo's data, store and checkpoints "
                                    "(default: a new temporary directory)."),
        steps: int = typer.Option(6, "--steps", min=1, help="Optimizer steps to train."),
    ) -> None:
        """Local end-to-end run on embedded defaults: synthetic data, tiny encoders, precompute, train."""
        from janus_job.demo.run import run_demo

        run_demo(workdir=workdir, steps=steps)
