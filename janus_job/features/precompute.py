"""The precompute Job: frozen-encoder features of every sample into the feature store.

Process model (docs/features.md): the chart's Indexed Job runs one pod per
``JOB_COMPLETION_INDEX``; a pod runs one worker process per local GPU (``CUDA_VISIBLE_DEVICES``
set to that GPU), so there are ``pods x gpus_per_pod`` workers and worker
``index * gpus_per_pod + local`` owns the samples whose position modulo the worker count is its
number, and the frames whose path hash lands on it (each distinct frame once, for the vision
tower). A worker:

1. hashes its frames (the frame identity), lists what the store already holds and keeps only
   the missing keys (so a rerun after a kill redoes nothing that finished);
2. streams batches of equal frame count and frame size through the batched frame-causal pass,
   with frame decode in a thread pool ahead of the GPU and uploads in a background pool behind it;
3. writes its frame index and its marker once every upload has landed.

Whoever sees every worker marker after writing its own checks coverage and writes the final
``COMPLETE.json`` that the trainer waits on.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from janus_job.data.annotations import AnnotationSet, Sample, load_spec_annotations
from janus_job.data.dataset import bad_frame_samples
from janus_job.errors import JobError
from janus_job.features.encoders import Encoders, load_encoders
from janus_job.features.store import FeatureStore, Fingerprint
from janus_job.io import read_bytes

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------- sharding


def frame_owner(image: str, workers: int) -> int:
    """The worker that computes a frame's vision features (stable across runs and hosts)."""
    return int.from_bytes(hashlib.sha256(image.encode()).digest()[:8], "big") % workers


def worker_samples(annotations: AnnotationSet, worker: int, workers: int) -> list[Sample]:
    return [s for s in annotations.samples if s.index % workers == worker]


def marker_name(worker: int, workers: int) -> str:
    return f"worker-{worker:05d}-of-{workers:05d}.json"


# ---------------------------------------------------------------- progress


class Progress:
    """A rate line every ``interval_s`` (newline-terminated: reads well in `kubectl logs`)."""

    def __init__(self, label: str, total: int, unit: str, interval_s: float, stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit, self.interval_s = label, total, unit, interval_s
        self.stream = stream or sys.stdout
        self.done = 0
        self.bytes = 0
        self.start = time.monotonic()
        self.last = self.start

    def update(self, count: int, nbytes: int) -> None:
        self.done += count
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self.emit()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else time.strftime("%H:%M:%S", time.gmtime(left))
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.1f}%) | {rate:.2f} {self.unit}/s | "
            f"{self.bytes / elapsed / 1e6:.1f} MB/s | ETA {eta}"
        )

    def emit(self) -> None:
        print(self.line(), file=self.stream, flush=True)


# ---------------------------------------------------------------- the worker


@dataclass
class WorkerReport:
    worker: int
    workers: int
    samples: int = 0
    spatial_keys: int = 0
    computed_spatial: int = 0
    skipped_spatial: int = 0
    vision_frames: int = 0
    computed_vision: int = 0
    skipped_vision: int = 0
    bytes_uploaded: int = 0
    verified_stored: int = 0  # objects of earlier runs read back and checked before being reused
    repaired: int = 0  # quarantined or corrupt objects recomputed
    seconds: float = 0.0
    # sample id -> why, for this worker's samples left out under data.on_bad_sample skip (a frame is
    # missing or unreadable); COMPLETE.json gathers them for the trainer
    bad_samples: dict[str, str] = field(default_factory=dict)


class _Uploads:
    """Background uploads with a bound on bytes in flight; the first failure is re-raised."""

    def __init__(self, store: FeatureStore, threads: int, max_in_flight: int) -> None:
        self.store = store
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="upload")
        self.slots = threading.BoundedSemaphore(max_in_flight)
        self.pending: deque[Future] = deque()

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self.slots.acquire()
        future = self.pool.submit(self.store.put_tensor, key, tensor)
        future.add_done_callback(lambda _f: self.slots.release())
        self.pending.append(future)
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()
        self.pool.shutdown(wait=True)


