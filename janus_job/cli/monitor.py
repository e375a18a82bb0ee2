"""CLI commands of the monitor area: `janus-job monitor`, the GPU-balance sidecar."""

from __future__ import annotations

from pathlib import Path

import typer

from janus_job.monitor import sidecar


def register(app: typer.Typer) -> None:
    """Adds this area's commands to the main app."""
    app.command("monitor")(monitor)


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

