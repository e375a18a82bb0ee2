"""The training step of JanusVLN, measured: JanusVLN's own configuration against janus-train's.

    python3 bench/step.py --gpus 4 --configs official,janus --steps 1 --warmup 1
    python3 bench/step.py --tiny            # CPU, gloo, 2 processes, tiny models (CI)

For each config name the bench starts its own `torchrun` process group (one after the other,
so GPU memory is freed in between), builds the full-size model with random weights directly on
the GPU (Qwen2.5-VL-7B + VGGT-1B shapes, bf16), feeds it synthetic samples at the official
geometry and runs `--warmup` + `--steps` + `--profile-steps` optimizer steps with real
DeepSpeed. It prints a table and writes one JSON (`$OUT/...` or
`bench/results/<date>-<card>-<gpus>.json`) with one top-level object per config plus `card`,
`gpus` and `ratio` (janus / official samples/s per GPU). docs/performance.md defines every field.

Synthetic data (official geometry): trajectories of 20..80 steps (uniform, seeded); step i of a
trajectory sees frames 0..i when i <= 8, else 9 frames (JanusVLN's create_data rule); 640x480
frames -> VGGT 490x644 (35x46 patches, even crop 34x46) and Qwen 476x644 = 391 tokens per
image; text = system turn + instruction (150..260 tokens) + a 12..24-token labelled answer.

Watchdog (progress, not wall time): every rank runs a heartbeat thread that notes when its main
thread last moved (common.Heartbeat). A micro-step in which no rank has moved for `--budget-s`
(all of them sleep or wait in a collective) is a stall: each rank has dumped its Python stacks
into the run folder by then, the bench kills the process group, records `stalled: true` with
the stacks and goes on with the next config. A slow step on a loaded machine keeps moving and is
never taken for a stall.

Config names: official, official_inside (JanusVLN exact: VGGT inside the ZeRO-3 engine; stalls),
janus (the spec defaults janus-train ships), janus_* (one spec field changed, for the
optimisation table), plan_a .. plan_e (single-change proposals, each applied alone to
`official`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import common  # noqa: E402  (bench/common.py)

from janus_job.deploy.launch import ALLOCATOR_DEFAULT, cpu_adam_threads  # noqa: E402

PHASES = ("data_wait", "vggt", "vision_tower", "llm_forward", "forward_other", "backward", "optimizer_step")
SOURCE_SIZE = (640, 480)  # R2R/RxR frames (width, height)
TINY_SOURCE_SIZE = (64, 48)
TINY_TARGET_WIDTH = 56
TRAJECTORY_STEPS = (20, 80)
MAX_HISTORY = 8
PROMPT_TOKENS = (150, 260)
ANSWER_TOKENS = (12, 24)
FRAME_POOL = 12  # distinct synthetic JPEG frames (decode cost is per frame, content is irrelevant)
STACK_CHARS = 20000


# ---------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Setup:
    """One measured configuration."""

    description: str
    deepspeed: str  # "official" (JanusVLN zero3.json), "spec" (janus-train defaults), "zero2_offload"
    spatial: str  # "cached" (from the store) | "online" (VGGT runs in the step)
    vision: str  # "online" | "cached"
    sampler: str  # "length_grouped" | "balanced"
    gradient_checkpointing: bool = True
    optimizer: str = "torch"  # "torch": torch AdamW (fused on GPU); "deepspeed": the config's section
    micro_batch_size: int = 1
    accumulation: int = 8
    target_width: int = 644
    decode: str = "pil"  # frame decode in the loader when an encoder runs online: pil | cv2
    workers: int = 8
    prefetch: int = 2
    write_through: bool = False  # plan B: store every computed feature (1 epoch = all misses)
    vggt_mode: str = "streaming"  # online VGGT: "streaming" (one call per frame) | "batched" (per sample)
    vggt_registered: bool = False  # online VGGT inside the module tree (ZeRO-3 partitions it)
    # janus_job.models.janusvln.lean MLP/RMSNorm (the product's model); False = transformers' own
    lean_activations: bool = False
    loader_indices: bool = False  # the collator computes positions and indices (the product's loader; not JanusVLN's)
    compile_layers: bool = False  # training.compile: each decoder layer compiled
    allocator_conf: str = ""  # PYTORCH_CUDA_ALLOC_CONF of the ranks ("" = torch's default allocator)
    spec_overrides: tuple = ()  # (dotted spec path, value) pairs for the spec-based configs


OFFICIAL = Setup(
    description="JanusVLN train.sh: ZeRO-3 (zero3.json), micro 1 x accum 8, grad ckpt, VGGT streamed per "
    "frame + vision tower online, length-grouped sampler, torch AdamW; VGGT replicated outside the engine",
    deepspeed="official",
    spatial="online",
    vision="online",
    sampler="length_grouped",
)


def janus_setup(world_size: int, tiny: bool = False, overrides: tuple = (), description: str = "") -> Setup:
    """The spec defaults janus-train ships (as `janus_job.config.spec` defines them), plus `overrides`."""
    spec = janus_spec(world_size, tiny, overrides)
    t, d = spec.training, spec.data
    return Setup(
        description=description or "janus-train defaults (JobSpec): features precomputed, rendered DeepSpeed config",
        deepspeed="spec",
        spec_overrides=overrides,
        spatial="cached" if spec.features.mode == "precomputed" else "online",
        vggt_mode="batched",  # the model's default, what the trainer runs online
        vggt_registered=spec.deepspeed.zero_stage < 3,  # as janus_job.train.trainer attaches it
        lean_activations=True,  # janus_job.train.trainer builds the model with it
        loader_indices=True,  # janus_job.train.trainer's collator
        compile_layers=t.compile,
        allocator_conf=ALLOCATOR_DEFAULT,  # janus-job launch sets it for the trainer
        vision="cached" if spec.features.cache_vision else "online",
        sampler="balanced" if t.balanced_sampler else "length_grouped",
        gradient_checkpointing=t.gradient_checkpointing,
        optimizer=spec.deepspeed.optimizer,
        micro_batch_size=t.micro_batch_size,
        accumulation=spec.accumulation_for(world_size),
        workers=d.num_workers,
        prefetch=d.prefetch_factor,
    )


def setups(world_size: int, tiny: bool = False) -> dict[str, Setup]:
    r = dataclasses.replace

    def janus(overrides: tuple = (), description: str = ""):
        try:
            return janus_setup(world_size, tiny, overrides, description)
        except Exception as err:  # JobError: the product refuses this spec at this size
            return err

    def janus_with(description: str, **changes):
        """janus with Setup fields (not spec fields) changed; the spec's refusal passes through."""
        setup = janus()
        return r(setup, description=description, **changes) if isinstance(setup, Setup) else setup

    return {
        "official": OFFICIAL,
        "official_inside": r(
            OFFICIAL,
            vggt_registered=True,
            description="JanusVLN exact: VGGT inside the ZeRO-3 engine (partitioned), streamed per frame",
        ),
        "janus": janus(),
        "janus_ckpt": janus(
            (("training.gradient_checkpointing", True),),
            "janus defaults with gradient checkpointing (the default before this measurement)",
        ),
        "janus_zero3": janus((("deepspeed.zero_stage", 3),), "janus defaults at ZeRO-3"),
        "janus_zero2": janus((("deepspeed.zero_stage", 2),), "janus defaults at ZeRO-2 (gradients reduce-scattered "
                             "at every micro-step; the default before ZeRO-1)"),
        "janus_stock_layers": janus_with("janus defaults with transformers' own MLP and RMSNorm "
                                         "(no janus_job.models.janusvln.lean)",
                                         lean_activations=False),
        "janus_default_allocator": janus_with("janus defaults with torch's default CUDA allocator settings "
                                              "(no expandable segments)", allocator_conf=""),
        "janus_torch_adam": janus((("deepspeed.optimizer", "torch"),),
                                  "janus defaults with torch AdamW instead of DeepSpeed's"),
        "janus_length_grouped": janus((("training.balanced_sampler", False),),
                                      "janus defaults with JanusVLN's length-grouped sampler"),
        "janus_compiled": janus((("training.compile", True),), "janus defaults with training.compile (each decoder "
                                "layer compiled)"),
        "janus_online": janus((("features.mode", "online"), ("features.cache_vision", False)),
                              "janus defaults with both encoders online (features.mode online)"),
        "plan_a": r(OFFICIAL, spatial="cached", vision="cached", description="official + precomputed VGGT and "
                    "vision features (seed plan A)"),
        "plan_b": r(OFFICIAL, write_through=True, description="official + read-through cache in its first "
                    "epoch: every feature computed online and written (seed plan B; 1 epoch = no hits)"),
        "plan_c": r(OFFICIAL, deepspeed="zero2_offload", optimizer="deepspeed", description="official with "
                    "ZeRO-2 + CPU optimizer offload (DeepSpeedCPUAdam) (seed plan C)"),
        "plan_d": r(OFFICIAL, target_width=616, description="official at max_pixels 384x28x28: frames 462x616 "
                    "(VGGT) / 448x616 (Qwen) = 352 tokens per image (seed plan D)"),
        "plan_e": r(OFFICIAL, workers=16, prefetch=4, decode="cv2", description="official + 16 loader workers, "
                    "prefetch 4, cv2 decode (PIL if cv2 is missing) (seed plan E)"),
    }


