"""The network a job asks for, and proof of what NCCL uses.

Three parts, one per moment of a job:

1. `nccl_env(settings)`: the NCCL/gloo variables of the spec's `network` section (preset, exact HCA
   lists, GID/TC/SL, socket interfaces, the free `network.env`). `janus-job launch` sets them before
   torchrun, so the rules live here once and the launch line shows them.
2. `preflight(settings)`: per node, before torchrun. Under an RDMA preset (infiniband, roce,
   hostnetwork) NCCL silently falls back to sockets when the verbs library, the RDMA device files or
   an ACTIVE port of a matching HCA is missing; this names which one. The sysfs and /dev roots are
   parameters, so tests describe hardware with directory trees.
3. `check_process_group(settings, device)`: at process-group start, every rank runs a short
   all-reduce (a few sizes; bus bandwidth the nccl-tests way, busbw = algbw * 2(n-1)/n) and reads its
   own NCCL init output (NCCL_DEBUG=INFO, NCCL_DEBUG_SUBSYS=INIT,NET, written to NCCL_DEBUG_FILE);
   rank 0 logs one line per job, e.g.
   `network transport=NET/IB hcas=mlx5_0,mlx5_1 nodes=2 ranks=16 busbw=180.3GB/s expected>=150GB/s ok`.
   Under gloo (CPU) the same all-reduce runs and the transport is `gloo`.

`network.check` (error | warn | off) decides what a socket fallback under an RDMA preset, a missing
RDMA prerequisite or a bus bandwidth below the expected figure does.

Only the standard library is imported at module level (torch inside the functions that need it):
bench/netcheck.py runs this module on a GPU machine that has torch and nothing else of the lock.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from janus_job.config.nccl import (  # noqa: F401  (the rules live in config; re-exported for callers)
    CHECK_MODES,
    DEBUG_DIR_ENV,
    DEFAULT_MIN_BUSBW_GBS,
    ENV_NAME,
    GDR_LEVELS,
    OWNED_ENV,
    POD_IP_ENV,
    PRESETS,
    RDMA_PRESETS,
    RUNTIME_ENV,
    RUNTIME_ENV_PREFIXES,
    VERBS_LIBRARY,
    NameFilter,
    check_env,
    check_hca_filter,
    check_ifname_filter,
)
from janus_job.errors import JobError

# -- the spec's network section, as plain values ------------------------------------------------


@dataclass(frozen=True)
class NetworkSettings:
    """The spec's `network` section (janus_job.config.spec.NetworkSpec has the same fields and their docs)."""

    preset: str = "tcp"
    ib_hca: str | None = None
    socket_ifname: str | None = None
    ib_gid_index: int | None = None
    ib_tc: int | None = None
    ib_sl: int | None = None
    gdr_level: str | None = None
    check: str = "error"
    min_busbw_gbs: float | None = None
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, section: Any) -> NetworkSettings:
        """From the spec's validated `network` section (any object with these attributes)."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})

    @property
    def rdma(self) -> bool:
        return self.preset in RDMA_PRESETS

    @property
    def expected_busbw_gbs(self) -> float | None:
        """The multi-node bus bandwidth below which the check reports a problem (None: no figure)."""
        if self.min_busbw_gbs is not None:
            return self.min_busbw_gbs
        return DEFAULT_MIN_BUSBW_GBS.get(self.preset)


def debug_file_pattern(directory: str) -> str:
    """NCCL_DEBUG_FILE: one file per process (NCCL replaces %p by the pid)."""
    return os.path.join(directory, "nccl.%p.log")


def nccl_env(settings: NetworkSettings, debug_dir: str | None = None) -> dict[str, str]:
    """Every variable the network section sets, in the order they are applied (network.env last)."""
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    if settings.rdma:
        env["NCCL_IB_DISABLE"] = "0"
        optional = {"NCCL_IB_HCA": settings.ib_hca, "NCCL_IB_GID_INDEX": settings.ib_gid_index,
                    "NCCL_IB_TC": settings.ib_tc, "NCCL_IB_SL": settings.ib_sl,
                    "NCCL_NET_GDR_LEVEL": settings.gdr_level}
        env.update({name: str(value) for name, value in optional.items() if value is not None})
    else:
        env["NCCL_IB_DISABLE"] = "1"
    if settings.socket_ifname:
        env["NCCL_SOCKET_IFNAME"] = settings.socket_ifname
        interfaces = NameFilter.parse(settings.socket_ifname, ports=False)
        if not interfaces.exclude:  # gloo takes a plain list of interface names
            env["GLOO_SOCKET_IFNAME"] = ",".join(interfaces.names)
    if settings.check == "off":
        env["NCCL_DEBUG"] = "WARN"
    else:
        env.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET",
                   NCCL_DEBUG_FILE=debug_file_pattern(debug_dir or default_debug_dir()))
    env.update(settings.env)
    return env


def default_debug_dir() -> str:
    return os.path.join(os.environ.get("TMPDIR") or "/tmp", "janus-nccl")


# -- 2. the node, before torchrun ---------------------------------------------------------------


@dataclass(frozen=True)
class HcaPort:
    hca: str
    port: int
    state: str  # ACTIVE, DOWN, INIT, ARMED, ...
    link_layer: str  # InfiniBand or Ethernet (RoCE)

    def __str__(self) -> str:
        return f"{self.hca}:{self.port}"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def scan_hcas(sys_root: str | Path = "/sys") -> list[HcaPort]:
    """Every port of every HCA the kernel lists under <sys_root>/class/infiniband."""
    ports = []
    base = Path(sys_root) / "class" / "infiniband"
    for hca in sorted(base.iterdir()) if base.is_dir() else []:
        for port_dir in sorted((hca / "ports").iterdir()) if (hca / "ports").is_dir() else []:
            if not port_dir.name.isdigit():
                continue
            state = _read(port_dir / "state")  # e.g. "4: ACTIVE"
            ports.append(HcaPort(hca.name, int(port_dir.name), state.split(":")[-1].strip() or "UNKNOWN",
                                 _read(port_dir / "link_layer") or "unknown"))
    return ports


def load_verbs(library: str = VERBS_LIBRARY) -> ctypes.CDLL:
    """The verbs library NCCL's IB transport dlopens (OSError when it is missing)."""
    return ctypes.CDLL(library)


