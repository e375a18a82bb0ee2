"""Every pod the chart creates is admitted by the Pod Security level its spec states, and every training
pod is Guaranteed QoS.

No API server runs here, so both are computed from the published definitions (kubernetes.io, "Pod
Security Standards" for Kubernetes 1.33 and "Pod Quality of Service Classes"), each check under the
name the standard gives it, and applied to every pod template of every example and chart preset
(examples/, charts/janus-train/ci/). The evaluator itself is shown to catch each violation, and
`janus-job validate` is shown to refuse exactly the presets whose pods the stated level refuses.
"""

from __future__ import annotations

import copy
import re
from decimal import Decimal
from pathlib import Path

import helm_python
import pytest

from janus_job.config.load import validate_spec
from janus_job.config.schema import spec_to_values
from janus_job.deploy.render import render_objects
from janus_job.errors import JobError

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "janus-train"
VALUE_FILES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((CHART / "ci").glob("*.yaml"))
LEVELS = ("privileged", "baseline", "restricted")

# -- the Pod Security Standards ------------------------------------------------------------------

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
APPARMOR_PREFIX = "container.apparmor.security.beta.kubernetes.io/"


def _containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]


def baseline_violations(metadata: dict, spec: dict) -> list[str]:
    """Names of the Baseline checks the pod fails, with what failed."""
    out = []
    pod_sc = spec.get("securityContext", {})
    containers = _containers(spec)
    scs = [(c["name"], c.get("securityContext", {})) for c in containers]

    if pod_sc.get("windowsOptions", {}).get("hostProcess") or any(
            sc.get("windowsOptions", {}).get("hostProcess") for _, sc in scs):
        out.append("HostProcess")
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"Host Namespaces: {field}")
    out += [f"Privileged Containers: {name}" for name, sc in scs if sc.get("privileged")]
    for name, sc in scs:
        extra = set(sc.get("capabilities", {}).get("add", [])) - BASELINE_CAPABILITIES
        if extra:
            out.append(f"Capabilities: {name} adds {sorted(extra)}")
    out += [f"HostPath Volumes: {v['name']}" for v in spec.get("volumes", []) if "hostPath" in v]
    for c in containers:
        for port in c.get("ports", []):
            # the API server defaults hostPort to containerPort for a hostNetwork pod
            host_port = port.get("hostPort", port.get("containerPort") if spec.get("hostNetwork") else 0)
            if host_port:
                out.append(f"Host Ports: {c['name']} {host_port}")
    profiles = [sc.get("appArmorProfile", {}).get("type") for sc in [pod_sc, *(sc for _, sc in scs)]]
    if any(p not in (None, "RuntimeDefault", "Localhost") for p in profiles):
        out.append("AppArmor: appArmorProfile")
    for key, value in metadata.get("annotations", {}).items():
        if key.startswith(APPARMOR_PREFIX) and value != "runtime/default" and not value.startswith("localhost/"):
            out.append(f"AppArmor: {key}={value}")
    for se in [pod_sc.get("seLinuxOptions")] + [sc.get("seLinuxOptions") for _, sc in scs]:
        if se and (se.get("type", "") not in SELINUX_TYPES or se.get("user") or se.get("role")):
            out.append("SELinux")
    out += [f"/proc Mount Type: {name}" for name, sc in scs if sc.get("procMount", "Default") != "Default"]
    seccomp = [sc.get("seccompProfile", {}).get("type") for sc in [pod_sc, *(sc for _, sc in scs)]]
    if "Unconfined" in seccomp:
        out.append("Seccomp: Unconfined")
    out += [f"Sysctls: {s['name']}" for s in pod_sc.get("sysctls", []) if s["name"] not in SAFE_SYSCTLS]
    return out