class BadFrame(JobError):
    """A frame that is missing or cannot be decoded; ``reason`` says which, without the path."""

    def __init__(self, message: str, path: str, reason: str) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


class _FrameReader:
    """Reads each frame once: bytes -> content hash and decoded, preprocessed tensor (LRU-bounded)."""

    def __init__(self, endpoint_url: str | None, target_width: int, patch: int, threads: int, keep: int,
                 where: Callable[[str], str] = str) -> None:
        self.endpoint_url = endpoint_url
        self.where = where  # frame path -> how errors name it (annotation file, record, path)
        self.target_width = target_width
        self.patch = patch
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.keep = keep
        self.decoded: OrderedDict[str, Future] = OrderedDict()
        self.lock = threading.Lock()

    def read(self, path: str) -> bytes:
        try:
            return read_bytes(path, self.endpoint_url)
        except FileNotFoundError as err:
            raise BadFrame(f"frame {self.where(path)} does not exist; check data.image_root and the annotation's "
                           "images", path, "does not exist") from err
        except OSError as err:
            raise BadFrame(f"cannot read frame {self.where(path)}: {err}", path, f"cannot be read ({err})") from err

    def hash_all(self, paths: Sequence[str], bad: dict[str, str] | None = None) -> dict[str, str]:
        """path -> content hash; with ``bad`` a frame that cannot be read goes there (path -> why)
        instead of raising."""
        def digest(path: str) -> str | None:
            try:
                return hashlib.sha256(self.read(path)).hexdigest()
            except BadFrame as err:
                if bad is None:
                    raise
                bad[path] = err.reason
                return None

        hashed = dict(zip(paths, self.pool.map(digest, paths)))
        return {path: value for path, value in hashed.items() if value is not None}

    def _decode(self, path: str) -> torch.Tensor:
        from janus_job.data import frames as frame_ops

        blob = self.read(path)
        try:
            rgb = frame_ops.load_frame(blob, name=self.where(path))
            return frame_ops.preprocess_for_vggt(rgb, self.target_width, self.patch)
        except JobError as err:
            raise BadFrame(str(err), path, getattr(err, "reason", str(err))) from err.__cause__

    def request(self, path: str) -> Future:
        with self.lock:
            future = self.decoded.get(path)
            if future is None:
                future = self.pool.submit(self._decode, path)
                self.decoded[path] = future
                while len(self.decoded) > self.keep:
                    self.decoded.popitem(last=False)
            else:
                self.decoded.move_to_end(path)
            return future

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _batches(items: list, size: int, group: Callable[[Any], Any]) -> list[list]:
    """Consecutive runs of equal ``group`` value, cut to ``size``."""
    out: list[list] = []
    for item in items:
        if out and len(out[-1]) < size and group(out[-1][0]) == group(item):
            out[-1].append(item)
        else:
            out.append([item])
    return out


def _queue_uploads(group: list, outputs: Any, uploads: Any, progress: Any) -> int:
    """Queues each (key, _) of `group` with its output as a bf16 CPU tensor; returns the bytes queued."""
    import torch

    nbytes = 0
    for (key, _input), tensor in zip(group, outputs):
        tensor = tensor.to(torch.bfloat16).cpu().clone()
        uploads.put(key, tensor)
        nbytes += tensor.numel() * tensor.element_size()
    progress.update(len(group), nbytes)
    return nbytes


def _by_shape(pairs: list[tuple[Any, torch.Tensor]]) -> list[list[tuple[Any, torch.Tensor]]]:
    groups: dict[tuple, list] = {}
    for pair in pairs:
        groups.setdefault(tuple(pair[1].shape), []).append(pair)
    return list(groups.values())


