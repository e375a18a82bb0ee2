"""The training loop: one rank of a janus-train job on the DeepSpeed engine, and its log line.

`janus-job train --spec job.yaml` runs one rank (torchrun starts it as `-m janus_job.cli train`);
torchrun (started by `janus-job launch`) runs one per GPU. Without torchrun's variables it runs
as a single-process job (the demo).

Order of a run: spec -> process group -> (precomputed mode) wait for the store's completion
marker, then refuse to start if any sample lacks features -> dataset, balanced sampler, model ->
`deepspeed.initialize` with the rendered config -> resume from the newest checkpoint -> loop.
Each optimizer step trains one global batch (see janus_job.data.sampler); every
`training.log_interval` steps every node's first rank prints one line

    train step=120/5000 s/it=3.02 samples/s=10.6 tokens/s=40.1k mfu=38.2% data_wait=1.2%
    mem_peak=61.3GiB mem_min=58.0GiB mem_max=63.1GiB loss=1.234 lr=1.9e-05 eta=4h05m

and appends the same fields as one JSON object to the metrics file (JANUS_METRICS_FILE, or
$JANUS_STATS_DIR/train-metrics-rank<r>.jsonl). docs/training.md defines every field.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from janus_job.deploy.network import NetworkSettings, check_process_group
from janus_job.errors import JobError
from janus_job.models.janusvln.fp8 import FP8_MULTIPLE, check_fp8_device, convert_to_fp8
from janus_job.train.distributed import init_distributed
from janus_job.train.metrics import (
    GIB,
    BatchWork,
    MetricsFile,
    ParamCounts,
    format_log_line,
    metrics_path,
    model_flops,
    peak_flops_per_device,
    per_rank_path,
)
from janus_job.train.shutdown import finish_rank

SAMPLE_TRACE_ENV = "JANUS_SAMPLE_TRACE"  # per-rank JSON lines of the sample ids trained, for resume checks

# ---------------------------------------------------------------- data


def _reraise_loader_error(err: JobError) -> None:
    """A JobError raised in a DataLoader worker arrives with the worker's traceback inside its
    message; keep the user's part (it names the sample)."""
    text = str(err)
    marker = "JobError: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].strip()
    raise JobError(text) from None


# ---------------------------------------------------------------- the run


@dataclass
class Interval:
    """What one rank measured since the last log line."""

    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    data_wait_s: float = 0.0
    loss_sum: Any = 0.0  # a device tensor once a step ran: no host sync per micro-step
    loss_count: int = 0
    lr: float = 0.0
    work: BatchWork = field(default_factory=BatchWork)


