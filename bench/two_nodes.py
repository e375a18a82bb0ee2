"""Two "nodes" of the product trainer on one host: a Master and a Worker `janus-job launch`, a SIGTERM
to one of them, and the resume at two nodes and at one.

Each "node" is one `python -m janus_job.cli launch --spec job.yaml` process with the environment
the Kubeflow training operator gives a PyTorchJob pod (one GPU per node, CUDA_VISIBLE_DEVICES):

- static (restartPolicy without elasticPolicy): PET_NNODES=2, PET_NODE_RANK, PET_NPROC_PER_NODE=1,
  PET_MASTER_ADDR/PORT, and the pod-level RANK (pod index), WORLD_SIZE (pods), MASTER_ADDR/PORT;
- elastic (the chart's `resize.policy: elastic`): PET_NNODES=min:max, PET_RDZV_BACKEND=c10d,
  PET_RDZV_ENDPOINT, PET_MAX_RESTARTS, plus the same pod-level variables; torchrun's c10d
  rendezvous assigns the node ranks.

`launch` execs torchrun, so a SIGTERM to the node's process is what the kubelet sends the pod.
The job is the demo's tiny flavor (synthetic data, tiny Qwen2.5-VL and VGGT checkpoints,
precomputed features in a local store), micro batch 1, global batch 4, ZeRO-1 (the default),
eager attention (deterministic backward), bf16 on GPUs and fp32 on CPU. Scenarios:

a. `a`: uninterrupted, static, 2 nodes, --steps steps, a checkpoint every --interval steps;
   `a_elastic`: the same through the elastic variant; it must equal `a` exactly (also the
   proof that the run is deterministic, which the exact checks below rely on);
b. `b_stop`: static; the Worker gets SIGTERM once rank 1 trains step --signal-at: every rank
   saves the step it is at and exits non-zero; `b_resume`: restarted at 2 nodes (elastic
   variant, as the operator restarts an elastic job): samples (per rank, step, micro-step), losses
   and lr per step of both parts together equal `a`'s exactly;
c. `c_resize`: from the same checkpoint at 1 node (static, one Master, `training.nodes: 1`, what
   `janus-job scale --nodes 1` gives), global batch kept (accumulation 2 -> 4): per step after the
   resume the same samples and lr as `a`, losses within LOSS_TOLERANCE (relative; the gradient
   sums run in another order, and bf16 rounds the weights after each step).

Recorded from the logs: the start-of-job check's `network transport=...` line (rank 0, once per
run), NCCL's own channel transports (from its debug files), and the trainer's `train start`,
`train step=...`, `train stopped` lines. One JSON, `<out or $OUT or bench/results>/
<date>-<card>-2-two_nodes.json` (card: torch.cuda.get_device_name, or "cpu"), holds the spec,
each run's commands' environment, exit codes, per-step records (step, loss, lr, samples) and a
pass/fail per check; the last lines printed are one `check <name>: PASS|FAIL ...` per check.
Exit status 0 when every check passed, 1 otherwise.

    python3 bench/two_nodes.py --gpus 2     # 2 GPUs of one host, NCCL (repository root on PYTHONPATH)
    python3 bench/two_nodes.py --cpu        # gloo, 2 CPU processes (tests/test_bench_two_nodes.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, card_name, card_slug, kill_tree, write_json_atomic  # noqa: E402

GLOBAL_BATCH = 4
MICRO_BATCH = 1
# Relative loss bound of the 1-node resume against the 2-node run, per dtype. fp32 (CPU): only the
# order of the gradient sums differs. bf16 (GPU): the same, but the weights the forward uses are
# rounded to bf16 (8 bits of mantissa) after every optimizer step, so one flipped last bit of a
# weight moves the loss; 2% is far below the change of the loss between two steps of this run.
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
# Every child runs with these (no NVLink multicast/NVLS on the lent machines).
FABRIC_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STEP_LINE = re.compile(r"^train step=(\d+)/(\d+) ")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the job


def prepare(work: Path, *, steps: int, gpu: bool) -> Path:
    """The demo's tiny job at 2 nodes x 1 GPU, features precomputed; returns the base spec."""
    import yaml

    from janus_job.demo.run import precompute_features, prepare_job

    spec_path = prepare_job(work / "job", steps=steps, gpu=gpu, nodes=2, micro_batch_size=MICRO_BATCH,
                            global_batch_size=GLOBAL_BATCH)
    spec = yaml.safe_load(spec_path.read_text())
    spec["model"]["attn_implementation"] = "eager"
    spec["deepspeed"]["bf16"] = gpu
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    precompute_features(spec_path)
    return spec_path


