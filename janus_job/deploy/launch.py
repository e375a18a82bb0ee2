"""The PyTorchJob container's entrypoint: the operator's variables -> one `torchrun` per pod.

The Kubeflow training operator (v1, PyTorchJob) describes the pod's place in the job with
environment variables; the trainer needs one process per GPU with global ranks, which is what
torchrun makes of them. Running the trainer directly would read the operator's pod-level `RANK`
(0 for the Master, i+1 for Worker i) and `WORLD_SIZE` (the number of pods) as process rank and
world size: wrong as soon as a pod has more than one GPU.

Variables read (operator-set first, older operator fallbacks second):

| meaning | variable | fallback |
| --- | --- | --- |
| nodes, or "min:max" (elastic) | `PET_NNODES` | `WORLD_SIZE` (pods), then spec `training.nodes` |
| processes per node | `PET_NPROC_PER_NODE` (number) | spec `training.gpus_per_node` |
| this pod's node rank (static) | `PET_NODE_RANK` | `RANK` (pod index set by the operator) |
| rendezvous host/port (static) | `PET_MASTER_ADDR`, `PET_MASTER_PORT` | `MASTER_ADDR`, `MASTER_PORT` |
| elastic rendezvous | `PET_RDZV_{BACKEND,ENDPOINT,ID,CONF}`, `PET_MAX_RESTARTS`, `PET_STANDALONE` | rdzv id: job name |

With `PET_RDZV_ENDPOINT` set (the operator's `elasticPolicy`), torchrun uses that rendezvous and
assigns node ranks itself; otherwise the static rendezvous at the master address is used with the
pod's node rank.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import sys
from collections.abc import Mapping

from janus_job.deploy import network
from janus_job.errors import JobError

# The default step runs within a few GiB of an 80 GB card; growable segments keep the caching
# allocator from fragmenting there (docs/performance.md measures it). A value in the pod wins.
ALLOCATOR_ENV, ALLOCATOR_DEFAULT = "PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"
SHUTDOWN_MARGIN_S = 15  # of the pod's grace period, left for torchrun itself to exit


def _int_var(env: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise JobError(f"{name}={raw!r} is not a whole number; the PyTorchJob sets it, check the pod's env") from None
    if value < minimum:
        raise JobError(f"{name}={value} must be >= {minimum}")
    return value


def _nnodes(env: Mapping[str, str], default: int) -> str:
    raw = (env.get("PET_NNODES") or "").strip()
    if raw:
        parts = raw.split(":")
        if len(parts) > 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise JobError(f"PET_NNODES={raw!r} must be a node count (e.g. 2) or 'min:max' (e.g. 1:4)")
        if len(parts) == 2 and int(parts[0]) > int(parts[1]):
            raise JobError(f"PET_NNODES={raw!r}: min is larger than max")
        return raw
    pods = _int_var(env, "WORLD_SIZE", minimum=1)
    return str(pods if pods is not None else default)


def _nproc(env: Mapping[str, str], default: int) -> int:
    raw = (env.get("PET_NPROC_PER_NODE") or "").strip()
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    if raw in ("", "auto", "gpu"):
        # torchrun's "auto" would start one process per CPU core on a node without GPUs.
        return default
    raise JobError(f"PET_NPROC_PER_NODE={raw!r} must be a process count (the spec's training.gpus_per_node)")


def torchrun_arguments(
    env: Mapping[str, str], spec_path: str, *, job_name: str, default_nodes: int, default_nproc: int, max_restarts: int
) -> list[str]:
    """The torchrun command line (after `python -m torch.distributed.run`) for this pod."""
    nnodes = _nnodes(env, default_nodes)
    args = ["--nnodes", nnodes, "--nproc-per-node", str(_nproc(env, default_nproc))]
    endpoint = (env.get("PET_RDZV_ENDPOINT") or "").strip()
    if endpoint:
        restarts = _int_var(env, "PET_MAX_RESTARTS", minimum=0)
        args += [
            "--rdzv-backend",
            (env.get("PET_RDZV_BACKEND") or "c10d").strip(),
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            (env.get("PET_RDZV_ID") or job_name).strip(),
            "--max-restarts",
            str(max_restarts if restarts is None else restarts),
        ]
        if env.get("PET_RDZV_CONF"):
            args += ["--rdzv-conf", env["PET_RDZV_CONF"]]
    elif "PET_STANDALONE" in env:
        args += ["--standalone"]
    else:
        if ":" in nnodes:
            raise JobError(
                f"PET_NNODES={nnodes!r} asks for an elastic node range but PET_RDZV_ENDPOINT is not set; "
                "the PyTorchJob needs an elasticPolicy (training.resize.policy: elastic) for a range"
            )
        node_rank = _int_var(env, "PET_NODE_RANK", minimum=0)
        if node_rank is None:
            node_rank = _int_var(env, "RANK", minimum=0)
        if node_rank is None:
            if int(nnodes) > 1:
                raise JobError("neither PET_NODE_RANK nor RANK is set: cannot tell which node this pod is")
            node_rank = 0
        if node_rank >= int(nnodes):
            raise JobError(f"node rank {node_rank} is not below the node count {nnodes}")
        addr = (env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR") or "").strip()
        port = _int_var(env, "PET_MASTER_PORT", minimum=1) or _int_var(env, "MASTER_PORT", minimum=1)
        if int(nnodes) > 1 and (not addr or port is None):
            raise JobError(
                "PET_MASTER_ADDR/PET_MASTER_PORT (or MASTER_ADDR/MASTER_PORT) must be set for a multi-node job"
            )
        args += [
            "--node-rank",
            str(node_rank),
            "--max-restarts",
            "0",
            "--master-addr",
            addr or "127.0.0.1",
            "--master-port",
            str(port or 29500),
        ]
    return args + ["--module", "janus_job.cli", "train", "--spec", spec_path]


def network_arguments(settings: network.NetworkSettings, env: Mapping[str, str]) -> list[str]:
    """torchrun options of the network preset. With the node's network namespace (hostnetwork) the
    hostname torchrun would publish for the rendezvous is the node's name, which other pods resolve
    only through /etc/hosts, if at all: the pod IP from the downward API is used instead."""
    if settings.preset != "hostnetwork":
        return []
    raw = (env.get(network.POD_IP_ENV) or "").strip()
    if not raw:
        raise JobError(f"network.preset hostnetwork needs {network.POD_IP_ENV} (the pod IP, status.podIP); "
                       "the chart sets it, set it in the pod's env when running without the chart")
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        raise JobError(f"{network.POD_IP_ENV}={raw!r} is not an IP address; set it from status.podIP") from None
    return ["--local-addr", str(address)]


def runtime_defaults(spec, nproc: int, cpus: int) -> dict[str, str]:
    """Variables the training processes get unless the pod sets them."""
    defaults = {
        # A torchrun restart (pod loss, resize) otherwise fails to re-create the shared rendezvous
        # store under deepspeed.init_distributed (pytorch/pytorch#135712).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        ALLOCATOR_ENV: ALLOCATOR_DEFAULT,
        # torchrun gives its ranks this long after forwarding SIGTERM before it SIGKILLs them
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(spec.cluster.termination_grace_seconds - SHUTDOWN_MARGIN_S),
    }
    if spec.deepspeed.offload_optimizer == "cpu":
        defaults["OMP_NUM_THREADS"] = str(cpu_adam_threads(cpus, nproc))
    return defaults


def cpu_adam_threads(cpus: int, nproc: int) -> int:
    """OpenMP threads per rank for DeepSpeed's CPU Adam: torchrun's default of 1 would run it on
    one core per rank."""
    return max(1, cpus // nproc)


def launch(spec_path: str, env: Mapping[str, str] | None = None) -> None:
    """Validates the spec, then replaces this process with torchrun (never returns)."""
    from janus_job.config.load import load_spec

    env = os.environ if env is None else env
    spec = load_spec(spec_path)
    args = torchrun_arguments(
        env,
        os.path.abspath(spec_path),
        job_name=spec.name,
        default_nodes=spec.training.nodes,
        default_nproc=spec.training.gpus_per_node,
        max_restarts=spec.training.resize.max_restarts,
    )
    nproc = int(args[args.index("--nproc-per-node") + 1])
    for name, value in runtime_defaults(spec, nproc, len(os.sched_getaffinity(0))).items():
        os.environ.setdefault(name, value)
    settings = network.NetworkSettings.of(spec.network)
    args = network_arguments(settings, env) + args
    network.preflight(settings)
    debug_dir = env.get(network.DEBUG_DIR_ENV) or network.default_debug_dir()
    os.makedirs(debug_dir, exist_ok=True)
    variables = network.nccl_env(settings, debug_dir)
    os.environ.update(variables)  # the spec's network section wins over the pod's environment
    print(f"janus-job launch: network preset={settings.preset} check={settings.check} "
          + " ".join(f"{k}={v}" for k, v in variables.items()), flush=True)
    command = [sys.executable, "-m", "torch.distributed.run", *args]
    print("janus-job launch: " + shlex.join(command), flush=True)
    os.execv(sys.executable, command)