class Trainer:
    """One rank's training run; `run()` trains to the end (or raises JobError)."""

    def __init__(self, spec: Any, spec_path: str = "") -> None:
        self.spec = spec
        self.spec_path = spec_path

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch

        from janus_job.data.annotations import load_spec_annotations
        from janus_job.data.dataset import JanusCollator, JanusDataset, load_processor
        from janus_job.data.sampler import BalancedBatchSampler, LengthGroupedBatchSampler
        from janus_job.features.sources import resolve_features
        from janus_job.io import local_copy
        from janus_job.models.janusvln.build import build_model
        from janus_job.train.engine import build_engine, warmup_steps_for

        spec, t = self.spec, self.spec.training
        self.ranks, self.device = init_distributed()
        check_process_group(NetworkSettings.of(spec.network), self.device)  # the network line, or JobError
        self._seed_everything(t.seed)

        annotations = load_spec_annotations(spec)
        features = resolve_features(spec, annotations, self.ranks, self.device)
        endpoint = spec.features.endpoint_url
        if self.ranks.local_rank == 0:  # one download per node; the others find the finished copy
            local_copy(spec.model.qwen, endpoint_url=endpoint)
        torch.distributed.barrier()
        qwen_dir = local_copy(spec.model.qwen, endpoint_url=endpoint)
        processor = load_processor(qwen_dir, spec.data.min_pixels, spec.data.max_pixels)
        dropped = self._unreadable_samples(annotations.samples, features)
        samples = [sample for sample in annotations.samples if sample.id not in dropped]
        # over data.max_bad_fraction (dropped + quarantined) this refuses, on every rank, before the model
        self.dataset = JanusDataset(samples, processor, features.source, spatial=features.spatial,
                                    vision=features.vision, target_width=features.target_width,
                                    on_bad_sample=spec.data.on_bad_sample,
                                    max_bad_fraction=spec.data.max_bad_fraction, dropped=dropped)
        self.dropped = len(dropped)

        self.global_batch_size = spec.global_batch_size
        sampler_cls = BalancedBatchSampler if t.balanced_sampler else LengthGroupedBatchSampler
        self.sampler = sampler_cls(
            self._token_lengths(samples),
            micro_batch_size=t.micro_batch_size,
            world_size=self.ranks.world_size,
            rank=self.ranks.rank,
            global_batch_size=self.global_batch_size,
            seed=t.seed,
        )
        self.accumulation = self.sampler.accumulation
        self.total_steps = t.max_steps or t.epochs * self.sampler.steps_per_epoch
        self.warmup_steps = warmup_steps_for(spec, self.total_steps)

        dtype = torch.bfloat16 if spec.deepspeed.bf16 else torch.float32
        model = build_model(
            qwen_dir,
            vggt=spec.model.vggt if features.spatial == "online" else None,
            # ZeRO-3 would partition and re-gather the frozen encoder: keep it out of the module tree
            register_vggt=spec.deepspeed.zero_stage < 3,
            spatial_channels=features.spatial_channels,
            dtype=dtype,
            device=self.device,
            attn_implementation=spec.model.attn_implementation,
            gradient_checkpointing=t.gradient_checkpointing,
            endpoint_url=endpoint,
        )
        if t.precision == "fp8":  # before compile, which fuses float8's casts into the layers' kernels
            check_fp8_device(self.device)
            convert_to_fp8(model.model.language_model, t.fp8_recipe)
        if t.compile:
            from janus_job.models.janusvln.compile import compile_decoder_layers

            compile_decoder_layers(model.model.language_model)
        self.image_token_id = int(model.config.image_token_id)
        # the loader computes the mRoPE positions and index tensors (no host synchronisations in the forward)
        self.collator = JanusCollator(processor.tokenizer.pad_token_id, image_token_id=self.image_token_id,
                                      spatial_merge_size=model.config.vision_config.spatial_merge_size,
                                      pad_to_multiple_of=FP8_MULTIPLE if t.precision == "fp8" else 1)
        self.merger_source = getattr(model, "merger_source", "fresh")
        self.params = ParamCounts.of(model)
        self.engine, self.deepspeed_config = build_engine(spec, model, self.ranks.world_size, self.total_steps,
                                                          accumulation=self.accumulation)
        self.step = 0
        self.bad_samples = self.dropped  # left out at start, then replaced ones are added at each log line
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None

    def _unreadable_samples(self, samples: list, features: Any) -> dict[str, str]:
        """sample id -> why, for the samples left out because a frame is missing or unreadable
        (data.on_bad_sample skip): those precompute recorded in its completion marker, or, when
        the encoders run online, those a pass over every frame's header finds (the frames split
        over the ranks, the findings gathered, so every rank drops the same samples and its sampler
        plans the same batch count)."""
        import torch.distributed as dist

        from janus_job.data.dataset import bad_frame_samples, unreadable_frames

        spec = self.spec
        found = dict(features.bad_samples)
        if found:
            origin = "precompute found missing or unreadable frames"
        elif features.source is None and spec.data.on_bad_sample == "skip":
            paths = sorted({path for sample in samples for path in sample.frame_paths})
            mine = unreadable_frames(paths[self.ranks.rank::self.ranks.world_size])
            parts: list = [None] * self.ranks.world_size
            dist.all_gather_object(parts, mine)
            problems = {path: why for part in parts for path, why in part.items()}
            found = bad_frame_samples(samples, problems)
            origin = f"{len(problems)} of {len(paths)} frames are missing or unreadable"
        if found and self.ranks.prints:
            print(f"train data: {len(found)} of {len(samples)} samples left out: {origin} (data.on_bad_sample: "
                  f"skip; first: {next(iter(found.values()))})", flush=True)
        return found

    def _token_lengths(self, samples: list) -> list[int]:
        """Per-sample load for the sampler. Visual tokens per image come from the first sample's
        first frame (one header read, not one per sample: a VLN dataset's frames share one camera
        resolution; a mixed-resolution set only balances less well)."""
        from janus_job.data.dataset import sample_token_length

        per_image = self.dataset.tokens_per_image(samples[0])
        return [sample_token_length(sample, per_image) for sample in samples]

    def _seed_everything(self, seed: int) -> None:
        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # -- checkpoint hooks (janus_job.train.checkpoint owns the format) -------------------------------

    def client_state(self) -> dict:
        """What a checkpoint must carry besides the engine (the checkpoint module adds RNG states)."""
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "global_batch_size": self.global_batch_size,
            "world_size": self.ranks.world_size,
        }

    def restore(self, client_state: dict) -> None:
        saved = client_state.get("global_batch_size", self.global_batch_size)
        if saved != self.global_batch_size:
            raise JobError(
                f"the checkpoint was trained with a global batch of {saved} samples, this spec gives "
                f"{self.global_batch_size}; set training.global_batch_size: {saved} to resume it"
            )
        self.sampler.load_state_dict(client_state["sampler"])
        self.step = int(client_state["step"])

    def _checkpoints(self) -> Any:
        from janus_job.train.checkpoint import CheckpointManager

        c = self.spec.training.checkpoint
        return CheckpointManager(c.url, keep=c.keep, interval_steps=c.interval_steps,
                                 rank=self.ranks.rank, world_size=self.ranks.world_size,
                                 local_rank=self.ranks.local_rank, endpoint_url=self.spec.features.endpoint_url)

    # -- the loop -------------------------------------------------------------------------------

    def _micro_batches(self) -> Any:
        """This rank's micro-batches from the sampler's position, epoch after epoch, each with its
        `BatchWork` counted on the host; `data.prefetch_batches` of them read and on the device ahead
        of the step (janus_job.train.batches)."""
        from janus_job.train.batches import BatchPrefetcher, LoaderFeed

        feed = LoaderFeed(self.dataset, self.sampler, self.collator, self.spec.data, self.device)
        image_token_id = self.image_token_id
        return BatchPrefetcher(feed, self.device, self.spec.data.prefetch_batches,
                               inspect=lambda batch: BatchWork.of(batch, image_token_id))

    def run(self) -> None:
        from janus_job.monitor.gpustats import RankStatsWriter
        from janus_job.train.engine import micro_step
        from janus_job.train.stop import StopRequest

        self.setup()
        checkpoints = self._checkpoints()
        latest = checkpoints.latest()
        if latest is not None:
            self.restore(checkpoints.load(self.engine, latest, lr_scheduler=self.engine.lr_scheduler))
        self._announce(latest)
        stats = RankStatsWriter.from_env(interval_seconds=self.spec.monitor.interval_seconds)
        # the figures the sidecar exports for this rank (monitor.gpustats.TRAINING_FIELDS)
        self.figures = {"total_steps": self.total_steps, "started": time.time(), "bad_samples": self.dropped,
                        "last_checkpoint_step": None if latest is None else self.step}
        self.trackers = self._trackers()
        metrics = MetricsFile(metrics_path(self.ranks.rank))
        trace = MetricsFile(per_rank_path(os.environ.get(SAMPLE_TRACE_ENV), self.ranks.rank))
        batches = self._micro_batches()
        interval = Interval()
        self.engine.train()
        # from here a SIGTERM becomes a checkpoint; before (setup, restore) it ends the rank at once
        stop = StopRequest().install()
        step_time = None
        while self.step < self.total_steps:
            step_started = time.perf_counter()
            if self.sampler.epoch_done:  # the epoch's last step is trained (the loader may be well into the next)
                self.sampler.set_epoch(self.sampler.epoch + 1)
            interval.lr = self._lr()  # the lr this step trains with (the scheduler moves it at the boundary)
            for micro in range(self.accumulation):
                waited = time.perf_counter()
                try:
                    batch, work = next(batches)  # blocked here (and on its copy to the GPU) = data wait
                except JobError as err:
                    _reraise_loader_error(err)
                interval.data_wait_s += time.perf_counter() - waited
                trace.write({"step": self.step, "micro_step": micro, "rank": self.ranks.rank,
                             "sample_ids": batch["sample_ids"]})
                interval.work.add(work)
                batch.pop("bad_samples", None)
                loss = micro_step(self.engine, batch, self.device,
                                  clip_mode=self.spec.training.clip_mode).loss.detach()
                interval.loss_sum = interval.loss_sum + loss.float()
                interval.loss_count += 1
            self.sampler.advance()
            self.step += 1
            interval.steps += 1
            step_time = time.perf_counter() - step_started
            if stats is not None:
                stats.maybe_write(self.step, step_time, self.global_batch_size / step_time, self.figures)
            if self.step % self.spec.training.log_interval == 0 or self.step == self.total_steps:
                self._log(interval, metrics)
                interval = Interval()
            saved = checkpoints.should_save(self.step) or (self.step == self.total_steps and self.spec.training.export)
            if saved:
                self._save(checkpoints)
                if self.spec.training.export_every_checkpoint and self.step < self.total_steps:
                    self._export(checkpoints, self.step, background=True)
            if self.step < self.total_steps and stop.agreed(self.device):
                self._stop(checkpoints, saved, batches)
        checkpoints.wait()
        if stats is not None and step_time:  # the sidecar shows the last step, not one the interval let through
            stats.write(self.step, step_time, self.global_batch_size / step_time, self.figures)
        self._finish(metrics)
        if self.spec.training.export:
            self._export(checkpoints, self.step, background=False)
        if self._export_thread is not None:
            self._export_thread.join()
        finish_rank(self, checkpoints=checkpoints, batches=batches)

    _export_thread: Any = None

    def _export(self, checkpoints: Any, step: int, background: bool) -> None:
        """Rank 0 exports the checkpoint of `step` as a JanusVLN directory (janus_job.models.janusvln.export)
        once it is complete; `background` runs it beside training (one export at a time)."""
        import threading

        from janus_job.train.export import export_from_checkpoint

        if self.ranks.rank != 0:
            return
        if self._export_thread is not None:
            self._export_thread.join()
            self._export_thread = None

        upload = checkpoints._upload  # this checkpoint's upload thread; rank 0's writes COMPLETE last

        def run() -> None:
            if background:
                if upload is not None:
                    upload.join()
            else:
                checkpoints.wait()
            export_from_checkpoint(self.spec, step=step, progress=lambda line: print(line, flush=True))

        if not background:
            run()
            return

        def guarded() -> None:
            try:
                run()
            except Exception as err:  # an export failing beside training must not stop it
                print(f"export of step {step} failed: {err}", file=sys.stderr, flush=True)

        self._export_thread = threading.Thread(target=guarded, name=f"export-{step}", daemon=True)
        self._export_thread.start()

    def _save(self, checkpoints: Any) -> None:
        checkpoints.save(self.engine, self.step, self.client_state(), lr_scheduler=self.engine.lr_scheduler)
        self.figures["last_checkpoint_step"] = self.step

    def _trackers(self) -> Any:
        """Rank 0's experiment trackers (training.report_to) and the status file; None on other ranks."""
        from janus_job.monitor.trackers import Trackers

        if self.ranks.rank != 0:
            return None
        t = self.spec.training
        return Trackers(t.report_to, t.checkpoint.url, self.spec.name, endpoint_url=self.spec.features.endpoint_url,
                        config=self.spec.model_dump(mode="json"))

    def _close_trackers(self) -> None:
        if getattr(self, "trackers", None) is not None:
            self.trackers.close()
            self.trackers = None

    def _stop(self, checkpoints: Any, saved: bool, batches: Any) -> None:
        """SIGTERM on some rank: checkpoint this step everywhere, then exit for a restart."""
        import torch.distributed as dist

        from janus_job.train.stop import EXIT_CODE

        if not saved:
            self._save(checkpoints)
        checkpoints.wait()
        self._close_trackers()
        # rank 0's wait ends with COMPLETE written; a rank leaving earlier makes its node's torchrun
        # stop the other local ranks, rank 0 among them
        dist.barrier()
        if self.ranks.prints:
            print(f"train stopped step={self.step}/{self.total_steps}: SIGTERM; checkpoint of step {self.step} "
                  f"is complete, exiting with {EXIT_CODE} so the pod restarts and resumes there", flush=True)
        finish_rank(self, checkpoints=checkpoints, batches=batches)
        sys.exit(EXIT_CODE)

    def _announce(self, resumed_from: Any) -> None:
        if not self.ranks.prints:
            return
        t, ds = self.spec.training, self.deepspeed_config
        where = ""
        if resumed_from is not None:
            where = f" resumed_from={getattr(resumed_from, 'url', resumed_from)} at step {self.step}"
        print(
            f"train start job={self.spec.name} world={self.ranks.world_size} node={self.ranks.node_rank} "
            f"device={self.device_name or self.device.type} micro={t.micro_batch_size} accum={self.accumulation} "
            f"global_batch={self.global_batch_size} steps={self.total_steps} warmup={self.warmup_steps} "
            f"samples={len(self.dataset)} zero={ds['zero_optimization']['stage']} "
            f"optimizer={'deepspeed' if 'optimizer' in ds else 'torch'} bf16={ds['bf16']['enabled']} "
            f"precision={t.precision}{'/' + t.fp8_recipe if t.precision == 'fp8' else ''} compile={t.compile} "
            f"sampler={type(self.sampler).__name__} spatial_merger={self.merger_source}{where}"
            + (f" bad_samples={self.dropped}" if self.dropped else ""),
            flush=True,
        )

    def _log(self, interval: Interval, metrics: MetricsFile) -> None:
        import torch
        import torch.distributed as dist

        from janus_job.monitor.gpustats import gather_memory_extremes, peak_memory_bytes

        elapsed = time.perf_counter() - interval.started
        reduce_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        summed = torch.tensor(interval.work.as_list() + [float(interval.loss_sum), interval.loss_count],
                              dtype=torch.float64, device=reduce_device)
        dist.all_reduce(summed)
        waited = torch.tensor([interval.data_wait_s / elapsed], dtype=torch.float64, device=reduce_device)
        dist.all_reduce(waited, op=dist.ReduceOp.MAX)
        values = summed.tolist()
        work = BatchWork.from_list(values[:-2])
        loss = values[-2] / max(values[-1], 1)
        peak = peak_memory_bytes() if self.device.type == "cuda" else None
        extremes = gather_memory_extremes(peak or 0)
        s_per_it = elapsed / max(interval.steps, 1)
        peak_flops = peak_flops_per_device(self.device_name)
        mfu = None
        if peak_flops:
            mfu = model_flops(work, self.params) / (elapsed * peak_flops * self.ranks.world_size)
        record = {
            "event": "train",
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.sampler.epoch,
            "s_per_it": s_per_it,
            "samples_per_s": work.samples / elapsed,
            "tokens_per_s": work.tokens / elapsed,
            "mfu": mfu,
            "data_wait": float(waited.item()),
            "mem_peak_gib": None if peak is None else peak / GIB,
            "mem_min_gib": None if peak is None else extremes.min_bytes / GIB,
            "mem_max_gib": None if peak is None else extremes.max_bytes / GIB,
            "loss": loss,
            "lr": interval.lr,
            "eta_s": (self.total_steps - self.step) * s_per_it,
            "grad_norm": self._grad_norm(),
            "bad_samples": self.bad_samples + work.bad_samples,  # left out at start + replaced since
            "rank": self.ranks.rank,
            "world_size": self.ranks.world_size,
            "time": time.time(),
        }
        if not math.isfinite(loss):
            raise JobError(f"the loss is {loss} at step {self.step}; lower training.learning_rate or check the data")
        self.bad_samples = record["bad_samples"]
        self.figures["bad_samples"] = self.bad_samples
        self.figures.update(loss=loss, learning_rate=interval.lr, grad_norm=record["grad_norm"],
                            tokens_per_s=record["tokens_per_s"], mfu=mfu, data_wait_ratio=record["data_wait"],
                            eta_s=record["eta_s"])
        if self.ranks.prints:
            print(format_log_line(record), flush=True)
            metrics.write(record)
        if self.trackers is not None:
            self.trackers.log(self.step, record)

    def _grad_norm(self) -> float | None:
        """The global gradient norm DeepSpeed measured at the last optimizer step (before clipping)."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        norm = float(norm)
        return norm if math.isfinite(norm) else None

    def _lr(self) -> float:
        groups = self.engine.optimizer.param_groups
        for group in groups:
            if str(group.get("name", "")).startswith("llm"):
                return float(group["lr"])
        return float(groups[0]["lr"])

    def _finish(self, metrics: MetricsFile) -> None:
        """Prints the norm of all trainable parameters (equal on every rank when they agree) and the
        bad samples of the run (left out at start + replaced; as of the last log line, which the
        last step always writes)."""
        import torch

        total = torch.zeros((), dtype=torch.float64)
        for param in self.engine.module.parameters():
            if param.requires_grad:
                total += param.detach().double().pow(2).sum().cpu()
        norm = float(total.sqrt())
        record = {"event": "done", "step": self.step, "param_norm": norm, "rank": self.ranks.rank,
                  "bad_samples": self.bad_samples}
        bad = f" bad_samples={self.bad_samples}" if self.bad_samples else ""
        # every rank prints this line: one write of the whole line, so ranks sharing a stdout (PYTHONUNBUFFERED,
        # as the image sets it) never glue their lines together
        sys.stdout.write(f"train done step={self.step} rank={self.ranks.rank} param_norm={norm:.10e}{bad}\n")
        sys.stdout.flush()
        metrics.write(record)
        self._close_trackers()


def run(spec_path: str) -> None:
    from janus_job.config.load import load_spec

    Trainer(load_spec(spec_path), spec_path).run()
