"""Loader headroom: samples/s the product's loader delivers to one rank's step, against what the step trains.

What is measured is what the trainer's step thread receives (janus_job.train.batches): the
balanced sampler's plan, `JanusDataset` in the DataLoader's worker processes (fetch, checksum and
decode of the stored features, tokenisation), `JanusCollator` (padding, mRoPE positions, index
tensors), the DataLoader's pin-memory thread (GPU), and `BatchPrefetcher`'s copy to the GPU on a
side stream, with the spec's default loader settings (`data.prefetch_factor`, `pin_memory`,
`persistent_workers`, `prefetch_batches`) and `data.num_workers` from --workers.

- rows: one per --workers count; the consumer takes batches as fast as they come, so the row's
  samples/s is all the loader can deliver per rank;
- paced: with --paced-workers workers (default the spec's `data.num_workers`), the consumer sleeps
  the step's time per micro-step (in place of the GPU work) and the share of time it is blocked
  in `next()` is the `data_wait` the trainer's log line would show at this pace (a sleep leaves
  the host idle, a real step keeps it partly busy: a lower bound).

Samples: 9 frames each (the upper end of JanusVLN's 1..9-image mix: the most bytes per sample),
trajectory-like (sample i's history is frames i-8..i-1), cached spatial (34, 46, 2048) and vision
(1564, 1280) bf16 objects: 42.4 MB per sample. The tokenizer is janus_job.demo.tiny's offline one.
`--ranks R` runs R such ranks at once (the ranks of one node share its CPUs: rank r of R gets its
share of each global batch, as in training).

Consumption: `--consume-per-gpu S` samples/s, else one sample per micro-step of the fastest
variant in `--step-profile` (default: the newest bench/results/*step_profile.json from a GPU).
Headroom = the best row's samples/s per rank / consumption; the goal is GOAL_HEADROOM.

Store: `file://` in a temp dir (default; written once, so the host's page cache may serve the
reads: the JSON gives the store's size beside the host memory), or `--store URL`
(`s3://bucket/prefix --endpoint URL` for a real object store; `s3://` without `--endpoint` starts
a local moto server).

Device:  python3 bench/loader.py                                    (GPU if present, ~1.5 min)
Cluster: python3 bench/loader.py --store s3://bucket/bench --endpoint https://minio:9000 --ranks 8
CI:      python3 bench/loader.py --tiny                             (CPU, tiny objects, seconds)
JSON: `<out or $OUT or bench/results>/loader-<date>-<card>-<ranks>[-tiny].json`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, RESULTS_DIR, card_name, print_table, results_path, write_json_atomic  # noqa: E402

GOAL_HEADROOM = 3.0
FRAMES_PER_SAMPLE = 9
ACCUMULATION = 8  # micro-batches per optimizer step per rank (the sampler's plan; micro batch 1)
PROMPT = "Go to the kitchen.\n This is your historical observation:{history}\n This is your current observation:<image>"
FULL = {"spatial_shape": (34, 46, 2048), "vision_shape": (34 * 46, 1280), "samples": 48, "workers": "2,4,8",
        "duration": 10.0, "paced_duration": 15.0}
TINY = {"spatial_shape": (2, 4, 2048), "vision_shape": (8, 1280), "samples": 16, "workers": "0,1",
        "duration": 1.0, "paced_duration": 1.0}


def start_moto() -> tuple[str, object]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return f"http://127.0.0.1:{port}", server


# ---------------------------------------------------------------- data and store


def synthetic_samples(count: int):
    """Trajectory-like samples: sample i's current frame is new, its history the 8 before it."""
    from janus_job.data.annotations import Sample

    samples = []
    for i in range(count):
        frames = [f"traj/frame_{max(0, i - k):06d}.png" for k in range(FRAMES_PER_SAMPLE - 1, -1, -1)]
        question = PROMPT.format(history="<image>" * (len(frames) - 1))
        samples.append(Sample(id=f"traj/{i}", images=tuple(frames), index=i, conversations=(
            {"from": "human", "value": question}, {"from": "gpt", "value": "MOVE_FORWARD"})))
    return samples


def fingerprints():
    from janus_job.features.store import Fingerprint

    return [Fingerprint("spatial", {"bench": "loader"}), Fingerprint("vision", {"bench": "loader"})]


def frame_hashes(samples) -> dict[str, str]:
    return {img: hashlib.sha256(img.encode()).hexdigest() for s in samples for img in s.images}