def restricted_violations(metadata: dict, spec: dict) -> list[str]:
    """Names of the Restricted checks (Baseline's included) the pod fails."""
    out = baseline_violations(metadata, spec)
    pod_sc = spec.get("securityContext", {})
    scs = [(c["name"], c.get("securityContext", {})) for c in _containers(spec)]
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"Volume Types: {v['name']} {sorted(kinds - RESTRICTED_VOLUMES)}")
    out += [f"Privilege Escalation: {name}" for name, sc in scs if sc.get("allowPrivilegeEscalation") is not False]
    for name, sc in scs:
        own = sc.get("runAsNonRoot")
        if own is False or (own is None and pod_sc.get("runAsNonRoot") is not True):
            out.append(f"Running as Non-root: {name}")
    if pod_sc.get("runAsUser") == 0 or any(sc.get("runAsUser") == 0 for _, sc in scs):
        out.append("Running as Non-root user")
    pod_seccomp = pod_sc.get("seccompProfile", {}).get("type")
    for name, sc in scs:
        own = sc.get("seccompProfile", {}).get("type")
        if (own or pod_seccomp) not in ("RuntimeDefault", "Localhost"):
            out.append(f"Seccomp (restricted): {name}")
    for name, sc in scs:
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"Capabilities (restricted): {name}")
    return out


def violations(metadata: dict, spec: dict, level: str) -> list[str]:
    if level == "privileged":
        return []
    return (baseline_violations if level == "baseline" else restricted_violations)(metadata, spec)


# -- QoS classes -------------------------------------------------------------------------------------

