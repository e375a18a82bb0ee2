"""Dataset, tokenisation and collation for JanusVLN annotations (the batch contract's producer).

One sample = one `janus_job.data.annotations.Sample` (from `load_annotations`): `id`,
`conversations` (human turn with one `<image>` per frame, then the assistant's answer) and `images`
(history frames, then the current frame), relative to `image_root`. Tokenisation follows JanusVLN's
`preprocess_qwen_2_visual`: a system turn, then every turn rendered alone with the ChatML template;
each `<image>` becomes `<|vision_start|>` + `<|image_pad|>` x (visual tokens of that image) +
`<|vision_end|>`; labels are -100 everywhere except the assistant turns after their `<|im_start|>assistant\\n` header.

Features come either from a `FeatureSource` (the store: `get_spatial(sample)`,
`get_vision(frame_ref)`) or are computed in the step from decoded frames (`vggt_frames`,
`pixel_values`). When both are cached the frames are not read at all: the patch grid is the
spatial map's grid.

The batch contract (`JanusCollator` -> `JanusVLNForConditionalGeneration.forward`), written only here:

| key | type / shape | notes |
| --- | --- | --- |
| `input_ids`, `labels` | long `(B, L)` | right-padded (pad token / -100); labels -100 except the answer |
| `attention_mask` | long `(B, L)` | 1 on real tokens |
| `image_grid_thw` | long `(N_img, 3)` | all images of the batch, sample order; `(1, Hq, Wq)` |
| `images_per_sample` | long `(B,)` | how many images each sample has |
| `pixel_values` | `(sum Hq*Wq, 1176)` | only when the vision tower runs online |
| `vision_features` | `(sum Hq*Wq, 1280)` | cached, natural order; instead of `pixel_values` |
| `spatial_features` | `(B, Hp', Wp', C)` | cached; a list of `(Hp', Wp', C)` if shapes differ in the batch |
| `vggt_frames` | list of `(S_i, 3, H, W)` | only when VGGT runs online |
| `sample_ids` | list of str | error messages, exact-resume checks |
| `position_ids` | long `(3, B, L)` | with the collator's `image_token_id`: mRoPE positions, from the host |
| `image_index` | long `(N_image_tokens,)` | with `image_token_id`: flat positions of the image tokens |
| `label_index` | long `(N_labels,)` | with `image_token_id`: flat positions whose next token is labelled |

`model(**batch)` accepts exactly these keys (plus `return_logits`, `return_computed_features`) and
raises `TypeError` on anything else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, Protocol, Sequence

from janus_job.errors import JobError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
SYSTEM_MESSAGE = "You are a helpful assistant."
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Rendered one message at a time, as JanusVLN does (no default system prompt injected).
TURN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
)
Source = Literal["cached", "online"]


@dataclass
class TextAndImageProcessor:
    """What the data path needs from a Qwen2.5-VL processor."""

    tokenizer: Any
    image_processor: Any


class FeatureSource(Protocol):
    """Where cached features come from (janus_job.features.store.StoreFeatureSource implements it).

    Both raise JobError naming the sample/frame when a feature is missing.
    """

    def get_spatial(self, sample: Any) -> "torch.Tensor":
        """(Hp', Wp', C) spatial map of the sample's last frame."""

    def get_vision(self, frame_ref: str) -> "torch.Tensor":
        """(Hq * Wq, 1280) pre-merger vision hidden states of one frame, natural order."""


def load_processor(
    qwen_dir: str, min_pixels: int | None = None, max_pixels: int | None = None
) -> TextAndImageProcessor:
    """Tokenizer + image processor from a local Qwen2.5-VL directory (see janus_job.io.local_copy)."""
    from transformers import AutoTokenizer

    try:
        import torchvision  # noqa: F401  (the default backend needs it)
        from transformers import Qwen2VLImageProcessor as ImageProcessor
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as ImageProcessor,
        )
    kwargs = {}
    if min_pixels is not None:
        kwargs["min_pixels"] = min_pixels
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    image_processor = ImageProcessor.from_pretrained(qwen_dir, **kwargs)
    return TextAndImageProcessor(tokenizer, image_processor)


# ---- annotations ----------------------------------------------------------------------------


