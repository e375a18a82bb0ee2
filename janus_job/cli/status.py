"""CLI command `janus-job status job.yaml`: one screen about a job from its feature store and checkpoint URL
alone.

No cluster access: it reads what the job writes to storage.

* features: the precompute workers' markers and `COMPLETE.json` under `markers/<annotations digest>/`;
* checkpoints: the newest complete `step-*` directory (the checkpoint module's own rule);
* training: `<checkpoint url>/status.json`, the trainer's last log record (written by rank 0 each log
  interval, see `janus_job.monitor.trackers`);
* export: the newest `export/step-*` directory that holds a `config.json`.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from janus_job.errors import JobError

EXPORT_DIR = "export"
_EXPORT_STEP = re.compile(r"^step-(\d{8})$")


@dataclass
class JobStatus:
    name: str
    features: str
    checkpoint: str
    training: str
    export: str
    facts: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [
            f"job        {self.name}",
            f"features   {self.features}",
            f"checkpoint {self.checkpoint}",
            f"training   {self.training}",
            f"export     {self.export}",
        ]


def _features(spec: Any, facts: dict) -> str:
    from janus_job.data.annotations import load_spec_annotations
    from janus_job.features.precompute import marker_name
    from janus_job.features.store import FeatureStore

    if spec.features.mode != "precomputed":
        return f"{spec.features.mode}: computed during training, no precompute"
    store = FeatureStore.from_spec(spec, local_cache=False)
    annotations = load_spec_annotations(spec)
    prefix = store.marker_prefix(annotations.digest)
    workers = spec.precompute.pods
    present = {key.rsplit("/", 1)[-1] for key in store.list_keys(prefix)}
    finished = sum(marker_name(w, workers) in present for w in range(workers))
    complete = store.completion(annotations.digest)
    facts.update(feature_workers_finished=finished, feature_workers=workers, features_complete=complete is not None,
                 samples=len(annotations))
    if complete is not None:
        return f"complete: {len(annotations)} samples, {finished}/{workers} workers, store {store.url}"
    return f"precomputing: {finished}/{workers} workers finished, {len(annotations)} samples, store {store.url}"


def _checkpoint_fs(spec: Any) -> tuple[Any, str]:
    from janus_job.io import url_to_fs

    return url_to_fs(spec.training.checkpoint.url, spec.features.endpoint_url)


def _checkpoint(spec: Any, facts: dict) -> str:
    from janus_job.train.checkpoint import CheckpointManager

    c = spec.training.checkpoint
    manager = CheckpointManager(c.url, keep=c.keep, interval_steps=c.interval_steps, rank=0, world_size=1)
    refs = manager.complete_checkpoints()
    facts["checkpoint_step"] = refs[-1].step if refs else None
    if not refs:
        return f"none complete yet under {c.url}"
    return f"newest complete step {refs[-1].step} ({len(refs)} kept) under {c.url}"


def _training(spec: Any, facts: dict, now: float) -> str:
    from janus_job.monitor.trackers import STATUS_FILE
    from janus_job.train.metrics import _duration, _pct, _si

    fs, root = _checkpoint_fs(spec)
    path = f"{root.rstrip('/')}/{STATUS_FILE}"
    try:
        record = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return "no step reported yet"
    except ValueError as err:
        return f"unreadable {STATUS_FILE} ({err})"
    facts["last_record"] = record
    step, total = record.get("step", 0), record.get("total_steps") or 0
    done = f" ({100 * step / total:.1f}%)" if total else ""
    age = now - float(record.get("written", now))
    loss = record.get("loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else "n/a"
    return (
        f"step {step}/{total}{done}, {record.get('samples_per_s', 0):.3g} samples/s, "
        f"{_si(record.get('tokens_per_s') or 0)} tokens/s, mfu {_pct(record.get('mfu'))}, "
        f"data wait {_pct(record.get('data_wait'))}, loss {loss_text}, eta {_duration(record.get('eta_s'))}, "
        f"reported {_duration(age)} ago"
    )


def _export(spec: Any, facts: dict) -> str:
    fs, root = _checkpoint_fs(spec)
    base = f"{root.rstrip('/')}/{EXPORT_DIR}"
    try:
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(base, detail=False)]
    except FileNotFoundError:
        names = []
    steps = sorted(int(m.group(1)) for m in map(_EXPORT_STEP.match, names) if m)
    done = [s for s in steps if fs.exists(f"{base}/step-{s:08d}/config.json")]
    facts["export_step"] = done[-1] if done else None
    if not done:
        return "no export yet"
    return f"step {done[-1]} -> {spec.training.checkpoint.url.rstrip('/')}/{EXPORT_DIR}/step-{done[-1]:08d}"


def job_status(spec: Any, now: float | None = None) -> JobStatus:
    """Reads the job's storage; each part says what went wrong instead of failing the whole screen."""
    now = time.time() if now is None else now
    facts: dict[str, Any] = {}
    parts = []
    for name, read in (("features", _features), ("checkpoint", _checkpoint),
                       ("training", lambda s, f: _training(s, f, now)), ("export", _export)):
        try:
            parts.append(read(spec, facts))
        except JobError as err:
            parts.append(f"unavailable: {err}")
        except OSError as err:
            parts.append(f"unavailable: {type(err).__name__}: {err}")
    return JobStatus(spec.name, *parts, facts=facts)


def register(app: typer.Typer) -> None:
    """Adds this area's commands to the main app."""
    app.command("status")(status)


def status(
    spec_path: Path = typer.Argument(..., help="Job spec YAML (the chart's values file)."),
    watch: bool = typer.Option(False, "--watch", help="Print the screen again every --interval seconds."),
    interval: float = typer.Option(30.0, "--interval", min=1.0, help="Seconds between screens with --watch."),
) -> None:
    """One screen about a job from its feature store and checkpoint URL alone (no cluster access)."""
    from janus_job.config.load import load_spec

    spec = load_spec(spec_path)
    while True:
        screen = "\n".join(job_status(spec).lines())
        if watch:
            typer.echo(f"\x1b[2J\x1b[H{time.strftime('%Y-%m-%d %H:%M:%S')}  (every {interval:g}s, Ctrl-C ends)")
        typer.echo(screen)
        if not watch:
            return
        time.sleep(interval)
