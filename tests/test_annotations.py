"""Annotation index and the trajectory-folder builder (JanusVLN's format and history rule)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from janus_job.data.annotations import (
    NAVIGATION_PROMPT,
    action_from_frame_name,
    build_scalevln,
    build_vlnce,
    check_prompt_template,
    history_indices,
    load_annotations,
    write_annotations,
)
from janus_job.errors import JobError


def test_history_indices_equal_numpy_linspace_rule():
    for step in range(0, 3000):
        expected = list(range(step + 1)) if step <= 8 else np.linspace(0, step, 9, dtype=int).tolist()
        assert history_indices(step) == expected, step
    assert history_indices(20, max_history=4) == np.linspace(0, 20, 5, dtype=int).tolist()


def test_action_from_vlnce_frame_names():
    assert action_from_frame_name("ep/rgb_0003_move_forward.png") == "MOVE_FORWARD"
    assert action_from_frame_name("ep/rgb_0003_stop.png") == "STOP"
    assert action_from_frame_name("ep/rgb_0010_turn_left.png") == "TURN_LEFT"


def _touch_frames(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")


def test_build_vlnce_then_load(tmp_path):
    root = tmp_path / "images"
    names = [f"rgb_{i:04d}_{'move_forward' if i < 11 else 'stop'}.png" for i in range(12)]
    _touch_frames(root / "R2R" / "7", names)
    episodes = {"episodes": [{"episode_id": 7, "instruction": {"instruction_text": " walk to the sofa "}}]}
    episodes_file = tmp_path / "train.json.gz"
    episodes_file.write_bytes(gzip.compress(json.dumps(episodes).encode()))

    records = build_vlnce(episodes_file, root / "R2R", root)
    assert len(records) == 12
    last = records[-1]
    assert last["id"] == f"7/{names[11]}"
    assert last["images"] == [f"R2R/7/{names[j]}" for j in np.linspace(0, 11, 9, dtype=int)]
    assert records[3]["images"] == [f"R2R/7/{names[j]}" for j in range(4)]
    assert last["conversations"][1] == {"from": "gpt", "value": "STOP"}
    assert records[0]["conversations"][1]["value"] == "MOVE_FORWARD"
    assert last["conversations"][0]["value"] == NAVIGATION_PROMPT.format(
        history="<image>" * 8, instruction="walk to the sofa"
    )

    out = tmp_path / "ann.json"
    write_annotations(records, out)
    loaded = load_annotations(out, root, max_images=9)
    assert [s.id for s in loaded] == [r["id"] for r in records]
    sample = loaded.samples[-1]
    assert sample.current_image == f"R2R/7/{names[11]}" and sample.num_frames == 9
    assert sample.frame_paths[-1] == str(root / "R2R" / "7" / names[11])
    assert loaded.unique_images() == [f"R2R/7/{n}" for n in names]
    assert len(loaded.digest) == 32


def test_build_scalevln(tmp_path):
    root = tmp_path / "images"
    _touch_frames(root / "scan1" / "rgb", [f"{i:03d}.jpg" for i in range(4)])
    annotations = [{"id": 5, "instructions": ["go left"], "video": "images/scan1", "actions": [-1, 2, 1, 0]}]
    path = tmp_path / "scale.json"
    path.write_text(json.dumps(annotations))
    records = build_scalevln(path, root, root)
    assert [r["conversations"][1]["value"] for r in records] == ["TURN_LEFT", "MOVE_FORWARD", "STOP", "STOP"]
    assert records[2]["images"] == ["scan1/rgb/000.jpg", "scan1/rgb/001.jpg", "scan1/rgb/002.jpg"]


def _write(tmp_path, records, name="a.json"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


GOOD = {
    "id": "e/1",
    "conversations": [{"from": "human", "value": "<image><image> go"}, {"from": "gpt", "value": "STOP"}],
    "images": ["a.png", "b.png"],
}


@pytest.mark.parametrize(
    "record, message",
    [
        ({**GOOD, "id": ""}, r"record 1: field 'id' must be a non-empty string"),
        ({k: v for k, v in GOOD.items() if k != "images"}, r"record 1 \(id 'e/1'\): field 'images' is missing"),
        ({**GOOD, "images": "a.png"}, "field 'images' must be a non-empty list"),
        ({**GOOD, "images": ["a.png"]}, r"hold 2 <image> tags but 'images' lists 1 frames"),
        (
            {**GOOD, "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "<image><image>"}]},
            r"field 'conversations\[0\]' must come from 'human'",
        ),
        (
            {**GOOD, "conversations": [{"from": "human", "value": 3}, GOOD["conversations"][1]]},
            r"field 'conversations\[0\]' must be",
        ),
        (
            {
                **GOOD,
                "images": [f"{i}.png" for i in range(10)],
                "conversations": [{"from": "human", "value": "<image>" * 10}, GOOD["conversations"][1]],
            },
            "has 10 frames; at most 9",
        ),
        ("just a string", r"record 1: field '\(record\)' must be an object"),
        ({**GOOD, "video": "ep1.mp4"}, r"record 1 \(id 'e/1'\): field 'video' is not supported .*extract the video's "
         r"frames to image files and list them in 'images'"),
        ({**GOOD, "conversations": [{"from": "user", "value": "<image><image>"}, GOOD["conversations"][1]]},
         r"field 'conversations\[0\]' has role 'user': write it as 'from': 'human'"),
        ({**GOOD, "conversations": [GOOD["conversations"][0], {"from": "assistant", "value": "STOP"}]},
         r"field 'conversations\[1\]' has role 'assistant': write it as 'from': 'gpt'"),
        ({**GOOD, "conversations": [{"from": "system", "value": "Be brief."}, *GOOD["conversations"]]},
         r"field 'conversations\[0\]' has role 'system', which is not read: put its text at the start of the first "
         r"human turn"),
        ({**GOOD, "conversations": [{"from": "robot", "value": "x"}, *GOOD["conversations"]]},
         r"has role 'robot': convert the conversation to alternating 'human' .* and 'gpt'"),
        ({**GOOD, "conversations": [{"role": "human", "content": "<image><image>"}, GOOD["conversations"][1]]},
         r"field 'conversations\[0\]' uses 'role'/'content': write the turn as"),
    ],
)
def test_malformed_records_name_the_record_and_field(tmp_path, record, message):
    path = _write(tmp_path, [GOOD, record])
    with pytest.raises(JobError, match=message):
        load_annotations(path, tmp_path, max_images=9)


def test_file_level_errors(tmp_path):
    with pytest.raises(JobError, match="cannot read"):
        load_annotations(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(JobError, match="is not valid JSON"):
        load_annotations(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(JobError, match="must hold a JSON list"):
        load_annotations(tmp_path / "obj.json")
    (tmp_path / "bad.jsonl").write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(JobError, match="line 2 is not JSON"):
        load_annotations(tmp_path / "bad.jsonl")


def test_jsonl_and_image_alias(tmp_path):
    alias = {k: v for k, v in GOOD.items() if k != "images"} | {"image": ["a.png", "b.png"]}
    loaded = load_annotations(_write(tmp_path, [GOOD, alias], "x.jsonl"), "/data")
    assert [s.images for s in loaded] == [("a.png", "b.png")] * 2
    assert loaded.samples[1].frame_paths == ("/data/a.png", "/data/b.png") and loaded.samples[1].index == 1


def test_malformed_record_errors_are_one_line(tmp_path):
    for record in ({**GOOD, "video": "ep1.mp4"},
                   {**GOOD, "conversations": [{"from": "system", "value": "x"}, *GOOD["conversations"]]}):
        with pytest.raises(JobError) as err:
            load_annotations(_write(tmp_path, [record]), tmp_path)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the builder's prompt template

MY_PROMPT = "Route so far:{history} now:<image>\nGoal: {instruction}. Answer with {{one}} action."


def test_builders_write_the_given_prompt(tmp_path):
    root = tmp_path / "images"
    names = [f"rgb_{i:04d}_{'move_forward' if i < 2 else 'stop'}.png" for i in range(3)]
    _touch_frames(root / "R2R" / "7", names)
    episodes = tmp_path / "train.json"
    episodes.write_text(json.dumps({"episodes": [{"episode_id": 7, "instruction": {"instruction_text": "go"}}]}))
    records = build_vlnce(episodes, root / "R2R", root, prompt=MY_PROMPT)
    assert [r["conversations"][0]["value"] for r in records] == [
        "Route so far: now:<image>\nGoal: go. Answer with {one} action.",
        "Route so far:<image> now:<image>\nGoal: go. Answer with {one} action.",
        "Route so far:<image><image> now:<image>\nGoal: go. Answer with {one} action.",
    ]
    out = tmp_path / "ann.json"
    write_annotations(records, out)
    assert [s.num_frames for s in load_annotations(out, root)] == [1, 2, 3]  # tags match frames

    _touch_frames(root / "scan1" / "rgb", ["000.jpg", "001.jpg"])
    scale = tmp_path / "scale.json"
    scale.write_text(json.dumps([{"id": 5, "instructions": ["go left"], "video": "images/scan1", "actions": [-1, 2]}]))
    records = build_scalevln(scale, root, root, prompt=MY_PROMPT)
    assert records[1]["conversations"][0]["value"].startswith("Route so far:<image> now:<image>\nGoal: go left.")
    assert check_prompt_template(NAVIGATION_PROMPT) == NAVIGATION_PROMPT


@pytest.mark.parametrize("template, message", [
    ("{history}<image> {instruction} {scene}", r"unknown placeholder \{scene\}"),
    ("{history}<image> {}", r"unknown placeholder \{\}"),
    ("{history}<image>", r"holds \{instruction\} 0 times, it must hold it once"),
    ("<image>{instruction}", r"holds \{history\} 0 times"),
    ("{history}{history}<image>{instruction}", r"holds \{history\} 2 times"),
    ("{history} {instruction}", r"holds 0 literal <image> tags, it must hold exactly one \(the current frame\)"),
    ("{history}<image><image>{instruction}", r"holds 2 literal <image> tags"),
    ("<image>{history}{instruction}", r"the literal <image> tag comes before \{history\}"),
    ("{history}<image>{instruction!r}", r"\{instruction\} takes no conversion or format spec"),
    ("{history}<image>{instruction} {json: 1}", r"unknown placeholder"),
    ("{history}<image>{instruction} }", r"not a valid template .*write literal braces as \{\{ and \}\}"),
    ("  ", r"the prompt template is empty"),
])
def test_a_template_with_wrong_placeholders_is_refused(tmp_path, template, message):
    with pytest.raises(JobError, match=message) as err:
        check_prompt_template(template, "--prompt-file p.txt")
    assert str(err.value).startswith("--prompt-file p.txt: ") and "\n" not in str(err.value)
    with pytest.raises(JobError, match=message):  # the builders check before reading anything
        build_vlnce(tmp_path / "absent.json", tmp_path, tmp_path, prompt=template)


def test_cli_refuses_a_bad_prompt_file_naming_it(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("History:{history}\nInstruction: {instruction}\n")
    result = subprocess.run(
        [sys.executable, "-m", "janus_job.cli", "features", "build-annotations", "--layout", "vlnce",
         "--episodes", str(tmp_path / "e.json"), "--trajectories", str(tmp_path), "--image-root", str(tmp_path),
         "--out", str(tmp_path / "a.json"), "--prompt-file", str(prompt)], capture_output=True, text=True)
    assert result.returncode != 0
    line = [x for x in result.stderr.splitlines() if "prompt" in x]
    assert len(line) == 1 and f"--prompt-file {prompt}: holds 0 literal <image> tags" in line[0], result.stderr
    assert not (tmp_path / "a.json").exists()
