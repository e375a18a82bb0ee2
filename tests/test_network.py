"""The network section: NCCL's list syntax, the variables launch sets, the per-node preflight (HCAs
described as sysfs/dev trees in tmp dirs: that is the hardware), NCCL's init output, and the
start-of-job all-reduce over real torchrun/gloo processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from janus_job.deploy import network
from janus_job.deploy.launch import network_arguments
from janus_job.deploy.network import (
    NameFilter,
    NetworkSettings,
    nccl_env,
    parse_nccl_log,
    preflight,
)
from janus_job.errors import JobError

ROOT = Path(__file__).resolve().parent.parent


# -- NCCL_IB_HCA / NCCL_SOCKET_IFNAME syntax (NCCL's env docs and its matchIfList) -------------------


@pytest.mark.parametrize("text, name, port, expected", [
    ("mlx5", "mlx5_0", 1, True),
    ("mlx5", "mlx5_bond_0", 1, True),  # the prefix trap
    ("=mlx5_0,mlx5_1", "mlx5_1", 1, True),
    ("=mlx5_0,mlx5_1", "mlx5_10", 1, False),
    ("=mlx5_0,mlx5_1", "mlx5_bond_0", 1, False),
    ("=mlx5_0:1", "mlx5_0", 1, True),
    ("=mlx5_0:1", "mlx5_0", 2, False),
    ("mlx5_0:2,mlx5_1", "mlx5_1", 2, True),
    ("^=mlx5_bond_0", "mlx5_bond_0", 1, False),
    ("^=mlx5_bond_0", "mlx5_bond_1", 1, True),
    ("^mlx5_bond", "mlx5_bond_1", 1, False),
    ("^mlx5_bond", "mlx5_3", 1, True),
    ("^=mlx5_0:1", "mlx5_0", 2, True),
])
def test_hca_filter_follows_nccls_syntax(text, name, port, expected):
    assert NameFilter.parse(text).matches(name, port) is expected


@pytest.mark.parametrize("text, why", [
    ("", "lists no name"), ("^=", "lists no name"), ("mlx5_0,,mlx5_1", "'' in"),
    ("mlx5_0:x", "not a name or name:port"),
    ("mlx5 0", "not a name"), ("=mlx5_0\nhostPID: true", "not a name"),
])
def test_hca_filter_refuses_what_nccl_would_misread(text, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        NameFilter.parse(text)


def test_including_prefix_lists_are_refused_exact_and_excluding_lists_pass():
    assert "prefix list" in network.check_hca_filter("mlx5") and "mlx5_bond_0" in network.check_hca_filter("mlx5")
    assert network.check_hca_filter("=mlx5_0,mlx5_1") is None
    assert network.check_hca_filter("^=mlx5_bond_0,mlx5_bond_1") is None
    assert network.check_hca_filter("^mlx5_bond") is None
    assert network.check_ifname_filter("eth0:1") is not None  # no ports on IP interfaces
    assert network.check_ifname_filter("^docker,lo") is None


# -- the spec section -----------------------------------------------------------------------------


def spec_with(network_section: dict):
    from test_spec import with_changes

    from janus_job.config.load import validate_spec

    return validate_spec(with_changes({"network": network_section}))


@pytest.mark.parametrize("section, field, fix", [
    ({"preset": "infiniband", "ib_hca": "mlx5"}, "network.ib_hca", "=mlx5_0,mlx5_1"),
    ({"preset": "infiniband", "ib_hca": "=mlx5_0;rm"}, "network.ib_hca", "NCCL_IB_HCA"),
    ({"preset": "infiniband", "env": {"NCCL_IB_HCA": "mlx5_0"}}, "network.env.NCCL_IB_HCA", "set network.ib_hca"),
    ({"preset": "roce", "env": {"NCCL_DEBUG": "TRACE"}}, "network.env.NCCL_DEBUG", "network.check"),
    ({"env": {"MASTER_ADDR": "10.0.0.1"}}, "network.env.MASTER_ADDR", "remove it"),
    ({"env": {"PET_NNODES": "4"}}, "network.env.PET_NNODES", "remove it"),
    ({"env": {"1BAD": "x"}}, "network.env", "letters, digits"),
    ({"env": {"NCCL_IB_TIMEOUT": "22\nhostPID: true"}}, "network.env.NCCL_IB_TIMEOUT", "remove control characters"),
    ({"preset": "tcp", "ib_gid_index": 3}, "network.ib_gid_index", "choose preset infiniband"),
    ({"preset": "tcp", "gdr_level": "PHB"}, "network.gdr_level", "choose preset"),
    ({"socket_ifname": "eth0:1"}, "network.socket_ifname", "interface names"),
])
def test_bad_network_sections_are_refused_with_the_field_and_fix(section, field, fix):
    with pytest.raises(JobError) as err:
        spec_with(section)
    assert field in str(err.value) and fix in str(err.value), str(err.value)


@pytest.mark.parametrize("section, field", [
    ({"preset": "ethernet"}, "network.preset"), ({"gdr_level": "NODE"}, "network.gdr_level"),
    ({"ib_sl": 16}, "network.ib_sl"), ({"check": "strict"}, "network.check"),
    ({"min_busbw_gbs": 0}, "network.min_busbw_gbs"),
    ({"env": {"NCCL_IB_TIMEOUT": 22}}, "network.env"),
])
def test_structure_of_the_network_section(section, field):
    with pytest.raises(JobError, match=re.escape(field)):
        spec_with(section)


def test_good_network_section_and_its_defaults():
    spec = spec_with({"preset": "roce", "ib_hca": "=mlx5_0,mlx5_1", "ib_tc": 106, "ib_sl": 3,
                      "socket_ifname": "=eth0", "env": {"NCCL_IB_TIMEOUT": "22"}})
    settings = NetworkSettings.of(spec.network)
    assert settings.preset == "roce" and settings.check == "error" and settings.ib_gid_index is None
    assert settings.expected_busbw_gbs == network.DEFAULT_MIN_BUSBW_GBS["roce"]
    assert NetworkSettings.of(spec_with({}).network).expected_busbw_gbs is None  # tcp: no figure


# -- the variables launch sets -------------------------------------------------------------------


def test_rdma_preset_leaves_gid_and_gdr_to_nccl_unless_set(tmp_path):
    env = nccl_env(NetworkSettings(preset="infiniband", ib_hca="=mlx5_0,mlx5_1"), str(tmp_path))
    assert env["NCCL_IB_DISABLE"] == "0" and env["NCCL_IB_HCA"] == "=mlx5_0,mlx5_1"
    assert not {"NCCL_IB_GID_INDEX", "NCCL_NET_GDR_LEVEL", "NCCL_IB_TC", "NCCL_IB_SL"} & set(env)
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_DEBUG_SUBSYS"] == "INIT,NET"
    assert env["NCCL_DEBUG_FILE"] == str(tmp_path / "nccl.%p.log")
    full = nccl_env(NetworkSettings(preset="roce", ib_gid_index=3, ib_tc=106, ib_sl=3, gdr_level="PHB",
                                    socket_ifname="=eth0,eth1", env={"NCCL_IB_TIMEOUT": "22"}), str(tmp_path))
    assert (full["NCCL_IB_GID_INDEX"], full["NCCL_IB_TC"], full["NCCL_IB_SL"], full["NCCL_NET_GDR_LEVEL"]) == \
        ("3", "106", "3", "PHB")
    assert full["NCCL_SOCKET_IFNAME"] == "=eth0,eth1" and full["GLOO_SOCKET_IFNAME"] == "eth0,eth1"
    assert full["NCCL_IB_TIMEOUT"] == "22"


def test_tcp_preset_and_check_off(tmp_path):
    env = nccl_env(NetworkSettings(preset="tcp", socket_ifname="^docker,lo", check="off"), str(tmp_path))
    assert env["NCCL_IB_DISABLE"] == "1" and env["NCCL_DEBUG"] == "WARN" and "NCCL_DEBUG_FILE" not in env
    assert env["NCCL_SOCKET_IFNAME"] == "^docker,lo" and "GLOO_SOCKET_IFNAME" not in env  # gloo has no exclusion
    assert not (set(env) - set(network.OWNED_ENV))  # everything set here is refused in network.env


def test_hostnetwork_rendezvous_uses_the_pod_ip():
    host = NetworkSettings(preset="hostnetwork")
    assert network_arguments(host, {network.POD_IP_ENV: "10.1.2.3"}) == ["--local-addr", "10.1.2.3"]
    assert network_arguments(NetworkSettings(preset="roce"), {network.POD_IP_ENV: "10.1.2.3"}) == []
    with pytest.raises(JobError, match="status.podIP"):
        network_arguments(host, {})
    with pytest.raises(JobError, match="not an IP address"):
        network_arguments(host, {network.POD_IP_ENV: "node-7"})


# -- the node before torchrun: sysfs and /dev trees in tmp dirs stand for the hardware ----------


@pytest.fixture
def verbs():
    try:
        network.load_verbs()
    except OSError as err:
        pytest.skip(f"libibverbs.so.1 is not installed here ({err}); tests/test_dockerfile.py installs the image's "
                    "RDMA packages where apt-get runs as root")


def node(tmp_path: Path, ports: dict[str, tuple[str, str]], uverbs: bool = True) -> dict:
    """A host with these HCA ports ({"mlx5_0:1": ("4: ACTIVE", "InfiniBand")}) as sysfs/dev roots."""
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    (sys_root / "class" / "infiniband").mkdir(parents=True)
    (dev_root / "infiniband").mkdir(parents=True)
    for name, (state, link) in ports.items():
        hca, port = name.split(":")
        folder = sys_root / "class" / "infiniband" / hca / "ports" / port
        folder.mkdir(parents=True)
        (folder / "state").write_text(state + "\n")
        (folder / "link_layer").write_text(link + "\n")
    if uverbs:
        (dev_root / "infiniband" / "uverbs0").touch()
    return {"sys_root": sys_root, "dev_root": dev_root, "log": lambda *a, **k: None}


ACTIVE_IB = ("4: ACTIVE", "InfiniBand")
RAILS = {"mlx5_0:1": ACTIVE_IB, "mlx5_1:1": ACTIVE_IB, "mlx5_bond_0:1": ("4: ACTIVE", "Ethernet")}


def test_preflight_accepts_active_hcas_matching_the_filter(tmp_path, verbs):
    lines = []
    host = node(tmp_path, RAILS) | {"log": lambda *a, **k: lines.append(a[0])}
    result = preflight(NetworkSettings(preset="infiniband", ib_hca="^=mlx5_bond_0"), **host)
    assert [str(p) for p in result.ports] == ["mlx5_0:1", "mlx5_1:1"] and result.problem is None
    assert lines == ["network preflight hcas=mlx5_0:1/IB,mlx5_1:1/IB ok"]
    unfiltered = preflight(NetworkSettings(preset="roce"), **host)
    assert [str(p) for p in unfiltered.ports] == ["mlx5_0:1", "mlx5_1:1", "mlx5_bond_0:1"]  # NCCL's default: all


@pytest.mark.parametrize("settings, ports, uverbs, cause", [
    (NetworkSettings(preset="infiniband"), RAILS, False, "no {dev}/infiniband/uverbs* device in the pod"),
    (NetworkSettings(preset="infiniband"), {}, True, "no HCA under {sys}/class/infiniband"),
    (NetworkSettings(preset="roce", ib_hca="=mlx5_4,mlx5_5"), RAILS, True,
     "no HCA port matches network.ib_hca '=mlx5_4,mlx5_5' (found mlx5_0:1, mlx5_1:1, mlx5_bond_0:1)"),
    (NetworkSettings(preset="hostnetwork", ib_hca="=mlx5_0:1"), {"mlx5_0:1": ("1: DOWN", "InfiniBand")}, True,
     "no matching HCA port is ACTIVE (mlx5_0:1 DOWN InfiniBand)"),
])
def test_preflight_names_why_nccl_would_use_sockets(tmp_path, verbs, settings, ports, uverbs, cause):
    host = node(tmp_path, ports, uverbs)
    with pytest.raises(JobError) as err:
        preflight(settings, **host)
    message = str(err.value)
    assert message.startswith(f"network.preset {settings.preset}: NCCL would fall back to sockets: ")
    assert cause.format(dev=host["dev_root"], sys=host["sys_root"]) in message, message


def test_preflight_without_the_verbs_library(tmp_path):
    with pytest.raises(JobError, match=r"libibverbs-missing\.so\.1 cannot be loaded .* rdma-core, libibverbs1"):
        preflight(NetworkSettings(preset="infiniband"), verbs_library="libibverbs-missing.so.1",
                  **node(tmp_path, RAILS))


def test_preflight_warns_instead_under_check_warn_and_skips_tcp_and_off(tmp_path, capsys):
    host = node(tmp_path, {}, uverbs=False)
    del host["log"]
    result = preflight(NetworkSettings(preset="roce", check="warn"), verbs_library="libibverbs-missing.so.1", **host)
    assert result.problem and "network warning: network.preset roce" in capsys.readouterr().err
    assert preflight(NetworkSettings(preset="roce", check="off"), **host).problem is None
    assert preflight(NetworkSettings(preset="tcp"), **host).problem is None


def test_verbs_device_list_of_this_machine(verbs):
    names = network.verbs_device_names(network.load_verbs())
    assert isinstance(names, list) and all(isinstance(n, str) and n for n in names)


# -- NCCL's own init output ----------------------------------------------------------------------
# Lines in the format of NCCL's INFO(...) calls (src/transport/net_ib/init.cc, net_socket.cc, net.cc,
# init.cc): what a GPU host prints; bench/netcheck.py records the real ones.

HEAD = "node-0:1234:1290 [0] NCCL INFO "
IB_LOG = "\n".join(HEAD + line for line in [
    "NCCL_IB_HCA set to =mlx5_0,mlx5_1",
    "NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB [RO]; OOB eth0:10.0.0.2<0>",
    "Using network IB",
    "Channel 00/0 : 8[0] -> 0[0] [receive] via NET/IB/0/GDRDMA",
    "Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read",
]) + "\nnode-0:1234:1290 [0] transport/net_ib.cc:123 NCCL WARN NET/IB : Got async event : port error\n"
SOCKET_LOG = "\n".join(HEAD + line for line in [
    "NET/IB : No device found.",
    "NET/Socket : Using [0]eth0:10.0.0.2<0> [1]eth1:10.0.1.2<0>",
    "Using network Socket",
    "Channel 00/0 : 8[0] -> 0[0] [receive] via NET/Socket/0",
])


def test_nccl_init_output_is_read_for_transport_hcas_and_warnings():
    ib = parse_nccl_log(IB_LOG)
    assert ib.networks == ["IB"] and ib.ib_devices == ["mlx5_0:1/IB", "mlx5_1:1/IB"]
    assert ib.links == ["NET/IB", "P2P"] and ib.warnings == ["NET/IB : Got async event : port error"]
    sockets = parse_nccl_log(SOCKET_LOG)
    assert sockets.no_ib_device and sockets.networks == ["Socket"] and sockets.socket_ifs == ["eth0", "eth1"]


def test_verdict_refuses_a_socket_fallback_under_an_rdma_preset_and_accepts_ib():
    ib = NetworkSettings(preset="infiniband")
    transport, expected, problem = network._verdict(ib, "nccl", parse_nccl_log(SOCKET_LOG), nodes=2, busbw=8.0)
    assert transport == "NET/Socket" and "NCCL uses NET/Socket" in problem and "No device found" in problem
    transport, expected, problem = network._verdict(ib, "nccl", parse_nccl_log(IB_LOG), nodes=2, busbw=180.0)
    assert (transport, expected, problem) == ("NET/IB", 40.0, None)
    slow = network._verdict(NetworkSettings(preset="roce", min_busbw_gbs=150), "nccl", parse_nccl_log(IB_LOG), 2, 90.0)
    assert "90.0 GB/s is below the expected 150 GB/s" in slow[2]
    # tcp expects sockets; one node has no network figure
    assert network._verdict(NetworkSettings(), "nccl", parse_nccl_log(SOCKET_LOG), 2, 8.0)[2] is None
    assert network._verdict(ib, "nccl", parse_nccl_log(IB_LOG), 1, 1.0)[1:] == (None, None)


# NCCL 2.28.9's own network lines, recorded by bench/netcheck.py on an H200 host (2 GPUs, no HCA): under
# the tcp preset (NCCL_IB_DISABLE=1) and under infiniband, where NCCL found no IB device and fell back.
RECORDED = {preset: ROOT / "bench" / "results" / f"2026-11-30-nvidia-h200-2-netcheck{suffix}.json"
            for preset, suffix in (("tcp", ""), ("infiniband", "-infiniband"))}


def recorded(preset: str) -> dict:
    import json

    record = json.loads(RECORDED[preset].read_text())
    assert record["backend"] == "nccl" and record["settings"]["preset"] == preset and record["nccl_init"]
    return record


def test_real_nccl_output_socket_fallback_is_refused_under_infiniband():
    record = recorded("infiniband")
    init = parse_nccl_log("\n".join(record["nccl_init"]))
    # "NET/IB : Using [RO]; OOB eth0..." names no device: no HCA is taken for one
    assert init.no_ib_device and init.networks == ["Socket"] and init.ib_devices == [] and init.socket_ifs == ["eth0"]
    assert init.links == ["P2P"]  # one node: the GPUs talk over NVLink, the network is what NCCL selected
    for nodes in (record["nodes"], 2):
        transport, _, problem = network._verdict(NetworkSettings(preset="infiniband"), "nccl", init, nodes,
                                                 record["result"]["busbw_gbs"])
        assert transport == "NET/Socket", transport
        assert problem == ("network.preset infiniband but NCCL uses NET/Socket: NCCL found no usable IB device "
                           "(NET/IB : No device found); the preflight line and docs/network.md list what the "
                           "node must provide"), problem
    # what the GPU run logged is what the verdict says on this output today
    assert record["result"]["transport"] == "NET/Socket" and record["result"]["problem"] == problem
    for preset in ("roce", "hostnetwork"):
        assert network._verdict(NetworkSettings(preset=preset), "nccl", init, 2, 8.0)[2].startswith(
            f"network.preset {preset} but NCCL uses NET/Socket")


def test_real_nccl_output_sockets_are_accepted_under_tcp():
    for preset in ("tcp", "infiniband"):  # the same sockets are what tcp asks for, whatever NCCL tried first
        record = recorded(preset)
        init = parse_nccl_log("\n".join(record["nccl_init"]))
        assert init.networks == ["Socket"] and init.socket_ifs == ["eth0"]
        for nodes in (1, 2):
            transport, expected, problem = network._verdict(NetworkSettings(preset="tcp"), "nccl", init, nodes,
                                                            record["result"]["busbw_gbs"])
            assert (transport, expected, problem) == ("NET/Socket", None, None)
    assert recorded("tcp")["result"]["problem"] is None


def test_debug_file_is_expanded_like_nccl_does():
    assert network.expand_debug_file("/tmp/x/nccl.%p.log", pid=42) == "/tmp/x/nccl.42.log"
    assert network.expand_debug_file("/tmp/%%%h", pid=1).startswith("/tmp/%")


def test_bus_bandwidth_is_nccl_tests():
    assert network.bus_bandwidth(1_000_000_000, 1.0, 16) == pytest.approx(2 * 15 / 16)
    assert network.bus_bandwidth(1_000_000_000, 0.5, 2) == pytest.approx(2.0)


# -- the all-reduce with real torchrun/gloo ranks ----------------------------------------------------


def netcheck(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    import json

    command = [sys.executable, str(ROOT / "bench" / "netcheck.py"), "--cpu", "--out", str(tmp_path), *args]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    files = list(tmp_path.glob("*-cpu-*-netcheck.json"))
    return proc, json.loads(files[0].read_text()) if files else None


def test_gloo_all_reduce_reports_transport_and_bus_bandwidth(tmp_path):
    proc, record = netcheck(tmp_path, "--nodes", "1", "--ranks-per-node", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("network ")]
    assert len(lines) == 1, proc.stdout  # one line per job
    assert re.fullmatch(r"network transport=gloo nodes=1 ranks=2 busbw=[0-9.]+GB/s expected>=n/a ok", lines[0])
    result = record["result"]
    assert result["line"] == lines[0] and [s["bytes"] for s in result["sizes"]] == [64 << 10, 1 << 20]
    for size in result["sizes"]:
        assert size["busbw_gbs"] == pytest.approx(size["bytes"] / size["seconds"] / 1e9 * 2 * (2 - 1) / 2)


@pytest.mark.slow
def test_two_nodes_below_the_expected_bandwidth(tmp_path):
    """Two torchrun agents (two 'nodes') on this host; no loopback reaches 10 TB/s."""
    proc, record = netcheck(tmp_path / "error", "--nodes", "2", "--min-busbw", "10000", "--check", "error")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert record["refused"] and "nodes=2 ranks=2" in record["result"]["line"]
    assert "ERROR: all-reduce bus bandwidth" in proc.stdout
    # every rank refuses (no rank is left waiting in a collective)
    assert proc.stderr.count("error: all-reduce bus bandwidth") == 2, proc.stderr
    proc, record = netcheck(tmp_path / "warn", "--nodes", "2", "--min-busbw", "10000", "--check", "warn")
    assert proc.returncode == 0 and "expected>=10000GB/s WARN: all-reduce bus bandwidth" in proc.stdout


def test_nccl_warnings_in_the_debug_file_reach_stderr(tmp_path, capsys):
    log = tmp_path / "nccl.7.log"
    log.write_text(IB_LOG)
    forwarder = network._WarningForwarder(str(log))
    forwarder.pump()
    with log.open("a") as f:
        f.write("node-0:1:2 [0] misc.cc:1 NCCL WARN Cuda failure 'out of memory'\nnode-0:1:2 [0] NCCL INFO half")
    forwarder.pump()
    forwarder.pump()
    err = capsys.readouterr().err.splitlines()
    assert err == ["node-0:1234:1290 [0] transport/net_ib.cc:123 NCCL WARN NET/IB : Got async event : port error",
                   "node-0:1:2 [0] misc.cc:1 NCCL WARN Cuda failure 'out of memory'"]  # each once, INFO never


def test_one_rank_group_and_check_off(tmp_path):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        lines = []
        result = network.check_process_group(NetworkSettings(preset="infiniband"), torch.device("cpu"),
                                             log=lambda line, **_: lines.append(line))
        assert result.busbw_gbs is None and result.problem is None  # one rank moves nothing between ranks
        assert lines == ["network transport=gloo nodes=1 ranks=1 busbw=n/a expected>=n/a ok"]
        assert network.check_process_group(NetworkSettings(check="off"), torch.device("cpu")) is None
    finally:
        dist.destroy_process_group()


# -- janus-job launch on a node without RDMA ----------------------------------------------------------


def test_launch_under_an_rdma_preset_refuses_before_torchrun_on_a_node_without_rdma(tmp_path):
    """The Worker container of the rendered r2r-2node-ib example (InfiniBand preset, check: error), started
    here with its command, the spec of its ConfigMap, the chart's env and the operator's elastic PET_*
    variables: this machine has no /dev/infiniband, so NCCL would use sockets and launch must stop there."""
    import os

    import yaml

    if list(Path("/dev/infiniband").glob("uverbs*")):
        pytest.skip("this machine has RDMA devices: the preflight may pass and torchrun would start")
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests/examples/r2r-2node-ib/manifests.yaml").read_text()) if d]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "r2r-2node-ib-spec"]
    (job,) = [d for d in docs if d["kind"] == "PyTorchJob"]
    (container,) = [c for c in job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
                    if c["name"] == "pytorch"]
    spec = tmp_path / "etc-janus" / "job.yaml"
    spec.parent.mkdir()
    spec.write_text(configmap["data"]["job.yaml"])
    assert yaml.safe_load(spec.read_text())["network"]["preset"] == "infiniband"
    assert container["command"] == ["janus-job", "launch", "--spec", "/etc/janus/job.yaml"]
    command = [sys.executable, "-m", "janus_job.cli", *container["command"][1:-1], str(spec)]

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "JANUS_", "NCCL_")) and k not in ("LOCAL_RANK", "CUDA_VISIBLE_DEVICES")}
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})  # the chart's literal values
    debug_dir = tmp_path / "nccl"
    env[network.DEBUG_DIR_ENV] = str(debug_dir)
    env.update(JANUS_SPEC=str(spec), HOME=str(tmp_path), TMPDIR=str(tmp_path),
               PET_NNODES="2:4", PET_NPROC_PER_NODE="8", PET_RDZV_BACKEND="c10d",
               PET_RDZV_ENDPOINT="r2r-2node-ib-worker-0:29400", PET_RDZV_ID="r2r-2node-ib", PET_MAX_RESTARTS="3",
               NODE_NAME="gpu-node-7", POD_NAME="r2r-2node-ib-worker-1", POD_NAMESPACE="janus")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.splitlines() == ["network preflight hcas=none FAILED"], proc.stdout
    (line,) = proc.stderr.splitlines()
    try:
        network.load_verbs()
        cause = "no /dev/infiniband/uverbs* device in the pod: request the RDMA device plugin's resource"
    except OSError:
        cause = "the verbs library libibverbs.so.1 cannot be loaded"
    assert line.startswith(f"error: network.preset infiniband: NCCL would fall back to sockets: {cause}"), line
    assert line.endswith("(network.check: warn lets the job start anyway)"), line
    # nothing after the preflight ran: no network variables printed, no torchrun command, no NCCL debug dir
    assert "janus-job launch:" not in proc.stdout and "torch.distributed.run" not in proc.stdout + proc.stderr
    assert not debug_dir.exists()


# -- the SR-IOV example: one VF resource and one Multus network per rail ----------------------------------


def test_sriov_example_trainer_pods_request_one_vf_per_rail_and_attach_each_rails_network(tmp_path):
    """manifests/examples/h800-roce-sriov (the chart's render of examples/h800-roce-sriov.yaml, kept current by
    tests/test_manifests_sync.py): every training pod asks the SR-IOV device plugin for the VF of each of the
    8 rails and Multus for the same 8 networks, next to its 8 GPUs, and NCCL is told the 8 HCAs exactly."""
    import yaml

    rails = [f"roce-rail-{i}" for i in range(8)]
    vfs = {f"nvidia.com/roce_rail_{i}": 1 for i in range(8)}
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests/examples/h800-roce-sriov/manifests.yaml").read_text())
            if d]
    (job,) = [d for d in docs if d["kind"] == "PyTorchJob"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Worker"} and replicas["Worker"]["replicas"] == 4  # elastic: Workers only, 4 nodes
    for role, replica in replicas.items():
        pod = replica["template"]
        assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"].split(",") == rails, role
        assert pod["spec"]["runtimeClassName"] == "nvidia" and not pod["spec"].get("hostNetwork")
        (trainer,) = [c for c in pod["spec"]["containers"] if c["name"] == "pytorch"]
        for kind in ("requests", "limits"):
            resources = trainer["resources"][kind]
            assert {k: v for k, v in resources.items() if k.startswith("nvidia.com/roce_rail_")} == vfs, (role, kind)
            assert resources["nvidia.com/gpu"] == 8
        # no other container of the pod holds a VF
        for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            if container is not trainer:
                assert not set(container.get("resources", {}).get("requests", {})) & set(vfs), container["name"]
    # VFs are the trainers' alone: the precompute, start and validate pods take none, nor ask Multus to
    # attach a rail (the SR-IOV CNI would find no VF allocated to the pod)
    for doc in docs:
        if doc["kind"] == "Job":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert not set(container["resources"].get("requests", {})) & set(vfs), doc["metadata"]["name"]
            annotations = doc["spec"]["template"]["metadata"].get("annotations") or {}
            assert "k8s.v1.cni.cncf.io/networks" not in annotations, doc["metadata"]["name"]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "h800-roce-spec"]
    from janus_job.config.load import load_spec

    (tmp_path / "job.yaml").write_text(configmap["data"]["job.yaml"])  # the spec the pods mount
    settings = NetworkSettings.of(load_spec(tmp_path / "job.yaml").network)
    env = nccl_env(settings, "/tmp/janus-nccl")
    assert settings.preset == "roce" and env["NCCL_IB_DISABLE"] == "0"
    hcas = NameFilter.parse(env["NCCL_IB_HCA"])
    assert hcas.exact and not hcas.exclude and hcas.names == [f"mlx5_{i}" for i in range(8)]  # one HCA per rail
