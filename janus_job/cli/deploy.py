"""CLI commands of the deploy area: start (the starter Job's entrypoint), upgrade, scale."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

RELEASE_HELP = "Helm release name (as given to helm install)."
NAMESPACE_HELP = "Namespace of the release when cluster.namespace is unset (default: the kubeconfig context's)."


def start(
    namespace: str = typer.Option(..., "--namespace", help="Namespace of the job."),
    pytorchjob: str = typer.Option(..., "--pytorchjob", help="The PyTorchJob to start."),
    precompute_job: str = typer.Option(..., "--precompute-job", help="The precompute Job it waits for."),
    kueue_queue: str | None = typer.Option(None, "--kueue-queue", help="Hand the job to this Kueue LocalQueue "
                                              "instead of resuming it (Kueue owns suspend)."),
    leave_suspended: bool = typer.Option(False, "--leave-suspended", help="Only report; keep the job suspended."),
) -> None:
    """Starter Job entrypoint: wait for the precompute Job, then start training or report its failure."""
    from janus_job.deploy.starter import Target, api_client_from_environment
    from janus_job.deploy.starter import start as run_start

    target = Target(namespace, pytorchjob, precompute_job, kueue_queue, leave_suspended)
    sys.exit(run_start(api_client_from_environment(), target))


def _release(release: str, namespace: str | None, context: str | None, chart: Path | None):
    from kubernetes import config

    from janus_job.deploy.render import CHART_DIR
    from janus_job.deploy.upgrade import Release

    if namespace is None:
        try:
            contexts, active = config.list_kube_config_contexts()
            chosen = next((c for c in contexts if c.get("name") == context), active) if context else active
            namespace = (chosen.get("context") or {}).get("namespace") or "default"
        except (config.ConfigException, OSError):
            namespace = "default"
    return Release(release, namespace, chart or CHART_DIR)


def upgrade(
    spec_path: Path = typer.Argument(..., help="Job spec YAML: the same file helm install was given."),
    release: str = typer.Option("janus-train", "--release", help=RELEASE_HELP),
    namespace: str | None = typer.Option(None, "--namespace", "-n", help=NAMESPACE_HELP),
    context: str | None = typer.Option(None, "--context", help="kubeconfig context (default: the current one)."),
    chart: Path | None = typer.Option(None, "--chart", help="Chart directory (default: this checkout's)."),
    wait_timeout: float | None = typer.Option(None, "--wait-timeout", min=1, help="Seconds to wait for the "
                                                 "pods to stop (default: termination_grace_seconds + 300)."),
) -> None:
    """Change a running job: suspend it, wait until its pods are gone, helm upgrade, resume. No mixed-version pods."""
    from janus_job.config.load import load_spec
    from janus_job.deploy.starter import api_client_from_environment
    from janus_job.deploy.upgrade import upgrade as run_upgrade

    load_spec(spec_path)  # refuse a bad spec before touching the cluster
    run_upgrade(api_client_from_environment(context), spec_path, _release(release, namespace, context, chart),
                wait_timeout_s=wait_timeout)


def scale(
    spec_path: Path = typer.Argument(..., help="Job spec YAML: the same file helm install was given."),
    nodes: int = typer.Option(..., "--nodes", min=1, help="Training nodes (pods) to run on."),
    release: str = typer.Option("janus-train", "--release", help=RELEASE_HELP),
    namespace: str | None = typer.Option(None, "--namespace", "-n", help=NAMESPACE_HELP),
    context: str | None = typer.Option(None, "--context", help="kubeconfig context (default: the current one)."),
    chart: Path | None = typer.Option(None, "--chart", help="Chart directory (default: this checkout's)."),
    wait_timeout: float | None = typer.Option(None, "--wait-timeout", min=1, help="Seconds to wait for the "
                                                 "pods to stop (default: termination_grace_seconds + 300)."),
) -> None:
    """Run the job on NODES nodes: the upgrade flow with training.nodes set in the spec file."""
    from janus_job.deploy.starter import api_client_from_environment
    from janus_job.deploy.upgrade import scale as run_scale

    run_scale(api_client_from_environment(context), spec_path, nodes, _release(release, namespace, context, chart),
              wait_timeout_s=wait_timeout)


def register(app: typer.Typer) -> None:
    """Adds this area's commands to the main app."""
    app.command("start")(start)
    app.command("upgrade")(upgrade)
    app.command("scale")(scale)
