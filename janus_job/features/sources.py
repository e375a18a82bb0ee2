"""Where a training run's encoder outputs come from, for each features.mode.

precomputed: wait for the store's completion marker, open it with the fingerprints precompute
recorded, check that the weights the spec names are the ones the store was built from and that no
sample lacks features. read_through: the job's ranks first fill what the store lacks (rank r is
worker r of world_size), then the same. online: no store; both encoders run in the model.
Every rank reaches the same verdict: rank 0 decides, the others receive its answer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from janus_job.errors import JobError

PRECOMPUTE_WAIT_ENV = "JANUS_PRECOMPUTE_WAIT_S"
DEFAULT_PRECOMPUTE_WAIT_S = 48 * 3600.0
FRAME_SPOT_CHECK = 64  # frames re-hashed at start against the store's frame index


def _same_on_all_ranks(value: Any) -> Any:
    """Rank 0's `value`, on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_everywhere(problem: str | None) -> None:
    """Every rank raises the same JobError (so no rank waits forever in a collective)."""
    problem = _same_on_all_ranks(problem)
    if problem:
        raise JobError(problem)


def _wait_seconds(env: dict | None = None) -> float:
    env = os.environ if env is None else env
    raw = env.get(PRECOMPUTE_WAIT_ENV)
    if not raw:
        return DEFAULT_PRECOMPUTE_WAIT_S
    try:
        return float(raw)
    except ValueError:
        raise JobError(f"{PRECOMPUTE_WAIT_ENV}={raw!r} is not a number of seconds") from None


def _fill_store(spec: Any, annotations: Any, ranks: Any, device: Any) -> None:
    """read_through: the job computes what the store lacks itself, sharded over its ranks (rank r
    is precompute worker r of world_size, skipping what exists), then trains from the store."""
    import io

    import torch

    from janus_job.features.encoders import load_encoders
    from janus_job.features.precompute import finalize, run_worker

    encoders = load_encoders(spec, str(device))
    run_worker(spec, encoders, worker=ranks.rank, workers=ranks.world_size, annotations=annotations,
               progress_interval_s=60.0)
    fingerprints = encoders.fingerprints()
    del encoders
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if ranks.rank != 0:
        return
    deadline = time.monotonic() + _wait_seconds()
    while finalize(spec, fingerprints, ranks.world_size, annotations=annotations, stream=io.StringIO()) is None:
        if time.monotonic() > deadline:
            raise JobError(f"read_through: not every rank finished filling {spec.features.store} within "
                           f"{_wait_seconds():.0f}s ({PRECOMPUTE_WAIT_ENV})")
        time.sleep(2.0)


def _open_completed_store(spec: Any, annotations: Any, poll_s: float) -> Any:
    """The feature store, once precompute has marked these annotations complete, opened with the
    fingerprints that precompute recorded (so features of other weights/geometry are refused)."""
    from janus_job.features.store import FeatureStore, Fingerprint

    store = FeatureStore.from_spec(spec)
    completion = store.wait_complete(annotations.digest, _wait_seconds(), poll_s=poll_s)
    recorded = completion.get("fingerprints", {})
    kinds = ["spatial"] + (["vision"] if spec.features.cache_vision else [])
    fingerprints = []
    for kind in kinds:
        if kind not in recorded:
            raise JobError(
                f"features.store {store.url} was precomputed without {kind} features; rerun `janus-job precompute` "
                f"with this spec (features.cache_vision: {str(spec.features.cache_vision).lower()})"
            )
        manifest = store.manifest(kind)
        if manifest is None:
            raise JobError(f"features.store {store.url}: manifest-{kind}.json is missing; rerun `janus-job precompute`")
        fingerprint = Fingerprint(manifest["kind"], manifest["fields"])
        if fingerprint.id != recorded[kind]:
            raise JobError(
                f"features.store {store.url}: the {kind} manifest changed after precompute completed "
                f"({fingerprint.id} != {recorded[kind]}); rerun `janus-job precompute`"
            )
        fingerprints.append(fingerprint)
    store.open(fingerprints, create=False)
    return store, {fp.kind: fp for fp in fingerprints}


@dataclass
class Features:
    """Where this run's encoder outputs come from."""

    source: Any  # a janus_job.data.dataset.FeatureSource, or None when both encoders run online
    spatial: str  # "cached" | "online"
    vision: str  # "cached" | "online"
    target_width: int  # frame width VGGT sees (data.frame_width; cached features were computed at it)
    spatial_channels: int | None = None  # channels of the cached spatial maps
    # sample id -> why: samples precompute left out under data.on_bad_sample skip (missing or unreadable
    # frames), as its completion marker records them
    bad_samples: dict = field(default_factory=dict)