def janus_spec(world_size: int, tiny: bool = False, overrides: tuple = ()):
    """The spec defaults at `world_size` (bench/common.py), plus `overrides`."""
    return common.default_job_spec("bench-step", world_size, tiny=tiny, overrides=overrides)


# JanusVLN's scripts/zero3.json (values), with the "auto" entries as the HF Trainer fills them.
def official_zero3_config(hidden_size: int, world_size: int, micro: int, accumulation: int) -> dict:
    return {
        "train_batch_size": micro * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 1.0,  # HF max_grad_norm default
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": True},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "sub_group_size": int(1e9),
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_max_live_parameters": int(1e9),
            "stage3_max_reuse_distance": int(1e9),
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }


def zero2_offload_config(hidden_size: int, world_size: int, micro: int, accumulation: int) -> dict:
    config = official_zero3_config(hidden_size, world_size, micro, accumulation)
    config["zero_optimization"] = {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "allgather_partitions": True,
        "allgather_bucket_size": int(2e8),
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": hidden_size * hidden_size,
        "contiguous_gradients": True,
    }
    config["optimizer"] = {
        "type": "AdamW",
        "params": {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
    }
    return config


# ---------------------------------------------------------------- synthetic data


@dataclass
class SyntheticSample:
    id: str
    frames: list[int]  # indices into the frame pool, history then current
    prompt_tokens: int
    answer_tokens: int


def synthetic_samples(count: int, seed: int) -> list[SyntheticSample]:
    """`count` samples drawn from synthetic trajectories with JanusVLN's history-frame rule."""
    import numpy as np

    rng = np.random.default_rng(seed)
    population: list[int] = []  # frame count of every step of every trajectory
    while len(population) < 20 * count:
        length = int(rng.integers(TRAJECTORY_STEPS[0], TRAJECTORY_STEPS[1] + 1))
        population.extend(min(i, MAX_HISTORY) + 1 for i in range(length))
    chosen = rng.choice(len(population), size=count, replace=False)
    samples = []
    for n, index in enumerate(chosen):
        frames = population[int(index)]
        samples.append(
            SyntheticSample(
                id=f"traj-sample-{n:05d}",
                frames=[int(f) for f in rng.integers(0, FRAME_POOL, frames)],
                prompt_tokens=int(rng.integers(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1)),
                answer_tokens=int(rng.integers(ANSWER_TOKENS[0], ANSWER_TOKENS[1] + 1)),
            )
        )
    return samples


def synthetic_jpegs(size: tuple[int, int], seed: int) -> list[bytes]:
    """Smooth random 8-bit RGB frames, JPEG-encoded (quality 90): decode cost like real frames."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    out = []
    for _ in range(FRAME_POOL):
        coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3)), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(noisy.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


@dataclass
class TokenIds:
    image: int
    vision_start: int
    vision_end: int
    text_low: int
    text_high: int


class SyntheticDataset:
    """Items in `janus_job.data.dataset.JanusDataset`'s format for `JanusCollator`.

    Online encoders: frames are really decoded (PIL or cv2) and preprocessed with janus_job.data.frames;
    pixel values come from Qwen's image processor. Cached features: bf16 tensors from an in-memory
    pool, copied per item like a store read (the store path's own speed is bench/loader.py's job).
    """

    def __init__(
        self,
        samples,
        setup: Setup,
        geometry,
        ids: TokenIds,
        spatial_channels: int,
        vision_channels: int,
        source_size,
        seed: int = 0,
    ) -> None:
        self.samples = samples
        self.setup = setup
        self.geometry = geometry
        self.ids = ids
        self.spatial_channels = spatial_channels
        self.vision_channels = vision_channels
        self.source_size = source_size
        self.seed = seed
        self.online = setup.spatial != "cached" or setup.vision == "online"
        self.jpegs = synthetic_jpegs(source_size, seed) if self.online else None
        self._pool = None
        self._processor = None
        self.decoder = setup.decode
        if self.decoder == "cv2":
            try:
                import cv2  # noqa: F401
            except ImportError:
                self.decoder = "pil"

    def __len__(self) -> int:
        return len(self.samples)

    def token_length(self, sample: SyntheticSample) -> int:
        return len(self._text_layout(sample)[0])

    def _text_layout(self, sample: SyntheticSample) -> tuple[list[str], int]:
        """Token kinds in order: 's' special/text, 'i' image, 'a' answer (labelled)."""
        g = self.geometry
        layout = ["s"] * 12  # system turn + user header
        for _ in sample.frames:
            layout += ["s"] + ["i"] * g.tokens_per_image + ["s"]
        layout += ["s"] * sample.prompt_tokens + ["s"] * 5  # instruction, end of turn, assistant header
        layout += ["a"] * sample.answer_tokens + ["s"] * 2
        return layout, sample.answer_tokens

    def _pools(self):
        import torch

        if self._pool is None:
            g = torch.Generator().manual_seed(self.seed + 1)
            sh, sw = self.geometry.spatial_grid
            qh, qw = self.geometry.qwen_grid
            self._pool = {
                "spatial": [
                    torch.randn(sh, sw, self.spatial_channels, generator=g).to(torch.bfloat16) for _ in range(4)
                ],
                "vision": [
                    torch.randn(qh * qw, self.vision_channels, generator=g).to(torch.bfloat16) for _ in range(4)
                ],
            }
        return self._pool

    def _decode(self, index: int):
        import numpy as np

        from janus_job.data import frames

        data = self.jpegs[index]
        if self.decoder == "cv2":
            import cv2
            import torch

            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            h, w = frames.vggt_resized_size(rgb.shape[1], rgb.shape[0], self.geometry.vggt_width)
            resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_CUBIC)
            image = torch.from_numpy(resized).permute(2, 0, 1).float().div(255)
            if h > w:  # the same centre crop as frames.preprocess_for_vggt
                image = image[:, (h - w) // 2 : (h - w) // 2 + w]
            return image.contiguous()
        return frames.preprocess_for_vggt(frames.load_frame(data), self.geometry.vggt_width)

    def __getitem__(self, index: int) -> dict:
        import torch

        from janus_job.data import frames

        sample = self.samples[index]
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        layout, _ = self._text_layout(sample)
        kinds = torch.tensor([{"s": 0, "i": 1, "a": 2}[k] for k in layout])
        input_ids = torch.randint(self.ids.text_low, self.ids.text_high, (len(layout),), generator=rng)
        input_ids[kinds == 1] = self.ids.image
        before = torch.nonzero(kinds[1:] == 1).flatten()
        starts = before[kinds[before] != 1]  # the token before each image run
        input_ids[starts] = self.ids.vision_start
        after = torch.nonzero(kinds[:-1] == 1).flatten() + 1
        input_ids[after[kinds[after] != 1]] = self.ids.vision_end
        labels = torch.full_like(input_ids, -100)
        labels[kinds == 2] = input_ids[kinds == 2]
        g = self.geometry
        n = len(sample.frames)
        item: dict[str, Any] = {
            "sample_id": sample.id,
            "input_ids": input_ids,
            "labels": labels,
            "image_grid_thw": torch.tensor([[1, *g.qwen_grid]] * n),
        }
        decoded = [self._decode(f) for f in sample.frames] if self.online else None
        if self.setup.spatial == "cached":
            pool = self._pools()["spatial"]
            item["spatial_features"] = pool[index % len(pool)].clone()
        else:
            item["vggt_frames"] = torch.stack(decoded)
        if self.setup.vision == "cached":
            pool = self._pools()["vision"]
            item["vision_features"] = torch.cat([pool[(index + k) % len(pool)] for k in range(n)])
        else:
            images = [frames.crop_to_even_patch_grid(img) for img in decoded]
            out = self.processor(images=images, return_tensors="pt", do_rescale=False)
            if out["image_grid_thw"].tolist() != item["image_grid_thw"].tolist():
                raise RuntimeError(f"image processor grid {out['image_grid_thw'].tolist()} != geometry {g}")
            item["pixel_values"] = out["pixel_values"]
        return item

    @property
    def processor(self):
        if self._processor is None:
            from janus_job.demo.tiny import tiny_image_processor

            pixels = self.geometry.qwen_height * self.geometry.qwen_width
            self._processor = tiny_image_processor(min_pixels=pixels, max_pixels=pixels)
        return self._processor


# ---------------------------------------------------------------- worker (one rank, under torchrun)


class PhaseClock:
    """Seconds per phase over a window of micro-steps.

    mode "events": CUDA events on the compute stream, read once at the end of the window (no
    synchronisation inside it, so overlap is left alone; a phase includes the time the compute
    stream waits for collectives issued in it). mode "sync": the device is synchronised at every
    boundary (exact, but serialises copies and collectives with compute). mode "cpu": wall
    clock (CPU runs are synchronous anyway). mode "off": nothing is recorded.
    Data wait is always host wall time (the loader is on the host).
    """

    GPU_PHASES = ("vggt", "vision_tower", "llm_forward", "forward", "backward", "optimizer_step")

    def __init__(self, device) -> None:
        self.device = device
        self.mode = "off"
        self._open: dict[str, Any] = {}
        self._spans: dict[str, list] = {p: [] for p in self.GPU_PHASES}
        self._seconds = dict.fromkeys(self.GPU_PHASES, 0.0)
        self.data_wait_s = 0.0

    def _mark(self):
        if self.mode == "events":
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        if self.mode == "sync" and self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self, phase: str) -> None:
        if self.mode != "off":
            self._open[phase] = self._mark()

    def stop(self, phase: str) -> None:
        if self.mode == "off" or phase not in self._open:
            return
        begin, end = self._open.pop(phase), self._mark()
        if self.mode == "events":
            self._spans[phase].append((begin, end))
        else:
            self._seconds[phase] += end - begin

    def hooks(self, module, phase: str) -> None:
        def before(*_):
            self.start(phase)

        def after(*_):  # returns None: the module's output is left alone
            self.stop(phase)

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def collect(self) -> dict[str, float]:
        """Seconds per phase (PHASES) since the last collect; synchronises for events."""
        if self._spans["forward"]:
            import torch

            torch.cuda.synchronize(self.device)
        seconds = dict(self._seconds)
        for phase, spans in self._spans.items():
            seconds[phase] += sum(b.elapsed_time(e) for b, e in spans) / 1000.0
        out = {p: 0.0 for p in PHASES}
        out.update({p: seconds[p] for p in PHASES if p in seconds})
        out["forward_other"] = max(
            0.0, seconds["forward"] - seconds["vggt"] - seconds["vision_tower"] - seconds["llm_forward"]
        )
        out["data_wait"] = self.data_wait_s
        self._spans = {p: [] for p in self.GPU_PHASES}
        self._seconds = dict.fromkeys(self.GPU_PHASES, 0.0)
        self.data_wait_s = 0.0
        return out


def _peak_memory_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # host RSS stand-in


def _reserved_memory_bytes(device) -> int | None:
    import torch

    return int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None


def _count(module) -> int:
    if module is None:
        return 0
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


def _build_optimizer_ops(config: dict, skip: bool) -> dict:
    """Builds the DeepSpeed op the config's optimizer needs up front, timed (JIT compile cost)."""
    if "optimizer" not in config:
        return {}
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    name = "CPUAdamBuilder" if offload == "cpu" else "FusedAdamBuilder"
    if skip:
        return {"op": name, "skipped": True}
    import deepspeed.ops.op_builder as builders

    started = time.perf_counter()
    try:
        getattr(builders, name)().load()
    except Exception as err:  # compile errors come in many types
        return {
            "op": name,
            "error": f"{type(err).__name__}: {str(err)[:400]}",
            "seconds": time.perf_counter() - started,
        }
    return {"op": name, "seconds": time.perf_counter() - started}


def _ds_config(setup: Setup, hidden: int, world: int, tiny: bool) -> dict:
    if setup.deepspeed == "spec":
        from janus_job.config.deepspeed import render_deepspeed_config

        return render_deepspeed_config(janus_spec(world, tiny, setup.spec_overrides), world)
    if setup.deepspeed == "zero2_offload":
        return zero2_offload_config(hidden, world, setup.micro_batch_size, setup.accumulation)
    return official_zero3_config(hidden, world, setup.micro_batch_size, setup.accumulation)


def worker(args: argparse.Namespace) -> None:
    import torch

    from janus_job.data import frames
    from janus_job.models.flavors import qwen25_vl_7b_config
    from janus_job.models.janusvln.build import model_from_config
    from janus_job.train import engine as product  # module attribute lookups: the trainer's own functions
    from janus_job.train.distributed import init_distributed
    from janus_job.train.metrics import BatchWork, ParamCounts, model_flops

    folder = Path(args.run_dir)
    ranks, device = init_distributed()
    rank, world = ranks.rank, ranks.world_size
    stacks = open(folder / f"stacks-rank{rank}.txt", "w")
    # what the parent watches: this rank's phase and micro-step, and when its main thread last moved
    progress = common.Heartbeat(folder / f"progress-rank{rank}.json", stacks=stacks,
                                dump_after_s=args.budget_s).start()
    progress("init")
    setup = setups(world, args.tiny)[args.config]
    if isinstance(setup, Exception):
        raise SystemExit(f"{args.config}: {setup}")
    if args.tiny:
        setup = dataclasses.replace(setup, workers=min(setup.workers, 1), prefetch=2)
    torch.manual_seed(1234)  # the same random weights on every rank
    if args.gpu_memory_gib and device.type == "cuda":
        # a larger card behaves like a smaller one for fitting: the allocator refuses beyond this
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gib * 1024**3 / total), device)
    t_init = time.perf_counter()

    # -- model (random weights, built on the device) --
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        from janus_job.demo.tiny import tiny_qwen_config, tiny_tokenizer, tiny_vggt_config

        qwen_config, vggt_config = tiny_qwen_config(tiny_tokenizer()), tiny_vggt_config()
        source_size, target_width = TINY_SOURCE_SIZE, TINY_TARGET_WIDTH
    else:
        from janus_job.models.vggt import VGGTAggregatorConfig

        qwen_config, vggt_config = qwen25_vl_7b_config(), VGGTAggregatorConfig()
        source_size, target_width = SOURCE_SIZE, setup.target_width
    geometry = frames.frame_geometry(*source_size, target_width=target_width)
    spatial_channels = 2 * vggt_config.embed_dim
    online_vggt = setup.spatial != "cached"
    # official: the aggregator is kept outside the module tree (DeepSpeed neither partitions nor
    # gathers it); official_inside: registered under model.vggt, as JanusVLN has it.
    model = model_from_config(qwen_config, vggt_config if online_vggt else None, dtype=dtype, device=device,
                              gradient_checkpointing=setup.gradient_checkpointing, spatial_mode=setup.vggt_mode,
                              vggt_dtype=dtype, spatial_channels=spatial_channels,
                              register_vggt=setup.vggt_registered, lean_activations=setup.lean_activations)
    if setup.compile_layers:
        from janus_job.models.janusvln.compile import compile_decoder_layers

        compile_decoder_layers(model.model.language_model)
    params = ParamCounts.of(model)
    params.vggt = _count(model.aggregator)  # also when it is kept outside the module tree
    llm_params = _count(model.model.language_model) + _count(model.lm_head)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hidden = qwen_config.text_config.hidden_size
    text_cfg = qwen_config.text_config
    ids = TokenIds(
        image=qwen_config.image_token_id,
        vision_start=qwen_config.vision_start_token_id,
        vision_end=qwen_config.vision_end_token_id,
        text_low=20,
        text_high=min(text_cfg.vocab_size, 151000),
    )
    model_build_s = time.perf_counter() - t_init

    # -- DeepSpeed: the trainer's engine (param groups, optimizer, schedule, deepspeed.initialize) --
    total_steps = args.warmup + args.steps + args.profile_steps
    config = _ds_config(setup, hidden, world, args.tiny)
    ops = _build_optimizer_ops(config, skip=args.skip_ds_ops or args.tiny)
    optimizer_note = "deepspeed config optimizer section"
    if "optimizer" in config and (ops.get("error") or ops.get("skipped")):
        if config.get("zero_optimization", {}).get("offload_optimizer"):
            raise SystemExit(f"{args.config}: CPU Adam cannot be built ({ops}); plan C needs it")
        config = {k: v for k, v in config.items() if k != "optimizer"}
        optimizer_note = f"torch AdamW (fallback: {ops['op']} {'skipped' if ops.get('skipped') else 'failed'})"
    if "optimizer" not in config and optimizer_note.startswith("deepspeed"):
        optimizer_note = f"torch AdamW (fused={device.type == 'cuda'})"
    # the spec's training section gives the learning rates, weight decay and schedule (JanusVLN's
    # values by default); the DeepSpeed config is the configuration's own (official: JanusVLN's)
    t_engine = time.perf_counter()
    engine, config = product.build_engine(
        janus_spec(world, args.tiny, setup.spec_overrides), model, world, total_steps, config=config
    )
    engine_init_s = time.perf_counter() - t_engine
    accumulation = engine.gradient_accumulation_steps()
    micro = engine.train_micro_batch_size_per_gpu()
    global_batch = micro * accumulation * world

    # -- data --
    from janus_job.data.dataset import JanusCollator
    from janus_job.data.sampler import BalancedBatchSampler, LengthGroupedBatchSampler, load_ratios

    samples = synthetic_samples(global_batch * total_steps, seed=args.seed)
    dataset = SyntheticDataset(
        samples,
        setup,
        geometry,
        ids,
        spatial_channels,
        qwen_config.vision_config.hidden_size,
        source_size,
        seed=args.seed,
    )
    lengths = [dataset.token_length(s) for s in samples]
    sampler_cls = BalancedBatchSampler if setup.sampler == "balanced" else LengthGroupedBatchSampler
    sampler = sampler_cls(
        lengths, micro_batch_size=micro, world_size=world, rank=rank, global_batch_size=global_batch, seed=args.seed
    )
    ratios = [load_ratios(sampler.plan(0, s), lengths) for s in range(total_steps)]
    from torch.utils.data import DataLoader

    if setup.loader_indices:
        collate = JanusCollator(0, image_token_id=qwen_config.image_token_id,
                                spatial_merge_size=qwen_config.vision_config.spatial_merge_size)
    else:
        collate = JanusCollator(0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                        num_workers=setup.workers, prefetch_factor=setup.prefetch if setup.workers else None,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    batches = iter(loader)

    # -- measuring --
    clock = PhaseClock(device)
    if online_vggt:
        clock.hooks(engine.module.aggregator, "vggt")  # once per frame (streaming) or per sample
    clock.hooks(engine.module.model.visual, "vision_tower")
    clock.hooks(engine.module.model.language_model, "llm_forward")
    write_dir = folder / f"write-through-rank{rank}"
    if setup.write_through:
        write_dir.mkdir(exist_ok=True)
    image_token = qwen_config.image_token_id

    def micro_step(step: int, k: int) -> BatchWork:
        work = BatchWork()
        waited = time.perf_counter()
        batch = next(batches)
        work.add_batch(batch, image_token)
        sample_ids = batch["sample_ids"]
        clock.data_wait_s += time.perf_counter() - waited
        if args.fault_hang_rank == rank and step == args.warmup and k == 0:
            time.sleep(10 * args.budget_s)  # fault injection for the watchdog test
        # the trainer's micro-step: host-to-device copy, forward, backward, optimizer step
        out = product.micro_step(
            engine, batch, device, clock=clock, **({"return_computed_features": True} if setup.write_through else {})
        )
        if setup.write_through:
            for sid, sp in zip(sample_ids, out.computed_spatial or []):
                torch.save({"spatial": sp.detach().to("cpu")}, write_dir / f"{sid}.pt")
            if out.computed_vision is not None:
                torch.save(out.computed_vision.detach().to("cpu"), write_dir / f"{sample_ids[0]}-vision.pt")
        return work, out.loss.detach().float()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def add(total: BatchWork, work: BatchWork) -> None:
        for name, value in dataclasses.asdict(work).items():
            setattr(total, name, getattr(total, name) + value)

    result_path = folder / "result.json"
    engine.train()
    first_micro_s = first_batch_wait_s = None
    micro_times: list[float] = []
    windows = {
        kind: {"s": 0.0, "work": BatchWork(), "phases": None, "loss": 0.0, "losses": 0}
        for kind in ("measure", "profile")
    }
    window_start = 0.0
    for step in range(total_steps):
        kind = "warmup" if step < args.warmup else "measure" if step < args.warmup + args.steps else "profile"
        if step in (args.warmup, args.warmup + args.steps) and kind != "warmup":
            sync()
            if kind == "measure" and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            clock.collect()
            clock.mode = {"measure": "events" if device.type == "cuda" else "cpu", "profile": "sync"}[kind]
            window_start = time.perf_counter()
        for k in range(accumulation):
            progress(kind, step, k)
            started = time.perf_counter()
            work, loss = micro_step(step, k)
            if first_micro_s is None:
                sync()
                first_micro_s = time.perf_counter() - started
                first_batch_wait_s = clock.data_wait_s
            micro_times.append(time.perf_counter() - started)
            if kind != "warmup":
                add(windows[kind]["work"], work)
                windows[kind]["loss"] = windows[kind]["loss"] + loss  # a device tensor: no sync here
                windows[kind]["losses"] += 1
        last_of_window = step + 1 in (args.warmup + args.steps, total_steps)
        if kind != "warmup" and last_of_window:
            sync()
            windows[kind]["s"] = time.perf_counter() - window_start
            windows[kind]["phases"] = clock.collect()
            clock.mode = "off"
        if rank == 0:  # what survives a kill later on (rank 0's own clock; no memory figures yet)
            partial = {"partial": True, "steps_done": step + 1, "first_micro_step_s": first_micro_s}
            if windows["measure"]["s"]:
                partial.update(
                    measured_s=windows["measure"]["s"],
                    samples_per_s_per_gpu=global_batch * args.steps / windows["measure"]["s"] / world,
                    s_per_step=windows["measure"]["s"] / args.steps,
                )
            common.write_json_atomic(result_path, partial)
    progress("report")

    # -- gather and report --
    import torch.distributed as dist

    per_rank = [None] * world
    dist.all_gather_object(
        per_rank,
        {
            "peak_mem_bytes": _peak_memory_bytes(device),
            "peak_reserved_bytes": _reserved_memory_bytes(device),
            "alloc_retries": (
                int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0)) if device.type == "cuda" else None
            ),
            "windows": {
                k: {
                    "s": w["s"],
                    "phases": w["phases"],
                    "work": dataclasses.asdict(w["work"]),
                    "loss": float(w["loss"]),
                    "losses": w["losses"],
                }
                for k, w in windows.items()
            },
        },
    )
    if rank == 0:

        def window(kind: str):
            runs = [r["windows"][kind] for r in per_rank]
            seconds = max(r["s"] for r in runs)
            work = BatchWork(**{k: sum(r["work"][k] for r in runs) for k in runs[0]["work"]})
            if not seconds or runs[0]["phases"] is None:
                return seconds, work, None, None, None
            mean = {p: sum(r["phases"][p] for r in runs) / world for p in PHASES}
            shares = {p: v / seconds for p, v in mean.items()}
            shares["unattributed"] = 1.0 - sum(shares.values())
            per_micro = {
                p: v / (accumulation * (args.steps if kind == "measure" else args.profile_steps))
                for p, v in mean.items()
            }
            per_rank_shares = [{p: r["phases"][p] / r["s"] for p in PHASES} for r in runs]
            return seconds, work, shares, per_micro, per_rank_shares

        elapsed, work, shares, per_micro, rank_shares = window("measure")
        synced_s, _, synced_shares, synced_per_micro, _ = window("profile")
        peaks = [r["peak_mem_bytes"] / common.GIB for r in per_rank]
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = (
            args.peak_tflops * 1e12
            if args.peak_tflops
            else (common.H100_DENSE_BF16_FLOPS if device.type == "cuda" else None)
        )
        six_pt = 6.0 * trainable * work.tokens
        result = {
            "config": args.config,
            "description": setup.description,
            "status": "ok",
            "stalled": False,
            "card": card,
            "gpu_memory_cap_gib": args.gpu_memory_gib or None,
            "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "world_size": world,
            "micro_batch_size": micro,
            "gradient_accumulation_steps": accumulation,
            "global_batch_size": global_batch,
            "zero_stage": config["zero_optimization"]["stage"],
            "optimizer": optimizer_note,
            "optimizer_ops_build": ops,
            "gradient_checkpointing": setup.gradient_checkpointing,
            "sampler": setup.sampler,
            "spatial_source": setup.spatial
            if setup.spatial == "cached"
            else f"online {setup.vggt_mode}, {'inside' if setup.vggt_registered else 'outside'} the engine",
            "vision_source": setup.vision,
            "loader": {
                "workers": setup.workers,
                "prefetch": setup.prefetch,
                "decode": dataset.decoder if dataset.online else "none (cached features)",
            },
            "geometry": dataclasses.asdict(geometry),
            "deepspeed_config": config,
            "steps_warmup": args.warmup,
            "steps_measured": args.steps,
            "steps_profiled": args.profile_steps,
            "measured_s": elapsed,
            "s_per_step": elapsed / args.steps if args.steps else None,
            "samples_per_s": work.samples / elapsed if elapsed else None,
            "samples_per_s_per_gpu": work.samples / elapsed / world if elapsed else None,
            "tokens_per_s": work.tokens / elapsed if elapsed else None,
            "tokens_per_s_per_gpu": work.tokens / elapsed / world if elapsed else None,
            "tokens_per_sample": work.tokens / work.samples if work.samples else None,
            "images_per_sample": work.image_tokens / geometry.tokens_per_image / work.samples if work.samples else None,
            "trainable_params": trainable,
            "llm_params": llm_params,
            "vggt_params": params.vggt,
            "mfu_basis": "6 x trainable params (LLM + lm_head + mergers) x non-pad tokens / time / (GPUs x peak)",
            "mfu": six_pt / (elapsed * world * peak) if elapsed and peak else None,
            "mfu_vs_measured_matmul": (
                six_pt / (elapsed * world * common.H100_MEASURED_MATMUL_FLOPS)
                if elapsed and device.type == "cuda"
                else None
            ),
            "mfu_model_flops": (model_flops(work, params) / (elapsed * world * peak) if elapsed and peak else None),
            "peak_flops_per_gpu": peak,
            "peak_mem_gib_per_rank": peaks,
            "peak_mem_gib_max": max(peaks),
            "peak_mem_spread": (max(peaks) - min(peaks)) / max(peaks) if max(peaks) else None,
            "peak_reserved_gib_per_rank": [
                None if r["peak_reserved_bytes"] is None else r["peak_reserved_bytes"] / common.GIB for r in per_rank
            ],
            "alloc_retries_per_rank": [r["alloc_retries"] for r in per_rank],  # whole run: cache freed, then retried
            "memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "host max RSS",
            "phase_timing": "CUDA events on the compute stream, unsynchronised window"
            if device.type == "cuda"
            else "host wall clock",
            "phase_shares": shares,
            "phase_s_per_micro_step": per_micro,
            "phase_shares_per_rank": rank_shares,
            "s_per_step_synced": synced_s / args.profile_steps if args.profile_steps else None,
            "phase_shares_synced": synced_shares,
            "phase_s_per_micro_step_synced": synced_per_micro,
            "first_micro_step_s": first_micro_s,
            "first_batch_wait_s": first_batch_wait_s,
            "micro_step_s_max": max(micro_times) if micro_times else None,
            "model_build_s": model_build_s,
            "engine_init_s": engine_init_s,
            "sampler_load_ratio_step": max(r[0] for r in ratios),
            "sampler_load_ratio_micro": max(r[1] for r in ratios),
            # mean loss the trainer's micro-step returned over the measured window, all ranks
            "mean_loss": (
                sum(r["windows"]["measure"]["loss"] for r in per_rank)
                / max(1, sum(r["windows"]["measure"]["losses"] for r in per_rank))
            ),
        }
        common.write_json_atomic(result_path, result)
    dist.barrier()
    progress("done")
    progress.stop()


