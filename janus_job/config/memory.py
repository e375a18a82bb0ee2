"""Does one GPU hold it? A rough upper-end memory estimate of one rank and the refusal when it does not fit.

Sizes of the JanusVLN model (Qwen2.5-VL-7B-Instruct + VGGT-1B), from their configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from janus_job.config.spec import IMAGE_TOKENS_PER_28PX, JobSpec
from janus_job.errors import Problem

# Sizes of the JanusVLN model (Qwen2.5-VL-7B-Instruct + VGGT-1B), from their configs.
QWEN_LLM_PARAMS = 7.62e9  # language model incl. embeddings and untied lm_head (trainable)
QWEN_VISION_PARAMS = 0.63e9  # vision tower blocks (frozen by default)
QWEN_MERGER_PARAMS = 0.045e9  # vision merger (trainable)
SPATIAL_MERGER_PARAMS = 0.048e9  # JanusVLN's spatial merger: 8192->4096->3584 MLP (trainable)
VGGT_PARAMS = 1.26e9  # loaded only when VGGT runs online
LLM_LAYERS, LLM_HIDDEN, LLM_INTERMEDIATE, LLM_VOCAB = 28, 3584, 18944, 152064
TEXT_TOKENS = 512  # instruction + answer tokens per sample (rough)
# hidden-size and intermediate-size tensors one decoder layer keeps for backward (attention inputs,
# q/k/v, outputs, residual-side norms; the MLP's gate, up and product), janus_job.models.janusvln.lean applied
LAYER_SAVED_HIDDEN, LAYER_SAVED_INTERMEDIATE = 7, 3
ANSWER_TOKENS = 64  # labelled (answer) tokens per sample, an upper bound for JanusVLN actions
RUNTIME_OVERHEAD_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class MemoryEstimate:
    """Rough peak memory of one GPU in GiB; the parts are printed when it does not fit."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def describe(self) -> str:
        return (f"weights {self.weights:.1f} + gradients {self.gradients:.1f} + optimizer {self.optimizer:.1f} + "
                f"activations {self.activations:.1f} + logits {self.logits:.1f} + overhead {self.overhead:.1f} "
                f"= {self.total:.1f} GiB")


def tokens_per_sample(spec: JobSpec) -> int:
    images = spec.data.max_history_images + 1
    return images * spec.data.max_pixels // IMAGE_TOKENS_PER_28PX + TEXT_TOKENS


def estimate_gpu_memory(spec: JobSpec, world_size: int | None = None) -> MemoryEstimate:
    """Upper-end estimate for the longest sample: bf16 weights/grads, fp32 optimizer state (16 bytes/param),
    ZeRO sharding over the data-parallel world, activations of the LLM, fp32 logits of the answer."""
    gib = 1024**3
    n = world_size or spec.world_size
    ds, t = spec.deepspeed, spec.training
    trainable = QWEN_LLM_PARAMS + QWEN_MERGER_PARAMS + SPATIAL_MERGER_PARAMS
    if t.vision_learning_rate is not None:
        trainable += QWEN_VISION_PARAMS
    total = QWEN_LLM_PARAMS + QWEN_MERGER_PARAMS + SPATIAL_MERGER_PARAMS
    if not spec.features.cache_vision or spec.features.mode == "online" or t.vision_learning_rate is not None:
        total += QWEN_VISION_PARAMS
    if spec.features.mode == "online":
        total += VGGT_PARAMS

    weight_bytes = 2 * total
    if ds.zero_stage == 3:
        weight_bytes /= n
    if ds.offload_param == "cpu":
        weight_bytes = 0.0
    grad_bytes = 2 * trainable / (n if ds.zero_stage >= 2 else 1)
    # fp32 master weights, Adam's two moments and the fp32 gradient partition DeepSpeed hands the
    # optimizer (measured: 87 GiB at 2 x H200 where 12 bytes/param predicted 70)
    optim_bytes = 16 * trainable / (n if ds.zero_stage >= 1 else 1)
    if ds.offload_optimizer == "cpu":
        optim_bytes = 0.0

    tokens = tokens_per_sample(spec) * t.micro_batch_size
    # bf16 values a decoder layer keeps per token for backward, with janus_job.models.janusvln.lean's MLP and norms
    layer_bytes = (LAYER_SAVED_HIDDEN * LLM_HIDDEN + LAYER_SAVED_INTERMEDIATE * LLM_INTERMEDIATE) * 2
    if t.gradient_checkpointing:
        # one saved hidden state per layer + one layer recomputed at a time
        act_bytes = tokens * (LLM_LAYERS * LLM_HIDDEN * 2 + layer_bytes)
    else:
        act_bytes = tokens * LLM_LAYERS * layer_bytes
    # the loss runs the LM head on answer positions only (janus_job.models.janusvln.model.restricted_lm_loss)
    logit_bytes = ANSWER_TOKENS * t.micro_batch_size * LLM_VOCAB * (2 + 4 + 4)  # bf16, fp32 upcast, fp32 grad
    return MemoryEstimate(weight_bytes / gib, grad_bytes / gib, optim_bytes / gib, act_bytes / gib,
                          logit_bytes / gib, RUNTIME_OVERHEAD_GIB)


def checkpoint_gib(spec: JobSpec) -> float:
    """Size of one checkpoint: bf16 weights, fp32 master weights and both Adam moments of the trainable
    parameters (frozen ones are not saved); 101 GiB for JanusVLN-7B."""
    trainable = QWEN_LLM_PARAMS + QWEN_MERGER_PARAMS + SPATIAL_MERGER_PARAMS
    if spec.training.vision_learning_rate is not None:
        trainable += QWEN_VISION_PARAMS
    return 14 * trainable / 1024**3


def memory_problems(spec: JobSpec) -> list[Problem]:
    limit = spec.cluster.resources.gpu_memory_gib * 0.95
    smallest_world = spec.min_nodes * spec.training.gpus_per_node
    est = estimate_gpu_memory(spec, smallest_world)
    if est.total <= limit:
        return []
    t, ds = spec.training, spec.deepspeed
    fixes = []
    if t.micro_batch_size > 1:
        fixes.append(
            "lower training.micro_batch_size (raise gradient_accumulation_steps to keep the global batch "
            f"{spec.global_batch_size})"
        )
    if not t.gradient_checkpointing:
        fixes.append("set training.gradient_checkpointing: true")
    if ds.zero_stage < 3:
        fixes.append(f"raise deepspeed.zero_stage (now {ds.zero_stage})")
    if ds.offload_optimizer == "none":
        fixes.append("set deepspeed.offload_optimizer: cpu")
    if spec.data.max_history_images > 4:
        fixes.append("lower data.max_history_images or data.max_pixels")
    return [
        Problem(
            "training.micro_batch_size",
            f"micro batch {t.micro_batch_size} of up to {tokens_per_sample(spec)} tokens/sample does not fit a "
            f"{spec.cluster.resources.gpu_memory_gib:g} GiB GPU at {smallest_world} ranks: estimated {est.describe()}",
            "; or ".join(fixes) or "use GPUs with more memory (cluster.resources.gpu_memory_gib)",
        )
    ]
