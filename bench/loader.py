"""Feature + sample loading throughput from an S3-protocol store, per worker and per node.

What one training sample costs the data path with cached features (features.mode precomputed):
one spatial object (34x46x2048 bf16 = 6.4 MB) and one vision object per frame (1564x1280 bf16 =
4.0 MB, 9 frames), each fetched, checksum-verified and decoded by janus_job.features.store, then tokenised
and assembled by janus_job.data.dataset.JanusDataset. Samples are read in random order, like a shuffled
epoch, so with the node cache off every read goes to the store.

Workers are separate processes (like DataLoader workers); the table shows samples/s and MB/s for
1 worker and for each --workers count, and compares the node rate with what the trainer consumes
per node (--consume-per-gpu x --gpus-per-node). The target is >= 3x headroom.

Local:    python bench/loader.py                      (starts a moto S3 server on 127.0.0.1; the
                                                      single-process Python server is then the limit)
Cluster:  python bench/loader.py --store s3://bucket/bench --endpoint https://minio:9000 \
            --workers 1,8,32 --consume-per-gpu 2.0 --gpus-per-node 8   (AWS_* credentials in env)
CI:       python bench/loader.py --tiny
Writes loader[_tiny].json to $OUT if set, else bench/results/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL_HEADROOM = 3.0
FRAMES_PER_SAMPLE = 9
PROMPT = "Go to the kitchen.\n This is your historical observation:{history}\n This is your current observation:<image>"


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
    import hashlib

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
    for image in sorted(set(hashes)):
        key = store.vision_key(hashes[image])
        if key not in present:
            store.put_tensor(key, vision)
            written += 1
    return {"objects_written": written,
            "spatial_mb": spatial.numel() * 2 / 1e6, "vision_mb": vision.numel() * 2 / 1e6}


def worker_main(args, samples, worker: int, ready, go, queue) -> None:
    """One loader worker: random samples through the real dataset path until the deadline."""
    from janus_job.data.dataset import JanusDataset
    from janus_job.demo.tiny import tiny_processor
    from janus_job.features.store import FeatureStore, StoreFeatureSource

    store = FeatureStore(args.store, endpoint_url=args.endpoint, cache_dir=args.cache_dir,
                         cache_size_gib=args.cache_gib)
    store.open(fingerprints(), create=False)
    source = StoreFeatureSource(store, frame_hashes=frame_hashes(samples))
    dataset = JanusDataset(samples, tiny_processor(), features=source, spatial="cached", vision="cached")
    rng = random.Random(worker)
    dataset[rng.randrange(len(samples))]  # warm: imports, connection
    ready.put(worker)
    go.wait()
    done = nbytes = 0
    begin = time.perf_counter()
    deadline = begin + args.duration
    while time.perf_counter() < deadline:
        item = dataset[rng.randrange(len(samples))]
        nbytes += item["spatial_features"].numel() * 2 + item["vision_features"].numel() * 2
        done += 1
    queue.put((worker, done, nbytes, time.perf_counter() - begin))


def measure(args, samples, workers: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=worker_main, args=(args, samples, w, ready, go, queue)) for w in range(workers)]
    for proc in procs:
        proc.start()
    for _ in procs:  # all workers imported and connected: start the clock together
        ready.get(timeout=args.startup)
    go.set()
    results = [queue.get(timeout=args.duration + 300) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"a loader worker failed (exit {proc.exitcode})")
    total = sum(r[1] for r in results)
    seconds = max(r[3] for r in results)
    mbytes = sum(r[2] for r in results) / 1e6
    return {"workers": workers, "samples": total, "seconds": round(seconds, 3),
            "samples_per_s": total / seconds, "mb_per_s": mbytes / seconds,
            "samples_per_s_per_worker": total / seconds / workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="store URL (default: a bucket on a local moto server)")
    parser.add_argument("--endpoint", help="S3 endpoint URL (default: the local moto server)")
    parser.add_argument("--samples", type=int, default=48, help="distinct samples in the store")
    parser.add_argument("--workers", default="1,4,8", help="worker counts per node to measure")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of measurement per row")
    parser.add_argument("--startup", type=float, default=300.0, help="seconds allowed for workers to start")
    parser.add_argument("--consume-per-gpu", type=float, default=2.0, help="samples/s one GPU trains at")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cache-dir", help="node-local cache directory (default: no cache)")
    parser.add_argument("--cache-gib", type=float, default=0.0)
    parser.add_argument("--tiny", action="store_true", help="CI mode: small objects, short rows")
    parser.add_argument("--out", help="output folder (default $OUT, else bench/results)")
    args = parser.parse_args()
    if args.tiny:
        args.samples, args.duration = 6, 1.0
        args.workers = "1,2"
        args.spatial_shape, args.vision_shape = (2, 4, 2048), (8, 1280)
    else:
        args.spatial_shape, args.vision_shape = (34, 46, 2048), (34 * 46, 1280)

    server = None
    if args.endpoint is None and (args.store is None or args.store.startswith("s3://")):
        args.endpoint, server = start_moto()
        import boto3

        bucket = "loader-bench"
        boto3.client("s3", endpoint_url=args.endpoint).create_bucket(Bucket=bucket)
        args.store = args.store or f"s3://{bucket}/features"
    samples = synthetic_samples(args.samples)
    try:
        fill = fill_store(args, samples)
        rows = [measure(args, samples, int(n)) for n in args.workers.split(",")]
    finally:
        if server is not None:
            server.stop()

    need = args.consume_per_gpu * args.gpus_per_node
    best = max(rows, key=lambda r: r["samples_per_s"])
    headroom = best["samples_per_s"] / need
    per_sample_mb = fill["spatial_mb"] + FRAMES_PER_SAMPLE * fill["vision_mb"]
    if headroom >= GOAL_HEADROOM:
        verdict = f"ok: {headroom:.1f}x the trainer's {need:.1f} samples/s per node"
    else:
        single = rows[0]["samples_per_s_per_worker"]
        scaling = best["samples_per_s_per_worker"] / single if single else 0
        limit = (f"the store's bandwidth or this host's {os.cpu_count()} CPU cores (per-worker rate falls "
                 "as workers are added; fetch + sha256 + decode cost CPU per byte)" if scaling < 0.7
                 else "worker count (per-worker rate holds; add workers)")
        verdict = (f"short: {headroom:.2f}x of {GOAL_HEADROOM:.0f}x goal; need {need * GOAL_HEADROOM:.1f} samples/s "
                   f"= {need * GOAL_HEADROOM * per_sample_mb:.0f} MB/s; limited by {limit}")

    print(f"store {args.store} (endpoint {args.endpoint or '-'}); {per_sample_mb:.1f} MB per sample "
          f"(spatial {fill['spatial_mb']:.2f} MB + {FRAMES_PER_SAMPLE} x vision {fill['vision_mb']:.2f} MB)")
    print(f"{'workers':>8} {'samples/s':>10} {'MB/s':>9} {'per worker':>11}")
    for row in rows:
        print(f"{row['workers']:>8} {row['samples_per_s']:>10.2f} {row['mb_per_s']:>9.1f} "
              f"{row['samples_per_s_per_worker']:>11.2f}")
    print(f"trainer consumes {need:.1f} samples/s per node ({args.consume_per_gpu} x {args.gpus_per_node} GPUs); "
          f"{verdict}")

    record = {
        "host": socket.gethostname(),
        "card": None,  # CPU/network benchmark: no GPU involved
        "store": args.store,
        "endpoint": args.endpoint,
        "local_moto_server": server is not None,
        "tiny": args.tiny,
        "object_mb": {"spatial": fill["spatial_mb"], "vision": fill["vision_mb"]},
        "mb_per_sample": per_sample_mb,
        "rows": rows,
        "consume": {
            "samples_per_s_per_gpu": args.consume_per_gpu,
            "gpus_per_node": args.gpus_per_node,
            "samples_per_s_per_node": need,
        },
        "headroom": headroom,
        "goal_headroom": GOAL_HEADROOM,
        "verdict": verdict,
        "cache": {"dir": args.cache_dir, "gib": args.cache_gib},
    }
    out = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("loader_tiny.json" if args.tiny else "loader.json")
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