def verbs_device_names(lib: ctypes.CDLL) -> list[str]:
    """What ibv_get_device_list returns: the HCAs for which a provider library (libmlx5, ...) loaded."""
    lib.ibv_get_device_list.restype = ctypes.POINTER(ctypes.c_void_p)
    lib.ibv_get_device_list.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.ibv_get_device_name.restype = ctypes.c_char_p
    lib.ibv_get_device_name.argtypes = [ctypes.c_void_p]
    lib.ibv_free_device_list.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    count = ctypes.c_int(0)
    devices = lib.ibv_get_device_list(ctypes.byref(count))
    if not devices:
        return []
    try:
        return [lib.ibv_get_device_name(devices[i]).decode() for i in range(count.value)]
    finally:
        lib.ibv_free_device_list(devices)


@dataclass
class Preflight:
    ports: list[HcaPort]  # the matching ACTIVE ports NCCL will use
    problem: str | None

    @property
    def line(self) -> str:
        used = ",".join(f"{p}/{'IB' if p.link_layer == 'InfiniBand' else 'RoCE'}" for p in self.ports)
        return f"network preflight hcas={used or 'none'} " + ("ok" if self.problem is None else "FAILED")


def _preflight_problem(settings: NetworkSettings, sys_root: Path, dev_root: Path,
                       verbs_library: str) -> tuple[list[HcaPort], str | None]:
    try:
        lib = load_verbs(verbs_library)
    except OSError as err:
        return [], (f"the verbs library {verbs_library} cannot be loaded ({err}); the image must install "
                    "rdma-core, libibverbs1 and ibverbs-providers (the janus-train image does)")
    uverbs = sorted((dev_root / "infiniband").glob("uverbs*"))
    if not uverbs:
        return [], (f"no {dev_root / 'infiniband'}/uverbs* device in the pod: request the RDMA device plugin's "
                    "resource (cluster.rdma_resources) or attach the SR-IOV/Multus RDMA network, see docs/network.md")
    ports = scan_hcas(sys_root)
    if not ports:
        return [], (f"no HCA under {sys_root / 'class' / 'infiniband'}: the node's RDMA driver is not loaded "
                    "or the pod sees no HCA")
    hca_filter = NameFilter.parse(settings.ib_hca) if settings.ib_hca else None
    found = ", ".join(map(str, ports))
    matching = [p for p in ports if hca_filter is None or hca_filter.matches(p.hca, p.port)]
    if not matching:
        return [], (f"no HCA port matches network.ib_hca '{settings.ib_hca}' (found {found}); "
                    "fix network.ib_hca to name these HCAs")
    usable = [p for p in matching if p.state == "ACTIVE" and p.link_layer in ("InfiniBand", "Ethernet")]
    if not usable:
        states = ", ".join(f"{p} {p.state} {p.link_layer}" for p in matching)
        return [], (f"no matching HCA port is ACTIVE ({states}): check the links and the subnet manager "
                    "(ibstat on the node)")
    if Path(sys_root) == Path("/sys"):  # the real host: the library must see the same HCAs
        listed = set(verbs_device_names(lib))
        if not {p.hca for p in usable} & listed:
            return usable, (f"{verbs_library} lists no device for {', '.join(sorted({p.hca for p in usable}))} "
                            "(the provider library of this HCA, from ibverbs-providers, did not load)")
    return usable, None


