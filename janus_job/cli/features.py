"""CLI commands of the features area: precompute, features verify / estimate / build-annotations."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Optional

import typer

from janus_job.errors import JobError

features_app = typer.Typer(help="Inspect, size and build inputs of the feature store.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Adds this area's commands to the main app."""
    app.command("precompute")(precompute)
    app.add_typer(features_app, name="features")


def _completion_index(index: Optional[int]) -> int:
    if index is not None:
        return index
    raw = os.environ.get("JOB_COMPLETION_INDEX", "0")
    try:
        return int(raw)
    except ValueError as err:
        raise JobError(f"JOB_COMPLETION_INDEX={raw!r} is not an integer") from err


def precompute(
    spec: str = typer.Option(..., "--spec", help="Job spec YAML."),
    index: Optional[int] = typer.Option(None, "--index", help="Pod index (default: $JOB_COMPLETION_INDEX, else 0)."),
    progress_interval: float = typer.Option(30.0, "--progress-interval", help="Seconds between progress lines."),
    report: Optional[str] = typer.Option(None, "--report", help="Write this pod's worker reports as JSON here."),
    local_worker: Optional[int] = typer.Option(
        None, "--local-worker", hidden=True, help="Run only this GPU's worker (set by the pod process)."
    ),
    pace_s: float = typer.Option(0.0, "--pace-s", hidden=True, help="Sleep after each batch (fault drills)."),
) -> None:
    """Compute the frozen encoders' features of this pod's shard into features.store."""
    from janus_job.config.load import load_spec
    from janus_job.features.precompute import run_pod

    job = load_spec(spec)
    if job.features.mode == "online":
        raise JobError("features.mode is 'online': nothing to precompute (set mode: precomputed or read_through)")
    run_pod(
        job,
        spec,
        index=_completion_index(index),
        local_worker=local_worker,
        progress_interval_s=progress_interval,
        pace_s=pace_s,
        report_path=report,
    )


