"""`helm install -f job.yaml` and `janus-job validate` accept exactly the same files.

Helm checks structure with values.schema.json and the rules between fields with
templates/_validate.tpl; Python checks both with janus_job.config.spec. These tests hold the two together:
every bad-spec case of test_spec.py and a seeded sweep of generated specs must get the same verdict
from both, and where both refuse, Helm must name every field Python names."""

from __future__ import annotations

import random

import helm_python
import pytest
from pydantic import ValidationError
from test_spec import BAD, MINIMAL, with_changes

from janus_job.config.deepspeed import deepspeed_problems
from janus_job.config.load import validate_spec
from janus_job.config.rules import spec_problems
from janus_job.config.spec import JobSpec
from janus_job.deploy.render import CHART_DIR
from janus_job.errors import JobError


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


def helm_verdict(chart, values: dict) -> str | None:
    """None when Helm renders the values, else its error message."""
    try:
        chart.render(values=values, name="janus-train", namespace="janus", is_install=True)
    except helm_python.HelmError as err:
        return str(err)
    return None


def python_fields(values: dict) -> list[str] | None:
    """None when janus-job validate accepts, else the dotted fields it names."""
    try:
        spec = JobSpec.model_validate(values)
    except ValidationError as err:
        return [".".join(map(str, e["loc"])) for e in err.errors()]
    problems = spec_problems(spec) + deepspeed_problems(spec)
    return [p.path for p in problems] or None


@pytest.mark.parametrize("case,data,field,fix", [b for b in BAD if isinstance(b[1], dict)],
                         ids=[b[0] for b in BAD if isinstance(b[1], dict)])
def test_helm_refuses_every_bad_spec(chart, case, data, field, fix):
    with pytest.raises(JobError):
        validate_spec(data)
    message = helm_verdict(chart, data)
    assert message is not None, f"Helm accepted {case}, janus-job validate refuses it"
    assert field.split(".")[-1] in message, message