def preflight(settings: NetworkSettings, *, sys_root: str | Path = "/sys", dev_root: str | Path = "/dev",
              verbs_library: str = VERBS_LIBRARY, log=print) -> Preflight:
    """Checks what NCCL's IB transport needs on this node; under `check: error` raises JobError
    naming the first missing piece, under `warn` logs it. Nothing to check for `tcp` or `check: off`."""
    if not settings.rdma or settings.check == "off":
        return Preflight([], None)
    ports, problem = _preflight_problem(settings, Path(sys_root), Path(dev_root), verbs_library)
    result = Preflight(ports, None if problem is None else
                       f"network.preset {settings.preset}: NCCL would fall back to sockets: {problem}")
    log(result.line, flush=True)
    if result.problem and settings.check == "error":
        raise JobError(result.problem + " (network.check: warn lets the job start anyway)")
    if result.problem:
        log(f"network warning: {result.problem}", file=sys.stderr, flush=True)
    return result


# -- 3. at process-group start -------------------------------------------------------------------

_USING_NETWORK = re.compile(r"NCCL INFO Using network (.+?)\s*$")
_IB_USING = re.compile(r"NCCL INFO NET/IB : Using(.*?); OOB")
_IB_DEVICE = re.compile(r"\[\d+\]([^\s:\[\]]+):(\d+)[:\d]*/(\w+)")
_SOCKET_USING = re.compile(r"NCCL INFO NET/Socket : Using(.*)$")
_SOCKET_IF = re.compile(r"\[\d+\]([^\s:\[\]]+):")
_VIA = re.compile(r"\] via ((?:NET/[^/\s]+)|[A-Za-z0-9]+)")


@dataclass
class NcclInit:
    """What one process's NCCL said at init."""

    networks: list[str] = field(default_factory=list)  # "Using network IB"
    ib_devices: list[str] = field(default_factory=list)  # mlx5_0:1/IB
    socket_ifs: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # transports of channel connections: NET/IB, P2P, SHM
    no_ib_device: bool = False
    warnings: list[str] = field(default_factory=list)

    def merge(self, other: NcclInit) -> None:
        for name in ("networks", "ib_devices", "socket_ifs", "links", "warnings"):
            mine = getattr(self, name)
            mine.extend(x for x in getattr(other, name) if x not in mine)
        self.no_ib_device = self.no_ib_device or other.no_ib_device


