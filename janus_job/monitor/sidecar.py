"""The GPU-balance sidecar: reads the ranks' stats files, logs the balance, serves Prometheus.

Runs in a small container without GPUs or torch: it only reads the files `gpustats.RankStatsWriter`
writes. Every interval it scans the directory, logs one `gpu-balance` line per node and `WARN`
lines for a large spread or stale ranks; `/metrics` serves the latest scan from the first second.

Spread of a node = (max - min) / max of the NVML used bytes over that node's ranks that report
GPU memory; 0 with fewer than two such ranks.

Entry point: `janus-job monitor ...` (janus_job.cli.monitor).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from janus_job.errors import JobError
from janus_job.monitor.gpustats import SCHEMA_VERSION, STATS_FILE_PATTERN, TRAINING_FIELDS

DEFAULT_PORT = 9464
DEFAULT_HOST = "0.0.0.0"
DEFAULT_INTERVAL_SECONDS = 30.0
DEFAULT_WARN_RATIO = 0.15
DEFAULT_STALE_AFTER_SECONDS = 120.0
JOB_NAME_ENV = "JANUS_JOB_NAME"  # the `job` label of every metric (the chart sets it)
BAD_FILE_WARN_REPEAT_SECONDS = 300.0

GIB = 1024**3
_log = logging.getLogger("janus.monitor")

_INT_FIELDS = ("rank", "local_rank", "step")
_OPTIONAL_INT_FIELDS = (
    "gpu_memory_used_bytes",
    "gpu_memory_total_bytes",
    "torch_allocated_bytes",
    "torch_reserved_bytes",
    "torch_peak_allocated_bytes",
)
_OPTIONAL_FLOAT_FIELDS = ("step_time_s", "samples_per_s")


@dataclass(frozen=True)
class MonitorConfig:
    stats_dir: Path
    port: int = DEFAULT_PORT
    host: str = DEFAULT_HOST
    interval_seconds: float = DEFAULT_INTERVAL_SECONDS
    warn_ratio: float = DEFAULT_WARN_RATIO
    stale_after_seconds: float = DEFAULT_STALE_AFTER_SECONDS
    job: str = field(default_factory=lambda: os.environ.get(JOB_NAME_ENV, ""))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise JobError(f"--port {self.port} is not a TCP port: use 1-65535 (0 picks a free one)")
        if not self.interval_seconds > 0:
            raise JobError(f"--interval must be > 0 seconds, got {self.interval_seconds}")
        if not 0 < self.warn_ratio <= 1:
            raise JobError(
                f"--warn-ratio must be in (0, 1] (a fraction of the largest GPU's used memory, "
                f"0.2 = 20%), got {self.warn_ratio}"
            )
        if not self.stale_after_seconds > 0:
            raise JobError(f"--stale-after must be > 0 seconds, got {self.stale_after_seconds}")


@dataclass(frozen=True)
class RankStats:
    """One rank's stats file, validated."""

    rank: int
    local_rank: int
    node: str
    gpu_uuid: str | None
    gpu_memory_used_bytes: int | None
    gpu_memory_total_bytes: int | None
    torch_peak_allocated_bytes: int | None
    step: int
    samples_per_s: float | None
    timestamp: float
    step_time_s: float | None = None
    training: dict[str, float | int | None] = field(default_factory=dict)


class BadStatsFile(ValueError):
    pass


