"""Injection payloads in every string of the job spec: refused with the field named, or rendered as one scalar.

The string slots are found by walking the pydantic model (every str and Literal field, every key and
value of a free map, every item of a list of strings, inside lists and nested Kubernetes objects);
a baseline spec fills each container so every slot exists. Each payload goes through `janus-job
validate` (the CLI's main, in this process) and, when accepted, through the real Helm engine: no
rendered object may gain or lose a field against the baseline render, and the spec the chart writes
into its ConfigMap must read back with the payload unchanged.
"""

from __future__ import annotations

import copy
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from janus_job import cli
from janus_job.config.load import load_spec
from janus_job.config.schema import spec_to_values
from janus_job.config.spec import JobSpec
from janus_job.deploy.render import CHART_DIR, RELEASE_NAME

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())

PAYLOADS = {
    "newline-hostpid": "janus\nhostPID: true\nhostNetwork: true",
    "colon-space": "a: b",
    "template": "{{ .Release.Name }}{{ fail \"x\" }}",
    "quotes": "it's \"quoted\" \\ back",
    "very-long": "x" * 5000,
    "unicode": "\u00fcn\u00efc\u00f8d\u00e9 \u2713 \u65e5\u672c \U0001f680",
    "nul": "nul\x00byte",
    "yaml-list": "- a\n- b",
    "looks-like-null": "null",
    "looks-like-number": "0x1F",
    "shell": "$(id) `id` ${HOME}",
}

AFFINITY_TERM = {
    "labelSelector": {"matchLabels": {"app": "janus"},
                      "matchExpressions": [{"key": "tier", "operator": "In", "values": ["gpu"]}]},
    "namespaceSelector": {"matchLabels": {"team": "ml"},
                          "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}]},
    "namespaces": ["janus"],
    "topologyKey": "kubernetes.io/hostname",
    "matchLabelKeys": ["pod-template-hash"],
    "mismatchLabelKeys": ["tenant"],
}
NODE_TERM = {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}],
             "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}


def baseline() -> dict:
    """examples/minimal.yaml with every optional string and every container filled, so each slot exists."""
    spec = copy.deepcopy(MINIMAL)
    spec["model"]["attn_implementation"] = "sdpa"
    spec["features"].update({"mode": "precomputed", "credentials_from": "secret"})
    spec["training"].update({"scheduler": "cosine", "resize": {"policy": "fixed"}})
    spec["image"] = {"repository": "ghcr.io/janus-train/janus-train", "tag": "0.1.0", "pull_policy": "Always",
                     "pull_secrets": ["regcred"]}
    spec["features"].update({"endpoint_url": "https://minio.example:9000", "cache_dir": "/var/cache/janus"})
    spec["deepspeed"] = {"offload_optimizer": "none", "offload_param": "none", "optimizer": "torch",
                         "extra_config": {"note": "plain"}}
    spec["cluster"] = {
        "namespace": "janus", "service_account": "janus-train", "priority_class": "janus-train",
        "node_selector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "true", "effect": "NoExecute",
                         "tolerationSeconds": 60}],
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [NODE_TERM]},
                             "preferredDuringSchedulingIgnoredDuringExecution": [
                                 {"weight": 10, "preference": NODE_TERM}]},
            "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [AFFINITY_TERM],
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {"weight": 5, "podAffinityTerm": AFFINITY_TERM}]},
            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [AFFINITY_TERM],
                                "preferredDuringSchedulingIgnoredDuringExecution": [
                                    {"weight": 5, "podAffinityTerm": AFFINITY_TERM}]},
        },
        "gang_scheduler": "volcano", "queue": "default",
        "resources": {"cpu": "96", "memory": "1000Gi", "gpu_resource_name": "nvidia.com/gpu"},
        "shm_size": "64Gi", "restart_policy": "OnFailure", "clean_pod_policy": "None",
        "rdma_resources": [{"name": "rdma/hca_shared_devices_a", "count": 1}],
        "pod_annotations": {"example.com/note": "plain"}, "pod_labels": {"team": "nav"},
        "pod_security": "privileged", "kueue_queue": "team-a", "checkpoint_staging_storage_class": "local-nvme",
        "checkpoint_staging_dir": "/var/lib/janus/staging", "scheduler_name": "volcano", "runtime_class_name": "nvidia",
        "kueue_topology": {"mode": "required", "level": "topology.example.com/block"},
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        "volumes": [{"name": "data", "mount_path": "/data", "read_only": True, "pvc": {"claim_name": "datasets"}},
                    {"name": "shared", "mount_path": "/shared", "nfs": {"server": "nfs.example", "path": "/export"}},
                    {"name": "nvme", "mount_path": "/mnt/nvme", "host_path": {"path": "/mnt/nvme0",
                                                                              "type": "Directory"}}],
        "resource_claims": [{"name": "nics", "resource_claim_template_name": "rdma-nics"}],
    }
    spec["network"] = {"preset": "infiniband", "ib_hca": "=mlx5_0", "socket_ifname": "eth0", "check": "error",
                       "gdr_level": "PHB", "env": {"NCCL_IB_TIMEOUT": "22"}}
    spec["data"]["on_bad_sample"] = "fail"
    spec["training"].update({"clip_mode": "sum", "precision": "fp8", "fp8_recipe": "tensorwise",
                             "report_to": ["tensorboard"], "tracker_secret": "janus-trackers"})
    spec["monitor"] = {"scraper_namespace": "monitoring"}
    return json.loads(json.dumps(spec))  # no shared objects, so the YAML has no anchors