def run_worker(
    spec: Any,
    encoders: Encoders,
    *,
    worker: int,
    workers: int,
    annotations: AnnotationSet | None = None,
    store: FeatureStore | None = None,
    progress_interval_s: float = 30.0,
    pace_s: float = 0.0,
    decode_threads: int = 8,
    upload_threads: int = 4,
    prefetch_batches: int = 3,
    stream: TextIO | None = None,
) -> WorkerReport:
    """Computes this worker's missing features and writes its marker. Idempotent."""
    import torch

    stream = stream or sys.stdout
    started = time.monotonic()
    annotations = annotations or load_spec_annotations(spec)
    store = store or FeatureStore.from_spec(spec, local_cache=False)
    store.check_reachable()
    store.open(encoders.fingerprints(), create=True)
    store.clean_temp_files()
    vision_on = encoders.vision is not None
    report = WorkerReport(worker=worker, workers=workers)
    label = f"precompute worker {worker}/{workers}"

    samples = worker_samples(annotations, worker, workers)
    paths = {image: path for s in annotations.samples for image, path in zip(s.images, s.frame_paths)}
    my_frames = [img for img in annotations.unique_images() if frame_owner(img, workers) == worker] if vision_on else []
    needed = sorted({img for s in samples for img in s.images} | set(my_frames))
    reader = _FrameReader(spec.features.endpoint_url, encoders.target_width, encoders.patch,
                          decode_threads, keep=max(64, 4 * prefetch_batches * spec.precompute.batch_size),
                          where=annotations.describe_frame)
    uploads = _Uploads(store, upload_threads, max_in_flight=4 * upload_threads)
    # under data.on_bad_sample skip: path -> why, for frames that are missing or do not decode; the
    # samples reading them are left out (recorded in the marker), the others are computed
    bad_frames: dict[str, str] | None = {} if spec.data.on_bad_sample == "skip" else None

    def bad_frame(err: BadFrame) -> None:
        if bad_frames is None:
            raise err
        bad_frames[err.path] = err.reason

    try:
        print(f"{label}: hashing {len(needed)} frames of {len(samples)} samples", file=stream, flush=True)
        hashes = reader.hash_all([paths[img] for img in needed], bad_frames)
        frame_hash = {img: hashes[paths[img]] for img in needed if paths[img] in hashes}
        store.write_frame_index(annotations.digest, marker_name(worker, workers), frame_hash)

        quarantined = store.quarantined()
        todo: dict[str, Sample] = {}
        for sample in samples:
            if all(i in frame_hash for i in sample.images):
                todo.setdefault(store.spatial_key([frame_hash[i] for i in sample.images]), sample)
        present = _sound(store, set(store.list_keys("spatial")), todo, quarantined, report, upload_threads)
        report.samples, report.spatial_keys = len(samples), len(todo)
        spatial_todo = [(key, s) for key, s in todo.items() if key not in present]
        report.skipped_spatial = len(todo) - len(spatial_todo)
        spatial_todo.sort(key=lambda pair: (pair[1].num_frames, pair[1].index))
        batches = _batches(spatial_todo, spec.precompute.batch_size, lambda pair: pair[1].num_frames)
        progress = Progress(f"{label} spatial", len(spatial_todo), "samples", progress_interval_s, stream)
        print(f"{label}: {len(spatial_todo)} spatial objects to compute, {report.skipped_spatial} already stored",
              file=stream, flush=True)

        def request(batch: list) -> list:
            return [[reader.request(p) for p in sample.frame_paths] for _key, sample in batch]

        ahead: deque[list] = deque(request(b) for b in batches[:prefetch_batches])
        for position, batch in enumerate(batches):
            if position + prefetch_batches < len(batches):
                ahead.append(request(batches[position + prefetch_batches]))
            futures = ahead.popleft()
            stacked = []
            for (key, _sample), fs in zip(batch, futures):
                try:
                    stacked.append((key, torch.stack([f.result() for f in fs])))
                except BadFrame as err:
                    bad_frame(err)
            for group in _by_shape(stacked):
                out = encoders.spatial(torch.stack([t for _k, t in group]))
                report.computed_spatial += len(group)
                report.bytes_uploaded += _queue_uploads(group, out, uploads, progress)
            if pace_s:
                time.sleep(pace_s)
        if spatial_todo:
            progress.emit()

        if vision_on:
            keyed: dict[str, str] = {}
            for img in my_frames:
                if img in frame_hash:
                    keyed.setdefault(store.vision_key(frame_hash[img]), img)
            present = _sound(store, set(store.list_keys("vision")), keyed, quarantined, report, upload_threads)
            unique_todo = sorted(((k, img) for k, img in keyed.items() if k not in present), key=lambda p: p[1])
            report.vision_frames = len(keyed)
            report.skipped_vision = len(keyed) - len(unique_todo)
            progress = Progress(f"{label} vision", len(unique_todo), "frames", progress_interval_s, stream)
            size = max(1, spec.precompute.batch_size * 4)
            for start in range(0, len(unique_todo), size):
                chunk = unique_todo[start:start + size]
                decoded = []
                for key, img in chunk:
                    try:
                        decoded.append((key, reader.request(paths[img]).result()))
                    except BadFrame as err:
                        bad_frame(err)
                for group in _by_shape(decoded):
                    outs = encoders.vision([t for _k, t in group])
                    report.computed_vision += len(group)
                    report.bytes_uploaded += _queue_uploads(group, outs, uploads, progress)
                if pace_s:
                    time.sleep(pace_s)
            if unique_todo:
                progress.emit()
        uploads.drain()
        for key in quarantined & (set(todo) | (set(keyed) if vision_on else set())):
            store.release(key)  # recomputed above
    finally:
        reader.close()
    if bad_frames:
        report.bad_samples = bad_frame_samples(samples, bad_frames)
        for message in report.bad_samples.values():
            print(f"{label}: bad_sample {message} (data.on_bad_sample: skip: left out of training)",
                  file=stream, flush=True)
    report.seconds = round(time.monotonic() - started, 3)
    store.write_record(f"{store.marker_prefix(annotations.digest)}/{marker_name(worker, workers)}", asdict(report))
    shown = dict(asdict(report), bad_samples=len(report.bad_samples))
    print(f"{label}: done {json.dumps(shown, sort_keys=True)}", file=stream, flush=True)
    return report


