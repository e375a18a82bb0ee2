"""`helm install`/`upgrade` refuse what `janus-job validate` refuses, with the rules written once.

Template time: values.schema.json (generated from the spec) checks types, enums and ranges, and the
templates name any value a user's null removed. Install time: a pre-install/pre-upgrade hook Job runs
`janus-job validate` from the image on a hook ConfigMap holding the values Helm is about to install.
Without a cluster the mechanism is followed as far as it goes: the real Helm engine renders the hook,
and the real CLI (through the interpreter running these tests) runs the hook Job's exact command on
the exact file the hook ConfigMap would mount.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import helm_python
import pytest
import yaml

from janus_job.config.schema import defaults_values
from janus_job.deploy.render import render_objects

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "janus-train"
VALUE_FILES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((CHART / "ci").glob("*.yaml"))
HOOK = "helm.sh/hook"


def user_values(path: Path) -> dict:
    return helm_python.values_from_yaml(path.read_text())


def minimal() -> dict:
    return user_values(ROOT / "examples" / "minimal.yaml")


def hook_objects(objects: list[dict]) -> tuple[dict, dict]:
    """(ConfigMap, Job) of the install/upgrade hook."""
    hooks = [o for o in objects if HOOK in o["metadata"].get("annotations", {})]
    (configmap,) = [o for o in hooks if o["kind"] == "ConfigMap"]
    (job,) = [o for o in hooks if o["kind"] == "Job"]
    return configmap, job


def run_hook(objects: list[dict], root: Path) -> subprocess.CompletedProcess:
    """Runs the hook Job's container command here: the ConfigMap's keys become files under its
    mountPath (below `root`), `janus-job` is the CLI of this interpreter."""
    configmap, job = hook_objects(objects)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {}
    for mount in container["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source:
            assert source["name"] == configmap["metadata"]["name"], "the hook Job must mount the hook ConfigMap"
            mounted[mount["mountPath"]] = root / mount["mountPath"].lstrip("/")
            mounted[mount["mountPath"]].mkdir(parents=True)
            for key, text in configmap["data"].items():
                (mounted[mount["mountPath"]] / key).write_text(text)
    command = container["command"]
    assert command[0] == "janus-job"
    args = []
    for arg in command[1:]:
        parent = str(PurePosixPath(arg).parent)
        args.append(str(mounted[parent] / PurePosixPath(arg).name) if parent in mounted else arg)
    return subprocess.run([sys.executable, "-m", "janus_job.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False)


# -- the hook objects ------------------------------------------------------------------------------


def test_hook_runs_validate_before_install_and_upgrade():
    objects = render_objects(minimal(), namespace="janus")
    configmap, job = hook_objects(objects)
    for obj in (configmap, job):
        notes = obj["metadata"]["annotations"]
        assert notes[HOOK] == "pre-install,pre-upgrade"
        # before-hook-creation: a new attempt replaces the old objects; no hook-failed: a failed Job's log stays
        assert notes["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
        assert obj["metadata"]["namespace"] == "janus"
    # Helm creates hooks of one phase in ascending weight: the ConfigMap exists before the Job's pod
    assert int(configmap["metadata"]["annotations"]["helm.sh/hook-weight"]) < \
        int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert job["metadata"]["annotations"]["helm.sh/hook-output-log-policy"] == "hook-failed"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["janus-job", "validate", "/etc/janus/job.yaml"]
    (spec_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/janus"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == spec_mount["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"] and set(configmap["data"]) == {"job.yaml"}
    trainer = next(o for o in objects if o["kind"] == "PyTorchJob")
    (main,) = next(iter(trainer["spec"]["pytorchReplicaSpecs"].values()))["template"]["spec"]["containers"]
    assert container["image"] == main["image"]
    # the hook's copy is the spec the chart installs
    (installed,) = [o for o in objects if o["kind"] == "ConfigMap" and HOOK not in o["metadata"].get("annotations", {})]
    assert yaml.safe_load(configmap["data"]["job.yaml"]) == yaml.safe_load(installed["data"]["job.yaml"])


@pytest.mark.parametrize("path", VALUE_FILES, ids=[p.stem for p in VALUE_FILES])
def test_hook_accepts_every_example(path, tmp_path):
    proc = run_hook(render_objects(user_values(path)), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ")


DELETE = object()


def _set(values: dict, dotted: str, value) -> dict:
    """A copy with one dotted field set (DELETE: left out)."""
    out = copy.deepcopy(values)
    node = out
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return out


# Specs the schema lets through (each field valid alone) that validate refuses: Helm renders them,
# so the hook is what stops `helm install`.
INSTALL_TIME_REFUSALS = [
    ("batch-arithmetic", {"training.global_batch_size": 100}, "training.global_batch_size"),
    ("memory-fit", {"training.micro_batch_size": 8}, "training.micro_batch_size"),
    ("resize-range", {"training.nodes": 2, "training.resize.min_nodes": 3}, "training.nodes"),
    ("deepspeed-offload", {"deepspeed.offload_param": "cpu"}, "deepspeed.offload_param"),
    ("credentials", {"features.credentials_secret": DELETE}, "features.credentials_secret"),
    ("hostnetwork-restricted", {"network.preset": "hostnetwork"}, "cluster.pod_security"),
    ("staging-too-small", {"cluster.checkpoint_staging_gib": 50}, "cluster.checkpoint_staging_gib"),
]


@pytest.mark.parametrize("case,changes,field", INSTALL_TIME_REFUSALS, ids=[c[0] for c in INSTALL_TIME_REFUSALS])
def test_hook_refuses_what_validate_refuses(case, changes, field, tmp_path):
    values = minimal()
    for dotted, value in changes.items():
        values = _set(values, dotted, value)
    objects = render_objects(values)  # the template accepts it: no copy of the rules there
    proc = run_hook(objects, tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"- {field}:" in proc.stderr and "fix:" in proc.stderr and "Traceback" not in proc.stderr
    # and the same file straight from the user gets the same verdict from `janus-job validate`
    direct = tmp_path / "job.yaml"
    direct.write_text(yaml.safe_dump(values))
    again = subprocess.run([sys.executable, "-m", "janus_job.cli", "validate", str(direct)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 2 and f"- {field}:" in again.stderr


@pytest.mark.parametrize("command", [["launch", "--spec"], ["precompute", "--spec"]], ids=["launch", "precompute"])
def test_pods_validate_again_at_start(command, tmp_path):
    """The trainer's and precompute's entrypoints refuse a bad spec before doing anything else."""
    values = _set(minimal(), "training.global_batch_size", 100)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(values))
    proc = subprocess.run([sys.executable, "-m", "janus_job.cli", *command, str(spec)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "- training.global_batch_size:" in proc.stderr, proc.stderr


# -- nulls: Helm deletes the key and skips the schema for it -------------------------------------


NULLS = ["precompute.pods", "cluster.termination_grace_seconds", "monitor.port"]


@pytest.mark.parametrize("field", NULLS)
def test_helm_refuses_a_null_by_schema(field):
    values = _set(minimal(), field, None)
    with helm_python.Chart.load(CHART) as chart, pytest.raises(helm_python.HelmError) as err:
        chart.render(values=values, name="janus-train", namespace="janus", is_install=True)
    parent, leaf = field.rsplit(".", 1)
    assert f"'/{parent}': missing property '{leaf}'" in str(err.value)


@pytest.fixture(scope="module")
def schemaless_chart(tmp_path_factory):
    """The chart as `helm install --skip-schema-validation` sees it."""
    copy_dir = tmp_path_factory.mktemp("chart") / "janus-train"
    shutil.copytree(CHART, copy_dir)
    (copy_dir / "values.schema.json").unlink()
    with helm_python.Chart.load(copy_dir) as chart:
        yield chart


def _render(chart, values: dict) -> dict[str, str]:
    return chart.render(values=values, name="janus-train", namespace="janus", is_install=True)


@pytest.mark.parametrize("field", NULLS)
def test_templates_refuse_a_null_without_the_schema(schemaless_chart, field):
    with pytest.raises(helm_python.HelmError) as err:
        _render(schemaless_chart, _set(minimal(), field, None))
    assert f"{field}: null or missing" in str(err.value) and "fix:" in str(err.value)


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_leaves(value, path + "."))
        out.append(path)
    return out


def _without_spec_copies(node):
    """Drops what only follows the spec text: checksums, and the precompute Job's name hash."""
    if isinstance(node, dict):
        return {k: _without_spec_copies(v) for k, v in node.items() if k != "janus-train.io/spec-checksum"}
    if isinstance(node, list):
        return [_without_spec_copies(v) for v in node]
    if isinstance(node, str) and "-precompute-" in node:
        return node.rsplit("-", 1)[0]
    return node


def _what_pods_get(rendered: dict[str, str]) -> list:
    """The rendered objects less the copies of the spec (ConfigMaps, checksums, the Job's hash)."""
    objects = []
    for name, text in sorted(rendered.items()):
        if name.endswith(".yaml"):
            objects += [_without_spec_copies(d) for d in yaml.safe_load_all(text) if d and d["kind"] != "ConfigMap"]
    return objects


def test_every_value_the_templates_read_is_required(schemaless_chart):
    """Nulls every defaulted field (and section) in turn: either the templates refuse it naming the
    field, or the rendered objects do not depend on it (only the pods' copy of the spec does, and
    the pods fill the default when they validate it)."""
    base = _what_pods_get(_render(schemaless_chart, minimal()))
    used, unused = [], []
    for field in _leaves(defaults_values()):
        try:
            rendered = _render(schemaless_chart, _set(minimal(), field, None))
        except helm_python.HelmError as err:
            assert f"{field}" in str(err) and "null or missing" in str(err), (field, str(err))
            used.append(field)
            continue
        assert _what_pods_get(rendered) == base, f"{field}: null changes the rendered objects but is not required"
        unused.append(field)
    assert "cluster.termination_grace_seconds" in used and "data.num_workers" in unused
