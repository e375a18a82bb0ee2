"""CLI commands of the monitor area: `janus-job monitor` (the GPU-balance sidecar) and `janus-job status`."""

from __future__ import annotations

from pathlib import Path

import typer

from janus_job.monitor import sidecar


def register(app: typer.Typer) -> None:
    """Adds this area's commands to the main app."""
    app.command("monitor")(monitor)
    app.command("status")(status)


def monitor(
    stats_dir: Path = typer.Option(..., "--stats-dir", help="Directory the ranks write rank-<N>.json to."),
    port: int = typer.Option(sidecar.DEFAULT_PORT, "--port", help="Port of /metrics (0 picks a free one)."),
    host: str = typer.Option(sidecar.DEFAULT_HOST, "--host", help="Address /metrics listens on."),
    interval: float = typer.Option(
        sidecar.DEFAULT_INTERVAL_SECONDS, "--interval", help="Seconds between scans and log lines."
    ),
    warn_ratio: float = typer.Option(
        sidecar.DEFAULT_WARN_RATIO,
        "--warn-ratio",
        help="WARN when a node's spread (max-min)/max of GPU used memory exceeds this fraction.",
    ),
    stale_after: float = typer.Option(
        sidecar.DEFAULT_STALE_AFTER_SECONDS,
        "--stale-after",
        help="WARN when a rank's stats file is older than this many seconds.",
    ),
) -> None:
    """Run the GPU-balance sidecar: log per-node memory balance and serve Prometheus metrics."""
    config = sidecar.MonitorConfig(
        stats_dir=stats_dir,
        port=port,
        host=host,
        interval_seconds=interval,
        warn_ratio=warn_ratio,
        stale_after_seconds=stale_after,
    )
    raise typer.Exit(sidecar.serve(config))


def status(
    spec_path: Path = typer.Argument(..., help="Job spec YAML (the chart's values file)."),
    watch: bool = typer.Option(False, "--watch", help="Print the screen again every --interval seconds."),
    interval: float = typer.Option(30.0, "--interval", min=1.0, help="Seconds between screens with --watch."),
) -> None:
    """One screen about a job from its feature store and checkpoint URL alone (no cluster access)."""
    import time

    from janus_job.config.load import load_spec
    from janus_job.monitor.status import job_status

    spec = load_spec(spec_path)
    while True:
        screen = "\n".join(job_status(spec).lines())
        if watch:
            typer.echo(f"\x1b[2J\x1b[H{time.strftime('%Y-%m-%d %H:%M:%S')}  (every {interval:g}s, Ctrl-C ends)")
        typer.echo(screen)
        if not watch:
            return
        time.sleep(interval)
