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

from janus_job.annotations import AnnotationSet, Sample, load_annotations, read_bytes
from janus_job.errors import JobError
from janus_job.store import FeatureStore, Fingerprint, state_dict_digest

if TYPE_CHECKING:
    import torch

# Bump when the cached function's code changes in a way that changes its output.
SPATIAL_FUNCTION = "janus-spatial-1: frame-causal VGGT aggregator, layer depth-2, frame+global halves, last frame, even patch grid"
VISION_FUNCTION = "janus-vision-1: Qwen2.5-VL vision blocks before the merger, natural merge-unit order, even patch grid"
STORED_DTYPE = "bfloat16"
TINY_TARGET_WIDTH = 112
TINY_SEED = 1234

# Per-sample GPU costs on one H100 used by `features estimate` (issue 7's measurements at the
# official geometry: one batched 9-frame VGGT pass 0.323 s, the vision tower 0.312 s per
# 9-image sample). Spatial cost is scaled linearly with the frame count.
H100_SPATIAL_S_PER_9_FRAME_SAMPLE = 0.323
H100_VISION_S_PER_FRAME = 0.312 / 9


# ---------------------------------------------------------------- encoders and fingerprints


@dataclass
class Encoders:
    """The two frozen functions on one device, with the fingerprints that name them."""

    device: str
    target_width: int
    patch: int
    merge: int
    spatial: Callable[[torch.Tensor], torch.Tensor]  # (B, S, 3, H, W) -> (B, h, w, C)
    spatial_fingerprint: Fingerprint
    vision: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None  # frames -> (n, C) each
    vision_fingerprint: Fingerprint | None = None

    def fingerprints(self) -> list[Fingerprint]:
        return [fp for fp in (self.spatial_fingerprint, self.vision_fingerprint) if fp is not None]


def _compute_mode(device: str) -> str:
    return "bf16-autocast" if str(device).startswith("cuda") else "float32"


def spatial_fingerprint(weights_sha256: str, config: Any, target_width: int, compute: str) -> Fingerprint:
    return Fingerprint(
        "spatial",
        {
            "function": SPATIAL_FUNCTION,
            "weights_sha256": weights_sha256,
            "architecture": config.to_dict(),
            "target_width": target_width,
            "patch": config.patch_size,
            "layer": config.feature_layer,
            "compute": compute,
            "stored_dtype": STORED_DTYPE,
        },
    )


def vision_fingerprint(weights_sha256: str, vision_config: Any, processor: Any, target_width: int,
                       compute: str) -> Fingerprint:
    arch = vision_config.to_dict() if hasattr(vision_config, "to_dict") else dict(vision_config)
    arch = {k: v for k, v in arch.items() if not k.startswith(("_", "transformers_version", "torch_dtype", "dtype"))}
    return Fingerprint(
        "vision",
        {
            "function": VISION_FUNCTION,
            "weights_sha256": weights_sha256,
            "architecture": json.loads(json.dumps(arch, default=str)),
            "target_width": target_width,
            "image_mean": [float(x) for x in processor.image_mean],
            "image_std": [float(x) for x in processor.image_std],
            "min_pixels": int(getattr(processor, "min_pixels", 0) or 0),
            "max_pixels": int(getattr(processor, "max_pixels", 0) or 0),
            "compute": compute,
            "stored_dtype": STORED_DTYPE,
        },
    )


def frozen_visual_digest(state_dict: Any) -> str:
    """The vision tower's weights without the merger (trainable in JanusVLN, so not cached)."""
    return state_dict_digest({k: v for k, v in state_dict.items() if not k.startswith("merger.")})


def _spatial_fn(aggregator: Any, device: str) -> Callable:
    import torch

    from janus_job.vggt import spatial_features

    def run(frames: torch.Tensor) -> torch.Tensor:
        frames = frames.to(device, non_blocking=True)
        if str(device).startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return spatial_features(aggregator, frames, mode="batched")
        return spatial_features(aggregator, frames, mode="batched")

    return run


def _vision_fn(visual: Any, processor: Any, device: str, patch: int, merge: int) -> Callable:
    import torch

    from janus_job import frames as frame_ops
    from janus_job.model import vision_tower_features

    def run(images: list[torch.Tensor]) -> list[torch.Tensor]:
        cropped = [frame_ops.crop_to_even_patch_grid(img, patch, merge) for img in images]
        out = processor(images=cropped, return_tensors="pt", do_rescale=False)
        grid = out["image_grid_thw"].to(torch.long)
        for img, (_, gh, gw) in zip(cropped, grid.tolist()):
            if (gh * patch, gw * patch) != tuple(img.shape[-2:]):
                raise JobError(
                    f"the Qwen image processor resized a {img.shape[-1]}x{img.shape[-2]} frame "
                    f"(data.min_pixels/max_pixels); cached vision features need the unresized frame"
                )
        return vision_tower_features(visual, out["pixel_values"].to(device), grid.to(device))

    return run


