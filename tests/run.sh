#!/usr/bin/env bash
# Install everything the project needs into .venv and run the whole test suite.
#   bash tests/run.sh              # CI's set (everything not marked `long`)
#   bash tests/run.sh --all        # also the long tests
#   bash tests/run.sh -k rewards   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

bash tools/setup_env.sh
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
exec .venv/bin/python -m pytest ${MARK:+-m "$MARK"} "${ARGS[@]}"
