"""NCCL's network settings as rules: the presets, the variables janus-train owns, and NCCL's interface/HCA
list syntax. Pure functions on strings, so the spec's rules (janus_job.config.rules) and the runtime
(janus_job.deploy.network) apply the same checks; imports nothing but the standard library."""

from __future__ import annotations

import re
from dataclasses import dataclass

PRESETS = ("tcp", "infiniband", "roce", "hostnetwork")
RDMA_PRESETS = ("infiniband", "roce", "hostnetwork")
CHECK_MODES = ("error", "warn", "off")
GDR_LEVELS = ("LOC", "PIX", "PXB", "PHB", "SYS")
# Expected all-reduce bus bandwidth of a multi-node job when network.min_busbw_gbs is unset. It is
# set to separate RDMA from a socket fallback (NCCL over TCP stays near 10 GB/s even on 200GbE
# NICs), not to grade a fabric: 8 x 400 Gb/s nodes reach several hundred GB/s, so set the figure of
# your fabric in network.min_busbw_gbs to catch a slow rail.
DEFAULT_MIN_BUSBW_GBS = {"infiniband": 40.0, "roce": 40.0, "hostnetwork": 40.0}
VERBS_LIBRARY = "libibverbs.so.1"
DEBUG_DIR_ENV = "JANUS_NCCL_DEBUG_DIR"
POD_IP_ENV = "JANUS_POD_IP"

# Variables janus-train sets itself: network.env may not override them (the value is the fix).
OWNED_ENV = {
    "NCCL_IB_DISABLE": "network.preset",
    "NCCL_IB_HCA": "network.ib_hca",
    "NCCL_IB_GID_INDEX": "network.ib_gid_index",
    "NCCL_IB_TC": "network.ib_tc",
    "NCCL_IB_SL": "network.ib_sl",
    "NCCL_NET_GDR_LEVEL": "network.gdr_level",
    "NCCL_SOCKET_IFNAME": "network.socket_ifname",
    "GLOO_SOCKET_IFNAME": "network.socket_ifname",
    "NCCL_DEBUG": "network.check (the transport check reads NCCL's INFO output; check: off leaves WARN)",
    "NCCL_DEBUG_SUBSYS": "network.check",
    "NCCL_DEBUG_FILE": "network.check",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "nothing: janus-train needs failed collectives to abort the job",
}
# Set by torchrun or the training operator for each process: never from the spec.
RUNTIME_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
               "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
RUNTIME_ENV_PREFIXES = ("PET_", "TORCHELASTIC_", "JANUS_")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IF_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"


# -- NCCL's interface/HCA list syntax -----------------------------------------------------------


@dataclass(frozen=True)
class NameFilter:
    """NCCL_IB_HCA / NCCL_SOCKET_IFNAME: a comma list of name prefixes (`mlx5`), exact names after a
    leading `=` (`=mlx5_0,mlx5_1`), all of it negated by a leading `^` (`^=mlx5_bond_0`); IB entries
    may name a port (`mlx5_0:1`). A port-less entry matches every port."""

    exclude: bool
    exact: bool
    entries: tuple[tuple[str, int | None], ...]

    @classmethod
    def parse(cls, text: str, *, ports: bool = True) -> NameFilter:
        """Raises ValueError naming what is wrong (the caller adds the field)."""
        rest = text  # NCCL does not strip blanks: ' mlx5_1' would match nothing
        exclude = rest.startswith("^")
        rest = rest[1:] if exclude else rest
        exact = rest.startswith("=")
        rest = rest[1:] if exact else rest
        if not rest:
            raise ValueError(f"'{text}' lists no name")
        entries = []
        entry_re = rf"({_IF_NAME})(?::([0-9]+))?" if ports else rf"({_IF_NAME})"
        for item in rest.split(","):
            m = re.fullmatch(entry_re, item)
            if not m:
                form = "a name or name:port (mlx5_0, mlx5_0:1)" if ports else "an interface name (eth0)"
                raise ValueError(f"'{item}' in '{text}' is not {form}")
            entries.append((m.group(1), int(m.group(2)) if ports and m.group(2) else None))
        return cls(exclude, exact, tuple(entries))

    def matches(self, name: str, port: int | None = None) -> bool:
        hit = any((name == prefix if self.exact else name.startswith(prefix))
                  and (want is None or port is None or want == port)
                  for prefix, want in self.entries)
        return hit != self.exclude

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.entries]


def check_hca_filter(text: str) -> str | None:
    """Why `text` is not a safe network.ib_hca, or None. NCCL's syntax, with one refusal: an
    including prefix list (`mlx5`) also takes every HCA that merely starts with it, such as the
    storage NICs mlx5_bond_*, so inclusion must be exact (`=`)."""
    try:
        parsed = NameFilter.parse(text)
    except ValueError as err:
        return str(err)
    if not parsed.exclude and not parsed.exact:
        return (f"'{text}' is a prefix list: NCCL would also take every HCA whose name starts with it "
                "(e.g. mlx5_bond_0); list the HCAs exactly ('=mlx5_0,mlx5_1') or exclude some ('^=mlx5_bond_0')")
    return None


def check_ifname_filter(text: str) -> str | None:
    try:
        NameFilter.parse(text, ports=False)
    except ValueError as err:
        return str(err)
    return None


def check_env(env: dict[str, str]) -> list[tuple[str, str, str]]:
    """Problems of network.env as (name, what, fix)."""
    problems = []
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):
            problems.append((name, f"'{name}' is not an environment variable name",
                             "use letters, digits and '_', not starting with a digit (e.g. NCCL_IB_TIMEOUT)"))
        elif name in OWNED_ENV:
            problems.append((name, f"{name} is set by janus-train", f"set {OWNED_ENV[name]} instead"))
        elif name in RUNTIME_ENV or name.startswith(RUNTIME_ENV_PREFIXES):
            problems.append((name, f"{name} is set by torchrun, the training operator or janus-train per process",
                             "remove it from network.env"))
        elif any(ord(c) < 32 for c in value):
            problems.append((name, "the value contains a control character (newline, NUL, ...)",
                             "write the value on one line"))
    return problems


# -- 1. the environment -----------------------------------------------------------------------