# ---------------------------------------------------------------- the parent (one torchrun per config)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_config(name: str, args: argparse.Namespace, run_root: Path) -> dict:
    """Runs one config in its own torchrun process group; kills it on a stall."""
    folder = run_root / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):
        if old.is_file():
            old.unlink()
    nproc = 2 if args.tiny else args.gpus
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(Path(__file__).resolve()),
        "--worker",
        "--config",
        name,
        "--run-dir",
        str(folder),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--profile-steps",
        str(args.profile_steps),
        "--budget-s",
        str(args.budget_s),
        "--seed",
        str(args.seed),
    ]
    for flag, on in (("--tiny", args.tiny), ("--skip-ds-ops", args.skip_ds_ops)):
        if on:
            cmd.append(flag)
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    if args.gpu_memory_gib:
        cmd += ["--gpu-memory-gib", str(args.gpu_memory_gib)]
    if args.fault_hang_rank is not None and name == args.fault_config:
        cmd += ["--fault-hang-rank", str(args.fault_hang_rank)]
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    for var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        env.setdefault(var, "0" if var == "NCCL_NVLS_ENABLE" else "1")  # NVLink multicast stays off
    if args.tiny:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    setup = setups(nproc, args.tiny).get(name)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)  # each config runs with its own allocator settings
    if isinstance(setup, Setup) and setup.allocator_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = setup.allocator_conf
    if isinstance(setup, Setup) and setup.deepspeed == "zero2_offload" and not args.tiny:
        env.setdefault("OMP_NUM_THREADS", str(cpu_adam_threads(os.cpu_count() or nproc, nproc)))
    log_path = folder / "torchrun.log"
    print(f"[step.py] {name}: starting {nproc} ranks (log {log_path})", flush=True)
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        status, reason = "ok", ""
        while proc.poll() is None:
            time.sleep(0.5)
            now = time.time()
            progress = [_read_json(folder / f"progress-rank{r}.json") for r in range(nproc)]
            in_step = [p for p in progress if p and p["phase"] in ("warmup", "measure", "profile", "report")]
            # a stall: no rank has moved for the budget (a slow rank that computes keeps the others waiting)
            still = min((common.still_for(p, now) for p in progress), default=0.0)
            if in_step and still > args.budget_s + args.grace_s:
                status = "stalled"
                where = max(in_step, key=lambda p: (p["step"], p["micro"]))
                reason = (f"no rank made progress for > {args.budget_s:.0f} s in a micro-step (phase {where['phase']} "
                          f"step {where['step']} micro {where['micro']})")
            elif (len(progress) == nproc and all(p and p["phase"] == "init" for p in progress)
                  and still > args.init_budget_s):
                status, reason = "stalled", f"no rank made progress for > {args.init_budget_s:.0f} s in initialisation"
            elif args.config_limit_s and time.monotonic() - started > args.config_limit_s:
                status, reason = "incomplete", f"config ran > {args.config_limit_s:.0f} s"
            if status != "ok":
                common.kill_tree(proc.pid)  # torchrun, its ranks (own sessions) and their loader workers
                proc.wait()
                break
    wall = time.monotonic() - started
    result = _read_json(folder / "result.json") or {}
    if status == "ok" and (proc.returncode != 0 or result.get("partial") or not result):
        status, reason = "failed", f"torchrun exited with {proc.returncode}"
    if status != "ok":
        result = dict(result, config=name, status=status, stalled=status == "stalled", reason=reason)
        log_text = log_path.read_text(errors="replace")
        result["log_tail"] = log_text[-4000:]
        # Deprecation warnings can push the cause out of the tail: keep the error lines apart.
        result["error_lines"] = [line for line in log_text.splitlines() if "Error" in line or "mismatch" in line][-40:]
        result["stacks"] = {}
        for r in range(nproc):
            text = (
                (folder / f"stacks-rank{r}.txt").read_text(errors="replace")
                if (folder / f"stacks-rank{r}.txt").exists()
                else ""
            )
            result["stacks"][f"rank{r}"] = text[-STACK_CHARS:]
    result["wall_s"] = wall
    print(f"[step.py] {name}: {status} in {wall:.0f} s {reason}", flush=True)
    return result


