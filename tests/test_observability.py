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


# ---------------------------------------------------------------- the real trainer and sidecar


def scrape_typed(port: int) -> dict[str, tuple[str, list[tuple[dict, float]]]]:
    """name -> (type, [(labels, value)]) through prometheus_client's own text parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, (family.type, []))[1].append((sample.labels, sample.value))
    return out


def by_rank(series, name) -> dict[str, float]:
    return {labels["rank"]: value for labels, value in series[name][1]}


@pytest.mark.slow
def test_real_trainer_metrics_reach_the_sidecar_tensorboard_and_status(tmp_path):
    """The trainer (tiny flavor, 2 CPU ranks under torchrun) writes its figures; the real sidecar serves
    every training metric typed and labelled, moving with the steps across a resumed second run;
    report_to tensorboard leaves event files TensorBoard's reader loads with the logged losses; and
    `janus-job status` reads the job's storage."""
    import subprocess
    import sys as _sys

    import ckpt_worker as worker
    import yaml
    from test_monitor import JOB, sidecar

    from janus_job.monitor.sidecar import TRAINING_METRICS

    base = worker.trainer_job(tmp_path / "job", steps=2, interval=2)
    checkpoints = tmp_path / "checkpoints"
    spec = yaml.safe_load(base.read_text())
    spec["training"].update(log_interval=1, report_to=["tensorboard"], export=False)
    spec["monitor"]["interval_seconds"] = 1
    spec_path = worker.trainer_spec(base, tmp_path / "job.yaml", checkpoints)
    stats_dir = tmp_path / "stats"
    env = {**worker.trainer_env(tmp_path / "trace-{rank}.jsonl", tmp_path / "staging"),
           "JANUS_STATS_DIR": str(stats_dir), "JANUS_PEAK_TFLOPS": "0.001"}
    seen = []
    stdout = ""
    with sidecar(stats_dir) as running:
        for steps in (2, 4):  # the second run resumes from the first's step-2 checkpoint
            spec["training"]["max_steps"] = steps
            spec["training"]["checkpoint"]["url"] = str(checkpoints)
            spec_path.write_text(yaml.safe_dump(spec))
            result = subprocess.run(worker.trainer_command(2, spec_path), cwd=worker.REPO, capture_output=True,
                                    text=True, env=env, timeout=600)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
            stdout += result.stdout
            running.wait_for_line(r"gpu-balance node=\S+ .*ranks=2$", start=len(running.lines))
            series = scrape_typed(running.port)
            while by_rank(series, "janus_train_step") != {"0": steps, "1": steps}:
                running.wait_for_line(r"gpu-balance node=", start=len(running.lines))
                series = scrape_typed(running.port)
            seen.append(series)
    for series in seen:
        for _, name, kind, _ in TRAINING_METRICS:
            assert name in series, f"{name} missing from /metrics"
            family_type, samples = series[name]
            assert family_type == kind, f"{name}: {family_type}"
            assert {frozenset(labels) for labels, _ in samples} == {frozenset({"job", "node", "rank"})}, name
            assert {labels["job"] for labels, _ in samples} == {JOB}
            assert sorted(labels["rank"] for labels, _ in samples) == ["0", "1"], name
    first, second = seen
    assert by_rank(first, "janus_train_step") == {"0": 2, "1": 2}
    assert by_rank(second, "janus_train_step") == {"0": 4, "1": 4}
    assert by_rank(second, "janus_train_last_checkpoint_step") == {"0": 4, "1": 4}
    assert by_rank(first, "janus_train_total_steps")["0"] == 2 and by_rank(second, "janus_train_total_steps")["0"] == 4
    started = [by_rank(series, "janus_train_start_time_seconds")["0"] for series in seen]
    assert started[1] > started[0]  # the second run is a restart
    for name in ("janus_train_loss", "janus_train_learning_rate", "janus_train_grad_norm", "janus_train_mfu_ratio",
                 "janus_train_tokens_per_second", "janus_train_samples_per_second"):
        assert all(value > 0 for value in by_rank(second, name).values()), name
    assert all(0 <= value <= 1 for value in by_rank(second, "janus_train_data_wait_ratio").values())

    logged = worker.logged_steps(stdout)
    events = read_scalars(checkpoints / "tensorboard")
    assert [step for step, _ in events[SCALARS["loss"]]] == [1, 2, 3, 4]
    for step, value in events[SCALARS["loss"]]:
        assert value == pytest.approx(logged[step][0], abs=5e-5), step

    status = subprocess.run([_sys.executable, "-m", "janus_job.cli", "status", str(spec_path)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"job        {spec['name']}"
    assert lines[1].startswith("features   complete: ") and "1/1 workers" in lines[1]
    assert lines[2].startswith("checkpoint newest complete step 4 ")
    assert lines[3].startswith("training   step 4/4 (100.0%), ") and f"loss {logged[4][0]:.4f}" in lines[3]
    assert lines[4] == "export     no export yet"