def _sound(store: FeatureStore, listed: set[str], wanted: Any, quarantined: set[str], report: WorkerReport,
           threads: int) -> set[str]:
    """The wanted keys already stored and sound. Quarantined objects are left out (recomputed),
    and every stored object is read back and checked first, so COMPLETE.json vouches for each
    object it covers: those of this run were written whole from memory, the others were checked."""
    stored = (set(wanted) & listed) - quarantined
    corrupt = set(store.check_objects(stored, threads))
    report.verified_stored += len(stored)
    report.repaired += len(corrupt) + len(set(wanted) & quarantined)
    return stored - corrupt



# ---------------------------------------------------------------- completion


def finalize(spec: Any, encoders_fingerprints: list[Fingerprint], workers: int, *,
             annotations: AnnotationSet | None = None, store: FeatureStore | None = None,
             stream: TextIO | None = None) -> dict | None:
    """Writes COMPLETE.json once every worker's marker exists and every sample is covered."""
    stream = stream or sys.stdout
    annotations = annotations or load_spec_annotations(spec)
    store = store or FeatureStore.from_spec(spec, local_cache=False)
    store.open(encoders_fingerprints, create=False)
    prefix = store.marker_prefix(annotations.digest)
    present = {key.rsplit("/", 1)[-1] for key in store.list_keys(prefix)}
    waiting = [w for w in range(workers) if marker_name(w, workers) not in present]
    if waiting:
        print(f"precompute: {workers - len(waiting)}/{workers} workers finished; the last one writes COMPLETE.json",
              file=stream, flush=True)
        return None
    vision = any(fp.kind == "vision" for fp in encoders_fingerprints)
    index = store.frame_index(annotations.digest)
    reports = [store.read_record(f"{prefix}/{marker_name(w, workers)}") or {} for w in range(workers)]
    bad_samples = {sample_id: why for r in reports for sample_id, why in (r.get("bad_samples") or {}).items()}
    missing = [s for s in store.missing(annotations.samples, index, vision=vision) if s not in bad_samples]
    if missing:
        raise JobError(
            f"all {workers} precompute workers finished but {len(missing)} samples lack features "
            f"(first: {missing[:3]}); rerun the precompute Job"
        )
    record = {
        "annotations": annotations.path,
        "annotations_digest": annotations.digest,
        "samples": len(annotations),
        "workers": workers,
        "fingerprints": {fp.kind: fp.id for fp in encoders_fingerprints},
        "spatial_keys": sum(r.get("spatial_keys", 0) for r in reports),
        "vision_frames": sum(r.get("vision_frames", 0) for r in reports),
        "frame_index": store.frame_index_checksums(annotations.digest),
        "verified": {"stored_objects_checked": sum(r.get("verified_stored", 0) for r in reports),
                     "repaired": sum(r.get("repaired", 0) for r in reports)},
        # left out under data.on_bad_sample skip (missing or unreadable frames); the trainer drops them
        "bad_samples": dict(sorted(bad_samples.items())),
    }
    store.write_record(f"{prefix}/COMPLETE.json", record)
    left_out = (f", {len(bad_samples)} left out with missing or unreadable frames (bad_samples={len(bad_samples)}, "
                "data.on_bad_sample: skip)") if bad_samples else ""
    print(f"precompute: complete, {len(annotations) - len(bad_samples)} samples covered{left_out}; wrote "
          f"{prefix}/COMPLETE.json", file=stream, flush=True)
    return record