def resolve_features(spec: Any, annotations: Any, ranks: Any, device: Any) -> Features:
    """The features for the spec's features.mode; cached ones fix the frame width (frames read
    online must match it) and the spatial merger's input channels."""
    from janus_job.features.store import StoreFeatureSource

    mode = spec.features.mode
    if mode == "online":
        return Features(None, "online", "online", target_width=int(spec.data.frame_width))
    if mode == "read_through":
        _fill_store(spec, annotations, ranks, device)
    poll_s = 2.0 if mode == "read_through" else 30.0  # read_through: rank 0 finalizes within seconds
    store, fingerprints = _open_completed_store(spec, annotations, poll_s)
    spatial_fingerprint = fingerprints["spatial"]
    problem = None
    frame_hashes: dict = {}
    bad_samples: dict = {}
    if ranks.rank == 0:
        try:
            stored_width = int(spatial_fingerprint.fields["target_width"])
            if stored_width != spec.data.frame_width:
                raise JobError(
                    f"features.store {store.url} was precomputed at frame width {stored_width}, data.frame_width "
                    f"is {spec.data.frame_width}; set data.frame_width: {stored_width}, or give this run its own "
                    "features.store and rerun `janus-job precompute`"
                )
            _check_spatial_weights(spec, spatial_fingerprint)
            if "vision" in fingerprints:
                _check_vision_weights(spec, fingerprints["vision"])
            frame_hashes = store.completed_frame_index(annotations.digest, frame_paths=annotations.image_paths(),
                                                       spot_check=FRAME_SPOT_CHECK)
            bad_samples = recorded_bad_samples(store, annotations, spec.data.on_bad_sample)
            missing = [sample_id for sample_id in store.missing(annotations.samples, frame_hashes,
                                                                vision=spec.features.cache_vision)
                       if sample_id not in bad_samples]
        except JobError as err:  # other ranks are already waiting for rank 0's verdict
            missing, problem = [], str(err)
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            problem = (
                f"features.store {store.url}: {len(missing)} of {len(annotations.samples)} samples have no "
                f"precomputed features (first: {shown}); the store is incomplete for these annotations: rerun "
                f"`janus-job precompute --spec ...` (it computes only what is missing), or use features.mode: online"
            )
    _raise_everywhere(problem)
    frame_hashes, bad_samples = _same_on_all_ranks((frame_hashes, bad_samples))
    source = StoreFeatureSource(store, frame_hashes=frame_hashes, image_root=spec.data.image_root,
                                vision=bool(spec.features.cache_vision))
    return Features(
        source,
        "cached",
        "cached" if spec.features.cache_vision else "online",
        target_width=int(spatial_fingerprint.fields["target_width"]),
        spatial_channels=2 * int(spatial_fingerprint.fields["architecture"]["embed_dim"]),
        bad_samples=bad_samples,
    )


def recorded_bad_samples(store: Any, annotations: Any, on_bad_sample: str) -> dict:
    """sample id -> why, for the samples precompute left out (their frames are missing or
    unreadable), from the checksummed completion marker; under data.on_bad_sample fail a JobError
    naming the first one."""
    found = dict((store.completion(annotations.digest) or {}).get("bad_samples") or {})
    known = {sample.id for sample in annotations.samples}
    stray = sorted(set(found) - known)
    if stray:
        raise JobError(f"{store.url}/{store.marker_prefix(annotations.digest)}/COMPLETE.json names samples the "
                       f"annotations do not have ({stray[:3]}); rerun `janus-job precompute`")
    if found and on_bad_sample == "fail":
        first = next(iter(found.values()))
        raise JobError(
            f"{first} (precompute left out {len(found)} samples with missing or unreadable frames; "
            "data.on_bad_sample: fail): restore or re-extract those frames and rerun `janus-job precompute`, "
            "or set data.on_bad_sample: skip"
        )
    return found


def _check_spatial_weights(spec: Any, fingerprint: Any) -> None:
    """The cached spatial features must come from the VGGT weights this spec names: a store
    precomputed with other weights (same geometry) is refused, never silently trained on."""
    import torch

    from janus_job.features.store import state_dict_digest
    from janus_job.models.vggt import VGGTAggregatorConfig, load_aggregator

    config = VGGTAggregatorConfig(**fingerprint.fields["architecture"])
    aggregator = load_aggregator(spec.model.vggt, config, "cpu", torch.float32,
                                 endpoint_url=spec.features.endpoint_url)
    found = state_dict_digest(aggregator.state_dict())
    if found != fingerprint.fields["weights_sha256"]:
        raise JobError(
            f"model.vggt: {spec.model.vggt} is not the VGGT checkpoint features.store was precomputed with "
            f"(weights sha256 {found[:12]} != {str(fingerprint.fields['weights_sha256'])[:12]}); point "
            "model.vggt at the weights the store was built from, or give this run its own features.store "
            "and rerun `janus-job precompute`"
        )


def _check_vision_weights(spec: Any, fingerprint: Any) -> None:
    """Cached vision-tower features must come from the vision tower of model.qwen."""
    from janus_job.features.encoders import frozen_visual_digest, read_qwen_visual

    found = frozen_visual_digest(read_qwen_visual(spec.model.qwen, spec.features.endpoint_url)[0])
    if found != fingerprint.fields["weights_sha256"]:
        raise JobError(
            f"model.qwen: the vision tower of {spec.model.qwen} is not the one features.store was precomputed "
            f"with (weights sha256 {found[:12]} != {str(fingerprint.fields['weights_sha256'])[:12]}); point "
            "model.qwen at the checkpoint the store was built from, or give this run its own features.store "
            "and rerun `janus-job precompute`"
        )
