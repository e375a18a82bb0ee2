#!/usr/bin/env bash
# Creates .venv and installs janus-train with every dependency pinned by constraints.txt.
# torch goes first: a later resolver step would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip==25.3"
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
# DeepSpeed compiles its CPU shared-memory collective op on the first CPU `init_distributed` and guards
# the build with a lock file; build it here once, so no training process (demo, tests) compiles it,
# waits on another's build, or leaves a stale lock behind when it is killed mid-build.
.venv/bin/python -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b and b.load(verbose=False)"