TABLE = (
    ("config", "config"),
    ("status", "status"),
    ("zero_stage", "ZeRO"),
    ("samples_per_s_per_gpu", "samples/s/GPU"),
    ("s_per_step", "s/step"),
    ("tokens_per_s_per_gpu", "tokens/s/GPU"),
    ("mfu", "MFU(989T)"),
    ("mfu_vs_measured_matmul", "MFU(790T)"),
    ("peak_mem_gib_max", "peak GiB"),
    ("peak_mem_spread", "mem spread"),
    ("first_micro_step_s", "1st micro s"),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=4, help="ranks (GPUs) per config")
    p.add_argument("--configs", default="official,janus", help="comma-separated config names")
    p.add_argument("--steps", type=int, default=1, help="measured optimizer steps (unsynchronised)")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps before measuring")
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="extra optimizer steps timed with synchronisation at every phase boundary",
    )
    p.add_argument(
        "--budget-s", type=float, default=90.0,
        help="watchdog: longest time without progress on any rank within a micro-step",
    )
    p.add_argument("--grace-s", type=float, default=8.0, help="time for the stack dumps before the kill")
    p.add_argument("--init-budget-s", type=float, default=420.0,
                   help="longest time without progress on any rank in model/engine init")
    p.add_argument("--config-limit-s", type=float, default=0.0, help="kill a config after this long (0: no limit)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak per device for MFU (default H100 989)")
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=0.0,
        help="cap each rank's allocator at this many GiB (an H200 run that must fit an 80 GB H100: 78)",
    )
    p.add_argument("--skip-ds-ops", action="store_true", help="do not JIT-build DeepSpeed ops; use torch AdamW")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tiny", action="store_true", help="CPU, gloo, 2 processes, tiny models")
    p.add_argument("--out", help="output folder (default $OUT, else bench/results)")
    p.add_argument("--tag", default="", help="appended to the JSON file name (several runs on one day)")
    p.add_argument("--run-dir", help="working folder (progress, stacks, logs)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--fault-hang-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fault-config", default="official", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import tempfile

    if args.tiny:
        args.budget_s = min(args.budget_s, 60.0)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    known = setups(2 if args.tiny else args.gpus, args.tiny)
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {sorted(known)}")
    run_root = Path(args.run_dir or tempfile.mkdtemp(prefix="bench-step-"))
    gpus = 2 if args.tiny else args.gpus
    card = "cpu" if args.tiny else _card_without_cuda_context()
    path = common.results_path(card, gpus, args.out, prefix="tiny-step-" if args.tiny else "", tag=args.tag)
    results: dict[str, dict] = {}
    for name in names:  # the JSON is rewritten after every config: a killed run keeps what it got
        results[name] = run_config(name, args, run_root)
        report = _report(args, argv, names, results, card, gpus)
        common.write_json_atomic(path, report)
    rows = [dict(r, config=n) for n, r in results.items()]
    common.print_table(rows, TABLE, title=f"bench/step.py on {gpus} x {report['card']}")
    if report["ratio"] is not None:
        print(f"ratio janus/official samples/s per GPU: {report['ratio']:.2f}", flush=True)
    print(f"wrote {path}", flush=True)
    return 0


def _card_without_cuda_context() -> str:
    """The GPU's name from nvidia-smi (the parent must not hold a CUDA context on GPU 0)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown-gpu"


def _report(args, argv, names, results: dict, card: str, gpus: int) -> dict:
    official = (results.get("official") or {}).get("samples_per_s_per_gpu")
    janus = (results.get("janus") or {}).get("samples_per_s_per_gpu")
    return {
        "bench": "step",
        "card": next((r["card"] for r in results.values() if r.get("card")), card),
        "gpus": gpus,
        "tiny": args.tiny,
        "command": " ".join(["bench/step.py"] + (argv if argv is not None else sys.argv[1:])),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "configs": names,
        "ratio": janus / official if official and janus else None,
        "targets": {"ratio_min": 5.0, "janus_samples_per_s_per_gpu_min": 2.0, "peak_mem_spread_max": 0.10},
        **results,
    }


if __name__ == "__main__":
    sys.exit(main())