def _generated_spec(rng: random.Random) -> dict:
    c = rng.choice
    nodes = c([1, 1, 2, 3, 4])
    gpus = c([1, 2, 4, 8, 8])
    training = {"nodes": nodes, "gpus_per_node": gpus, "micro_batch_size": c([1, 1, 2, 3, 4, 8]),
                "gradient_checkpointing": c([True, True, False]), "checkpoint": {"url": "s3://ckpt/x"},
                "warmup_ratio": c([0.03, 0.03, 0.6])}
    if rng.random() < 0.4:
        training["gradient_accumulation_steps"] = c([1, 2, 4, 8])
    if rng.random() < 0.5:
        training["global_batch_size"] = c([16, 24, 48, 64, 96, 128, 192, 100])
    if rng.random() < 0.2:
        training["max_steps"] = 1000
    if rng.random() < 0.2:
        training["vision_learning_rate"] = 1e-6
    policy = c(["elastic", "elastic", "fixed"])
    training["resize"] = {"policy": policy}
    if rng.random() < 0.4:
        training["resize"]["min_nodes"] = c([1, 2])
        training["resize"]["max_nodes"] = c([2, 3, 4])
    deepspeed = {"zero_stage": c([0, 1, 2, 2, 3]), "offload_optimizer": c(["none", "none", "cpu"]),
                 "offload_param": c(["none", "none", "cpu"]), "optimizer": c(["deepspeed", "deepspeed", "torch"])}
    if rng.random() < 0.2:
        deepspeed["stage3"] = {"max_live_parameters": 1000}
    if rng.random() < 0.3:
        deepspeed["extra_config"] = c([
            {"zero_optimization": {"round_robin_gradients": True}},
            {"zero_optimization": {"offload_param": {"device": "cpu"}}},
            {"zero_optimization": {"offload_optimizer": {"device": "none"}}},
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            {"zero_optimization": {"stage3_prefetch_bucket_size": 10}},
            {"gradient_accumulation_steps": 2},
            {"fp16": {"enabled": True}},
            {"bf16": {"enabled": False}, "fp16": {"enabled": True}},
            {"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}},
            {"comms_logger": {"enabled": "auto"}},
            {"zero_optimization": "fast"},
        ])
    store = c(["s3://features/r2r", "/mnt/features", "gs://features/x"])
    features = {"store": store, "mode": c(["precomputed", "precomputed", "read_through", "online"]),
                "cache_vision": c([True, False]), "credentials_from": c(["secret", "secret", "environment"])}
    if rng.random() < 0.7:
        features["credentials_secret"] = "janus-s3"
    if rng.random() < 0.3:
        features["endpoint_url"] = c(["https://minio:9000", "minio:9000"])
    cluster = {"gang_scheduler": c(["none", "none", "volcano", "scheduler-plugins"]),
               "network": c(["tcp", "infiniband", "roce", "hostnetwork"]),
               "resources": {"gpu_memory_gib": c([24, 40, 80, 80, 141])}}
    if rng.random() < 0.5:
        cluster["queue"] = "default"
    if rng.random() < 0.3:
        cluster["nccl_ib_hca"] = "mlx5"
    data = {"annotations": "s3://data/a.json", "image_root": "s3://data/images", "max_history_images": c([0, 4, 8, 8, 16]),
            "max_pixels": c([576 * 28 * 28, 576 * 28 * 28, 1024 * 28 * 28, 64 * 28 * 28]),
            "min_pixels": c([16 * 28 * 28, 16 * 28 * 28, 100 * 28 * 28]), "num_workers": c([0, 4, 8]),
            "persistent_workers": c([True, False])}
    monitor = {"interval_seconds": c([10, 30, 60]), "stale_after_seconds": c([30, 120])}
    return {"name": c(["r2r", "a" * 45, "b" * 50]), "model": MINIMAL["model"], "data": data, "features": features,
            "precompute": {"pods": c([1, 2, 16])}, "training": training, "deepspeed": deepspeed,
            "cluster": cluster, "monitor": monitor}


def _tidy(values: dict) -> dict:
    """Removes the non-arithmetic mistakes, so batch, resize and memory rules decide alone."""
    t, ds, f, c, d = (values[k] for k in ("training", "deepspeed", "features", "cluster", "data"))
    values["name"] = "r2r"
    values["monitor"] = {"interval_seconds": 30, "stale_after_seconds": 120}
    t["warmup_ratio"] = 0.03
    d.update(min_pixels=16 * 28 * 28, persistent_workers=d["num_workers"] > 0)
    f.update(credentials_secret="janus-s3", cache_vision=f["mode"] != "online")
    f.pop("endpoint_url", None)
    ds["optimizer"] = "deepspeed"
    ds.pop("extra_config", None)
    if ds["zero_stage"] < 3:
        ds.update(offload_param="none")
        ds.pop("stage3", None)
    c.pop("nccl_ib_hca", None)
    if c["gang_scheduler"] == "volcano":
        c["queue"] = "default"
    else:
        c.pop("queue", None)
    return values


def test_generated_specs_get_the_same_verdict(chart):
    rng = random.Random(20261126)
    accepted = refused = 0
    for i in range(500):
        values = _generated_spec(rng)
        if i % 2:
            values = _tidy(values)
        fields = python_fields(values)
        message = helm_verdict(chart, values)
        assert (fields is None) == (message is None), f"spec {i}: python {fields} vs helm {message}\n{values}"
        if fields is None:
            accepted += 1
            continue
        refused += 1
        for field in fields:
            assert field in message or field.split(".")[-1] in message, f"spec {i}: helm does not name {field}:\n{message}"
    print(f"generated specs: {accepted} accepted, {refused} refused by both")
    assert accepted >= 40 and refused >= 100, (accepted, refused)


def test_good_files_pass_both(chart):
    values = with_changes({})
    assert python_fields(values) is None and helm_verdict(chart, values) is None


@pytest.mark.parametrize("stage,offload,checkpointing,mode,vision_lr,micro,nodes", [
    (0, "none", True, "precomputed", None, 1, 1), (1, "none", False, "precomputed", None, 2, 1),
    (2, "cpu", True, "online", None, 1, 2), (3, "none", True, "read_through", 1e-6, 4, 3),
    (3, "cpu", False, "online", 1e-6, 1, 4),
])
def test_helm_memory_estimate_equals_pythons(chart, stage, offload, checkpointing, mode, vision_lr, micro, nodes):
    import re

    from janus_job.config.memory import estimate_gpu_memory

    values = with_changes({"deepspeed": {"zero_stage": stage, "offload_optimizer": offload},
                           "training.gradient_checkpointing": checkpointing, "training.micro_batch_size": micro,
                           "training.nodes": nodes, "training.resize": {"policy": "fixed"},
                           "features.mode": mode, "features.cache_vision": mode != "online",
                           "cluster": {"resources": {"gpu_memory_gib": 1}}})  # nothing fits: both print the estimate
    if vision_lr:
        values["training"]["vision_learning_rate"] = vision_lr
    expected = estimate_gpu_memory(JobSpec.model_validate(values)).total
    message = helm_verdict(chart, values)
    found = re.search(r"estimated ([0-9.]+) GiB", message or "")
    assert found, message
    assert float(found.group(1)) == pytest.approx(expected, abs=0.051)