@features_app.command("verify")
def verify(
    spec: str = typer.Option(..., "--spec", help="Job spec YAML."),
    checksums: bool = typer.Option(
        True, "--checksums/--no-checksums", help="Read every object and check its checksum."
    ),
    weights: bool = typer.Option(
        True, "--weights/--skip-weights", help="Hash the spec's encoder weights and compare the fingerprint."
    ),
    frames: bool = typer.Option(True, "--frames/--no-frames", help="Re-hash every frame against the frame index."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a store: fingerprint, coverage of the spec's samples, checksums, completion marker."""
    from janus_job.config.load import load_spec
    from janus_job.data.annotations import load_spec_annotations
    from janus_job.features.encoders import expected_fingerprints
    from janus_job.features.store import KINDS, FeatureStore

    job = load_spec(spec)
    annotations = load_spec_annotations(job)
    store = FeatureStore.from_spec(job, local_cache=False)
    store.check_reachable()
    manifests = {kind: store.manifest(kind) for kind in KINDS}
    wanted = ["spatial"] + (["vision"] if job.features.cache_vision else [])
    absent = [kind for kind in wanted if manifests[kind] is None]
    if absent:
        raise JobError(
            f"feature store {store.url} has no {' or '.join(absent)} manifest: run `janus-job precompute` first"
        )
    compute = manifests["spatial"]["fields"].get("compute", "bf16-autocast")
    expected = expected_fingerprints(job, compute=compute, hash_weights=weights, stored=store)
    store.open(expected, create=False)
    completion = store.completion(annotations.digest)
    recorded = completion.get("frame_index") if completion is not None else None
    if completion is not None and not isinstance(recorded, dict):
        raise JobError(f"{store.url}: COMPLETE.json records no frame index checksums (an older precompute): "
                       "rerun `janus-job precompute`")
    index = store.frame_index(annotations.digest, recorded=recorded)
    mismatched, frames_checked = (store.check_frame_hashes(index, annotations.image_paths(),
                                                          endpoint_url=job.features.endpoint_url)
                                  if frames else ([], 0))
    left_out = (completion or {}).get("bad_samples") or {}  # frames missing/unreadable, data.on_bad_sample skip
    missing = [sample_id for sample_id in store.missing(annotations.samples, index, vision=job.features.cache_vision)
               if sample_id not in left_out]
    found = store.verify(check_checksums=checksums)
    report = {
        "store": store.url,
        "samples": len(annotations),
        "missing_samples": len(missing),
        "first_missing": missing[:5],
        "bad_samples": len(left_out),
        "objects": found.objects,
        "bytes": found.bytes,
        "corrupt": found.corrupt,
        "stale_temp_files": len(found.stale_temp),
        "complete_marker": completion is not None,
        "frames_checked": frames_checked,
        "frame_index_mismatches": mismatched[:5],
        "fingerprint_checked": "full" if weights else "manifest only (weights not hashed)",
        "fingerprints": {fp.kind: fp.id for fp in expected},
    }
    if as_json:
        typer.echo(json.dumps(report, indent=1, sort_keys=True))
    else:
        for name, value in report.items():
            typer.echo(f"{name:>20}: {value}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(annotations)} samples lack features")
    if found.corrupt:
        problems.append(f"{len(found.corrupt)} corrupt objects (delete them and rerun precompute)")
    if completion is None:
        problems.append("no COMPLETE.json marker for these annotations")
    if mismatched:
        problems.append(f"{len(mismatched)} frames differ from the frame index (first: {mismatched[0]}); "
                        "rerun `janus-job precompute`")
    if problems:
        raise JobError(f"feature store {store.url}: " + "; ".join(problems))


@features_app.command("estimate")
def estimate(
    spec: str = typer.Option(..., "--spec", help="Job spec YAML."),
    spatial_s: float = typer.Option(
        0.323, "--spatial-s-per-sample", help="GPU seconds per 9-frame sample (batched VGGT; H100 measured)."
    ),
    vision_s: float = typer.Option(
        0.312 / 9, "--vision-s-per-frame", help="GPU seconds per frame of the Qwen vision tower (H100 measured)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Samples, unique frames, bytes and GPU-hours of a precompute, before spending them."""
    from janus_job.config.load import load_spec
    from janus_job.features.estimate import estimate as run_estimate

    job = load_spec(spec)
    result = run_estimate(job, spatial_s_per_9_frames=spatial_s, vision_s_per_frame=vision_s)
    record = asdict(result)
    if as_json:
        typer.echo(json.dumps(record, indent=1))
        return
    gpus = job.precompute.pods * job.precompute.gpus_per_pod
    typer.echo(f"samples            {result.samples:,} (by frame count: {result.samples_by_frames})")
    typer.echo(f"unique frames      {result.unique_frames:,} ({result.frame_size[0]}x{result.frame_size[1]})")
    typer.echo(f"spatial bytes      {result.spatial_bytes / 1e9:,.1f} GB")
    typer.echo(
        f"vision bytes       {result.vision_bytes / 1e9:,.1f} GB"
        + ("" if job.features.cache_vision else " (cache_vision off)")
    )
    typer.echo(
        f"GPU-hours          {result.spatial_gpu_hours + result.vision_gpu_hours:,.1f} "
        f"(spatial {result.spatial_gpu_hours:,.1f}, vision {result.vision_gpu_hours:,.1f}; H100 rates)"
    )
    typer.echo(f"wall-clock         {result.wall_hours:,.2f} h on {gpus} GPUs ({job.precompute.pods} pods)")


@features_app.command("build-annotations")
def build_annotations(
    layout: str = typer.Option(
        ..., "--layout", help="vlnce (R2R/RxR: <root>/<episode>/*.png) or scalevln (<root>/<name>/rgb/*.jpg)."
    ),
    episodes: str = typer.Option(
        ..., "--episodes", help="Episode file: VLN-CE episodes (.json/.json.gz) or ScaleVLN annotations."
    ),
    trajectories: str = typer.Option(..., "--trajectories", help="Folder of trajectory folders."),
    image_root: str = typer.Option(
        ..., "--image-root", help="Image paths are written relative to this (data.image_root)."
    ),
    out: str = typer.Option(..., "--out", help="Annotation JSON to write."),
    max_history: int = typer.Option(8, "--max-history", help="History frames per sample (JanusVLN: 8)."),
    prompt_file: str | None = typer.Option(
        None, "--prompt-file",
        help="Text file with the human turn's template: {history} (one <image> tag per history frame), "
        "{instruction}, and one literal <image> for the current frame after {history}; one trailing newline "
        "is dropped. Default: janus-train's own wording (docs/features.md).",
    ),
) -> None:
    """Build JanusVLN annotations from trajectory folders (JanusVLN's history-frame rule)."""
    from janus_job.data.annotations import (
        NAVIGATION_PROMPT,
        build_scalevln,
        build_vlnce,
        check_prompt_template,
        write_annotations,
    )

    prompt = NAVIGATION_PROMPT
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise JobError(f"--prompt-file {prompt_file}: cannot read it ({err}); give a UTF-8 text file") from None
        prompt = check_prompt_template(text.removesuffix("\n"), f"--prompt-file {prompt_file}")
    if layout == "vlnce":
        records = build_vlnce(episodes, trajectories, image_root, max_history=max_history, prompt=prompt)
    elif layout == "scalevln":
        records = build_scalevln(episodes, trajectories, image_root, max_history=max_history, prompt=prompt)
    else:
        raise JobError(f"--layout must be vlnce or scalevln, not {layout!r}")
    typer.echo(f"wrote {write_annotations(records, out)} samples to {out}")