def run_spec(base: Path, target: Path, *, checkpoints: Path, interval: int, nodes: int, elastic: bool) -> Path:
    import yaml

    spec = yaml.safe_load(base.read_text())
    t = spec["training"]
    t["nodes"] = nodes
    t["checkpoint"].update(url=str(checkpoints), interval_steps=interval, keep=3)
    t["export"] = False  # the runs compare checkpoints and losses; an export would add a last save
    t["resize"] = {"policy": "elastic", "min_nodes": nodes, "max_nodes": nodes} if elastic else {"policy": "fixed"}
    target.write_text(yaml.safe_dump(spec, sort_keys=False))
    return target


# ---------------------------------------------------------------- the "nodes"


def node_env(run_dir: Path, *, node_rank: int, nodes: int, port: int, elastic: bool, gpu: int | None) -> dict:
    """The environment of one PyTorchJob pod (the operator's variables) plus the bench's files."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "JANUS_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(
        PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
        # pod-level variables the operator sets in both modes
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(node_rank), WORLD_SIZE=str(nodes),
        PET_NPROC_PER_NODE="1",
        JANUS_METRICS_FILE=str(run_dir / "metrics-{rank}.jsonl"),
        JANUS_SAMPLE_TRACE=str(run_dir / "trace-{rank}.jsonl"),
        JANUS_CHECKPOINT_STAGING=str(run_dir / f"staging-node{node_rank}"),
        JANUS_NCCL_DEBUG_DIR=str(run_dir / "nccl"),
        **FABRIC_ENV,
    )
    if elastic:
        env.update(PET_NNODES=f"{nodes}:{nodes}", PET_RDZV_BACKEND="c10d", PET_RDZV_ENDPOINT=f"127.0.0.1:{port}",
                   PET_MAX_RESTARTS="0")
    else:
        env.update(PET_NNODES=str(nodes), PET_NODE_RANK=str(node_rank), PET_MASTER_ADDR="127.0.0.1",
                   PET_MASTER_PORT=str(port))
    # one GPU per node; "" hides every GPU (the --cpu mode on any machine)
    env["CUDA_VISIBLE_DEVICES"] = "" if gpu is None else str(gpu)
    return env


class Run:
    """One scenario's `launch` processes (one per node), their logs and what they wrote."""

    def __init__(self, name: str, spec: Path, run_dir: Path, *, nodes: int, elastic: bool, gpus: bool) -> None:
        self.name, self.spec, self.dir, self.nodes, self.elastic = name, spec, run_dir, nodes, elastic
        self.dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.envs = [node_env(run_dir, node_rank=n, nodes=nodes, port=port, elastic=elastic,
                              gpu=n if gpus else None) for n in range(nodes)]
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.started = 0.0
        self.wall_s: float | None = None

    def start(self) -> Run:
        print(f"[{self.name}] {self.nodes} node(s), {'elastic' if self.elastic else 'static'}", flush=True)
        self.started = time.perf_counter()
        for n, env in enumerate(self.envs):
            log = self.dir / f"node{n}.log"
            self.logs.append(log)
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "janus_job.cli", "launch", "--spec", str(self.spec)], env=env,
                    cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        return self

    def wait(self, limit_s: float) -> list[int | None]:
        """Exit codes (None: killed at the limit, with its whole tree)."""
        deadline = time.monotonic() + limit_s
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.wait()
                codes.append(None)
        self.wall_s = time.perf_counter() - self.started
        for n, code in enumerate(codes):
            print(f"[{self.name}] node {n} exit {code} ({self.wall_s:.0f}s, log {self.logs[n]})", flush=True)
        return codes

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()

    def output(self, node: int) -> str:
        return self.logs[node].read_text(errors="replace") if node < len(self.logs) else ""

    def lines(self, prefix: str) -> list[str]:
        return [line for n in range(len(self.logs)) for line in self.output(n).splitlines()
                if line.startswith(prefix)]

    def trace_steps(self, rank: int) -> list[int]:
        path = self.dir / f"trace-{rank}.jsonl"
        if not path.exists():
            return []
        with open(path) as f:
            return [json.loads(line)["step"] for line in f if line.endswith("\n")]