def fill_store(args, samples) -> dict:
    """Writes one spatial object per sample and one vision object per frame (skips existing)."""
    import torch

    from janus_job.features.store import FeatureStore

    store = FeatureStore(args.store, endpoint_url=args.endpoint)
    store.check_reachable()
    store.open(fingerprints(), create=True)
    hashes = frame_hashes(samples)
    present = set(store.list_keys("spatial")) | set(store.list_keys("vision"))
    gen = torch.Generator().manual_seed(0)
    spatial = torch.randn(*args.spatial_shape, generator=gen).to(torch.bfloat16)
    vision = torch.randn(*args.vision_shape, generator=gen).to(torch.bfloat16)
    written = 0
    for sample in samples:
        key = store.spatial_key([hashes[i] for i in sample.images])
        if key not in present:
            store.put_tensor(key, spatial)
            written += 1
    frames = sorted(set(hashes))
    for image in frames:
        key = store.vision_key(hashes[image])
        if key not in present:
            store.put_tensor(key, vision)
            written += 1
    spatial_mb, vision_mb = spatial.numel() * 2 / 1e6, vision.numel() * 2 / 1e6
    return {"objects_written": written, "spatial_mb": spatial_mb, "vision_mb": vision_mb,
            "store_gb": (len(samples) * spatial_mb + len(frames) * vision_mb) / 1e3}


# ---------------------------------------------------------------- one rank's loader


def rank_loop(args, samples, workers: int, pace_s: float, duration: float, rank: int, ranks: int,
              barrier=None) -> dict:
    """One rank's product loader (LoaderFeed + BatchPrefetcher) for `duration` seconds after warm-up."""
    import torch

    from janus_job.config.spec import DataSpec
    from janus_job.data.dataset import JanusCollator, JanusDataset, sample_token_length
    from janus_job.data.sampler import BalancedBatchSampler
    from janus_job.demo.tiny import tiny_processor
    from janus_job.features.store import FeatureStore, StoreFeatureSource
    from janus_job.train.batches import BatchPrefetcher, LoaderFeed

    defaults = {name: field.default for name, field in DataSpec.model_fields.items()}
    store = FeatureStore(args.store, endpoint_url=args.endpoint, cache_dir=args.cache_dir,
                         cache_size_gib=args.cache_gib)
    store.open(fingerprints(), create=False)
    source = StoreFeatureSource(store, frame_hashes=frame_hashes(samples))
    processor = tiny_processor()
    dataset = JanusDataset(samples, processor, features=source, spatial="cached", vision="cached")
    per_image = args.spatial_shape[0] * args.spatial_shape[1] // 4
    sampler = BalancedBatchSampler([sample_token_length(s, per_image) for s in samples], micro_batch_size=1,
                                   world_size=ranks, rank=rank, global_batch_size=ACCUMULATION * ranks, seed=rank)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    collator = JanusCollator(processor.tokenizer.pad_token_id, image_token_id=image_token_id, spatial_merge_size=2)
    if torch.cuda.is_available():
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    settings = SimpleNamespace(num_workers=workers, pin_memory=defaults["pin_memory"],
                               prefetch_factor=defaults["prefetch_factor"], persistent_workers=workers > 0)
    feed = LoaderFeed(dataset, sampler, collator, settings, device)
    batches = BatchPrefetcher(feed, device, defaults["prefetch_batches"])
    try:
        for _ in range(max(2, workers)):  # worker start-up and the first reads are not measured
            next(batches)
        if barrier is not None:
            barrier.wait()
        done = nbytes = 0
        waited = 0.0
        begin = time.perf_counter()
        deadline = begin + duration
        while time.perf_counter() < deadline:
            asked = time.perf_counter()
            batch, _ = next(batches)
            waited += time.perf_counter() - asked
            if pace_s:
                time.sleep(pace_s)  # the step's GPU time
            done += len(batch["sample_ids"])
            spatial = batch["spatial_features"]
            nbytes += batch["vision_features"].numel() * 2 + sum(
                t.numel() * 2 for t in (spatial if isinstance(spatial, list) else [spatial]))
        seconds = time.perf_counter() - begin
    finally:
        batches.close()
    return {"rank": rank, "samples": done, "seconds": seconds, "bytes": nbytes, "waited_s": waited,
            "device": str(device)}


def _rank_child(args, samples, workers, pace_s, duration, rank, ranks, barrier, results) -> None:
    results.put(rank_loop(args, samples, workers, pace_s, duration, rank, ranks, barrier))


