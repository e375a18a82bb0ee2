"""JanusVLN annotations: the sample index and the builder from trajectory folders.

The annotation format is JanusVLN's: a JSON list (or JSON lines) of records
``{"id": str, "conversations": [{"from": "human"|"gpt", "value": str}, ...], "images": [str, ...]}``
where ``images`` are the sample's frames in order, history first and the current frame last,
relative to ``data.image_root`` (paths leaving it are refused unless
``data.allow_absolute_image_paths`` lets absolute ones through), and the human turns hold one
``<image>`` tag per image.

The builder turns trajectory folders into such records with JanusVLN's history rule: for step
``i`` the frames are ``0..i`` while ``i <= max_history`` (8), else ``max_history + 1`` indices
spread evenly over ``0..i`` (numpy ``linspace`` truncated to integers), so the first and the
current frame are always included.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from janus_job.errors import JobError
from janus_job.io import read_bytes

IMAGE_TAG = "<image>"
ROLES = ("human", "gpt")
DEFAULT_MAX_HISTORY = 8
ACTIONS = ("STOP", "MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT")

# The instruction prompt of built annotations: janus-train's own wording, not JanusVLN's. A dataset that must
# tokenise like JanusVLN's released annotations should use those files, or give the builder its own template.
# Placeholders: {history} (one <image> tag per history frame, empty at step 0) and {instruction}; the current
# frame is the one literal <image> tag, after {history} (tags follow the order of `images`).
NAVIGATION_PROMPT = (
    "You navigate by vision and language. Earlier views along the route:{history}\n"
    "Current view:<image>\n"
    "Instruction: {instruction}\n"
    "Choose the next action: MOVE_FORWARD, TURN_LEFT, TURN_RIGHT or STOP."
)
PROMPT_PLACEHOLDERS = ("history", "instruction")


def check_prompt_template(template: str, where: str = "prompt template") -> str:
    """Returns `template` when it is a valid builder prompt, else raises a JobError naming `where`.

    Valid: `str.format` syntax (a literal brace doubled: `{{`, `}}`) with `{history}` and
    `{instruction}` once each, no other placeholder, and exactly one literal `<image>` tag (the
    current frame) after `{history}`, so a record's tags match its frames, history first.
    """
    import string

    fix = ("use {history} (one <image> tag per history frame) and {instruction} once each, plus one literal "
           "<image> tag after {history} for the current frame; write literal braces as {{ and }}")
    if not isinstance(template, str) or not template.strip():
        raise JobError(f"{where}: the prompt template is empty; {fix}")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise JobError(f"{where}: not a valid template ({err}); {fix}") from None
    seen: dict[str, int] = dict.fromkeys(PROMPT_PLACEHOLDERS, 0)
    current_tags = tags_before_history = 0
    for literal, name, spec, conversion in parts:
        current_tags += literal.count(IMAGE_TAG)
        if not seen["history"]:
            tags_before_history += literal.count(IMAGE_TAG)
        if name is None:
            continue
        if name not in PROMPT_PLACEHOLDERS:
            raise JobError(f"{where}: unknown placeholder {{{name}}}; {fix}")
        if spec or conversion:
            raise JobError(f"{where}: placeholder {{{name}}} takes no conversion or format spec; {fix}")
        seen[name] += 1
    for name, count in seen.items():
        if count != 1:
            raise JobError(f"{where}: holds {{{name}}} {count} times, it must hold it once; {fix}")
    if current_tags != 1:
        raise JobError(f"{where}: holds {current_tags} literal {IMAGE_TAG} tags, it must hold exactly one "
                       f"(the current frame); {fix}")
    if tags_before_history:
        raise JobError(f"{where}: the literal {IMAGE_TAG} tag comes before {{history}}; the current frame's tag "
                       f"must follow the history frames' ({fix})")
    return template


@dataclass(frozen=True)
class Sample:
    """One training sample: ``images`` as written in the annotation, ``frame_paths`` resolved."""

    id: str
    images: tuple[str, ...]
    conversations: tuple[Mapping[str, str], ...] = ()
    frame_paths: tuple[str, ...] = ()
    index: int = -1
    source: str = ""  # the annotation file the record came from (for error messages)

    @property
    def num_frames(self) -> int:
        return len(self.images)

    @property
    def current_image(self) -> str:
        return self.images[-1]


@dataclass
class AnnotationSet:
    """The ordered samples of one annotation file and the digest that names it in the store."""

    path: str
    digest: str
    samples: list[Sample] = field(default_factory=list)
    _first_use: dict[str, str] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def unique_images(self) -> list[str]:
        """Every distinct frame (annotation string), in first-use order."""
        seen: dict[str, None] = {}
        for sample in self.samples:
            for image in sample.images:
                seen.setdefault(image, None)
        return list(seen)

    def image_paths(self) -> dict[str, str]:
        """Annotation image string -> resolved path, for every distinct frame."""
        return {image: path for sample in self.samples for image, path in zip(sample.images, sample.frame_paths)}

    def describe_frame(self, path: str) -> str:
        """A frame path as errors name it: the path, then the annotation file and first record using it."""
        if self._first_use is None:  # built whole, then published: decode threads may call this at once
            first_use: dict[str, str] = {}
            for sample in self.samples:
                for frame_path in sample.frame_paths:
                    first_use.setdefault(frame_path, sample.id)
            self._first_use = first_use
        record = self._first_use.get(path)
        return f"{path} ({self.path}, record {record!r})" if record is not None else str(path)

    def image_path(self, image: str) -> str:
        for sample in self.samples:
            if image in sample.images:
                return sample.frame_paths[sample.images.index(image)]
        raise KeyError(image)


# ---------------------------------------------------------------- loading and validation


def load_annotations(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    max_images: int | None = None,
    endpoint_url: str | None = None,
    allow_absolute: bool = False,
) -> AnnotationSet:
    """Reads and validates a JanusVLN annotation file (.json list or .jsonl, optionally .gz).

    Image paths resolve under ``image_root``: a path that leaves it (``..`` segments, or an
    absolute path elsewhere) is refused with its record named, unless ``allow_absolute`` lets
    absolute paths through as they are.
    """
    try:
        raw = read_bytes(path, endpoint_url)
    except OSError as err:
        raise JobError(f"data.annotations: cannot read {path}: {err.strerror or err}") from err
    source = str(path)
    if source.endswith(".gz"):
        raw = gzip.decompress(raw)
    records = _parse_records(raw, source)
    root = str(image_root) if image_root else ""
    samples = [
        _validate_record(record, position, source, root, max_images, allow_absolute)
        for position, record in enumerate(records)
    ]
    if not samples:
        raise JobError(f"data.annotations: {source} holds no samples")
    return AnnotationSet(path=source, digest=hashlib.sha256(raw).hexdigest()[:32], samples=samples)


def load_spec_annotations(spec: Any) -> AnnotationSet:
    """The annotations a job spec names (its data section; the store's endpoint for s3://)."""
    return load_annotations(
        spec.data.annotations,
        spec.data.image_root,
        max_images=spec.data.max_history_images + 1,
        endpoint_url=spec.features.endpoint_url,
        allow_absolute=spec.data.allow_absolute_image_paths,
    )


def _parse_records(raw: bytes, path: str) -> list[Any]:
    text = raw.decode("utf-8", errors="replace")
    if path.endswith((".jsonl", ".jsonl.gz")):
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as err:
                    raise JobError(f"data.annotations: {path} line {line_no} is not JSON: {err}") from err
        return records
    try:
        records = json.loads(text)
    except ValueError as err:
        raise JobError(f"data.annotations: {path} is not valid JSON: {err}") from err
    if not isinstance(records, list):
        raise JobError(f"data.annotations: {path} must hold a JSON list of samples, found {type(records).__name__}")
    return records


def resolve_image(image: str, root: str, *, allow_absolute: bool = False) -> str:
    """The path of an annotation image under ``root`` (a directory or an fsspec URL).

    Raises ValueError saying why when the image would be read from outside ``root``.
    """
    if "://" in image or image.startswith("/") or os.path.isabs(image):
        if allow_absolute or not root:
            return image
        inside = _normalized(image)
        base = _normalized(root).rstrip("/")
        if inside.startswith(base + "/"):
            return inside
        raise ValueError(f"{image!r} is an absolute path outside data.image_root {root}; write it relative "
                         "to image_root, or set data.allow_absolute_image_paths: true to read it from there")
    relative = posixpath.normpath(image.replace(os.sep, "/"))
    if relative == ".." or relative.startswith("../"):
        if not root:
            return image
        raise ValueError(f"{image!r} leaves data.image_root through '..'; write the path relative to "
                         "image_root without '..' (or move image_root up to a folder that holds every frame)")
    if not root:
        return relative
    return f"{root.rstrip('/')}/{relative}" if "://" in root else os.path.join(root, relative)


def _normalized(path: str) -> str:
    """A path or URL with '.' and '..' segments resolved (the scheme and bucket kept)."""
    scheme, sep, rest = path.partition("://")
    if not sep:
        return posixpath.normpath(path.replace(os.sep, "/"))
    return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"


def _validate_record(record: Any, position: int, path: str, root: str, max_images: int | None,
                     allow_absolute: bool = False) -> Sample:
    def bad(field_name: str, problem: str) -> JobError:
        name = record.get("id") if isinstance(record, dict) else None
        which = f"record {position}" + (f" (id {name!r})" if isinstance(name, str) and name else "")
        return JobError(f"data.annotations: {path}: {which}: field {field_name!r} {problem}")

    if not isinstance(record, dict):
        raise bad("(record)", f"must be an object, found {type(record).__name__}")
    sample_id = record.get("id")
    if not isinstance(sample_id, str) or not sample_id:
        raise bad("id", "must be a non-empty string")
    if "video" in record:
        raise bad("video", "is not supported (janus-train trains on frames): extract the video's frames to image files "
                  "and list them in 'images', history first and current last, with one <image> tag each in the "
                  "human turn")
    images = record.get("images", record.get("image"))
    if images is None:
        raise bad("images", "is missing (a list of frame paths, history first, current last)")
    if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
        raise bad("images", "must be a non-empty list of non-empty path strings")
    if max_images is not None and len(images) > max_images:
        raise bad("images", f"has {len(images)} frames; at most {max_images} (data.max_history_images + 1)")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise bad("conversations", "must be a list of at least two turns (human, then gpt)")
    tags = 0
    for turn_no, turn in enumerate(conversations):
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        if isinstance(role, str) and role not in ROLES:
            raise bad(f"conversations[{turn_no}]", _role_fix(role))
        if isinstance(turn, dict) and "from" not in turn and "role" in turn:
            raise bad(f"conversations[{turn_no}]", "uses 'role'/'content': write the turn as "
                      '{"from": "human"|"gpt", "value": str}')
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise bad(f"conversations[{turn_no}]", 'must be {"from": "human"|"gpt", "value": str}')
        if turn["from"] == "human":
            tags += turn["value"].count(IMAGE_TAG)
    if conversations[0]["from"] != "human":
        raise bad("conversations[0]", "must come from 'human'")
    if tags != len(images):
        raise bad("conversations", f"hold {tags} {IMAGE_TAG} tags but 'images' lists {len(images)} frames")
    frame_paths = []
    for number, image in enumerate(images):
        try:
            frame_paths.append(resolve_image(image, root, allow_absolute=allow_absolute))
        except ValueError as err:
            raise bad(f"images[{number}]", str(err)) from None
    return Sample(
        id=sample_id,
        images=tuple(images),
        conversations=tuple(dict(turn) for turn in conversations),
        frame_paths=tuple(frame_paths),
        index=position,
        source=path,
    )


def _role_fix(role: str) -> str:
    """How to convert a turn of an unsupported role (one clause of a record's error)."""
    renames = {"user": "human", "assistant": "gpt"}
    if role in renames:
        return f"has role {role!r}: write it as 'from': {renames[role]!r} (only human and gpt turns are read)"
    if role == "system":
        return ("has role 'system', which is not read: put its text at the start of the first human turn "
                "(only human and gpt turns are read)")
    return (f"has role {role!r}: convert the conversation to alternating 'human' (question, with the <image> tags) "
            "and 'gpt' (answer) turns")


# ---------------------------------------------------------------- the builder


def history_indices(step: int, max_history: int = DEFAULT_MAX_HISTORY) -> list[int]:
    """Frame indices of step ``step``: all of 0..step while short, else evenly spread over it."""
    if step < 0:
        raise ValueError("step must be >= 0")
    if step <= max_history:
        return list(range(step + 1))
    count = max_history + 1
    # numpy.linspace(0, step, count, dtype=int): start + k * (step / (count - 1)), truncated.
    spacing = step / (count - 1)
    indices = [int(k * spacing) for k in range(count - 1)]
    return indices + [step]


def trajectory_records(
    episode_id: str,
    frames: Sequence[str],
    instruction: str,
    actions: Sequence[str],
    *,
    max_history: int = DEFAULT_MAX_HISTORY,
    prompt: str = NAVIGATION_PROMPT,
) -> list[dict]:
    """One record per step; ``frames`` are annotation image strings, ``actions[i]`` the answer at step i;
    ``prompt`` is the human turn's template (`check_prompt_template`)."""
    check_prompt_template(prompt)
    if len(actions) != len(frames):
        raise JobError(f"episode {episode_id}: {len(frames)} frames but {len(actions)} actions")
    records = []
    for step, answer in enumerate(actions):
        images = [frames[j] for j in history_indices(step, max_history)]
        question = prompt.format(history=IMAGE_TAG * (len(images) - 1), instruction=instruction)
        records.append(
            {
                "id": f"{episode_id}/{os.path.basename(frames[step])}",
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                "images": images,
            }
        )
    return records


def action_from_frame_name(path: str) -> str:
    """VLN-CE frame names end in the action taken there: ``..._<word>`` or ``..._<word>_<word>``."""
    parts = Path(path).stem.split("_")
    return "_".join(parts[-2:]).upper() if len(parts) > 3 else parts[-1].upper()


def build_vlnce(
    episodes_file: str | os.PathLike,
    trajectory_root: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    max_history: int = DEFAULT_MAX_HISTORY,
    prompt: str = NAVIGATION_PROMPT,
) -> list[dict]:
    """R2R/RxR VLN-CE layout: ``<trajectory_root>/<episode_id>/*.png``, actions in the frame names,
    instructions in the VLN-CE episodes file (``{"episodes": [{"episode_id", "instruction":
    {"instruction_text"}}]}``, optionally gzipped). ``prompt``: see `check_prompt_template`."""
    check_prompt_template(prompt)
    data = _read_json(episodes_file)
    episodes = data.get("episodes") if isinstance(data, dict) else None
    if not isinstance(episodes, list):
        raise JobError(f"{episodes_file}: expected a VLN-CE episodes file with an 'episodes' list")
    records = []
    for position, episode in enumerate(episodes):
        try:
            episode_id = str(episode["episode_id"])
            instruction = str(episode["instruction"]["instruction_text"]).strip()
        except (KeyError, TypeError) as err:
            raise JobError(f"{episodes_file}: episode {position} lacks {err}") from err
        frames = sorted(str(p) for p in Path(trajectory_root, episode_id).glob("*.png"))
        relative = [os.path.relpath(frame, image_root) for frame in frames]
        actions = [action_from_frame_name(frame) for frame in frames]
        records += trajectory_records(episode_id, relative, instruction, actions, max_history=max_history,
                                      prompt=prompt)
    return records


def build_scalevln(
    annotations_file: str | os.PathLike,
    trajectory_root: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    max_history: int = DEFAULT_MAX_HISTORY,
    action_names: Sequence[str] = ACTIONS,
    prompt: str = NAVIGATION_PROMPT,
) -> list[dict]:
    """ScaleVLN / DAgger layout: ``<trajectory_root>/<name>/rgb/*.jpg`` with an episode list
    ``[{"id", "instructions": [...], "video": ".../<name>", "actions": [int, ...]}]``; the answer
    at step i is ``actions[i + 1]`` and STOP at the last frame. ``prompt``: see `check_prompt_template`."""
    check_prompt_template(prompt)
    episodes = _read_json(annotations_file)
    if not isinstance(episodes, list):
        raise JobError(f"{annotations_file}: expected a list of episodes")
    records = []
    for position, episode in enumerate(episodes):
        try:
            episode_id = str(episode["id"])
            instruction = str(episode["instructions"][0])
            name = str(episode["video"]).split("/")[1]
            codes = list(episode["actions"])
        except (KeyError, TypeError, IndexError) as err:
            raise JobError(f"{annotations_file}: episode {position} lacks {err}") from err
        frames = sorted(str(p) for p in Path(trajectory_root, name, "rgb").glob("*.jpg"))
        if len(codes) < len(frames):
            raise JobError(f"{annotations_file}: episode {episode_id} has {len(frames)} frames, {len(codes)} actions")
        actions = [action_names[codes[i + 1]] for i in range(len(frames) - 1)] + ["STOP"]
        relative = [os.path.relpath(frame, image_root) for frame in frames]
        records += trajectory_records(episode_id, relative, instruction, actions[: len(frames)],
                                      max_history=max_history, prompt=prompt)
    return records


def write_annotations(records: Iterable[dict], path: str | os.PathLike) -> int:
    """Writes records atomically (temp file, then rename); returns how many."""
    records = list(records)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return len(records)


def _read_json(path: str | os.PathLike) -> Any:
    try:
        raw = Path(path).read_bytes()
        if str(path).endswith(".gz"):
            raw = gzip.decompress(raw)
        return json.loads(raw)
    except (OSError, ValueError) as err:
        raise JobError(f"cannot read {path}: {err}") from err
