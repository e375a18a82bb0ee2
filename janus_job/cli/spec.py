"""CLI commands of the spec area: validate, render, schema."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def validate(spec_path: Path = typer.Argument(..., help="Job spec YAML (the chart's values file).")) -> None:
    """Check a job spec; prints what it resolves to, or every problem with its fix."""
    from janus_job.config.load import load_spec
    from janus_job.config.memory import estimate_gpu_memory

    spec = load_spec(spec_path)
    t = spec.training
    resize = f"elastic {spec.min_nodes}-{spec.max_nodes} nodes" if spec.elastic else "fixed"
    typer.echo(
        f"ok: {spec.name}: {t.nodes} node(s) x {t.gpus_per_node} GPUs = {spec.world_size} ranks, "
        f"global batch {spec.global_batch_size} = micro {t.micro_batch_size} x accumulation "
        f"{spec.accumulation_for(spec.world_size)} x {spec.world_size}, ZeRO-{spec.deepspeed.zero_stage}, "
        f"features {spec.features.mode}, resize {resize}\n"
        f"    estimated GPU memory: {estimate_gpu_memory(spec).describe()}"
    )


def render(
    spec_path: Path = typer.Argument(..., help="Job spec YAML."),
    out: Path = typer.Option(..., "--out", help="Directory for deepspeed.json and manifests.yaml."),
    namespace: str = typer.Option("default", help="Release namespace when cluster.namespace is unset."),
) -> None:
    """Write DIR/deepspeed.json and DIR/manifests.yaml (the chart rendered by Helm) for a spec."""
    from janus_job.config.deepspeed import render_deepspeed_config
    from janus_job.config.load import load_spec
    from janus_job.config.schema import spec_to_values
    from janus_job.deploy.render import render_chart, write_outputs

    spec = load_spec(spec_path)
    deepspeed_json = json.dumps(render_deepspeed_config(spec, spec.world_size), indent=2) + "\n"
    manifests = render_chart(spec_to_values(spec), namespace=namespace)
    write_outputs(out, {"deepspeed.json": deepspeed_json, "manifests.yaml": manifests})
    typer.echo(f"wrote {out / 'deepspeed.json'} and {out / 'manifests.yaml'}")


def schema(
    values: bool = typer.Option(False, "--values", help="Print the chart's default values.yaml instead."),
) -> None:
    """Print the JSON Schema of the job spec (= charts/janus-train/values.schema.json)."""
    from janus_job.config.schema import chart_values_yaml, json_schema

    typer.echo(chart_values_yaml() if values else json.dumps(json_schema(), indent=2), nl=not values)


def register(app: typer.Typer) -> None:
    """Adds this area's commands to the main app."""
    app.command("validate")(validate)
    app.command("render")(render)
    app.command("schema")(schema)
