"""manifests/examples/<example>/ is exactly what `janus-job render examples/<example>.yaml` writes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import JANUS_JOB

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_every_example_has_rendered_manifests():
    rendered = {p.name for p in (ROOT / "manifests" / "examples").iterdir() if p.is_dir()}
    assert rendered == {e.stem for e in EXAMPLES}, "run the loop in docs/deploy.md (Rendered examples)"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_rendered_example_is_current(tmp_path, example):
    proc = subprocess.run([*JANUS_JOB, "render", str(example), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    committed = ROOT / "manifests" / "examples" / example.stem
    for name in ("deepspeed.json", "manifests.yaml"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"{committed / name} is stale: "
            f"janus-job render {example.relative_to(ROOT)} --out {committed.relative_to(ROOT)}"
        )
    assert not list(tmp_path.glob(".*.tmp")), "render left a temporary file behind"