def parse_stats(text: str, file_rank: int) -> RankStats:
    """Validates one stats file's text; raises BadStatsFile saying what is wrong."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadStatsFile(f"not valid JSON (partial or corrupt?): {err}") from None
    if not isinstance(record, dict):
        raise BadStatsFile("not a JSON object")
    if record.get("schema") != SCHEMA_VERSION:
        raise BadStatsFile(f"schema {record.get('schema')!r} is not the supported {SCHEMA_VERSION}")
    for name in _INT_FIELDS:
        if not _is_int(record.get(name)) or record[name] < 0:
            raise BadStatsFile(f"field {name!r} must be a non-negative integer")
    for name in _OPTIONAL_INT_FIELDS:
        value = record.get(name)
        if value is not None and (not _is_int(value) or value < 0):
            raise BadStatsFile(f"field {name!r} must be a non-negative integer or null")
    for name in _OPTIONAL_FLOAT_FIELDS:
        value = record.get(name)
        if value is not None and not _is_number(value):
            raise BadStatsFile(f"field {name!r} must be a number or null")
    if not isinstance(record.get("node"), str) or not record["node"]:
        raise BadStatsFile("field 'node' must be a non-empty string")
    uuid = record.get("gpu_uuid")
    if uuid is not None and not isinstance(uuid, str):
        raise BadStatsFile("field 'gpu_uuid' must be a string or null")
    if not _is_number(record.get("timestamp")):
        raise BadStatsFile("field 'timestamp' must be a number")
    if record["rank"] != file_rank:
        raise BadStatsFile(f"holds rank {record['rank']}, but the file name says rank {file_rank}")
    training = record.get("training") or {}
    if not isinstance(training, dict):
        raise BadStatsFile("field 'training' must be an object or null")
    for name in TRAINING_FIELDS:
        value = training.get(name)
        if value is not None and not _is_number(value):
            raise BadStatsFile(f"field 'training.{name}' must be a number or null")
    return RankStats(
        rank=record["rank"],
        local_rank=record["local_rank"],
        node=record["node"],
        gpu_uuid=uuid,
        gpu_memory_used_bytes=record.get("gpu_memory_used_bytes"),
        gpu_memory_total_bytes=record.get("gpu_memory_total_bytes"),
        torch_peak_allocated_bytes=record.get("torch_peak_allocated_bytes"),
        step=record["step"],
        samples_per_s=record.get("samples_per_s"),
        timestamp=float(record["timestamp"]),
        step_time_s=record.get("step_time_s"),
        training={name: training.get(name) for name in TRAINING_FIELDS},
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class NodeBalance:
    node: str
    ranks: tuple[RankStats, ...]  # ordered by local rank
    spread: float | None  # None when no rank of the node reports GPU memory
    min_headroom_bytes: int | None


def memory_spread(used_bytes: Sequence[int]) -> float:
    """(max - min) / max of the used bytes; 0 for fewer than two values or nothing used."""
    if len(used_bytes) < 2 or max(used_bytes) == 0:
        return 0.0
    return (max(used_bytes) - min(used_bytes)) / max(used_bytes)


def node_balances(ranks: Sequence[RankStats]) -> list[NodeBalance]:
    by_node: dict[str, list[RankStats]] = {}
    for stats in ranks:
        by_node.setdefault(stats.node, []).append(stats)
    balances = []
    for node in sorted(by_node):
        members = tuple(sorted(by_node[node], key=lambda s: (s.local_rank, s.rank)))
        used = [s.gpu_memory_used_bytes for s in members if s.gpu_memory_used_bytes is not None]
        headrooms = [
            s.gpu_memory_total_bytes - s.gpu_memory_used_bytes
            for s in members
            if s.gpu_memory_used_bytes is not None and s.gpu_memory_total_bytes is not None
        ]
        balances.append(
            NodeBalance(
                node=node,
                ranks=members,
                spread=memory_spread(used) if used else None,
                min_headroom_bytes=min(headrooms) if headrooms else None,
            )
        )
    return balances


@dataclass
class Scan:
    """The result of reading the stats directory once."""

    ranks: list[RankStats] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    missing_dir: bool = False


def scan_stats_dir(stats_dir: Path) -> Scan:
    scan = Scan()
    try:
        entries = sorted(stats_dir.iterdir())
    except FileNotFoundError:
        scan.missing_dir = True
        return scan
    except OSError as err:
        scan.problems.append((str(stats_dir), f"cannot list the stats directory: {err}"))
        return scan
    seen_ranks: set[int] = set()
    for path in entries:
        if path.name.startswith("."):
            continue  # a writer's temp file, renamed into place when complete
        match = STATS_FILE_PATTERN.match(path.name)
        if match is None:
            scan.problems.append((path.name, "not a stats file (expected rank-<N>.json)"))
            continue
        try:
            text = path.read_text(encoding="utf-8")
            stats = parse_stats(text, int(match.group(1)))
        except FileNotFoundError:
            continue  # removed between listing and reading
        except (OSError, UnicodeDecodeError, BadStatsFile) as err:
            scan.problems.append((path.name, str(err)))
            continue
        if stats.rank in seen_ranks:
            continue
        seen_ranks.add(stats.rank)
        scan.ranks.append(stats)
    return scan


# The trainer's figures on /metrics: (stats key, metric name, type, help). Base units, ratios 0..1.
TRAINING_METRICS = (
    ("step", "janus_train_step", "gauge", "Optimizer steps completed."),
    ("total_steps", "janus_train_total_steps", "gauge", "Optimizer steps the run will train."),
    ("loss", "janus_train_loss", "gauge", "Mean training loss over the last log interval."),
    ("learning_rate", "janus_train_learning_rate", "gauge", "Learning rate of the language model."),
    ("grad_norm", "janus_train_grad_norm", "gauge", "Global gradient norm before clipping."),
    ("samples_per_s", "janus_train_samples_per_second", "gauge", "Job-wide training samples per second."),
    ("tokens_per_s", "janus_train_tokens_per_second", "gauge", "Job-wide training tokens per second."),
    ("mfu", "janus_train_mfu_ratio", "gauge", "Model FLOPs utilisation (0..1) over the last log interval."),
    ("data_wait_ratio", "janus_train_data_wait_ratio", "gauge",
     "Share of the last log interval the slowest rank waited for data (0..1)."),
    ("step_time_s", "janus_train_step_duration_seconds", "gauge", "Duration of the rank's last optimizer step."),
    ("eta_s", "janus_train_eta_seconds", "gauge", "Seconds left at the last interval's speed."),
    ("last_checkpoint_step", "janus_train_last_checkpoint_step", "gauge",
     "Step of the newest checkpoint saved or resumed from."),
    ("bad_samples", "janus_train_bad_samples_total", "counter",
     "Samples left out or replaced as unreadable (data.on_bad_sample)."),
    ("started", "janus_train_start_time_seconds", "gauge",
     "Unix time the rank's process started training; a change is a restart."),
)


@dataclass(frozen=True)
class Snapshot:
    """What /metrics serves: the latest scan and when it was taken."""

    ranks: tuple[RankStats, ...] = ()
    balances: tuple[NodeBalance, ...] = ()
    stale_ranks: tuple[int, ...] = ()
    ignored_files: int = 0


class BalanceCollector:
    """A Prometheus collector over the latest Snapshot (swapped in whole by the scan loop)."""

    def __init__(self, job: str = "") -> None:
        self.snapshot = Snapshot()
        self.job = job

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snapshot, job = self.snapshot, self.job
        used = GaugeMetricFamily(
            "janus_gpu_memory_used_bytes",
            "GPU memory in use on the rank's GPU, as NVML reports it.",
            labels=["job", "node", "gpu", "rank"],
        )
        total = GaugeMetricFamily(
            "janus_gpu_memory_total_bytes",
            "Total memory of the rank's GPU, as NVML reports it.",
            labels=["job", "node", "gpu", "rank"],
        )
        peak = GaugeMetricFamily(
            "janus_torch_memory_peak_allocated_bytes",
            "Peak memory torch allocated on the rank's GPU.",
            labels=["job", "node", "rank"],
        )
        updated = GaugeMetricFamily(
            "janus_metrics_last_update_timestamp_seconds",
            "Unix time at which the rank last wrote its stats.",
            labels=["job", "node", "rank"],
        )
        training = {
            key: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, text, labels=["job", "node", "rank"]
            )
            for key, name, kind, text in TRAINING_METRICS
        }
        for stats in snapshot.ranks:
            rank = str(stats.rank)
            gpu = stats.gpu_uuid or f"local-{stats.local_rank}"
            if stats.gpu_memory_used_bytes is not None:
                used.add_metric([job, stats.node, gpu, rank], stats.gpu_memory_used_bytes)
            if stats.gpu_memory_total_bytes is not None:
                total.add_metric([job, stats.node, gpu, rank], stats.gpu_memory_total_bytes)
            if stats.torch_peak_allocated_bytes is not None:
                peak.add_metric([job, stats.node, rank], stats.torch_peak_allocated_bytes)
            updated.add_metric([job, stats.node, rank], stats.timestamp)
            values = {**stats.training, "step": stats.step, "samples_per_s": stats.samples_per_s,
                      "step_time_s": stats.step_time_s}
            for key, family in training.items():
                if values.get(key) is not None:
                    family.add_metric([job, stats.node, rank], float(values[key]))
        yield from (used, total, peak, updated, *training.values())
        imbalance = GaugeMetricFamily(
            "janus_gpu_memory_imbalance_ratio",
            "(max - min) / max of GPU memory used over the node's ranks.",
            labels=["job", "scope", "node"],
        )
        for balance in snapshot.balances:
            if balance.spread is not None:
                imbalance.add_metric([job, "node", balance.node], balance.spread)
        yield imbalance
        yield GaugeMetricFamily(
            "janus_monitor_ranks_reporting",
            "Ranks with a valid stats file (0 until the first rank writes).",
            value=len(snapshot.ranks),
        )
        yield GaugeMetricFamily(
            "janus_monitor_ranks_stale",
            "Ranks whose stats file is older than --stale-after.",
            value=len(snapshot.stale_ranks),
        )
        yield GaugeMetricFamily(
            "janus_monitor_ignored_files",
            "Files in the stats directory ignored in the last scan (malformed or foreign).",
            value=snapshot.ignored_files,
        )


class BalanceMonitor:
    """Scans the stats directory each interval, logs the balance, updates the collector."""

    def __init__(self, config: MonitorConfig, collector: BalanceCollector):
        self.config = config
        self.collector = collector
        self._warned_at: dict[tuple[str, str], float] = {}
        self._waiting_logged_at: float | None = None

    def scan_once(self, now: float | None = None) -> Snapshot:
        now = time.time() if now is None else now
        scan = scan_stats_dir(self.config.stats_dir)
        self._report_problems(scan)
        balances = node_balances(scan.ranks)
        stale = tuple(
            s.rank for s in scan.ranks if now - s.timestamp > self.config.stale_after_seconds
        )
        snapshot = Snapshot(
            ranks=tuple(scan.ranks),
            balances=tuple(balances),
            stale_ranks=stale,
            ignored_files=len(scan.problems),
        )
        self.collector.snapshot = snapshot
        if not scan.ranks:
            self._log_waiting(scan, now)
            return snapshot
        for balance in balances:
            _log.info("%s", balance_line(balance))
            if balance.spread is not None and balance.spread > self.config.warn_ratio:
                _log.warning("%s", spread_warning(balance, self.config.warn_ratio))
        for stats in scan.ranks:
            age = now - stats.timestamp
            if age > self.config.stale_after_seconds:
                _log.warning(
                    "gpu-balance node=%s rank=%d stale: last update %.0fs ago (stale-after %gs); "
                    "the trainer may be hung",
                    stats.node,
                    stats.rank,
                    age,
                    self.config.stale_after_seconds,
                )
        return snapshot

    def _log_waiting(self, scan: Scan, now: float) -> None:
        if self._waiting_logged_at is not None and now - self._waiting_logged_at < 60:
            return
        self._waiting_logged_at = now
        where = self.config.stats_dir
        state = "does not exist yet" if scan.missing_dir else "has no rank stats yet"
        _log.info("gpu-balance waiting: %s %s", where, state)

    def _report_problems(self, scan: Scan) -> None:
        now = time.monotonic()
        current = set()
        for name, reason in scan.problems:
            key = (name, reason)
            current.add(key)
            last = self._warned_at.get(key)
            if last is None or now - last >= BAD_FILE_WARN_REPEAT_SECONDS:
                self._warned_at[key] = now
                _log.warning("ignoring %s in %s: %s", name, self.config.stats_dir, reason)
        for key in set(self._warned_at) - current:
            del self._warned_at[key]  # fixed or gone: warn again if it comes back


def balance_line(balance: NodeBalance) -> str:
    used = ", ".join(_gib(s.gpu_memory_used_bytes) for s in balance.ranks)
    spread = "n/a" if balance.spread is None else f"{balance.spread * 100:.1f}%"
    headroom = _gib(balance.min_headroom_bytes)
    headroom = headroom if balance.min_headroom_bytes is None else f"{headroom} GiB"
    return (
        f"gpu-balance node={balance.node} used=[{used}] GiB spread={spread} "
        f"min_headroom={headroom} ranks={len(balance.ranks)}"
    )


def spread_warning(balance: NodeBalance, warn_ratio: float) -> str:
    reporting = [s for s in balance.ranks if s.gpu_memory_used_bytes is not None]
    most = max(reporting, key=lambda s: s.gpu_memory_used_bytes or 0)
    least = min(reporting, key=lambda s: s.gpu_memory_used_bytes or 0)
    return (
        f"gpu-balance node={balance.node} spread={balance.spread * 100:.1f}% exceeds "
        f"warn-ratio {warn_ratio * 100:.1f}%: rank {most.rank} uses "
        f"{_gib(most.gpu_memory_used_bytes)} GiB, rank {least.rank} uses "
        f"{_gib(least.gpu_memory_used_bytes)} GiB"
    )


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.1f}"


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "WARN" if record.levelno == logging.WARNING else record.levelname
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        return f"{stamp} {level} {record.getMessage()}"


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_LevelFormatter())
    for name in ("janus.monitor", "janus_job.monitor.gpustats"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve(config: MonitorConfig) -> int:
    """Runs the sidecar until SIGTERM or SIGINT; returns the exit code (0)."""
    from prometheus_client import CollectorRegistry, start_http_server

    _configure_logging()
    stop = threading.Event()
    received: list[str] = []

    def request_stop(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    collector = BalanceCollector(config.job)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    try:
        server, thread = start_http_server(config.port, addr=config.host, registry=registry)
    except OSError as err:
        raise JobError(
            f"cannot serve metrics on {config.host}:{config.port} ({err}): "
            f"pick a free --port or --host"
        ) from None
    _log.info(
        "monitor serving metrics on http://%s:%d/metrics, stats dir %s, interval %gs, "
        "warn-ratio %g, stale-after %gs",
        config.host,
        server.server_port,
        config.stats_dir,
        config.interval_seconds,
        config.warn_ratio,
        config.stale_after_seconds,
    )
    monitor = BalanceMonitor(config, collector)
    while not stop.is_set():
        try:
            monitor.scan_once()
        except Exception as err:  # the sidecar outlives any one bad scan
            _log.warning("gpu-balance scan failed: %s: %s", type(err).__name__, err)
        stop.wait(config.interval_seconds)
    _log.info("monitor stopping on %s", received[0])
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    _log.info("monitor stopped")
    return 0
