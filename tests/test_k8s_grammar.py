"""The Kubernetes grammars and the strict spec reader on their own: what each accepts and refuses.

Refusals through the CLI and Helm are in test_bad_specs.py; here each grammar also has to accept the
values real clusters use, and its JSON Schema (what Helm checks) has to agree with the Python check
on every sample.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest
from pydantic import TypeAdapter, ValidationError

from janus_job.config import k8s
from janus_job.config.load import MAX_DEPTH, read_spec_yaml
from janus_job.errors import JobError

SAMPLES = {
    "DNSLabel": (k8s.DNSLabel, ["janus", "a", "team-1", "0abc", "a" * 63],
                 ["Janus", "-a", "a-", "a.b", "a_b", "", "a" * 64, "a\n"]),
    "DNSSubdomain": (k8s.DNSSubdomain, ["janus-train", "a.b.c", "regcred", "x" * 253],
                     ["a..b", ".a", "a.", "A", "x" * 254, "a b", "janus-train\nhostPID: true"]),
    "PriorityClassName": (k8s.PriorityClassName, ["janus-train", "high", "system-node-critical"],
                          ["system-janus", "High", ""]),
    "LabelKey": (k8s.LabelKey, ["gpu", "nvidia.com/gpu.product", "kubernetes.io/hostname", "a_b.c-d",
                                "x/" + "n" * 63, "p" * 253 + "/n"],
                 ["-gpu", "gpu-", "a/b/c", "/gpu", "n" * 64, "p" * 254 + "/n", "UPPER.COM/x", "a b"]),
    "LabelValue": (k8s.LabelValue, ["", "h100", "NVIDIA-H800", "v1.2_3", "v" * 63],
                   ["-x", "x-", "a b", "v" * 64, "a/b", "x\n"]),
    "Quantity": (k8s.Quantity, ["96", "500m", "1.5", ".5", "5.", "1000Gi", "64Ki", "1e3", "2E6", "1k", "3M", "1Ei"],
                 ["lots", "0", "0Gi", "-1", "+-1", "1K", "1 Gi", "1GB", "1.2.3", "", "1e", "Gi", "1e400"]),
    "ExtendedResourceName": (k8s.ExtendedResourceName, ["nvidia.com/gpu", "rdma/hca_shared_devices_a",
                                                        "amd.com/gpu", "example.com/foo.bar"],
                             ["cpu", "nvidia.com/", "kubernetes.io/gpu", "node.kubernetes.io/x",
                              "requests.example.com/x", "nvidia.com/gpu/x"]),
    "ImageRepository": (k8s.ImageRepository, ["ghcr.io/janus-train/janus-train", "nginx", "library/nginx",
                                              "localhost:5000/a/b", "registry.example.com:443/team/img",
                                              "a__b/c--d/e.f", "[::1]:5000/img"],
                        ["ghcr.io/Janus/x", "a//b", "a/", "/a", "img:tag", "img@sha256:" + "0" * 64, "a/-b"]),
    "ImageTag": (k8s.ImageTag, ["0.1.0", "latest", "v1_2-3.4", "_x", "@sha256:" + "a" * 64,
                                "1.0@sha256:" + "b" * 64, "T" * 128],
                 [".x", "-x", "T" * 129, "@sha256:abc", "@sha256:" + "A" * 64, "a b", "1.0\n", ""]),
    "AbsolutePath": (k8s.AbsolutePath, ["/var/cache/janus-features", "/a", "/data/x_y.z"],
                     ["relative", "/", "/a/", "//a", "/a//b", "/a/./b", "/a/../b", "/a b", "/a\n"]),
    "EnvVarName": (k8s.EnvVarName, ["NCCL_IB_HCA", "_X", "a1"], ["1A", "A-B", "A B", ""]),
    "StorageLocation": (k8s.StorageLocation, ["s3://janus-features/r2r", "s3://bucket", "/mnt/features",
                                              "file:///mnt/x", "relative/dir", "C:x"],
                        ["gs://b/x", "gcs://b/x", "az://c/x", "abfs://c/x", "s4://b/x", "https://h/x", "s3://B/x",
                         "s3://ab/x", "file://rel", "/x\n", "x" * 1025]),
    "WeightsLocation": (k8s.WeightsLocation, ["s3://models/qwen", "https://example.com/v.pt", "http://h/x",
                                              "/models/qwen"],
                        ["gs://b/x", "hf://Qwen/x", "ftp://h/x"]),
    "HttpUrl": (k8s.HttpUrl, ["https://minio.storage.svc:9000", "http://10.0.0.1:9000/path"],
                ["minio:9000", "https://", "https://a b", "ftp://h"]),
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_grammar_accepts_real_values_refuses_bad_ones_and_agrees_with_its_json_schema(name):
    kind, good, bad = SAMPLES[name]
    adapter = TypeAdapter(kind)
    schema = adapter.json_schema()
    for value in good:
        assert adapter.validate_python(value) == value, value
        jsonschema.validate(value, schema)
    for value in bad:
        with pytest.raises(ValidationError) as err:
            adapter.validate_python(value)
        (error,) = err.value.errors()
        assert error["type"] == "k8s_grammar" and error["ctx"]["fix"], error
        assert "\n" not in error["msg"] and "\n" not in error["ctx"]["fix"]


# values JSON Schema lets through but the Python check refuses: the install-time check covers them
SCHEMA_LAXER = {("Quantity", "1e400")}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_json_schema_refuses_the_bad_values_it_can_express(name):
    kind, _, bad = SAMPLES[name]
    validator = jsonschema.Draft202012Validator(TypeAdapter(kind).json_schema())
    for value in bad:
        if value.endswith("\n"):
            # Python's re lets "$" match before a final newline; Helm's Go regexp does not (test_bad_specs
            # shows Helm refusing one): nothing to learn from this validator
            continue
        assert validator.is_valid(value) == ((name, value) in SCHEMA_LAXER), value


def test_quantity_values():
    assert k8s.quantity_value("1536Mi") == 1536 * 1024**2
    assert k8s.quantity_value("500m") == Decimal("0.5")
    assert k8s.quantity_value("1e3") == 1000
    assert k8s.quantity_value("2k") == 2000


def test_tolerations_follow_the_api_rules():
    adapter = TypeAdapter(list[k8s.Toleration])
    good = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, {"operator": "Exists"},
            {"key": "dedicated", "operator": "Equal", "value": "ml"}, {"key": "dedicated", "value": "ml"},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
             "tolerationSeconds": 300}]
    assert len(adapter.validate_python(good)) == len(good)
    schema = jsonschema.Draft202012Validator(adapter.json_schema())
    assert schema.is_valid(good)
    bad = [{"operator": "Exists", "key": "a", "value": "x"}, {"value": "x"}, {"key": "a", "tolerationSeconds": 5},
           {"key": "a", "effect": "NoRun"}, {"key": "a", "operator": "In"}, {"key": "a", "extra": 1},
           {"key": "a", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": -1}]
    for item in bad:
        with pytest.raises(ValidationError):
            adapter.validate_python([item])
        assert not schema.is_valid([item]), item


def test_affinity_as_the_api_writes_it():
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu.count", "operator": "Gt", "values": ["4"]},
                              {"key": "zone", "operator": "Exists"}]}]}},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                "labelSelector": {"matchLabels": {"app": "janus"}}}}]}}
    adapter = TypeAdapter(k8s.Affinity)
    assert adapter.dump_python(adapter.validate_python(affinity), exclude_none=True) == affinity
    assert jsonschema.Draft202012Validator(adapter.json_schema()).is_valid(affinity)
    gt_text = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu.count", "operator": "Gt", "values": ["four"]}]}]}}}
    with pytest.raises(ValidationError, match="exactly one integer"):
        adapter.validate_python(gt_text)
    assert not jsonschema.Draft202012Validator(adapter.json_schema()).is_valid(gt_text)


def test_mount_paths_must_not_clash():
    taken = {m: "chart" for m in k8s.CHART_MOUNTS}
    assert k8s.mount_path_problem("/var/cache/janus-features", taken) is None
    assert "overlaps /etc/janus" in k8s.mount_path_problem("/etc", taken)
    assert "overlaps /dev/shm" in k8s.mount_path_problem("/dev/shm/x", taken)
    assert "hide /proc" in k8s.mount_path_problem("/proc/x", taken)
    assert "hide /usr" in k8s.mount_path_problem("/usr", taken)
    assert k8s.mount_path_problem("/usr-local-cache", taken) is None


def test_annotations_total_size():
    adapter = TypeAdapter(k8s.Annotations)
    adapter.validate_python({"a": "x" * 200_000, "example.com/multus": '[{"name": "ib"}]\n'})
    with pytest.raises(ValidationError, match="262144"):
        adapter.validate_python({"a": "x" * 140_000, "b": "x" * 140_000})


# -- the strict reader -------------------------------------------------------------------------------------


def read(tmp_path: Path, content: str | bytes):
    path = tmp_path / "job.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return read_spec_yaml(path)


def test_reader_keeps_what_helm_keeps(tmp_path):
    data = read(tmp_path, "\ufeffa: 2e-5\nb: 2024-01-01\nc: '2'\nd: yes\ne: 0.5\nf: ~\ng: [1, x]\nh: {i: j}\n")
    assert data == {"a": 2e-5, "b": "2024-01-01", "c": "2", "d": True, "e": 0.5, "f": None, "g": [1, "x"],
                    "h": {"i": "j"}}


def test_reader_depth_limit_is_exact(tmp_path):
    def nest(depth: int) -> str:
        return "a: " + "{b: " * (depth - 1) + "1" + "}" * (depth - 1) + "\n"

    assert read(tmp_path, nest(MAX_DEPTH))  # the top-level mapping counts as one level
    with pytest.raises(JobError, match="nested deeper than"):
        read(tmp_path, nest(MAX_DEPTH + 1))


@pytest.mark.parametrize("content,field,words", [
    ("a:\n  b: 1\n  b: 2\n", "a.b (line 3)", "set twice (first at line 2)"),
    ("a: [1, {b: .inf}]\n", "a.1.b (line 1)", "not a finite number"),
    ("a: {? [x]: 1}\n", "a (line 1)", "keys must be plain text"),
    ("a: {1: x}\n", "a (line 1)", "key 1 is not text"),
    ("a: !custom x\n", "a (line 1)", "YAML tag !custom"),
    ("a: &x 1\nb: *x\n", "line 1", "anchor &x"),
    ("a: [unclosed\n", "not valid YAML at line 2", "fix: correct the YAML syntax"),
    ("# only a comment\n", "the file is empty", "fix:"),
    ("---\n...\n", "holds no values", "fix:"),
])
def test_reader_errors_name_file_and_field(tmp_path, content, field, words):
    with pytest.raises(JobError) as err:
        read(tmp_path, content)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "job.yaml") + ": ") and "\n" not in message
    assert field in message and words in message, message