def tiny_frozen_encoders(seed: int = TINY_SEED) -> tuple[Any, Any]:
    """The seeded random tiny VGGT aggregator and Qwen2.5-VL vision tower (fp32, CPU): what
    `tiny_encoders` runs and what the demo's tiny checkpoints hold."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from janus_job.tiny import tiny_qwen_config
    from janus_job.vggt import FrameCausalAggregator, VGGTAggregatorConfig

    torch.manual_seed(seed)
    aggregator = FrameCausalAggregator(VGGTAggregatorConfig.tiny())
    visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(tiny_qwen_config().vision_config)
    return aggregator, visual


def tiny_encoders(device: str = "cpu", *, vision: bool = True, target_width: int = TINY_TARGET_WIDTH,
                  seed: int = TINY_SEED) -> Encoders:
    """Seeded random tiny encoders (tests, the demo): the same code paths at CPU speed."""
    from janus_job.tiny import tiny_image_processor

    aggregator, visual = tiny_frozen_encoders(seed)
    config = aggregator.config
    aggregator = aggregator.to(device).eval()
    encoders = Encoders(
        device=device,
        target_width=target_width,
        patch=config.patch_size,
        merge=2,
        spatial=_spatial_fn(aggregator, device),
        spatial_fingerprint=spatial_fingerprint(
            state_dict_digest(aggregator.state_dict()), config, target_width, _compute_mode(device)
        ),
    )
    if vision:
        visual = visual.to(device).eval()
        processor = tiny_image_processor(max_pixels=4096 * 28 * 28)
        encoders.vision = _vision_fn(visual, processor, device, config.patch_size, 2)
        encoders.vision_fingerprint = vision_fingerprint(
            frozen_visual_digest(visual.state_dict()), visual.config, processor, target_width, _compute_mode(device)
        )
    return encoders


def read_qwen_visual(qwen: str) -> tuple[dict, Any]:
    """The ``visual.*`` tensors of a Qwen2.5-VL checkpoint as stored (names without the prefix),
    and its vision config."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from janus_job.model import local_copy

    local = local_copy(qwen)
    config = AutoConfig.from_pretrained(local)
    files = sorted(f for f in os.listdir(local) if f.endswith(".safetensors"))
    if not files:
        raise JobError(f"model.qwen {qwen}: no .safetensors files in {local}")
    state = {}
    for name in files:
        with safe_open(os.path.join(local, name), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                for prefix in ("visual.", "model.visual."):
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = handle.get_tensor(key)
    return state, config.vision_config


def load_qwen_visual(qwen: str, device: str, dtype: Any) -> tuple[Any, Any, str]:
    """Only the vision tower of a Qwen2.5-VL checkpoint, its config and the digest of its frozen
    weights as stored in the checkpoint (the same whatever dtype the tower is run in)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    state, vision_config = read_qwen_visual(qwen)
    # Built for real, not on "meta": non-persistent buffers (rotary tables) are not in the checkpoint.
    visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config)
    try:
        visual.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise JobError(f"model.qwen {qwen}: its visual.* tensors do not fit the vision config: {err}") from err
    return visual.to(device=device, dtype=dtype).eval(), vision_config, frozen_visual_digest(state)


def load_encoders(spec: Any, device: str, *, vision: bool | None = None, vggt_config: Any = None,
                  target_width: int | None = None) -> Encoders:
    """The real encoders of a job spec (VGGT-1B aggregator, Qwen2.5-VL vision tower).

    ``vggt_config`` / ``target_width`` default to VGGT-1B and JanusVLN's 644; tests pass tiny ones.
    """
    import torch

    from janus_job import frames as frame_ops
    from janus_job.vggt import VGGTAggregatorConfig, load_aggregator

    config = vggt_config or VGGTAggregatorConfig()
    width = target_width or frame_ops.VGGT_TARGET_WIDTH
    aggregator = load_aggregator(spec.model.vggt, config, device, torch.float32).eval()
    compute = _compute_mode(device)
    encoders = Encoders(
        device=device,
        target_width=width,
        patch=frame_ops.PATCH_SIZE,
        merge=frame_ops.MERGE_SIZE,
        spatial=_spatial_fn(aggregator, device),
        spatial_fingerprint=spatial_fingerprint(state_dict_digest(aggregator.state_dict()), config, width, compute),
    )
    if spec.features.cache_vision if vision is None else vision:
        from janus_job.data import load_processor
        from janus_job.model import local_copy

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        visual, vision_config, digest = load_qwen_visual(spec.model.qwen, device, dtype)
        processor = load_processor(local_copy(spec.model.qwen), spec.data.min_pixels, spec.data.max_pixels).image_processor
        encoders.vision = _vision_fn(visual, processor, device, frame_ops.PATCH_SIZE, frame_ops.MERGE_SIZE)
        encoders.vision_fingerprint = vision_fingerprint(
            digest, vision_config, processor, width, compute
        )
    return encoders


def expected_fingerprints(spec: Any, *, compute: str = "bf16-autocast", hash_weights: bool = True,
                          stored: FeatureStore | None = None, tiny: bool = False) -> list[Fingerprint]:
    """The fingerprints a consumer (trainer, verify) opens the store with.

    ``hash_weights`` loads the spec's weights on CPU and hashes them (seconds to a minute for
    VGGT-1B + the vision tower). Without it, the weight digests are taken from ``stored``'s
    manifests and every other field (function version, architecture, geometry, dtype) is still
    checked; use that where the weights are not at hand, knowing a weight swap goes unnoticed.
    """
    vision = bool(spec.features.cache_vision)
    if tiny:
        found = tiny_encoders("cpu", vision=vision).fingerprints()
    elif hash_weights:
        found = load_encoders(spec, "cpu", vision=vision).fingerprints()
    else:
        from janus_job import frames as frame_ops
        from janus_job.vggt import VGGTAggregatorConfig

        if stored is None:
            raise JobError("expected_fingerprints without hash_weights needs the store to read weight digests from")

        def digest(kind: str) -> str:
            record = stored.manifest(kind)
            if record is None:
                raise JobError(f"feature store {stored.url} has no {kind} manifest: run `janus-job precompute` first")
            return str(record["fields"].get("weights_sha256"))

        found = [spatial_fingerprint(digest("spatial"), VGGTAggregatorConfig(), frame_ops.VGGT_TARGET_WIDTH, compute)]
        if vision:
            from transformers import AutoConfig

            from janus_job.data import load_processor
            from janus_job.model import local_copy

            local = local_copy(spec.model.qwen)
            processor = load_processor(local, spec.data.min_pixels, spec.data.max_pixels).image_processor
            found.append(vision_fingerprint(digest("vision"), AutoConfig.from_pretrained(local).vision_config,
                                            processor, frame_ops.VGGT_TARGET_WIDTH, compute))
    return [Fingerprint(fp.kind, {**fp.fields, "compute": compute}) for fp in found]


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
            raise JobError(f"frame {self.where(path)} does not exist; check data.image_root and the annotation's "
                           "images") from err
        except OSError as err:
            raise JobError(f"cannot read frame {self.where(path)}: {err}") from err

    def hash_all(self, paths: Sequence[str]) -> dict[str, str]:
        return dict(zip(paths, self.pool.map(lambda p: hashlib.sha256(self.read(p)).hexdigest(), paths)))

    def _decode(self, path: str) -> torch.Tensor:
        from janus_job import frames as frame_ops

        rgb = frame_ops.load_frame(self.read(path), name=self.where(path))
        return frame_ops.preprocess_for_vggt(rgb, self.target_width, self.patch)

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
    try:
        print(f"{label}: hashing {len(needed)} frames of {len(samples)} samples", file=stream, flush=True)
        hashes = reader.hash_all([paths[img] for img in needed])
        frame_hash = {img: hashes[paths[img]] for img in needed}
        store.write_frame_index(annotations.digest, marker_name(worker, workers), frame_hash)

        quarantined = store.quarantined()
        todo: dict[str, Sample] = {}
        for sample in samples:
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
            stacked = [(key, torch.stack([f.result() for f in fs])) for (key, _s), fs in zip(batch, futures)]
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
                keyed.setdefault(store.vision_key(frame_hash[img]), img)
            present = _sound(store, set(store.list_keys("vision")), keyed, quarantined, report, upload_threads)
            unique_todo = sorted(((k, img) for k, img in keyed.items() if k not in present), key=lambda p: p[1])
            report.vision_frames = len(keyed)
            report.skipped_vision = len(keyed) - len(unique_todo)
            progress = Progress(f"{label} vision", len(unique_todo), "frames", progress_interval_s, stream)
            size = max(1, spec.precompute.batch_size * 4)
            for start in range(0, len(unique_todo), size):
                chunk = unique_todo[start:start + size]
                decoded = [(key, reader.request(paths[img]).result()) for key, img in chunk]
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
    report.seconds = round(time.monotonic() - started, 3)
    store.write_record(f"{store.marker_prefix(annotations.digest)}/{marker_name(worker, workers)}", asdict(report))
    print(f"{label}: done {json.dumps(asdict(report), sort_keys=True)}", file=stream, flush=True)
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


def load_spec_annotations(spec: Any) -> AnnotationSet:
    return load_annotations(
        spec.data.annotations,
        spec.data.image_root,
        max_images=spec.data.max_history_images + 1,
        endpoint_url=spec.features.endpoint_url,
        allow_absolute=spec.data.allow_absolute_image_paths,
    )


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
    missing = store.missing(annotations.samples, index, vision=vision)
    if missing:
        raise JobError(
            f"all {workers} precompute workers finished but {len(missing)} samples lack features "
            f"(first: {missing[:3]}); rerun the precompute Job"
        )
    reports = [store.read_record(f"{prefix}/{marker_name(w, workers)}") or {} for w in range(workers)]
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
    }
    store.write_record(f"{prefix}/COMPLETE.json", record)
    print(f"precompute: complete, {len(annotations)} samples covered; wrote {prefix}/COMPLETE.json",
          file=stream, flush=True)
    return record


# ---------------------------------------------------------------- the pod


def run_pod(
    spec: Any,
    spec_path: str,
    *,
    index: int,
    tiny: bool = False,
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

    def build(device: str) -> Encoders:
        return tiny_encoders(device, vision=spec.features.cache_vision) if tiny else load_encoders(spec, device)

    if local_worker is None:  # fail fast, once, before starting any worker
        load_spec_annotations(spec)
        FeatureStore.from_spec(spec, local_cache=False).check_reachable()

    reports: list[WorkerReport] = []
    if local_worker is not None or per_pod == 1:
        local = local_worker or 0
        device = "cuda:0" if cuda else "cpu"  # the parent sets CUDA_VISIBLE_DEVICES per child
        encoders = build(device)
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
            if tiny:
                command.append("--tiny-encoders")
            children.append(subprocess.Popen(command, env=env))
        failed = [local for local, child in enumerate(children) if child.wait() != 0]
        if failed:
            raise JobError(f"precompute workers {failed} of pod {index} failed (see their log lines above); "
                           "the Job retries this index and the rerun skips finished work")
        fingerprints = build("cpu").fingerprints() if tiny else _fingerprints_from_store(spec)
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


# ---------------------------------------------------------------- estimate


@dataclass
class Estimate:
    samples: int
    unique_frames: int
    samples_by_frames: dict[int, int] = field(default_factory=dict)
    spatial_bytes: int = 0
    vision_bytes: int = 0
    spatial_gpu_hours: float = 0.0
    vision_gpu_hours: float = 0.0
    wall_hours: float = 0.0
    frame_size: tuple[int, int] = (0, 0)


def estimate(spec: Any, *, spatial_s_per_9_frames: float = H100_SPATIAL_S_PER_9_FRAME_SAMPLE,
             vision_s_per_frame: float = H100_VISION_S_PER_FRAME,
             annotations: AnnotationSet | None = None) -> Estimate:
    """Counts and sizes from the annotations and the first frame's size; costs from the constants."""
    from PIL import Image
    import io

    from janus_job import frames as frame_ops

    annotations = annotations or load_spec_annotations(spec)
    first = annotations.samples[0].frame_paths[0]
    try:
        with Image.open(io.BytesIO(read_bytes(first, spec.features.endpoint_url))) as img:
            width, height = img.size
    except (OSError, Image.UnidentifiedImageError) as err:
        raise JobError(f"cannot read the first frame {first} to size the features: {err}") from err
    geometry = frame_ops.frame_geometry(width, height)
    header = 200
    spatial_each = geometry.spatial_grid[0] * geometry.spatial_grid[1] * 2048 * 2 + header
    vision_each = geometry.qwen_grid[0] * geometry.qwen_grid[1] * 1280 * 2 + header
    by_frames: dict[int, int] = {}
    for sample in annotations.samples:
        by_frames[sample.num_frames] = by_frames.get(sample.num_frames, 0) + 1
    frames = annotations.unique_images()
    result = Estimate(samples=len(annotations), unique_frames=len(frames),
                      samples_by_frames=dict(sorted(by_frames.items())), frame_size=(width, height))
    result.spatial_bytes = spatial_each * len(annotations)
    spatial_s = sum(count * spatial_s_per_9_frames * n / 9 for n, count in by_frames.items())
    result.spatial_gpu_hours = spatial_s / 3600
    if spec.features.cache_vision:
        result.vision_bytes = vision_each * len(frames)
        result.vision_gpu_hours = len(frames) * vision_s_per_frame / 3600
    gpus = spec.precompute.pods * spec.precompute.gpus_per_pod
    result.wall_hours = (result.spatial_gpu_hours + result.vision_gpu_hours) / gpus
    return result