def parse_nccl_log(text: str) -> NcclInit:
    """Reads NCCL's INFO output (subsystems INIT and NET)."""
    out = NcclInit()
    for line in text.splitlines():
        if " NCCL WARN " in line:
            out.warnings.append(line.split(" NCCL WARN ", 1)[1].strip())
        elif m := _USING_NETWORK.search(line):
            out.networks.append(m.group(1))
        elif m := _IB_USING.search(line):
            out.ib_devices.extend(f"{d}:{p}/{ll}" for d, p, ll in _IB_DEVICE.findall(m.group(1)))
        elif m := _SOCKET_USING.search(line):
            out.socket_ifs.extend(_SOCKET_IF.findall(m.group(1)))
        elif "NET/IB : No device found." in line:
            out.no_ib_device = True
        elif "Channel " in line and (m := _VIA.search(line)):
            out.links.append(m.group(1))
    empty = NcclInit()
    empty.merge(out)  # deduplicated, first-seen order
    return empty


def expand_debug_file(pattern: str, pid: int | None = None) -> str:
    """NCCL_DEBUG_FILE as NCCL expands it for this process (%h host, %p pid, %% percent)."""
    host = socket.gethostname().split(".")[0]
    return re.sub(r"%(.)", lambda m: {"h": host, "p": str(pid or os.getpid()), "%": "%"}.get(m.group(1), m.group(0)),
                  pattern)


class _WarningForwarder(threading.Thread):
    """NCCL writes everything, its warnings too, to the debug file: copy `NCCL WARN` lines to stderr
    so `kubectl logs` keeps showing them for the whole job."""

    def __init__(self, path: str, interval_s: float = 2.0) -> None:
        super().__init__(name="nccl-warnings", daemon=True)
        self.path, self.interval_s, self.offset = path, interval_s, 0

    def run(self) -> None:
        while True:
            self.pump()
            time.sleep(self.interval_s)

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            if " NCCL WARN " in line:
                print(line, file=sys.stderr, flush=True)


def bus_bandwidth(nbytes: int, seconds: float, ranks: int) -> float:
    """All-reduce bus bandwidth in GB/s as nccl-tests reports it: algbw * 2(n-1)/n."""
    return nbytes / seconds / 1e9 * 2 * (ranks - 1) / ranks


@dataclass
class CheckResult:
    transport: str
    hcas: list[str]
    nodes: int
    ranks: int
    busbw_gbs: float | None  # at the largest size; None for one rank
    expected_gbs: float | None  # None: no figure applies (tcp, one node, gloo)
    sizes: list[dict]  # per size: bytes, seconds per all-reduce, algbw_gbs, busbw_gbs
    links: list[str]
    problem: str | None
    line: str

    def to_json(self) -> dict:
        return asdict(self)


class NetworkCheckFailed(JobError):
    """The check refused the network (`check: error`); `result` has the measurement."""

    def __init__(self, message: str, result: CheckResult) -> None:
        super().__init__(message)
        self.result = result


def _sizes_for(backend: str) -> tuple[list[int], int, int]:
    """(message sizes in bytes, warm-up iterations, timed iterations) for the check."""
    if backend == "nccl":
        return [8 << 20, 64 << 20, 256 << 20], 3, 10
    return [64 << 10, 1 << 20], 1, 3


def _measure(device: Any, sizes: list[int], warmup: int, iters: int) -> list[dict]:
    import torch
    import torch.distributed as dist

    ranks = dist.get_world_size()
    results = []
    for nbytes in sizes:
        data = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        for _ in range(warmup):
            dist.all_reduce(data)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(data)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time, like nccl-tests
        seconds = float(elapsed.item()) / iters
        results.append({"bytes": nbytes, "seconds": seconds, "algbw_gbs": nbytes / seconds / 1e9,
                        "busbw_gbs": bus_bandwidth(nbytes, seconds, ranks) if ranks > 1 else None})
        del data
    return results


