"""bench/export.py in --tiny mode: the product's engine writes a real DeepSpeed checkpoint, `janus-job export`
runs as a measured child process. The full-size numbers come from the device; this keeps the bench from rotting
and checks that what it reports is consistent with what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_export_bench_measures_the_product_export(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "export.py"), "--tiny", "--out", str(out),
                           "--workdir", str(work)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("export-*-cpu-1-tiny.json"))
    assert len(files) == 1, proc.stdout
    r = json.loads(files[0].read_text())
    e = r["export"]
    assert e["exit_code"] == 0 and all(r["spot_checks"].values()) and len(r["spot_checks"]) == 4
    assert any("saved at world size 1, ZeRO-1" in line for line in e["log"])
    assert any(line.startswith("export done step=1") for line in e["log"])
    # what it reports is what it wrote
    export = work / "export"
    assert e["output_files"] == {p.name: p.stat().st_size for p in export.iterdir() if p.is_file()}
    assert e["output_bytes"] == sum(e["output_files"].values())
    index = json.loads((export / "model.safetensors.index.json").read_text())
    params = r["trainable_params"] + r["frozen_params"] + r["vggt_aggregator_params"]
    assert index["metadata"]["total_size"] >= 4 * params  # fp32 tiny run: every parameter, 4 bytes
    ckpt = work / "checkpoints" / "step-00000001"
    assert r["checkpoint"]["files"] == {n: (ckpt / n).stat().st_size for n in r["checkpoint"]["files"]}
    assert r["checkpoint"]["optimizer_step_taken"] is False
    # the memory figures belong to the export process: positive, and the sampled peak within ru_maxrss
    assert 0 < e["rssanon_peak_gib"] <= e["vmrss_peak_gib"] <= e["ru_maxrss_gib"]
    assert e["wall_s"] > 0 and e["user_cpu_s"] > 0