def run_ranks(args, samples, workers: int, pace_s: float = 0.0, duration: float = 1.0) -> dict:
    """`--ranks` loaders at once (spawned processes when more than one); their totals."""
    if args.ranks == 1:
        per_rank = [rank_loop(args, samples, workers, pace_s, duration, 0, 1)]
    else:
        ctx = multiprocessing.get_context("spawn")
        barrier, results = ctx.Barrier(args.ranks), ctx.Queue()
        procs = [ctx.Process(target=_rank_child, args=(args, samples, workers, pace_s, duration, r, args.ranks,
                                                       barrier, results)) for r in range(args.ranks)]
        for proc in procs:
            proc.start()
        per_rank = [results.get(timeout=duration + 600) for _ in procs]
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"a rank's loader failed (exit {proc.exitcode})")
    seconds = max(r["seconds"] for r in per_rank)
    total = sum(r["samples"] for r in per_rank)
    rate = total / seconds / args.ranks
    return {"workers": workers, "samples": total, "seconds": round(seconds, 3),
            "samples_per_s_per_rank": rate,
            "mb_per_s_per_rank": sum(r["bytes"] for r in per_rank) / 1e6 / seconds / args.ranks,
            "samples_per_s_per_worker": rate / workers if workers else None,
            "data_wait": max(r["waited_s"] / r["seconds"] for r in per_rank),
            "device": per_rank[0]["device"]}


# ---------------------------------------------------------------- what the step consumes


def newest_step_profile() -> Path | None:
    """The newest GPU step profile in bench/results (its name starts with the date)."""
    found = sorted(p for p in RESULTS_DIR.glob("*step_profile.json") if not json.loads(p.read_text()).get("tiny"))
    return found[-1] if found else None