def _turns(sample) -> list[tuple[str, str]]:
    """(role, content) turns as JanusVLN reads them: `<image>\n` -> `<image>` in the first turn,
    then a leading non-human turn is dropped."""
    turns = []
    for n, turn in enumerate(sample.conversations):
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLES or not isinstance(content, str):
            raise JobError(f"sample {sample.id}: conversation turn {turn!r} needs from/value (human or gpt) with text")
        if n == 0:
            content = content.replace(IMAGE_TAG + "\n", IMAGE_TAG)
        turns.append((ROLES[role], content))
    if turns and turns[0][0] != "user":
        turns = turns[1:]
    return turns


def tokenize_sample(sample, tokenizer, tokens_per_image: Sequence[int]) -> tuple[list[int], list[int]]:
    """input_ids and labels of one sample (JanusVLN's preprocess_qwen_2_visual semantics).

    Each image placeholder is tokenised as a single `<|image_pad|>` and expanded afterwards:
    special tokens are atomic, so the result equals tokenising the fully expanded text.
    """
    pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def encode(role: str, content: str) -> list[int]:
        text = tokenizer.apply_chat_template(
            [{"role": role, "content": content}], chat_template=TURN_TEMPLATE, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    header = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    input_ids = encode("system", SYSTEM_MESSAGE)
    labels = [IGNORE_INDEX] * len(input_ids)
    image = 0
    for role, content in _turns(sample):
        if role == "user":
            count = content.count(IMAGE_TAG)
            content = content.replace(IMAGE_TAG, "<|vision_start|><|image_pad|><|vision_end|>")
            if image + count > len(tokens_per_image):
                raise JobError(
                    f"sample {sample.id}: the conversation has more {IMAGE_TAG} "
                    f"placeholders than images ({len(tokens_per_image)})"
                )
            ids: list[int] = []
            for token in encode(role, content):
                if token == pad_id:
                    ids.extend([pad_id] * tokens_per_image[image])
                    image += 1
                else:
                    ids.append(token)
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
        elif role == "assistant":
            ids = encode(role, content)
            input_ids += ids
            labels += [IGNORE_INDEX] * header + ids[header:]
        else:
            ids = encode(role, content)
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
    if image != len(tokens_per_image):
        raise JobError(
            f"sample {sample.id}: {len(tokens_per_image)} images but {image} "
            f"{IMAGE_TAG} placeholders in the human turn; they must match one to one"
        )
    return input_ids, labels


def sample_token_length(sample, tokens_per_image: int = 391, chars_per_token: float = 3.5) -> int:
    """Cheap load estimate for the balanced sampler: visual tokens + text tokens (estimated).

    Default 391 visual tokens per image is the official 640x480 geometry
    (`janus_job.data.frames.frame_geometry(640, 480).tokens_per_image`).
    """
    text = sum(len(str(turn.get("value", turn.get("content", "")))) for turn in sample.conversations)
    text -= len(IMAGE_TAG) * len(sample.images)
    overhead = 30  # system turn and chat-template tokens
    return int(len(sample.images) * tokens_per_image + max(text, 0) / chars_per_token + overhead)


# ---- dataset --------------------------------------------------------------------------------


class JanusDataset:
    """Map-style dataset producing per-sample dicts for `JanusCollator`.

    spatial / vision: "cached" asks `features` (a FeatureSource), "online" decodes the frames and
    leaves the encoder to the model. With both cached, no frame is read.

    ``dropped`` (sample id -> why) are the samples already left out of ``samples`` because a frame
    is missing or unreadable (`bad_frame_samples`); they count against ``max_bad_fraction`` with
    the samples replaced here. Under on_bad_sample 'skip' a frame that fails to decode replaces
    its sample like corrupt features do; under 'fail' it ends the run naming the frame.
    """

    def __init__(
        self,
        samples: Sequence[Any],
        processor: TextAndImageProcessor,
        features: FeatureSource | None = None,
        spatial: Source = "cached",
        vision: Source = "cached",
        target_width: int | None = None,
        frame_size: tuple[int, int] | None = None,
        on_bad_sample: str = "fail",
        max_bad_fraction: float = 1.0,
        dropped: Mapping[str, str] | None = None,
    ):
        from janus_job.data import frames

        if (spatial == "cached" or vision == "cached") and features is None:
            raise JobError("cached features need a feature source (the feature store)")
        for name, value in (("spatial", spatial), ("vision", vision)):
            if value not in ("cached", "online"):
                raise JobError(f"{name} feature source must be 'cached' or 'online', not {value!r}")
        self.samples = list(samples)
        self.processor = processor
        self.features = features
        self.spatial = spatial
        self.vision = vision
        self.target_width = target_width or frames.VGGT_TARGET_WIDTH
        self.frame_size = frame_size
        self.merge = int(getattr(processor.image_processor, "merge_size", 2))
        self.patch = int(getattr(processor.image_processor, "patch_size", 14))
        if on_bad_sample not in ("fail", "skip"):
            raise JobError(f"data.on_bad_sample must be 'fail' or 'skip', not {on_bad_sample!r}")
        self.on_bad_sample = on_bad_sample
        self.max_bad_fraction = max_bad_fraction
        self.dropped: dict[str, str] = dict(dropped or {})
        # samples whose stored features were quarantined before this run: replaced, never read
        finder = getattr(features, "bad_samples", None)
        self.bad: dict[str, str] = dict(finder(self.samples)) if finder and spatial == "cached" else {}
        self._check_bad_fraction()
        if self.bad and os.environ.get("RANK", "0") == "0":
            print(f"train data: {len(self.bad)} of {len(self.samples)} samples read quarantined (corrupt) features "
                  f"and are replaced by the next good sample (first: {next(iter(self.bad))}); rerun `janus-job "
                  "precompute` to recompute them", flush=True)

    def _check_bad_fraction(self) -> None:
        total = len(self.samples) + len(self.dropped)
        bad = len(self.bad) + len(self.dropped)
        if not total or bad <= self.max_bad_fraction * total:
            return
        first = "; ".join([*list(self.dropped.values())[:1],
                           *(f"{sid} ({key})" for sid, key in list(self.bad.items())[:1 if self.dropped else 3])])
        if not self.dropped:
            what = "have corrupt (quarantined) features"
            fix = "rerun `janus-job precompute` (it recomputes quarantined objects)"
        elif not self.bad:
            what = "have missing or unreadable frames"
            fix = "restore or re-extract those frames (or drop their records) and rerun `janus-job precompute`"
        else:
            what = (f"are bad ({len(self.dropped)} with missing or unreadable frames, {len(self.bad)} with corrupt "
                    "(quarantined) features)")
            fix = "restore the frames and rerun `janus-job precompute`"
        raise JobError(
            f"{bad} of {total} samples {what}, more than data.max_bad_fraction {self.max_bad_fraction} allows "
            f"(first: {first}); {fix}, or raise data.max_bad_fraction"
        )

    def __len__(self) -> int:
        return len(self.samples)

    # -- lengths for the sampler
    def tokens_per_image(self, sample=None) -> int:
        """Visual tokens of one frame: from `frame_size` if set, else the sample's first image header."""
        from janus_job.data import frames

        if self.frame_size is not None:
            width, height = self.frame_size
        else:
            width, height = _image_size(sample, 0)
        return frames.frame_geometry(width, height, self.target_width, self.patch, self.merge).tokens_per_image

    def token_lengths(self) -> list[int]:
        """Estimated tokens per sample (text + visual), for the token-balanced sampler.

        Without `frame_size` one image header per sample is read; set it for large datasets or
        when only the feature store (not the frames) is available.
        """
        if self.frame_size is not None:
            per_image = self.tokens_per_image()
            return [sample_token_length(s, per_image) for s in self.samples]
        return [sample_token_length(s, self.tokens_per_image(s)) for s in self.samples]

    # -- items
    def __getitem__(self, index: int) -> dict:
        """The sample's item; one with corrupt features is replaced by the next good sample
        (counted in ``bad_samples``), or, under on_bad_sample 'fail', ends the run the first time
        its object is met (it is quarantined then, so a restarted run replaces it)."""
        from janus_job.errors import BadSample

        replaced: list[str] = []
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            sample = self.samples[position]
            if sample.id in self.bad:
                replaced.append(sample.id)
                continue
            try:
                item = self._item(position)
            except BadSample as err:
                if self.on_bad_sample == "fail" and not err.known:
                    where = f"data.annotations {sample.source}: " if getattr(sample, "source", "") else ""
                    raise JobError(
                        f"{where}sample {sample.id}: {err} (data.on_bad_sample: fail; a restarted run replaces "
                        "this sample, or set on_bad_sample: skip)"
                    ) from None
                self.bad[sample.id] = err.key
                replaced.append(sample.id)
                print(f"train bad_sample sample={sample.id} key={err.key} action=replaced "
                      f"(data.on_bad_sample: {self.on_bad_sample})", flush=True)
                self._check_bad_fraction()
                continue
            if replaced:
                item["bad_samples"] = replaced
            return item
        raise JobError(f"every one of the {len(self.samples)} samples has corrupt features; "
                       "rerun `janus-job precompute`")

    def _item(self, index: int) -> dict:
        import torch

        sample = self.samples[index]
        if not sample.images:
            raise JobError(f"sample {sample.id} has no images; JanusVLN samples need at least the current frame")
        item: dict[str, Any] = {"sample_id": sample.id}
        spatial = None
        if self.spatial == "cached":
            spatial = _with_sample_id(sample, lambda: self.features.get_spatial(sample))
            item["spatial_features"] = spatial
        decoded = None
        if self.spatial == "online" or self.vision == "online":
            decoded = self._decode(sample)
        if self.spatial == "online":
            item["vggt_frames"] = torch.stack(decoded)
        if self.vision == "online":
            pixel_values, grid = self._pixel_values(sample, decoded)
            item["pixel_values"] = pixel_values
        else:
            vision = [_with_sample_id(sample, lambda ref=ref: self.features.get_vision(ref)) for ref in sample.images]
            if decoded is not None:
                grid = torch.tensor([[1, *self._qwen_grid(img)] for img in decoded])
            else:
                grid = torch.tensor([[1, spatial.shape[0], spatial.shape[1]]] * len(vision))
            for ref, feats, (_, gh, gw) in zip(sample.images, vision, grid.tolist()):
                if feats.ndim != 2 or feats.shape[0] != gh * gw:
                    raise JobError(
                        f"sample {sample.id}: cached vision features of {ref} have shape "
                        f"{tuple(feats.shape)}, expected ({gh * gw}, C) for a {gh}x{gw} patch grid; "
                        "the store was built with another geometry: re-run precompute"
                    )
            item["vision_features"] = torch.cat(vision)
        item["image_grid_thw"] = grid
        tokens = (grid.prod(-1) // (self.merge * self.merge)).tolist()
        input_ids, labels = tokenize_sample(sample, self.processor.tokenizer, tokens)
        item["input_ids"] = torch.tensor(input_ids, dtype=torch.long)
        item["labels"] = torch.tensor(labels, dtype=torch.long)
        return item

    def _decode(self, sample) -> list:
        from janus_job.data import frames
        from janus_job.errors import BadSample

        out = []
        for ref, path in zip(sample.images, _frame_paths(sample)):
            try:
                rgb = frames.load_frame(path)
            except JobError as err:
                message = describe_bad_frame(sample, ref, path, getattr(err, "reason", str(err)))
                if self.on_bad_sample == "skip":
                    raise BadSample(message, path, known=False) from None
                raise JobError(f"{message} (data.on_bad_sample: fail): restore or re-extract the frame, drop its "
                               "record, or set data.on_bad_sample: skip") from err
            out.append(frames.preprocess_for_vggt(rgb, self.target_width, self.patch))
        return out

    def _qwen_grid(self, vggt_image) -> tuple[int, int]:
        from janus_job.data import frames

        h, w = frames.qwen_image_size(*vggt_image.shape[-2:], self.patch, self.merge)
        return h // self.patch, w // self.patch

    def _pixel_values(self, sample, decoded: list):
        import torch

        from janus_job.data import frames

        images = [frames.crop_to_even_patch_grid(img, self.patch, self.merge) for img in decoded]
        out = self.processor.image_processor(images=images, return_tensors="pt", do_rescale=False)
        grid = out["image_grid_thw"].to(torch.long)
        for image, (_, gh, gw) in zip(images, grid.tolist()):
            if (gh * self.patch, gw * self.patch) != tuple(image.shape[-2:]):
                raise JobError(
                    f"sample {sample.id}: the Qwen image processor resized a {image.shape[-1]}x"
                    f"{image.shape[-2]} frame to {gw * self.patch}x{gh * self.patch} "
                    f"(min_pixels/max_pixels); JanusVLN's blend needs the VGGT patch grid: "
                    "widen the pixel bounds or change the VGGT target width instead"
                )
        return out["pixel_values"], grid


def _frame_paths(sample) -> Sequence[str]:
    paths = getattr(sample, "frame_paths", None)
    return paths if paths else sample.images


def describe_bad_frame(sample, image: str, path: str, reason: str) -> str:
    """How errors name a frame: the annotation file, the record id, the frame as written and its path."""
    source = getattr(sample, "source", "")
    where = f"data.annotations {source}: " if source else ""
    return f"{where}sample {sample.id}: frame {image} ({path}): {reason}"


def unreadable_frames(paths: Sequence[str]) -> dict[str, str]:
    """path -> why, for the frame files that are missing or have no readable image header."""
    from janus_job.data import frames

    found = {}
    for path in paths:
        problem = frames.frame_problem(path)
        if problem is not None:
            found[path] = problem
    return found


def bad_frame_samples(samples: Sequence[Any], problems: Mapping[str, str]) -> dict[str, str]:
    """sample id -> why it cannot be read (its first bad frame named, `describe_bad_frame`), for the
    samples that read a frame in ``problems`` (path -> why)."""
    found = {}
    for sample in samples:
        for image, path in zip(sample.images, _frame_paths(sample)):
            if path in problems:
                found[sample.id] = describe_bad_frame(sample, image, path, problems[path])
                break
    return found


def _image_size(sample, k: int) -> tuple[int, int]:
    """(width, height) from the image header only."""
    from PIL import Image

    path = _frame_paths(sample)[k]
    try:
        with Image.open(path) as img:
            return img.size
    except (FileNotFoundError, OSError) as err:
        raise JobError(
            f"sample {sample.id}: frame {sample.images[k]} ({path}) is missing or unreadable: {err}"
        ) from err


def _with_sample_id(sample, fetch):
    from janus_job.errors import BadSample

    try:
        return fetch()
    except JobError as err:
        if str(sample.id) in str(err) or isinstance(err, BadSample):
            raise
        raise JobError(f"sample {sample.id}: {err}") from err


# ---- collation ------------------------------------------------------------------------------

def mrope_position_ids(input_ids: "torch.Tensor", attention_mask: "torch.Tensor", image_grid_thw: "torch.Tensor",
                       image_token_id: int, spatial_merge_size: int = 2,
                       sample_ids: Sequence[str] | None = None) -> "torch.Tensor":
    """Qwen2.5-VL's multimodal RoPE positions (3, batch, length) for text and still images, on the host.

    The same values as the model's `get_rope_index` (text positions count up by one; an image's
    tokens get (start, start + row, start + column) and the next position is start + max(rows,
    columns); padding stays 0), computed once per batch in the loader instead of per step on the
    GPU, where it costs a device synchronisation per image. Each run of image tokens is one image
    of `image_grid_thw`, in order; a run whose length is not that image's merged grid raises.
    """
    import torch

    batch, length = input_ids.shape
    positions = torch.zeros(3, batch, length, dtype=torch.long)
    grids = image_grid_thw.tolist()
    m = spatial_merge_size
    image = 0
    for b in range(batch):
        keep = attention_mask[b].bool()
        ids = input_ids[b][keep]
        is_image = (ids == image_token_id).tolist()
        pieces, pos, start = [], 0, 0
        while start < len(is_image):
            end = start
            while end < len(is_image) and is_image[end] == is_image[start]:
                end += 1
            run = end - start
            if not is_image[start]:
                pieces.append(torch.arange(pos, pos + run).expand(3, run))
                pos += run
            else:
                name = sample_ids[b] if sample_ids else f"#{b}"
                if image >= len(grids):
                    raise JobError(f"sample {name}: more runs of image tokens than images ({len(grids)} in the "
                                   "batch); tokenisation and image grid disagree")
                t, h, w = grids[image]
                gh, gw = h // m, w // m
                if run != t * gh * gw:
                    raise JobError(f"sample {name}: image {image} has {run} placeholder tokens but its "
                                   f"{t}x{h}x{w} patch grid merges to {t * gh * gw}; tokenisation and image "
                                   "grid disagree")
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
                pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
                pos += max(gh, gw)
                image += 1
            start = end
        if pieces:
            positions[:, b, keep] = torch.cat(pieces, dim=1)
    if image != len(grids):
        raise JobError(f"batch {list(sample_ids or [])}: {len(grids)} images but {image} runs of image "
                       "tokens; tokenisation and image grid disagree")
    return positions


class JanusCollator:
    """Per-sample dicts -> the batch contract (this module's docstring), right-padded.

    With `image_token_id` the batch also carries `position_ids`, `image_index` and `label_index`
    (`step_indices`): the model then runs its forward and backward without a host synchronisation.

    `pad_to_multiple_of` (float8 matmuls need every dimension, the token count included, divisible by
    16) appends pad tokens up to that multiple. They sit after every real token, so causal attention
    never lets a real token see them, and their labels are ignored: the loss and every real token's
    output are unchanged. In a row that needs no padding of its own (every row of a one-sample
    batch) their attention-mask entries are 1, so the attention kernels still run without a mask.
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None, image_token_id: int | None = None,
                 spatial_merge_size: int = 2, pad_to_multiple_of: int = 1):
        self.pad_token_id = int(pad_token_id)
        self.max_length = max_length
        self.image_token_id = image_token_id
        self.spatial_merge_size = spatial_merge_size
        self.pad_to_multiple_of = max(1, int(pad_to_multiple_of))

    def __call__(self, items: Sequence[dict]) -> dict:
        import torch

        if not items:
            raise JobError("cannot collate an empty micro batch")
        ids = [item["sample_id"] for item in items]
        longest = max(item["input_ids"].shape[0] for item in items)
        if self.max_length is not None and longest > self.max_length:
            raise JobError(
                f"sample(s) {ids} reach {longest} tokens, above the max length "
                f"{self.max_length}; image tokens cannot be truncated: raise it or use "
                "fewer frames"
            )
        batch_size = len(items)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        for b, item in enumerate(items):
            n = item["input_ids"].shape[0]
            input_ids[b, :n] = item["input_ids"]
            labels[b, :n] = item["labels"]
            # a row without padding of its own keeps an all-ones mask over the multiple's padding (see above)
            attention_mask[b, :n if n < longest else length] = 1
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "image_grid_thw": torch.cat([item["image_grid_thw"] for item in items]),
            "images_per_sample": torch.tensor([item["image_grid_thw"].shape[0] for item in items]),
            "sample_ids": ids,
        }
        for key in ("pixel_values", "vision_features"):
            have = [key in item for item in items]
            if any(have) and not all(have):
                raise JobError(f"micro batch {ids} mixes samples with and without {key}")
            if all(have):
                batch[key] = torch.cat([item[key] for item in items])
        if "spatial_features" in items[0]:
            maps = [item["spatial_features"] for item in items]
            same = len({tuple(m.shape) for m in maps}) == 1
            batch["spatial_features"] = torch.stack(maps) if same else maps
        if "vggt_frames" in items[0]:
            batch["vggt_frames"] = [item["vggt_frames"] for item in items]
        replaced = [sid for item in items for sid in item.get("bad_samples", ())]
        if replaced:
            batch["bad_samples"] = replaced  # not a model input: the trainer counts and removes it
        if self.image_token_id is not None:
            batch.update(step_indices(input_ids, attention_mask, labels, batch["image_grid_thw"],
                                      self.image_token_id, self.spatial_merge_size, ids))
        return batch


def step_indices(input_ids: "torch.Tensor", attention_mask: "torch.Tensor", labels: "torch.Tensor",
                 image_grid_thw: "torch.Tensor", image_token_id: int, spatial_merge_size: int = 2,
                 sample_ids: Sequence[str] | None = None) -> dict:
    """What the forward would otherwise find out on the GPU, each read costing a synchronisation:
    `position_ids` (mrope_position_ids), `image_index` (flat positions of the image tokens, where the
    image embeddings go) and `label_index` (flat positions whose next token is labelled: where the LM
    head and the loss run)."""
    import torch

    positions = mrope_position_ids(input_ids, attention_mask, image_grid_thw, image_token_id,
                                   spatial_merge_size, sample_ids)
    image_index = torch.nonzero((input_ids == image_token_id).flatten()).flatten()
    predicts_label = torch.zeros_like(labels, dtype=torch.bool)
    predicts_label[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    label_index = torch.nonzero(predicts_label.flatten()).flatten()
    return {"position_ids": positions, "image_index": image_index, "label_index": label_index}
