#!/usr/bin/env bash
# Creates .venv and installs janus-train with every dependency pinned by constraints.txt.
# torch goes first: a later resolver step would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip==25.3"
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
