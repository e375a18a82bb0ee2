"""Observability: the trainer's figures through the sidecar, the Grafana dashboard, trackers, `status`."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from janus_job.monitor.sidecar import TRAINING_METRICS
from janus_job.monitor.trackers import SCALARS, Trackers, scalars

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = REPO_ROOT / "charts" / "janus-train" / "dashboards" / "janus-train.json"
GRAFANA_SCHEMA_VERSION = 39  # Grafana 10.x/11.x dashboard JSON model
PANEL_TYPES = {"timeseries", "stat", "gauge", "table", "text", "row", "bargauge"}


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and annotation queries."""
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names in one PromQL expression: label matchers, ranges, grouping clauses and strings
    removed, then every identifier not followed by `(` (a function or aggregation)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("("):
            continue
        if match.group() in {"and", "or", "unless", "bool", "offset", "by", "without"}:
            continue
        names.add(match.group())
    return names


def test_metric_name_parser_sees_through_promql():
    expr = 'sum(changes(janus_a{job="$job", x=~"b|c"}[$__range])) / max by (node) (janus_b) + time()'
    assert metric_names(expr) == {"janus_a", "janus_b"}


def test_dashboard_is_a_grafana_dashboard_json_model():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] == GRAFANA_SCHEMA_VERSION
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    for panel in dashboard["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        grid = panel["gridPos"]
        assert grid["w"] >= 1 and grid["h"] >= 1 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert '{job="$job"}' in target["expr"], f"{panel['title']}: every query is scoped to the job"
    # every figure the issue names has a panel
    exprs = " ".join(dashboard_queries(dashboard))
    for metric in ("janus_train_samples_per_second", "janus_train_mfu_ratio", "janus_train_loss",
                   "janus_train_learning_rate", "janus_train_data_wait_ratio", "janus_gpu_memory_used_bytes",
                   "janus_gpu_memory_imbalance_ratio", "janus_train_step_duration_seconds",
                   "janus_train_last_checkpoint_step", "janus_train_start_time_seconds"):
        assert metric in exprs


def test_dashboard_names_only_metrics_the_sidecar_exports():
    exported = {name for _, name, _, _ in TRAINING_METRICS} | {
        "janus_gpu_memory_used_bytes", "janus_gpu_memory_total_bytes", "janus_torch_memory_peak_allocated_bytes",
        "janus_metrics_last_update_timestamp_seconds", "janus_gpu_memory_imbalance_ratio",
    }
    for expr in dashboard_queries(json.loads(DASHBOARD.read_text())):
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, f"{expr}: {sorted(names - exported)} not exported"


def test_training_metric_names_follow_prometheus_conventions():
    for key, name, kind, _ in TRAINING_METRICS:
        assert name.startswith("janus_train_")
        assert not name.endswith("_total") or kind == "counter", name
        assert kind != "counter" or name.endswith("_total"), name
        assert not re.search(r"_(ms|milliseconds|gib|mib|percent)$", name), f"{name}: use base units"


def records(n: int) -> list[dict]:
    return [{"step": s, "loss": 2.0 / s, "lr": 1e-5 * s, "samples_per_s": 10.0 + s, "tokens_per_s": 4000.0,
             "mfu": 0.3, "data_wait": 0.01, "s_per_it": 0.5, "total_steps": n} for s in range(1, n + 1)]


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_event_files_load_in_tensorboards_reader(tmp_path):
    trackers = Trackers(["tensorboard"], str(tmp_path), "job-a")
    for record in records(5):
        trackers.log(record["step"], record)
    trackers.close()
    assert trackers.warnings == []
    found = read_scalars(tmp_path / "tensorboard")
    assert set(found) == set(scalars(records(1)[0]))
    assert found[SCALARS["loss"]] == [(r["step"], pytest.approx(r["loss"])) for r in records(5)]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["step"] == 5 and status["loss"] == pytest.approx(0.4)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_or_missing_tracker_is_a_warning_not_a_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{closed_port()}"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    trackers = Trackers(["tensorboard", "mlflow"], "s3://nowhere/ckpt", "job-a", storage_options=options,
                        status=False)
    for record in records(3):
        trackers.log(record["step"], record)  # never raises, never blocks
    trackers.close()
    text = "\n".join(trackers.warnings)
    assert "training.report_to mlflow: not installed" in text or "training.report_to mlflow: cannot open" in text
    assert "training.report_to tensorboard" in text and "training goes on" in text