# ---------------------------------------------------------------- what the runs wrote


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def metrics(run_dir: Path) -> dict[int, dict]:
    """step -> {loss, lr} from rank 0's metrics file (the last record of a step survives a restart)."""
    return {r["step"]: {"loss": r["loss"], "lr": r["lr"]} for r in read_jsonl(run_dir / "metrics-0.jsonl")
            if r.get("event") == "train"}


def samples(run_dir: Path) -> dict[tuple[int, int, int], list]:
    """(rank, step, micro_step) -> sample ids; `step` counts from 1 like the log line."""
    out = {}
    for path in sorted(run_dir.glob("trace-*.jsonl")):
        for r in read_jsonl(path):
            out[(r["rank"], r["step"] + 1, r["micro_step"])] = r["sample_ids"]
    return out


def samples_per_step(traced: dict[tuple[int, int, int], list]) -> dict[int, list]:
    out: dict[int, list] = {}
    for (_, step, _), ids in traced.items():
        out.setdefault(step, []).extend(ids)
    return {step: sorted(ids, key=str) for step, ids in out.items()}


def nccl_links(run_dir: Path) -> list[str]:
    """The transports of NCCL's channel connections (P2P, SHM, NET/Socket, NET/IB) in its debug files."""
    from janus_job.deploy.network import NcclInit, parse_nccl_log

    merged = NcclInit()
    for path in sorted((run_dir / "nccl").glob("*.log")) if (run_dir / "nccl").is_dir() else []:
        merged.merge(parse_nccl_log(path.read_text(errors="replace")))
    return merged.links


def step_records(run_dir: Path) -> list[dict]:
    logged = metrics(run_dir)
    per_step = samples_per_step(samples(run_dir))
    return [{"step": s, "loss": logged[s]["loss"], "lr": logged[s]["lr"], "samples": per_step.get(s)}
            for s in sorted(logged)]


def describe(run: Run, codes: list[int | None]) -> dict:
    keep = ("PET_", "RANK", "WORLD_SIZE", "MASTER_", "CUDA_VISIBLE_DEVICES", "NCCL_", "TORCH_SYMM", "NVSHMEM")
    return {
        "nodes": run.nodes,
        "mode": "elastic" if run.elastic else "static",
        "exit_codes": codes,
        "wall_s": run.wall_s,
        "node_env": [{k: v for k, v in sorted(env.items()) if k.startswith(keep)} for env in run.envs],
        "launch_lines": run.lines("janus-job launch: network"),
        "network_lines": run.lines("network transport="),
        "start_lines": run.lines("train start "),
        "step_lines": run.lines("train step="),
        "stopped_lines": run.lines("train stopped "),
        "done_lines": run.lines("train done "),
        "nccl_links": nccl_links(run.dir),
    }


def complete_steps(store: Path) -> list[int]:
    """Steps with a complete checkpoint (their COMPLETE marker written) in a file store."""
    return sorted(int(p.parent.name.split("-")[1]) for p in store.glob("step-*/COMPLETE"))


