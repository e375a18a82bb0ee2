"""The job spec through the real `janus-job` CLI: good files pass, bad ones are refused with field + fix."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import JANUS_JOB

from janus_job.config.load import load_spec, validate_spec
from janus_job.config.memory import estimate_gpu_memory
from janus_job.config.schema import spec_to_values
from janus_job.config.spec import JobSpec
from janus_job.errors import JobError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
MINIMAL = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*JANUS_JOB, *args], capture_output=True, text=True, timeout=60)


def with_changes(changes: dict) -> dict:
    """MINIMAL with dotted-path changes; a value of ... deletes the key."""
    data = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return data


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_examples_validate(example):
    proc = run_cli("validate", str(example))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ")


def test_minimal_spec_is_short_and_gets_the_fast_defaults():
    lines = [
        l for l in (ROOT / "examples" / "minimal.yaml").read_text().splitlines() if l.strip() and not l.startswith("#")
    ]
    assert len(lines) <= 13
    spec = load_spec(ROOT / "examples" / "minimal.yaml")
    assert spec.deepspeed.zero_stage == 1 and spec.deepspeed.offload_param == "none"
    assert spec.features.mode == "precomputed" and spec.training.balanced_sampler
    assert (
        spec.data.max_history_images == 8
        and spec.data.max_pixels == 576 * 28 * 28
        and spec.data.min_pixels == 16 * 28 * 28
    )
    assert spec.training.learning_rate == 2e-5 and spec.training.merger_learning_rate == 1e-5
    assert spec.network.preset == "tcp" and spec.model.attn_implementation == "sdpa"


def test_values_round_trip():
    spec = load_spec(ROOT / "examples" / "r2r-2node-ib.yaml")
    assert validate_spec(spec_to_values(spec)) == spec


def test_scientific_notation_is_a_number(tmp_path):
    # Helm's toYaml writes 2e-05; YAML 1.1 readers would see a string and hand it to DeepSpeed as one
    path = tmp_path / "job.yaml"
    data = with_changes(
        {"training.learning_rate": 2.5e-5, "deepspeed": {"extra_config": {"optimizer": {"params": {"eps": 1e-6}}}}}
    )
    path.write_text(yaml.safe_dump(data).replace("2.5e-05", "2.5e-5").replace("1.0e-06", "1e-6"))
    assert "eps: 1e-6" in path.read_text()
    spec = load_spec(path)
    assert spec.training.learning_rate == 2.5e-5
    assert spec.deepspeed.extra_config["optimizer"]["params"]["eps"] == 1e-6


def test_global_batch_and_accumulation():
    spec = validate_spec(
        with_changes(
            {"training.nodes": 2, "training.global_batch_size": 96, "training.resize": {"min_nodes": 2, "max_nodes": 4}}
        )
    )
    assert spec.elastic and [spec.accumulation_for(n * 8) for n in (2, 3, 4)] == [6, 4, 3]
    with pytest.raises(JobError, match="world size 40"):
        spec.accumulation_for(5 * 8)
    assert not validate_spec(MINIMAL).elastic  # one node: nothing to resize
    # every node is a Worker of an elastic job, so it may start on, and shrink to, one node
    for resize in ({"max_nodes": 2}, {"min_nodes": 1, "max_nodes": 4}):
        one = validate_spec(with_changes({"training.global_batch_size": 96, "training.resize": resize}))
        assert one.elastic and one.min_nodes == 1 and one.training.nodes == 1
    default = validate_spec(MINIMAL)
    assert default.global_batch_size == 1 * 8 * 8  # micro 1 x JanusVLN's accumulation 8 x 8 GPUs


def test_memory_estimate_tracks_the_settings():
    base = validate_spec(MINIMAL)
    assert estimate_gpu_memory(base).total < 80
    bigger = JobSpec.model_validate(
        with_changes({"training.micro_batch_size": 4, "training.gradient_checkpointing": False})
    )
    assert estimate_gpu_memory(bigger).total > 4 * estimate_gpu_memory(base).activations
    stage3 = JobSpec.model_validate(with_changes({"deepspeed": {"zero_stage": 3}}))
    assert estimate_gpu_memory(stage3).weights < estimate_gpu_memory(base).weights / 4


# (id, spec data or raw text, field named in the message, words of the fix)
BAD = [
    ("typo-top-level", with_changes({"trainig": {"nodes": 2}}), "trainig", "did you mean 'training'"),
    ("typo-nested", with_changes({"training.node": 2}), "training.node", "did you mean 'training.nodes'"),
    ("nodes-zero", with_changes({"training.nodes": 0}), "training.nodes", "use a value >= 1"),
    ("prefetch-batches-negative", with_changes({"data.prefetch_batches": -1}), "data.prefetch_batches",
     "use a value >= 0"),
    ("name-too-long-for-generated-names", with_changes({"name": "a" * 55}), "name", "at most"),
    ("name-over-63", with_changes({"name": "a" * 70}), "name", "at most 63 characters"),
    ("name-not-dns", with_changes({"name": "R2R_job"}), "name", "lowercase letters"),
    (
        "stage2-param-offload",
        with_changes({"deepspeed": {"zero_stage": 2, "offload_param": "cpu"}}),
        "deepspeed.offload_param",
        "zero_stage: 3",
    ),
    (
        "micro-batch-does-not-fit",
        with_changes({"training.micro_batch_size": 8, "training.gradient_checkpointing": False}),
        "training.micro_batch_size",
        "lower training.micro_batch_size",
    ),
    (
        "s3-store-without-secret",
        with_changes({"features.credentials_secret": ...}),
        "features.credentials_secret",
        "credentials_from: environment",
    ),
    (
        "feature-mode-unknown",
        with_changes({"features.mode": "cached"}),
        "features.mode",
        "'precomputed', 'read_through' or 'online'",
    ),
    ("zero-stage-4", with_changes({"deepspeed": {"zero_stage": 4}}), "deepspeed.zero_stage", "<= 3"),
    (
        "activation-checkpointing-block",
        with_changes({"deepspeed": {"extra_config": {"activation_checkpointing": {}}}}),
        "deepspeed.extra_config.activation_checkpointing",
        "remove the block",
    ),
    (
        "optimizer-offload-without-optimizer",
        with_changes({"deepspeed": {"offload_optimizer": "cpu", "optimizer": "torch"}}),
        "deepspeed.offload_optimizer",
        "optimizer: deepspeed",
    ),
    (
        "stage3-knob-at-stage2",
        with_changes({"deepspeed": {"stage3": {"prefetch_bucket_size": 1000}}}),
        "deepspeed.stage3.prefetch_bucket_size",
        "zero_stage: 3",
    ),
    (
        "global-batch-not-multiple",
        with_changes({"training.global_batch_size": 20}),
        "training.global_batch_size",
        "multiple of 8",
    ),
    (
        "global-batch-disagrees",
        with_changes({"training.global_batch_size": 64, "training.gradient_accumulation_steps": 4}),
        "training.global_batch_size",
        "set only one",
    ),
    (
        "resize-cannot-keep-batch",
        with_changes(
            {"training.nodes": 2, "training.global_batch_size": 64, "training.resize": {"min_nodes": 2, "max_nodes": 3}}
        ),
        "training.resize",
        "(e.g. 48)",
    ),
    (
        "nodes-outside-resize-range",
        with_changes({"training.nodes": 4, "training.resize": {"max_nodes": 2}}),
        "training.nodes",
        "min_nodes <= nodes <= max_nodes",
    ),
    (
        "volcano-without-queue",
        with_changes({"cluster": {"gang_scheduler": "volcano"}}),
        "cluster.queue",
        "set cluster.queue",
    ),
    (
        "min-pixels-above-max",
        with_changes({"data.min_pixels": 600 * 28 * 28}),
        "data.min_pixels",
        "min_pixels <= max_pixels",
    ),
    (
        "monitor-stale-below-interval",
        with_changes({"monitor": {"interval_seconds": 60, "stale_after_seconds": 30}}),
        "monitor.stale_after_seconds",
        "2 x interval_seconds",
    ),
    ("missing-model-path", with_changes({"model.qwen": ...}), "model.qwen", "add it"),
    ("gpus-per-node-17", with_changes({"training.gpus_per_node": 17}), "training.gpus_per_node", "<= 16"),
    ("hca-prefix-list", with_changes({"network": {"preset": "infiniband", "ib_hca": "mlx5"}}), "network.ib_hca",
     "'=mlx5_0,mlx5_1'"),
    ("hca-blank-in-list", with_changes({"network": {"preset": "roce", "ib_hca": "=mlx5_0, mlx5_1"}}), "network.ib_hca",
     "NCCL_IB_HCA"),
    ("ifname-with-port", with_changes({"network": {"socket_ifname": "eth0:1"}}), "network.socket_ifname", "'eth0'"),
    ("env-owned", with_changes({"network": {"env": {"NCCL_IB_HCA": "=mlx5_0"}}}), "network.env.NCCL_IB_HCA",
     "network.ib_hca"),
    ("env-per-process", with_changes({"network": {"env": {"MASTER_ADDR": "x"}}}), "network.env.MASTER_ADDR",
     "remove it"),
    ("env-bad-name", with_changes({"network": {"env": {"NCCL-X": "1"}}}), "network.env", "letters, digits"),
    ("env-newline", with_changes({"network": {"env": {"NCCL_X": "1\nhostPID: true"}}}), "network.env.NCCL_X",
     "remove control characters"),
    ("tcp-with-ib-field", with_changes({"network": {"ib_tc": 106}}), "network.ib_tc", "choose preset"),
    ("unknown-network", with_changes({"network": {"preset": "ethernet"}}), "network.preset",
     "'tcp', 'infiniband', 'roce' or 'hostnetwork'"),
    ("endpoint-not-url", with_changes({"features.endpoint_url": "minio:9000"}), "features.endpoint_url", "https://"),
    (
        "auto-in-extra-config",
        with_changes({"deepspeed": {"extra_config": {"zero_optimization": {"sub_group_size": "auto"}}}}),
        "deepspeed.extra_config.zero_optimization.sub_group_size",
        "concrete value",
    ),
    (
        "deepspeed-scheduler",
        with_changes({"deepspeed": {"extra_config": {"scheduler": {"type": "WarmupLR"}}}}),
        "deepspeed.extra_config.scheduler",
        "training.scheduler",
    ),
    (
        "offload-at-stage0",
        with_changes({"deepspeed": {"zero_stage": 0, "offload_optimizer": "cpu", "optimizer": "deepspeed"}}),
        "deepspeed.offload_optimizer",
        "zero_stage: 2",
    ),
    ("shm-size-unit", with_changes({"cluster": {"shm_size": "64GB"}}), "cluster.shm_size", "match the pattern"),
    (
        "learning-rate-string",
        with_changes({"training.learning_rate": "fast"}),
        "training.learning_rate",
        "use a number",
    ),
    ("spec-is-a-list", "- name: x\n", "job spec must be a YAML mapping", "name, model"),
    ("yaml-syntax", "name: x\nmodel: [unclosed\n", "not valid YAML", "line"),
]


@pytest.mark.parametrize("case,data,field,fix", BAD, ids=[b[0] for b in BAD])
def test_bad_spec_is_refused_by_the_cli(tmp_path, case, data, field, fix):
    path = tmp_path / f"{case}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    if isinstance(data, str):
        assert field in proc.stderr and fix in proc.stderr, proc.stderr
        return
    entry = proc.stderr.split(f"  - {field}:", 1)
    assert len(entry) == 2, f"field {field} not named:\n{proc.stderr}"
    assert fix in entry[1].split("\n  - ")[0], proc.stderr


def test_at_least_twenty_distinct_refusals():
    assert len({b[2] for b in BAD}) >= 20 and len(BAD) >= 25


def test_missing_file_and_bad_output_dir(tmp_path):
    proc = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "no such job spec file" in proc.stderr
    with pytest.raises(JobError, match="no such job spec"):
        load_spec(tmp_path / "nope.yaml")


def test_schema_command_prints_the_json_schema():
    proc = run_cli("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"name", "image", "model", "data", "features", "precompute", "training",
                                         "deepspeed", "cluster", "network", "monitor"}