def _verdict(settings: NetworkSettings, backend: str, init: NcclInit, nodes: int,
             busbw: float | None) -> tuple[str, float | None, str | None]:
    """(transport, expected figure, problem) from the ranks' merged NCCL output and the measurement."""
    net_links = [link for link in init.links if link.startswith("NET/")]
    if backend != "nccl":
        transport = backend
    elif net_links:
        transport = ",".join(net_links)
    elif init.networks:
        transport = ",".join(f"NET/{n}" for n in init.networks)
    else:
        transport = "unknown"
    # one node's traffic stays on NVLink/PCIe; the preset's figure is NCCL's, an explicit one applies to gloo too
    expected = None
    if nodes > 1:
        expected = settings.expected_busbw_gbs if backend == "nccl" else settings.min_busbw_gbs
    problem = None
    if backend == "nccl" and settings.rdma and not all(t.startswith("NET/IB") for t in transport.split(",")):
        cause = ("NCCL found no usable IB device (NET/IB : No device found)" if init.no_ib_device
                 else "NCCL's init output names no IB transport" if transport == "unknown"
                 else "NCCL chose it over IB")
        problem = (f"network.preset {settings.preset} but NCCL uses {transport}: {cause}; "
                   "the preflight line and docs/network.md list what the node must provide")
    elif expected is not None and busbw is not None and busbw < expected:
        problem = (f"all-reduce bus bandwidth {busbw:.1f} GB/s is below the expected {expected:g} GB/s; "
                   "check the HCAs in use (hcas=) and the fabric, or set network.min_busbw_gbs to your fabric's figure")
    return transport, expected, problem


def check_process_group(settings: NetworkSettings, device: Any, *, log=print,
                        debug_file: str | None = None) -> CheckResult | None:
    """Runs on every rank of the initialised default process group (all must call it). Rank 0 logs the
    line; a problem raises JobError on every rank under `check: error`, is logged under `warn`."""
    import torch.distributed as dist

    if settings.check == "off":
        return None
    backend = dist.get_backend()
    pattern = debug_file or os.environ.get("NCCL_DEBUG_FILE")
    path = expand_debug_file(pattern) if backend == "nccl" and pattern else None
    if path:
        _WarningForwarder(path).start()
    sizes, warmup, iters = _sizes_for(backend)
    measured = _measure(device, sizes, warmup, iters)
    own = parse_nccl_log(_read(Path(path))) if path else NcclInit()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, asdict(own))
    ranks = dist.get_world_size()
    nodes = max(1, ranks // int(os.environ.get("LOCAL_WORLD_SIZE", ranks)))
    result = None
    if dist.get_rank() == 0:
        init = NcclInit()
        for item in gathered:
            init.merge(NcclInit(**item))
        busbw = measured[-1]["busbw_gbs"]
        transport, expected, problem = _verdict(settings, backend, init, nodes, busbw)
        hcas = sorted({d.split(":")[0] for d in init.ib_devices}) if transport.startswith("NET/IB") else []
        parts = [f"network transport={transport}"]
        if hcas:
            parts.append("hcas=" + ",".join(hcas))
        elif transport.startswith("NET/Socket") and init.socket_ifs:
            parts.append("ifs=" + ",".join(init.socket_ifs))
        parts += [f"nodes={nodes}", f"ranks={ranks}",
                  "busbw=" + (f"{busbw:.1f}GB/s" if busbw is not None else "n/a"),
                  "expected>=" + (f"{expected:g}GB/s" if expected is not None else "n/a")]
        parts.append("ok" if problem is None else f"{settings.check.upper()}: {problem}")
        result = CheckResult(transport, hcas, nodes, ranks, busbw, expected, measured, init.links, problem,
                             " ".join(parts))
        log(result.line, flush=True)
    box = [result]
    dist.broadcast_object_list(box, src=0)
    result = box[0]
    if result.problem and settings.check == "error":
        raise NetworkCheckFailed(result.problem + " (network.check: warn lets the job run anyway)", result)
    return result