# ---------------------------------------------------------------- checks


class Checks:
    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.items.append({"name": name, "passed": bool(ok), "detail": detail})
        print(f"[check] {name}: {'PASS' if ok else 'FAIL'} {detail}", flush=True)
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.items) and all(c["passed"] for c in self.items)

    def summary(self) -> list[str]:
        return [f"check {c['name']}: {'PASS' if c['passed'] else 'FAIL'} {c['detail']}" for c in self.items]


def first_difference(got: dict, want: dict, steps: list[int]) -> str | None:
    for step in steps:
        if got.get(step) != want.get(step):
            return f"step {step}: {got.get(step)} != {want.get(step)}"
    return None


def compare_exact(checks: Checks, name: str, run_dir: Path, reference_dir: Path, steps: list[int]) -> None:
    """Samples per (rank, step, micro-step), loss and lr per step equal the reference's exactly."""
    got_samples, want_samples = samples(run_dir), samples(reference_dir)
    got_keys = sorted(k for k in got_samples if k[1] in steps)
    want_keys = sorted(k for k in want_samples if k[1] in steps)
    diff = None if got_keys == want_keys else f"trained (rank, step, micro) {got_keys} != {want_keys}"
    diff = diff or next((f"rank {k[0]} step {k[1]} micro {k[2]}: {got_samples[k]} != {want_samples[k]}"
                         for k in want_keys if got_samples[k] != want_samples[k]), None)
    checks.add(f"{name}_samples", diff is None and bool(want_keys),
               diff or f"{len(want_keys)} micro-batches over steps {steps[0]}..{steps[-1]} identical")
    got, want = metrics(run_dir), metrics(reference_dir)
    for key in ("loss", "lr"):
        diff = first_difference({s: got[s][key] for s in got}, {s: want[s][key] for s in want}, steps)
        checks.add(f"{name}_{key}", diff is None and all(s in want for s in steps),
                   diff or f"steps {steps[0]}..{steps[-1]} bit-identical")


# ---------------------------------------------------------------- the scenario


