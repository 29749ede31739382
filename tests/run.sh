#!/usr/bin/env bash
# Install everything the project needs into .venv and run the whole test suite.
#   bash tests/run.sh              # CI's set (everything not marked `long`; the `beside` tests in a second pytest alongside)
#   bash tests/run.sh --all        # also the long tests
#   bash tests/run.sh -k rewards   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# Machines of one kind differ in CPU model, and vLLM / torch pick CPU kernels from these flags
# (AMX_MLA attention, AVX-512 GEMMs): say in the log which paths this run can exercise.
echo "== CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores"
echo "== CPU flags deciding kernels: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(amx|avx512f$|avx512_bf16|avx512_fp16|avx2$)' | sort | tr '\n' ' ')"
if grep -qw amx_tile /proc/cpuinfo; then echo "== AMX present: the AMX_MLA (bf16) rollout tests run"
else echo "== AMX absent: the AMX_MLA rollout tests skip; float32 engines use CPU_MLA everywhere"; fi

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
if [ -n "$MARK" ] && [ ${#ARGS[@]} -eq 0 ]; then
  # CI's run: the `beside` tests (the shrunken R1 pipeline: ~25 process starts, mostly single-threaded imports,
  # ~1.2 of the 2 cores) run in a second pytest beside the rest, in their own base temp directory (pytest prunes
  # old numbered ones), with their report printed after the main one's
  BESIDE_TMP=$(mktemp -d /tmp/pytest-beside.XXXXXX)
  echo "== pytest -m beside (beside the main run; its report follows the main one's)"
  .venv/bin/python -m pytest -m "beside and not long" --basetemp "$BESIDE_TMP/tmp" > "$BESIDE_TMP/log" 2>&1 &
  BESIDE_PID=$!
  echo "== pytest"
  rc=0; .venv/bin/python -m pytest -m "$MARK and not beside" || rc=$?
  brc=0; wait "$BESIDE_PID" || brc=$?
  echo "== pytest -m beside (exit $brc)"; cat "$BESIDE_TMP/log"
  [ "$brc" = 0 ] && [ "$rc" = 0 ] && rm -rf "$BESIDE_TMP"
  exit $(( rc != 0 ? rc : brc ))
fi
echo "== pytest"
exec .venv/bin/python -m pytest ${MARK:+-m "$MARK"} "${ARGS[@]}"
