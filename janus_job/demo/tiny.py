"""Tiny, fully offline stand-ins for the real models: for CPU tests and `janus-job demo`.

Everything here is built in code (no hub download): a few-layer random Qwen2.5-VL config, a small
byte-level BPE tokenizer carrying Qwen's special tokens, Qwen's image processor, the tiny VGGT
aggregator config from `janus_job.models.vggt`, and an in-memory feature source for equivalence checks.
"""

from __future__ import annotations

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen's own template, reduced to what training uses (text content only, no tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TRAINING_TEXT = """
You are a helpful assistant. You are a navigation agent in an indoor scene.
Walk forward past the sofa, turn left at the kitchen door and stop next to the dining table.
Go up the stairs, turn right and wait by the bedroom window. Exit the bathroom and move to the hall.
The next action is move forward 25 cm. The next action is turn left 15 degrees.
The next action is turn right 15 degrees. The next action is stop.
These are your historical observations. This is your current observation.
Your task is to follow the instruction. What is the next action?
0123456789 , . ; : ? ! ' " ( ) [ ] { } - + * / = < > | _ # @ & % $
"""


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory, with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT.strip().splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_image_processor(min_pixels: int = 4 * 28 * 28, max_pixels: int = 1024 * 28 * 28):
    """Qwen2-VL image processor with Qwen's normalisation; the PIL backend needs no torchvision."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def tiny_processor(min_pixels: int = 4 * 28 * 28, max_pixels: int = 1024 * 28 * 28):
    """The tiny tokenizer and image processor as the pair `janus_job.data.dataset` consumes.

    (transformers' Qwen2_5_VLProcessor insists on a video processor, which needs torchvision; the
    training data path uses only these two parts of it.)
    """
    from janus_job.data.dataset import TextAndImageProcessor

    return TextAndImageProcessor(tiny_tokenizer(), tiny_image_processor(min_pixels, max_pixels))


def tiny_qwen_config(tokenizer=None, text_hidden: int = 64, text_layers: int = 2):
    """The tiny Qwen2.5-VL flavor (janus_job.models.flavors) with the token ids of `tiny_tokenizer()`."""
    from janus_job.models.flavors import tiny_qwen_config as flavor

    tokenizer = tokenizer or tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return flavor(ids, len(tokenizer), text_hidden=text_hidden, text_layers=text_layers)


def tiny_vggt_config():
    """The tiny frame-causal VGGT aggregator config (owned by `janus_job.models.vggt`)."""
    from janus_job.models.vggt import VGGTAggregatorConfig

    return VGGTAggregatorConfig.tiny()


class MemoryFeatureSource:
    """A FeatureSource (see janus_job.data.dataset) holding features in memory: spatial maps by sample
    id, vision features by frame reference."""

    def __init__(self, spatial: dict | None = None, vision: dict | None = None):
        self.spatial = {} if spatial is None else spatial
        self.vision = {} if vision is None else vision

    @classmethod
    def computed(cls, model, samples, target_width: int, image_processor=None, dtype=None,
                 mode: str = "batched") -> "MemoryFeatureSource":
        """Features computed by the model's encoders, as the precompute job stores them: spatial
        per sample (the aggregator over the sample's frames), vision per frame (the frozen vision
        blocks, natural order). Tensors are cast to `dtype` (the store keeps bf16)."""
        import torch

        from janus_job.data import frames
        from janus_job.models.janusvln.model import encoder_autocast, vision_tower_features
        from janus_job.models.vggt import spatial_features

        spatial_maps: dict = {}
        vision: dict = {}
        visual = model.model.visual
        device = visual.patch_embed.proj.weight.device
        processor = image_processor or tiny_image_processor(min_pixels=1, max_pixels=1 << 30)
        for sample in samples:
            decoded = [frames.preprocess_for_vggt(frames.load_frame(path), target_width)
                       for path in sample.frame_paths]
            stacked = torch.stack(decoded)[None].to(device)
            with torch.no_grad(), encoder_autocast(model.dtype, device):
                spatial = spatial_features(model.aggregator, stacked, mode)[0]
            spatial_maps[sample.id] = spatial.to("cpu", dtype or spatial.dtype)
            for ref, image in zip(sample.images, decoded):
                if ref in vision:
                    continue
                out = processor(images=[frames.crop_to_even_patch_grid(image)], return_tensors="pt",
                                do_rescale=False)
                hidden = vision_tower_features(visual, out["pixel_values"].to(device),
                                               out["image_grid_thw"].to(device))[0]
                vision[ref] = hidden.to("cpu", dtype or hidden.dtype)
        return cls(spatial_maps, vision)

    def get_spatial(self, sample):
        from janus_job.errors import JobError

        if sample.id not in self.spatial:
            raise JobError(f"spatial features of sample {sample.id} are missing")
        return self.spatial[sample.id]

    def get_vision(self, frame_ref):
        from janus_job.errors import JobError

        if frame_ref not in self.vision:
            raise JobError(f"vision features of frame {frame_ref} are missing")
        return self.vision[frame_ref]

