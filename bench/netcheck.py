"""The start-of-job network check (janus_job/deploy/network.py) on its own: real torchrun ranks, real NCCL
(GPUs) or gloo (--cpu), the same environment `janus-job launch` sets, and the one log line.

    python bench/netcheck.py --gpus 2                       # NCCL on 2 GPUs of this host
    python bench/netcheck.py --gpus 8 --preset infiniband   # also asks for NCCL's IB transport
    python bench/netcheck.py --cpu --nodes 2 --ranks-per-node 1   # gloo, two torchrun agents on this host

Writes <out or $OUT or bench/results>/<date>-<card>-<ranks>-netcheck[-<preset>].json with the line, every
size's bandwidth, the settings and NCCL's own init lines about the network. Needs torch and the
repository on PYTHONPATH, nothing else (no pydantic, no DeepSpeed). Exit status 2 when the check
refuses (network.check: error), like the trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import card_name, results_path, write_json_atomic
from janus_job.deploy import network
from janus_job.errors import JobError

NCCL_NETWORK_WORDS = ("Using network", "NET/IB", "NET/Socket", " via ", "NCCL WARN", "NCCL version")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _settings(args: argparse.Namespace) -> network.NetworkSettings:
    return network.NetworkSettings(preset=args.preset, ib_hca=args.ib_hca, socket_ifname=args.socket_ifname,
                                   check=args.check, min_busbw_gbs=args.min_busbw)


def _nccl_version() -> str:
    import torch

    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def worker(args: argparse.Namespace) -> int:
    """One rank under torchrun."""
    import torch
    import torch.distributed as dist

    settings = network.NetworkSettings(**json.loads(args.worker))
    local_rank = int(os.environ["LOCAL_RANK"])
    if args.cpu:
        device, backend = torch.device("cpu"), "gloo"
    else:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    dist.init_process_group(backend)
    code = 0
    try:
        result = network.check_process_group(settings, device)
    except network.NetworkCheckFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        result, code = err.result, 2
    if dist.get_rank() == 0:
        nccl_lines = []
        pattern = os.environ.get("NCCL_DEBUG_FILE")
        if backend == "nccl" and pattern:
            log = Path(network.expand_debug_file(pattern))
            if log.exists():
                nccl_lines = [line for line in log.read_text(errors="replace").splitlines()
                              if any(word in line for word in NCCL_NETWORK_WORDS)][:200]
        write_json_atomic(args.result, {
            "result": result.to_json() if result else None, "refused": code != 0,
            "backend": backend, "torch": torch.__version__,
            "nccl": _nccl_version() if backend == "nccl" else None,
            "nccl_init": nccl_lines,
        })
    dist.destroy_process_group()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=1, help="ranks (one per GPU) on this host")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU instead of NCCL on GPUs")
    parser.add_argument("--nodes", type=int, default=1, help="torchrun agents on this host, each a 'node' (--cpu)")
    parser.add_argument("--ranks-per-node", type=int, default=1, help="ranks per agent with --cpu")
    parser.add_argument("--preset", choices=network.PRESETS, default="tcp")
    parser.add_argument("--ib-hca", default=None, help="network.ib_hca (NCCL_IB_HCA syntax)")
    parser.add_argument("--socket-ifname", default=None, help="network.socket_ifname")
    parser.add_argument("--check", choices=network.CHECK_MODES, default="warn")
    parser.add_argument("--min-busbw", type=float, default=None, help="network.min_busbw_gbs")
    parser.add_argument("--out", default=None, help="results folder (default $OUT or bench/results)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    settings = _settings(args)
    for problem in filter(None, [settings.ib_hca and network.check_hca_filter(settings.ib_hca),
                                 settings.socket_ifname and network.check_ifname_filter(settings.socket_ifname)]):
        parser.error(problem)
    nodes, per_node = (args.nodes, args.ranks_per_node) if args.cpu else (1, args.gpus)
    try:
        network.preflight(settings)
    except JobError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    with tempfile.TemporaryDirectory(prefix="netcheck-") as tmp:
        env = dict(os.environ, **network.nccl_env(settings, debug_dir=tmp), PYTHONUNBUFFERED="1")
        result_file = os.path.join(tmp, "result.json")
        port = _free_port()
        agents = []
        for node_rank in range(nodes):
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                       "--node-rank", str(node_rank), "--nproc-per-node", str(per_node),
                       "--master-addr", "127.0.0.1", "--master-port", str(port), __file__,
                       "--worker", json.dumps(asdict(settings)), "--result", result_file]
            if args.cpu:
                command.append("--cpu")
            agents.append(subprocess.Popen(command, env=env))
        codes = [agent.wait() for agent in agents]
        if not os.path.exists(result_file):
            print(f"error: the ranks wrote no result (exit codes {codes})", file=sys.stderr)
            return 1
        record = json.loads(Path(result_file).read_text())
    ranks = nodes * per_node
    card = "cpu" if args.cpu else card_name()
    record.update(card=card, ranks=ranks, nodes=nodes, settings=asdict(settings))
    path = results_path(card, ranks, args.out, tag="netcheck" if args.preset == "tcp" else f"netcheck-{args.preset}")
    write_json_atomic(path, record)
    print(f"netcheck: wrote {path}", flush=True)
    return 2 if record["refused"] else max(codes)


if __name__ == "__main__":
    sys.exit(main())