_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
           "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
           "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def quantity(value) -> Decimal:
    match = re.fullmatch(r"([+-]?[0-9.]+)(?:[eE]([+-]?[0-9]+))?(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?", str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    number, exponent, suffix = match.groups()
    return Decimal(number) * Decimal(10) ** int(exponent or 0) * Decimal(_SUFFIX[suffix or ""])


def qos_class(spec: dict) -> str:
    """Guaranteed: every container (init and sidecar containers included) has CPU and memory limits, and
    its requests equal them (a missing request takes the limit). BestEffort: no container has any CPU or
    memory request or limit. Otherwise Burstable."""
    containers = [*spec.get("initContainers", []), *spec.get("containers", [])]
    guaranteed, any_set = True, False
    for c in containers:
        limits = c.get("resources", {}).get("limits", {})
        requests = c.get("resources", {}).get("requests", {})
        for resource in ("cpu", "memory"):
            any_set |= resource in limits or resource in requests
            limit = limits.get(resource)
            if limit is None or quantity(requests.get(resource, limit)) != quantity(limit):
                guaranteed = False
    return "Guaranteed" if guaranteed else ("Burstable" if any_set else "BestEffort")


# -- the chart's pods --------------------------------------------------------------------------------


def pods(objects: list[dict]) -> dict[str, tuple[dict, dict]]:
    """Every pod template: {'<kind>/<name>[/<role>]': (metadata, spec)}."""
    out = {}
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Job":
            template = obj["spec"]["template"]
            out[name] = (template.get("metadata", {}), template["spec"])
        elif obj["kind"] == "PyTorchJob":
            for role, replica in obj["spec"]["pytorchReplicaSpecs"].items():
                out[f"{name}/{role}"] = (replica["template"].get("metadata", {}), replica["template"]["spec"])
    return out


def user_values(path: Path) -> dict:
    return helm_python.values_from_yaml(path.read_text())


@pytest.fixture(scope="module")
def rendered() -> dict[str, tuple[str, dict]]:
    out = {}
    for path in VALUE_FILES:
        spec = validate_spec(user_values(path), str(path))
        out[path.stem] = (spec.cluster.pod_security, pods(render_objects(spec_to_values(spec))))
    return out


@pytest.mark.parametrize("path", VALUE_FILES, ids=[p.stem for p in VALUE_FILES])
def test_every_pod_is_admitted_at_the_level_its_spec_states(rendered, path):
    level, templates = rendered[path.stem]
    assert {n.split("/")[0] for n in templates} >= {"Job", "PyTorchJob"}  # hook (+ precompute) and trainer
    for name, (metadata, spec) in templates.items():
        assert violations(metadata, spec, level) == [], f"{path.name} {name} at {level}"


def test_default_level_is_that_of_the_shipped_namespace(rendered):
    import yaml

    namespace = yaml.safe_load((ROOT / "manifests" / "namespace.yaml").read_text())
    enforced = namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    assert enforced == "restricted"
    assert rendered["minimal"][0] == enforced  # the example states nothing: the default applies
    for name, (metadata, spec) in rendered["minimal"][1].items():
        assert restricted_violations(metadata, spec) == [], name


@pytest.mark.parametrize("path", VALUE_FILES, ids=[p.stem for p in VALUE_FILES])
def test_every_training_pod_is_guaranteed(rendered, path):
    _, templates = rendered[path.stem]
    trainers = {n: spec for n, (_, spec) in templates.items() if n.startswith("PyTorchJob/")}
    assert trainers
    for name, spec in trainers.items():
        assert qos_class(spec) == "Guaranteed", name
    for name, (_, spec) in templates.items():  # precompute and the validation hook as well
        assert qos_class(spec) == "Guaranteed", name


def test_writable_paths_are_volumes(rendered):
    """A read-only root filesystem: each path the code writes is a volume of the trainer."""
    _, templates = rendered["all-features-values"]
    _, spec = templates["PyTorchJob/all-features/Worker"]  # elastic: Workers only
    (trainer,) = spec["containers"]
    assert trainer["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    for path in ("/tmp", env["HOME"], "/dev/shm", env["JANUS_STATS_DIR"], env["JANUS_CHECKPOINT_STAGING"]):
        assert path in mounts, path
        assert "emptyDir" in volumes[mounts[path]], path
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


# -- the evaluator catches each violation --------------------------------------------------------


def _compliant() -> tuple[dict, dict]:
    objects = render_objects(user_values(ROOT / "examples" / "minimal.yaml"))
    return copy.deepcopy(pods(objects)["PyTorchJob/janus-minimal/Master"])


MUTATIONS = [
    ("HostProcess", "baseline", lambda m, s: s["securityContext"].update(windowsOptions={"hostProcess": True})),
    ("Host Namespaces", "baseline", lambda m, s: s.update(hostPID=True)),
    ("Privileged Containers", "baseline", lambda m, s: s["containers"][0]["securityContext"].update(privileged=True)),
    ("Capabilities", "baseline",
     lambda m, s: s["containers"][0]["securityContext"]["capabilities"].update(add=["IPC_LOCK"])),
    ("HostPath Volumes", "baseline", lambda m, s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
    ("Host Ports", "baseline", lambda m, s: s["containers"][0]["ports"][0].update(hostPort=23456)),
    ("AppArmor", "baseline", lambda m, s: m["annotations"].update({APPARMOR_PREFIX + "pytorch": "unconfined"})),
    ("SELinux", "baseline", lambda m, s: s["securityContext"].update(seLinuxOptions={"type": "spc_t"})),
    ("/proc Mount Type", "baseline", lambda m, s: s["containers"][0]["securityContext"].update(procMount="Unmasked")),
    ("Seccomp", "baseline", lambda m, s: s["securityContext"].update(seccompProfile={"type": "Unconfined"})),
    ("Sysctls", "baseline",
     lambda m, s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}])),
    ("Volume Types", "restricted",
     lambda m, s: s["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}})),
    ("Privilege Escalation", "restricted",
     lambda m, s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation")),
    ("Running as Non-root", "restricted", lambda m, s: s["securityContext"].pop("runAsNonRoot")),
    ("Running as Non-root user", "restricted", lambda m, s: s["securityContext"].update(runAsUser=0)),
    ("Seccomp (restricted)", "restricted", lambda m, s: s["securityContext"].pop("seccompProfile")),
    ("Capabilities (restricted)", "restricted",
     lambda m, s: s["containers"][0]["securityContext"]["capabilities"].update(add=["CHOWN"])),
]


@pytest.mark.parametrize("check,level,mutate", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_each_check_catches_its_violation(check, level, mutate):
    metadata, spec = _compliant()
    assert violations(metadata, spec, "restricted") == []
    mutate(metadata, spec)
    found = violations(metadata, spec, level)
    assert any(v == check or v.startswith(check + ":") for v in found), found
    if level == "baseline":  # restricted includes baseline; privileged admits everything
        assert violations(metadata, spec, "restricted")
    else:
        assert violations(metadata, spec, "baseline") == []
    assert violations(metadata, spec, "privileged") == []


def test_qos_classes():
    _, spec = _compliant()
    assert qos_class(spec) == "Guaranteed"
    spec["initContainers"][0]["resources"]["limits"].pop("cpu")  # the sidecar alone makes it Burstable
    assert qos_class(spec) == "Burstable"
    bare = {"containers": [{"name": "a"}], "initContainers": [{"name": "b", "resources": {"requests": {}}}]}
    assert qos_class(bare) == "BestEffort"
    only_limits = {"containers": [{"name": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}
    assert qos_class(only_limits) == "Guaranteed"
    assert quantity("1Gi") == quantity("1024Mi") and quantity("500m") == quantity("0.5") and quantity("1e3") == 1000


# -- validate refuses what the stated level would refuse -----------------------------------------


@pytest.mark.parametrize("network", ["tcp", "infiniband", "roce", "hostnetwork"])
@pytest.mark.parametrize("level", LEVELS)
def test_validate_refuses_exactly_the_pods_the_level_refuses(network, level):
    values = user_values(ROOT / "examples" / "minimal.yaml")
    values["cluster"] = {"pod_security": level}
    values["network"] = {"preset": network}
    if network != "tcp":
        values["network"]["ib_hca"] = "=mlx5_0"
    admitted = all(violations(m, s, level) == [] for m, s in pods(render_objects(values)).values())
    try:
        validate_spec(values)
    except JobError as err:
        assert not admitted, f"validate refused pods that {level} admits: {err}"
        assert "cluster.pod_security" in str(err)
    else:
        assert admitted, f"validate accepted {network} pods that {level} refuses"
    assert admitted == (network != "hostnetwork" or level == "privileged")


def test_validate_refuses_an_apparmor_annotation_the_level_refuses():
    values = user_values(ROOT / "examples" / "minimal.yaml")
    values["cluster"] = {"pod_annotations": {APPARMOR_PREFIX + "pytorch": "unconfined"}}
    (metadata, spec) = pods(render_objects(values))["PyTorchJob/janus-minimal/Master"]
    assert violations(metadata, spec, "restricted")
    with pytest.raises(JobError, match=r"cluster\.pod_annotations\.container\.apparmor"):
        validate_spec(values)
    values["cluster"]["pod_security"] = "privileged"
    validate_spec(values)


VOLUME_SOURCES = {"pvc": {"claim_name": "data"}, "nfs": {"server": "10.0.0.5", "path": "/exports/data"},
                  "host_path": {"path": "/mnt/nvme0"}}


@pytest.mark.parametrize("source", list(VOLUME_SOURCES))
@pytest.mark.parametrize("level", LEVELS)
def test_validate_refuses_exactly_the_volumes_the_level_refuses(source, level):
    """cluster.volumes: hostPath only under privileged, NFS under baseline or privileged, a PVC anywhere; the
    rendered pods (training and precompute) are judged by the evaluator above."""
    values = user_values(ROOT / "examples" / "minimal.yaml")
    values["cluster"] = {"pod_security": level,
                         "volumes": [{"name": "extra", "mount_path": "/mnt/extra", source: VOLUME_SOURCES[source]}]}
    rendered = pods(render_objects(values))
    gpu_pods = {n: p for n, p in rendered.items() if n.startswith("PyTorchJob/") or "-precompute-" in n}
    assert len(gpu_pods) == 2
    assert all(any(v["name"] == "extra" for v in spec["volumes"]) for _, spec in gpu_pods.values()), gpu_pods.keys()
    admitted = all(violations(m, s, level) == [] for m, s in rendered.values())
    try:
        validate_spec(values)
    except JobError as err:
        assert not admitted, f"validate refused pods that {level} admits: {err}"
        assert f"cluster.volumes.0.{source}" in str(err) and "cluster.pod_security" in str(err)
    else:
        assert admitted, f"validate accepted a {source} volume that {level} refuses"
    expected = {"pvc": LEVELS, "nfs": ("privileged", "baseline"), "host_path": ("privileged",)}[source]
    assert admitted == (level in expected)
