"""Experiment trackers: the trainer's step figures in TensorBoard, Weights & Biases or MLflow, and the
run's status file that `janus-job status` reads.

Rank 0 logs. A tracker never stops or slows training: every tracker runs on one background thread behind
a bounded queue, so the training loop only enqueues; a tracker that cannot be opened, imported or reached
logs one warning and is switched off, and a full queue drops records with a warning.

* `tensorboard`: event files (tensorboardX) under `<training.checkpoint.url>/tensorboard/`, so
  `tensorboard --logdir <that URL>` (or a synced copy) shows the run. For an object store the files are
  written locally and copied up after every record.
* `wandb` / `mlflow`: optional extras (`pip install "janus-train[wandb]"` / `"janus-train[mlflow]"`);
  credentials come from the environment (the chart's `training.tracker_secret`): `WANDB_API_KEY`,
  `WANDB_PROJECT`, `WANDB_MODE`; `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`, `MLFLOW_TRACKING_TOKEN`.
  Restarts of the same job resume the same run (its id is the job name).
* the status file `<training.checkpoint.url>/status.json` (always written): the last record, rewritten
  atomically, for `janus-job status`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

REPORT_TO = ("tensorboard", "wandb", "mlflow")
STATUS_FILE = "status.json"
TENSORBOARD_DIR = "tensorboard"
QUEUE_DEPTH = 256
# figures every tracker receives (the trainer's metrics record keys), under these display names
SCALARS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "samples_per_s": "perf/samples_per_second",
    "tokens_per_s": "perf/tokens_per_second",
    "mfu": "perf/mfu",
    "data_wait": "perf/data_wait_ratio",
    "s_per_it": "perf/step_seconds",
    "mem_peak_gib": "memory/peak_gib",
    "mem_max_gib": "memory/max_gib",
    "mem_min_gib": "memory/min_gib",
    "bad_samples": "data/bad_samples",
}

_log = logging.getLogger("janus.trackers")


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric figures of one metrics record, under their tracker names (missing/None left out)."""
    out = {}
    for key, name in SCALARS.items():
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


class _TensorBoard:
    def __init__(self, url: str, run_name: str, storage_options: Mapping[str, Any]) -> None:
        from tensorboardX import SummaryWriter

        from janus_job.io import url_to_fs

        self.url = _join(url, TENSORBOARD_DIR)
        self.fs, self.root = url_to_fs(self.url, **dict(storage_options))
        self.remote = "file" not in self.fs.protocol and "local" not in self.fs.protocol
        if self.remote:
            self.local = tempfile.mkdtemp(prefix="janus-tensorboard-")
        else:
            self.local = self.root
            os.makedirs(self.local, exist_ok=True)
        self.writer = SummaryWriter(logdir=self.local, filename_suffix=f".{run_name}")

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()
        self._upload()

    def close(self) -> None:
        self.writer.close()
        self._upload()

    def _upload(self) -> None:
        if self.remote:
            for path in Path(self.local).iterdir():
                self.fs.put_file(str(path), f"{self.root.rstrip('/')}/{path.name}")


class _Wandb:
    def __init__(self, url: str, run_name: str, storage_options: Mapping[str, Any], config: Mapping) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "janus-train"), name=run_name,
                              id=run_name, resume="allow", config=dict(config))

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, url: str, run_name: str, storage_options: Mapping[str, Any], config: Mapping) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "janus-train"))
        found = mlflow.search_runs(filter_string=f"tags.mlflow.runName = '{run_name}'", output_format="list")
        self.run = mlflow.start_run(run_id=found[0].info.run_id if found else None, run_name=run_name)
        if not found:
            mlflow.log_params({key: str(value)[:500] for key, value in _flatten(config).items()})

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics({name.replace("/", "_"): v for name, v in scalars(record).items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Status:
    """`<checkpoint url>/status.json`: the last record, replaced atomically (for `janus-job status`)."""

    def __init__(self, url: str, run_name: str, storage_options: Mapping[str, Any]) -> None:
        from janus_job.io import url_to_fs

        self.fs, root = url_to_fs(url, **dict(storage_options))
        self.path = f"{root.rstrip('/')}/{STATUS_FILE}"
        self.fs.makedirs(root, exist_ok=True)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        body = json.dumps({**record, "written": time.time()}, allow_nan=False, sort_keys=True).encode()
        temp = f"{self.path}.tmp.{os.getpid()}"
        self.fs.pipe_file(temp, body)
        self.fs.mv(temp, self.path)

    def close(self) -> None:
        pass


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_OPENERS: dict[str, Callable[..., Any]] = {
    "tensorboard": lambda url, name, opts, config: _TensorBoard(url, name, opts),
    "wandb": _Wandb,
    "mlflow": _Mlflow,
    "status": lambda url, name, opts, config: _Status(url, name, opts),
}
_EXTRAS = {"wandb": "janus-train[wandb]", "mlflow": "janus-train[mlflow]", "tensorboard": "tensorboardX"}


class Trackers:
    """The trackers named in `training.report_to` plus the status file, fed from one background thread.

    `log(step, record)` never blocks and never raises; `close()` waits a bounded time for the queue.
    """

    def __init__(self, report_to: Iterable[str], url: str, run_name: str, *, endpoint_url: str | None = None,
                 storage_options: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                 status: bool = True) -> None:
        self.names = [*dict.fromkeys(report_to), *(["status"] if status else [])]
        unknown = [name for name in self.names if name not in _OPENERS]
        if unknown:
            raise ValueError(f"unknown tracker(s) {unknown}: use {list(REPORT_TO)}")
        from janus_job.io import storage_options as endpoint_options

        options = {**endpoint_options(url, endpoint_url), **dict(storage_options or {})}
        self._args = (url, run_name, options, dict(config or {}))
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self._dropped = 0
        self.active: dict[str, Any] = {}
        self.warnings: list[str] = []
        self._thread = threading.Thread(target=self._run, name="janus-trackers", daemon=True)
        self._thread.start()

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        try:
            self._queue.put_nowait((int(step), dict(record)))
        except queue.Full:
            self._dropped += 1
            if self._dropped in (1, 10, 100) or self._dropped % 1000 == 0:
                self._warn(f"trackers: {self._dropped} record(s) dropped; a tracker is slower than training")

    def close(self, timeout_s: float = 60.0) -> None:
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            self._warn("trackers: queue still full at the end; the last records are not logged")
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._warn(f"trackers: still busy after {timeout_s:.0f}s at the end; leaving them")

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        _log.warning("%s", message)
        print(f"WARN {message}", flush=True)

    def _open(self) -> None:
        for name in self.names:
            try:
                self.active[name] = _OPENERS[name](*self._args)
            except ImportError as err:
                self._warn(f"training.report_to {name}: not installed ({err}); install {_EXTRAS[name]} "
                           f"in the image, or remove {name} from training.report_to; training goes on")
            except Exception as err:  # an unreachable tracker never stops training
                self._warn(f"training.report_to {name}: cannot open ({type(err).__name__}: {err}); "
                           f"training goes on without it")

    def _run(self) -> None:
        self._open()
        while True:
            item = self._queue.get()
            if item is None:
                break
            step, record = item
            for name, tracker in list(self.active.items()):
                try:
                    tracker.log(step, record)
                except Exception as err:
                    del self.active[name]
                    self._warn(f"training.report_to {name}: logging failed ({type(err).__name__}: {err}); "
                               f"switched off, training goes on")
        for name, tracker in list(self.active.items()):
            try:
                tracker.close()
            except Exception as err:
                self._warn(f"training.report_to {name}: closing failed ({type(err).__name__}: {err})")