# -- the string slots of the model --------------------------------------------------------------------


def _unwrap(annotation: Any) -> list[Any]:
    """The alternatives of an annotation, Annotated and Optional removed."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) if arg is not type(None) for a in _unwrap(arg)]
    return [annotation]


def model_string_slots(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of every string the model holds; '*' stands for a list index, '<key>' for a map key."""
    slots: set[str] = set()

    def visit(annotation: Any, path: str) -> None:
        for ann in _unwrap(annotation):
            origin = typing.get_origin(ann)
            if ann is str or origin is typing.Literal:
                slots.add(path)
            elif isinstance(ann, type) and issubclass(ann, BaseModel):
                slots.update(model_string_slots(ann, path + "."))
            elif origin is list:
                visit(typing.get_args(ann)[0], path + ".*")
            elif origin is dict:
                key, value = typing.get_args(ann)
                visit(key, path + ".<key>")
                visit(value, path + ".*")
            elif ann is Any:  # free data (deepspeed.extra_config): its strings are the baseline's
                slots.add(path)

    for name, field in model.model_fields.items():
        visit(field.annotation, prefix + name)
    return slots


def data_slots(data: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """(path, 'value'|'key') of every string leaf and every map key of the baseline data."""
    out: list[tuple[tuple, str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            out.append(((*path, key), "key"))
            out.extend(data_slots(value, (*path, key)))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            out.extend(data_slots(item, (*path, i)))
    elif isinstance(data, str):
        out.append((path, "value"))
    return out


def model_slot(path: tuple, kind: str, model_slots: set[str]) -> str | None:
    """The model slot a data slot fills, or None (keys of the spec's own sections)."""
    parts = ["*" if isinstance(p, int) else str(p) for p in path]
    if kind == "key":
        slot = ".".join([*parts[:-1], "<key>"])
        return slot if slot in model_slots else None
    for slot in (".".join(parts), ".".join([*parts[:-1], "*"])):  # a field, or a value of a map
        if slot in model_slots:
            return slot
    joined = ".".join(parts)
    return next((s for s in model_slots if joined.startswith(s + ".")), None)  # inside free data


def slots_to_fuzz() -> list[tuple[tuple, str]]:
    model_slots = model_string_slots(JobSpec)
    return [(path, kind) for path, kind in data_slots(baseline()) if model_slot(path, kind, model_slots)]


SLOTS = slots_to_fuzz()


def test_every_string_slot_of_the_model_is_fuzzed():
    model_slots = model_string_slots(JobSpec)
    covered = {model_slot(path, kind, model_slots) for path, kind in SLOTS}
    missing = sorted(model_slots - covered)
    assert not missing, f"string fields without a slot in the baseline spec: {missing}"
    assert len(SLOTS) >= 60


# -- one payload in one slot ----------------------------------------------------------------------------


def put(data: dict, path: tuple, kind: str, payload: str) -> dict:
    data = copy.deepcopy(data)
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    if kind == "key":
        node[payload] = node.pop(path[-1])
    else:
        node[path[-1]] = payload
    return data


def run_validate(path: Path, capsys) -> tuple[int, str]:
    """`janus-job validate PATH` through the CLI's own entry point; (exit code, stderr)."""
    argv = sys.argv
    sys.argv = ["janus-job", "validate", str(path)]
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def key_paths(obj: Any, prefix: tuple = ()) -> set[tuple]:
    """Every field path of a rendered object (list items by index); values left out."""
    out = {prefix}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out |= key_paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            out |= key_paths(item, (*prefix, i))
    return out


def shapes(objects: list[dict], map_keys: set[str]) -> dict[tuple, set[tuple]]:
    """Field paths per object; keys of user maps (annotations, node selector) counted as one field."""
    out = {}
    for obj in objects:
        paths = {tuple("<key>" if isinstance(p, str) and p in map_keys else p for p in path)
                 for path in key_paths(obj)}
        # by kind and component: the precompute Job's name carries a hash of its inputs
        out[(obj["kind"], obj["metadata"].get("labels", {}).get("app.kubernetes.io/component"))] = paths
    return out


@pytest.fixture(scope="module")
def chart():
    import helm_python

    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart, values: dict) -> list[dict]:
    """The chart's objects for `values`, as janus_job.render does it (schema check, then templates), with the
    chart loaded once for the whole test."""
    chart.validate_schema(values)
    rendered = chart.render(values=values, name=RELEASE_NAME, namespace="default", is_install=True)
    return [doc for name, text in sorted(rendered.items()) if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def base_render(chart):
    return render(chart, spec_to_values(JobSpec.model_validate(baseline())))


@pytest.mark.parametrize("payload_name", list(PAYLOADS))
def test_payload_in_every_string_is_refused_or_one_scalar(tmp_path, capsys, chart, base_render, payload_name):
    payload = PAYLOADS[payload_name]
    base = baseline()
    refused = rendered = 0
    for path, kind in SLOTS:
        where = ".".join(str(p) for p in path)
        data = put(base, path, kind, payload)
        spec_file = tmp_path / "job.yaml"
        spec_file.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        code, err = run_validate(spec_file, capsys)
        assert code in (0, 2), f"{where}: exit {code}\n{err}"
        assert "Traceback" not in err, f"{where}: {err}"
        if code == 2:
            refused += 1
            lines = err.rstrip("\n").split("\n")
            named = [line for line in lines[1:] if line.startswith("  - ")] or lines[:1]
            field = where if kind == "value" else ".".join(str(p) for p in path[:-1])
            # the field itself, or a rule between fields that shows the payload (store vs endpoint_url)
            assert any(_names(line, field) or payload[:40] in line for line in named), \
                f"{where}: field not named:\n{err}"
            assert all("; fix: " in line or "fix: " in line for line in named), err
            continue
        rendered += 1
        spec = load_spec(spec_file)
        objects = render(chart, spec_to_values(spec))
        map_keys = {payload, "example.com/note", "gpu", "note", "app", "team"}  # the baseline's map keys
        now, before = shapes(objects, map_keys), shapes(base_render, map_keys)
        changes = {k: (sorted(map(str, now.get(k, set()) - before.get(k, set())))[:3],
                       sorted(map(str, before.get(k, set()) - now.get(k, set())))[:3])
                   for k in now.keys() | before.keys() if now.get(k) != before.get(k)}
        assert not changes, f"{where}: rendered objects gained/lost fields: {changes}"
        (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"
                        and o["metadata"]["labels"].get("app.kubernetes.io/component") == "spec"]
        in_pod = tmp_path / "in-pod.yaml"
        in_pod.write_text(configmap["data"]["job.yaml"])
        assert load_spec(in_pod) == spec, f"{where}: the pod would read a different spec"
    print(f"{payload_name}: {refused} refused, {rendered} rendered as one scalar")
    assert refused + rendered == len(SLOTS)


def _names(line: str, field: str) -> bool:
    """Whether a problem line names `field` or the object holding it (a toleration, a map)."""
    body = line.removeprefix("  - ").removeprefix("error: ")
    named = body.split(": ", 1)[0].split(" (line")[0]
    if body.startswith("/"):  # "FILE: field (line N): ..."
        rest = body.split(": ", 1)[1] if ": " in body else ""
        named = rest.split(" (line")[0]
    return bool(named) and (field == named or field.startswith(named + "."))