def signal_when(run: Run, rank: int, step: int, limit_s: float) -> int | None:
    """SIGTERM to the node that runs `rank` (static: node == rank) once it has begun step `step`
    (1-based); returns the step it had begun, or None when the run ended first."""
    deadline = time.monotonic() + limit_s
    proc = run.procs[rank]
    while time.monotonic() < deadline and all(p.poll() is None for p in run.procs):
        begun = run.trace_steps(rank)
        if begun and max(begun) + 1 >= step:
            proc.send_signal(signal.SIGTERM)  # what the kubelet sends the pod: launch exec'd torchrun
            return max(begun) + 1
        time.sleep(0.002)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpus", type=int, choices=[2], help="one GPU per node, NCCL")
    mode.add_argument("--cpu", action="store_true", help="gloo, 2 CPU processes")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 12 GPU, 8 CPU)")
    p.add_argument("--interval", type=int, default=3, help="checkpoint every N steps")
    p.add_argument("--signal-at", type=int, default=4, help="SIGTERM the Worker once rank 1 begins this step")
    p.add_argument("--out", default=None, help="results folder (default: $OUT, else bench/results)")
    p.add_argument("--workdir", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--run-limit-s", type=float, default=None, help="per run (default 150 GPU, 400 CPU)")
    args = p.parse_args(argv)
    gpu = not args.cpu
    steps = args.steps or (12 if gpu else 8)
    limit = args.run_limit_s or (150.0 if gpu else 400.0)
    if not 1 < args.signal_at < steps - 1:
        p.error(f"--signal-at must lie between 2 and {steps - 2} (--steps {steps})")
    dtype = "bf16" if gpu else "fp32"

    started = time.perf_counter()
    card = card_name() if gpu else "cpu"
    if gpu:
        import torch

        if torch.cuda.device_count() < 2:
            print(f"--gpus 2 needs 2 visible GPUs, this machine has {torch.cuda.device_count()}", file=sys.stderr)
            return 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="janus-two-nodes-"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out or os.environ.get("OUT") or REPO_ROOT / "bench" / "results")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out_path = out_dir / f"{date}-{card_slug(card)}-2-two_nodes.json"

    base = prepare(work, steps=steps, gpu=gpu)
    prepared_s = time.perf_counter() - started
    print(f"job prepared in {prepared_s:.0f}s: {base}", flush=True)
    checks = Checks()
    report: dict[str, Any] = {
        "bench": "two_nodes", "card": card, "gpus": 2 if gpu else 0, "backend": "nccl" if gpu else "gloo",
        "dtype": dtype, "steps": steps, "checkpoint_interval": args.interval, "signal_at": args.signal_at,
        "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH, "loss_tolerance_rel": LOSS_TOLERANCE[dtype],
        "fabric_env": FABRIC_ENV, "python": sys.version.split()[0], "runs": {}, "scenarios": {}, "checks": checks.items,
        "prepare_s": prepared_s,
    }
    try:
        import torch

        report["torch"] = torch.__version__
        report["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if gpu else None
    except Exception as err:  # noqa: BLE001 - a version string is informative only
        report["torch"] = f"unknown ({err})"
    current: list[Run] = []

    def launch(name: str, *, nodes: int, elastic: bool, store: Path, run_dir: Path | None = None) -> Run:
        spec = run_spec(base, work / f"{name}.yaml", checkpoints=store, interval=args.interval, nodes=nodes,
                        elastic=elastic)
        run = Run(name, spec, run_dir or work / name, nodes=nodes, elastic=elastic, gpus=gpu).start()
        current[:] = [run]
        return run

    def finish(name: str, run: Run, key: str | None = None) -> list[int | None]:
        codes = run.wait(limit)
        report["runs"][key or name] = describe(run, codes)
        return codes

    try:
        everything = list(range(1, steps + 1))
        # a: the uninterrupted reference, static and elastic
        for name, elastic in (("a", False), ("a_elastic", True)):
            run = launch(name, nodes=2, elastic=elastic, store=work / f"{name}-checkpoints")
            codes = finish(name, run)
            ok = codes == [0, 0] and sorted(metrics(run.dir)) == everything
            starts = run.lines("train start ")
            ok = ok and len(starts) == 2 and all("world=2" in s for s in starts)
            checks.add(f"{name}_ran", ok, f"exit codes {codes}, steps logged {sorted(metrics(run.dir))}, "
                       f"{len(starts)} start lines")
            report["scenarios"][name] = {"records": step_records(run.dir)}
        network = report["runs"]["a"]["network_lines"]
        want = "gloo" if not gpu else None
        transport = network[0].split()[1].split("=", 1)[1] if len(network) == 1 else None
        checks.add("network_line", len(network) == 1 and network[0].endswith(" ok") and transport is not None
                   and (transport == want if want else transport != "gloo"),
                   f"{network} (NCCL channel links: {report['runs']['a']['nccl_links']})")
        compare_exact(checks, "elastic_equals_static", work / "a_elastic", work / "a", everything)

        # b: SIGTERM to the Worker, then the restart at 2 nodes
        run = launch("b_stop", nodes=2, elastic=False, store=work / "b-checkpoints", run_dir=work / "b")
        signalled = signal_when(run, rank=1, step=args.signal_at, limit_s=limit)
        codes = finish("b_stop", run)
        stopped = run.lines("train stopped step=")
        stop_step = int(stopped[0].split("step=", 1)[1].split("/", 1)[0]) if stopped else None
        saved = complete_steps(work / "b-checkpoints")
        report["scenarios"]["b"] = {"signalled_at_step": signalled, "stop_step": stop_step,
                                    "complete_checkpoints": saved}
        ok = (signalled is not None and stop_step is not None and signalled <= stop_step < steps
              and all(c not in (0, None) for c in codes) and len(stopped) == 2 and saved and saved[-1] == stop_step)
        checks.add("b_stopped_with_checkpoint", ok,
                   f"SIGTERM at step {signalled}, stopped at {stop_step}, exit codes {codes}, complete checkpoints "
                   f"{saved}, {len(stopped)} stop lines")
        if not ok:
            raise RuntimeError("the SIGTERM part did not stop as it should; nothing to resume")
        # the store as the job left it, for the 1-node resume
        shutil.copytree(work / "b-checkpoints", work / "c-checkpoints")
        shutil.copytree(work / "b", work / "c", ignore=shutil.ignore_patterns("node*.log", "staging-*", "nccl"))

        run = launch("b_resume", nodes=2, elastic=True, store=work / "b-checkpoints", run_dir=work / "b")
        codes = finish("b_resume", run)
        starts = run.lines("train start ")
        checks.add("b_resumed_at_stop_step", codes == [0, 0] and len(starts) == 2
                   and all(s.endswith(f"at step {stop_step}") and "world=2" in s for s in starts),
                   f"exit codes {codes}, start lines {starts}")
        compare_exact(checks, "b_equals_a", work / "b", work / "a", everything)
        report["scenarios"]["b"]["records"] = step_records(work / "b")

        # c: the same checkpoint at 1 node, global batch kept
        run = launch("c_resize", nodes=1, elastic=False, store=work / "c-checkpoints", run_dir=work / "c")
        codes = finish("c_resize", run)
        starts = run.lines("train start ")
        accumulation = GLOBAL_BATCH // MICRO_BATCH
        checks.add("c_resumed_at_one_node", codes == [0] and len(starts) == 1 and "world=1" in starts[0]
                   and f"accum={accumulation}" in starts[0] and starts[0].endswith(f"at step {stop_step}"),
                   f"exit codes {codes}, start line {starts}")
        after = list(range(stop_step + 1, steps + 1))
        got, want = samples_per_step(samples(work / "c")), samples_per_step(samples(work / "a"))
        diff = first_difference(got, want, after)
        checks.add("c_samples", diff is None, diff or f"steps {after[0]}..{after[-1]}: the same global batches")
        got_m, want_m = metrics(work / "c"), metrics(work / "a")
        diff = first_difference({s: got_m[s]["lr"] for s in got_m}, {s: want_m[s]["lr"] for s in want_m}, after)
        checks.add("c_lr", diff is None, diff or f"steps {after[0]}..{after[-1]} identical")
        errors = {s: abs(got_m[s]["loss"] - want_m[s]["loss"]) / abs(want_m[s]["loss"])
                  for s in after if s in got_m and s in want_m}
        worst = max(errors.values()) if len(errors) == len(after) else None
        bound = LOSS_TOLERANCE[dtype]
        checks.add("c_loss", worst is not None and worst <= bound,
                   f"max relative loss difference vs the 2-node run {worst if worst is None else f'{worst:.2e}'} "
                   f"(bound {bound:g}, {dtype}) over steps {after[0]}..{after[-1]}")
        report["scenarios"]["c"] = {"resumed_at_step": stop_step, "records": step_records(work / "c"),
                                    "loss_rel_error": {str(s): e for s, e in errors.items()}}
    except Exception as err:  # noqa: BLE001 - recorded as a failed check; the JSON is still written
        checks.add("bench_completed", False, f"{type(err).__name__}: {err}")
    finally:
        for run in current:
            run.kill()
    report["status"] = "passed" if checks.passed else "failed"
    report["total_s"] = time.perf_counter() - started
    report["workdir"] = str(work)
    write_json_atomic(out_path, report)
    print(f"results: {out_path}", flush=True)
    for line in checks.summary():
        print(line, flush=True)
    return 0 if checks.passed else 1


if __name__ == "__main__":
    sys.exit(main())