# ---------------------------------------------------------------- the pod


def run_pod(
    spec: Any,
    spec_path: str,
    *,
    index: int,
    local_worker: int | None = None,
    progress_interval_s: float = 30.0,
    pace_s: float = 0.0,
    report_path: str | None = None,
) -> list[WorkerReport]:
    """One pod of the Indexed Job: one worker per local GPU (child processes), then finalize."""
    import torch

    pods, per_pod = spec.precompute.pods, spec.precompute.gpus_per_pod
    if not 0 <= index < pods:
        raise JobError(f"completion index {index} is outside precompute.pods={pods}")
    workers = pods * per_pod
    cuda = torch.cuda.is_available()
    if cuda and local_worker is None and torch.cuda.device_count() < per_pod:
        raise JobError(
            f"precompute.gpus_per_pod is {per_pod} but this pod sees {torch.cuda.device_count()} GPUs"
        )

    if local_worker is None:  # fail fast, once, before starting any worker
        load_spec_annotations(spec)
        FeatureStore.from_spec(spec, local_cache=False).check_reachable()

    reports: list[WorkerReport] = []
    if local_worker is not None or per_pod == 1:
        local = local_worker or 0
        device = "cuda:0" if cuda else "cpu"  # the parent sets CUDA_VISIBLE_DEVICES per child
        encoders = load_encoders(spec, device)
        reports.append(run_worker(spec, encoders, worker=index * per_pod + local, workers=workers,
                                  progress_interval_s=progress_interval_s, pace_s=pace_s))
        fingerprints = encoders.fingerprints()
    else:
        children = []
        for local in range(per_pod):
            env = dict(os.environ)
            if cuda:
                env["CUDA_VISIBLE_DEVICES"] = str(local)
            command = [sys.executable, "-m", "janus_job.cli", "precompute", "--spec", spec_path,
                       "--index", str(index), "--local-worker", str(local),
                       "--progress-interval", str(progress_interval_s), "--pace-s", str(pace_s)]
            children.append(subprocess.Popen(command, env=env))
        failed = [local for local, child in enumerate(children) if child.wait() != 0]
        if failed:
            raise JobError(f"precompute workers {failed} of pod {index} failed (see their log lines above); "
                           "the Job retries this index and the rerun skips finished work")
        fingerprints = _fingerprints_from_store(spec)
    if report_path:
        with open(report_path, "w") as handle:
            json.dump([asdict(r) for r in reports], handle)
    if local_worker is None:
        finalize(spec, fingerprints, workers)
    return reports


def _fingerprints_from_store(spec: Any) -> list[Fingerprint]:
    """The fingerprints the children just opened the store with (the parent loads no weights)."""
    store = FeatureStore.from_spec(spec, local_cache=False)
    found = []
    for kind in ("spatial", "vision"):
        record = store.manifest(kind)
        if record is not None and (kind == "spatial" or spec.features.cache_vision):
            found.append(Fingerprint(record["kind"], record["fields"]))
    return found