def consumption(args) -> dict:
    """Samples/s one GPU trains: the argument, or one sample per fastest micro-step of a step profile."""
    if args.consume_per_gpu is not None:
        return {"samples_per_s_per_gpu": args.consume_per_gpu, "source": "--consume-per-gpu", "card": None}
    path = Path(args.step_profile) if args.step_profile else newest_step_profile()
    if path is None:
        raise SystemExit("no step profile in bench/results: give --consume-per-gpu or --step-profile")
    profile = json.loads(path.read_text())
    variants = {name: v["s_per_micro_step"]["micro_step"] for name, v in profile.get("variants", {}).items()
                if v.get("s_per_micro_step", {}).get("micro_step")}
    if not variants:
        raise SystemExit(f"{path} has no variant with s_per_micro_step.micro_step")
    fastest = min(variants, key=variants.get)
    try:
        shown = str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        shown = str(path)
    return {"samples_per_s_per_gpu": 1.0 / variants[fastest], "source": shown, "card": profile.get("card"),
            "variant": fastest, "s_per_micro_step": variants[fastest], "samples_per_micro_step": 1}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="store URL (default: file:// in a temp dir)")
    parser.add_argument("--endpoint", help="S3 endpoint URL (s3:// store without it: a local moto server)")
    parser.add_argument("--samples", type=int, help="distinct samples in the store (default 48; tiny 16)")
    parser.add_argument("--workers", help="data.num_workers values to measure, comma-separated (default 2,4,8)")
    parser.add_argument("--ranks", type=int, default=1, help="ranks loading at once, as on one node")
    parser.add_argument("--duration", type=float, help="seconds measured per row (default 10; tiny 1)")
    parser.add_argument("--paced-workers", type=int, help="workers of the paced run (default: data.num_workers)")
    parser.add_argument("--paced-duration", type=float, help="seconds of the paced run (default 15; tiny 1)")
    parser.add_argument("--consume-per-gpu", type=float, help="samples/s one GPU trains (else from --step-profile)")
    parser.add_argument("--step-profile", help="bench/step_profile.py JSON (default: the newest in bench/results)")
    parser.add_argument("--cache-dir", help="node-local feature cache directory (default: none)")
    parser.add_argument("--cache-gib", type=float, default=0.0)
    parser.add_argument("--tiny", action="store_true", help="CI: tiny objects, short rows")
    parser.add_argument("--out", help="output folder (default $OUT, else bench/results)")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    args.spatial_shape, args.vision_shape = sizes["spatial_shape"], sizes["vision_shape"]
    args.samples = args.samples or sizes["samples"]
    args.workers = args.workers or sizes["workers"]
    args.duration = args.duration or sizes["duration"]
    args.paced_duration = args.paced_duration or sizes["paced_duration"]

    from janus_job.config.spec import DataSpec

    defaults = {name: field.default for name, field in DataSpec.model_fields.items()}
    if args.paced_workers is None:
        args.paced_workers = 1 if args.tiny else defaults["num_workers"]
    consume = consumption(args)
    started = time.perf_counter()
    server = temp = None
    if args.store is None:
        temp = tempfile.TemporaryDirectory(prefix="loader-bench-")
        args.store = Path(temp.name, "store").as_uri()
    elif args.endpoint is None and args.store.startswith("s3://"):
        args.endpoint, server = start_moto()
        import boto3

        boto3.client("s3", endpoint_url=args.endpoint).create_bucket(Bucket=args.store[5:].split("/")[0])
    samples = synthetic_samples(args.samples)
    try:
        fill = fill_store(args, samples)
        rows = [run_ranks(args, samples, int(n), duration=args.duration) for n in args.workers.split(",")]
        pace_s = 1.0 / consume["samples_per_s_per_gpu"]
        paced = run_ranks(args, samples, args.paced_workers, pace_s=pace_s, duration=args.paced_duration)
        paced["step_s"] = pace_s
    finally:
        if server is not None:
            server.stop()
        if temp is not None:
            temp.cleanup()

    need = consume["samples_per_s_per_gpu"]
    best = max(rows, key=lambda r: r["samples_per_s_per_rank"])
    headroom = best["samples_per_s_per_rank"] / need
    for row in rows:
        row["headroom"] = row["samples_per_s_per_rank"] / need
    per_sample_mb = fill["spatial_mb"] + FRAMES_PER_SAMPLE * fill["vision_mb"]
    if headroom >= GOAL_HEADROOM:
        verdict = f"ok: {headroom:.1f}x the step's {need:.2f} samples/s per GPU with {best['workers']} workers"
    else:
        verdict = (f"short: {headroom:.2f}x of the {GOAL_HEADROOM:.0f}x goal at the step's {need:.2f} samples/s "
                   f"per GPU; need {need * GOAL_HEADROOM:.1f} samples/s = {need * GOAL_HEADROOM * per_sample_mb:.0f} "
                   "MB/s per rank: more workers, or a faster store (node-local cache)")
    host_ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    card = card_name()

    print(f"store {args.store} (endpoint {args.endpoint or '-'}), {fill['store_gb']:.2f} GB, host memory "
          f"{host_ram_gb:.0f} GB; {per_sample_mb:.1f} MB per sample (spatial {fill['spatial_mb']:.2f} MB + "
          f"{FRAMES_PER_SAMPLE} x vision {fill['vision_mb']:.2f} MB); {args.ranks} rank(s) on {rows[0]['device']}")
    print_table(rows, [("workers", "workers"), ("samples_per_s_per_rank", "samples/s per rank"),
                       ("mb_per_s_per_rank", "MB/s per rank"), ("samples_per_s_per_worker", "per worker"),
                       ("headroom", "x step")],
                title=f"loader on {card}, as fast as it delivers (prefetch_batches {defaults['prefetch_batches']}, "
                      f"prefetch_factor {defaults['prefetch_factor']})")
    print(f"paced at the step's {pace_s:.3f} s per micro-step ({consume['source']}): {args.paced_workers} workers, "
          f"data_wait {100 * paced['data_wait']:.2f}%, {paced['samples_per_s_per_rank']:.2f} samples/s per rank")
    print(f"step consumes {need:.2f} samples/s per GPU; {verdict}")

    record = {
        "bench": "loader",
        "card": card,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "host_cpus": os.cpu_count(),
        "host_ram_gb": host_ram_gb,
        "tiny": args.tiny,
        "store": args.store,
        "endpoint": args.endpoint,
        "local_moto_server": server is not None,
        "store_gb": fill["store_gb"],
        "samples": args.samples,
        "object_mb": {"spatial": fill["spatial_mb"], "vision": fill["vision_mb"]},
        "mb_per_sample": per_sample_mb,
        "loader": {"prefetch_factor": defaults["prefetch_factor"], "pin_memory": defaults["pin_memory"],
                   "persistent_workers": True, "prefetch_batches": defaults["prefetch_batches"],
                   "micro_batch_size": 1, "sampler": "BalancedBatchSampler"},
        "ranks": args.ranks,
        "rows": rows,
        "paced": paced,
        "consume": consume,
        "headroom": headroom,
        "goal_headroom": GOAL_HEADROOM,
        "verdict": verdict,
        "cache": {"dir": args.cache_dir, "gib": args.cache_gib},
        "wall_s": time.perf_counter() - started,
    }
    path = results_path(card, args.ranks, args.out, prefix="loader-", tag="tiny" if args.tiny else "")
    write_json_atomic(path, record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
