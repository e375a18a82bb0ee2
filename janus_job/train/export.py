"""A job's export step: the JanusVLN checkpoint directory of a complete training checkpoint, at the end of
training (the trainer) or by hand (`janus-job export`); the format is janus_job.models.janusvln.export's."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from janus_job.errors import JobError
from janus_job.models.janusvln.export import EXPORT_DIR, write_export

SCRATCH_DIR = "export"  # under the checkpoint staging directory


def export_from_checkpoint(spec, step: int | None = None, out: str | None = None, progress=print) -> str:
    """Exports the complete checkpoint of `step` (default: the newest) of `spec`'s job as a JanusVLN
    checkpoint directory at `out` (default `<training.checkpoint.url>/export/step-XXXXXXXX`); returns
    its URL. One process, CPU only, memory about one shard plus one parameter (the rank files are
    memory-mapped): trained weights from the DeepSpeed files, frozen ones (vision tower) from
    model.qwen, the VGGT aggregator from model.vggt, the base directory's tokenizer/processor files
    copied. The directory appears complete or not at all: config.json is written last (into a
    temporary name that is renamed, on a mounted path).

    Disk: a checkpoint on object storage is fetched, and an export to object storage is written
    before its upload, under the checkpoint staging directory ($JANUS_CHECKPOINT_STAGING, the
    volume the chart sizes for checkpoints; cluster.checkpoint_staging_gib counts the export), never
    under /tmp. A copy of the same checkpoint already staged there for a resume is read in place.
    """

    from janus_job.io import local_copy, url_to_fs
    from janus_job.train.checkpoint import CheckpointManager, _stamp, step_tag

    c = spec.training.checkpoint
    endpoint = spec.features.endpoint_url
    manager = CheckpointManager(c.url, keep=c.keep, interval_steps=c.interval_steps, rank=0, world_size=1,
                                local_rank=0, endpoint_url=endpoint)
    refs = manager.complete_checkpoints()
    if not refs:
        raise JobError(f"no complete checkpoint under training.checkpoint.url {c.url}; train first")
    ref = refs[-1] if step is None else manager.ref_for_step(step)
    tag = step_tag(ref.step)
    out = out or f"{c.url.rstrip('/')}/{EXPORT_DIR}/{tag}"
    progress(f"export step={ref.step} from {ref.url} (saved at world size {ref.world_size}, ZeRO-"
             f"{ref.manifest.get('zero_stage', '?')}) to {out}")
    fs, root = url_to_fs(out, endpoint)
    remote = "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    needed = {name: size for name, size in ref.manifest["files"].items()
              if name.endswith(("model_states.pt", "optim_states.pt"))}
    scratch_root = manager.staging / SCRATCH_DIR
    scratch_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{tag}-", dir=scratch_root) as scratch:
        source = Path(manager.root) / tag
        if not source.is_dir():
            source = _staged_copy(manager.staging / "load" / f"{tag}-{_stamp(ref)}", needed)
        if source is None:
            source = Path(scratch) / "checkpoint"
            source.mkdir()
            for name, size in needed.items():
                progress(f"export fetching {name} ({size / 1024**3:.2f} GiB) to {source}")
                manager._fetch(f"{ref.url}/{name}", source / name, size)
        else:
            progress(f"export reading {source}")
        qwen_dir = local_copy(spec.model.qwen, endpoint_url=endpoint)
        vggt = spec.model.vggt
        if "://" in vggt and not vggt.startswith("file://"):
            from janus_job.io import fetch_file

            local_vggt = os.path.join(scratch, "vggt" + (".safetensors" if vggt.endswith(".safetensors") else ".pt"))
            fetch_file(vggt, local_vggt, endpoint, what="vggt checkpoint")
            vggt = local_vggt
        target = os.path.join(scratch, "out") if remote else f"{root.rstrip('/')}.tmp-{os.getpid()}"
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        try:
            write_export(str(source), qwen_dir, vggt.removeprefix("file://"), target,
                         dtype="bfloat16" if spec.deepspeed.bf16 else "float32", progress=progress)
            if remote:
                names = sorted(os.listdir(target), key=lambda n: n == "config.json")  # config.json last
                for name in names:
                    progress(f"export uploading {name}")
                    fs.put_file(os.path.join(target, name), f"{root.rstrip('/')}/{name}")
            else:
                old = f"{root.rstrip('/')}.old-{os.getpid()}"
                if os.path.exists(root):
                    os.replace(root, old)
                os.replace(target, root)
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if not remote:
                shutil.rmtree(target, ignore_errors=True)
    progress(f"export done step={ref.step} url={out}")
    return out


def _staged_copy(local: Path, needed: dict[str, int]) -> Path | None:
    """`local` when it holds every file in `needed` at its manifest size (a resume's fetched copy of the
    same checkpoint), else None."""
    for name, size in needed.items():
        path = local / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return local
