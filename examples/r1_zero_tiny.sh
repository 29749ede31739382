#!/usr/bin/env bash
#SBATCH --job-name=r1-zero-tiny
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --output=slurm-r1-zero-tiny-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#
# The main job in miniature: R1-Zero on a 2-core CPU, no downloads.
#   bash examples/r1_zero_tiny.sh            # or: sbatch examples/r1_zero_tiny.sh
#   bash examples/r1_zero_tiny.sh --dry-run  # say what each stage would do and check it; train nothing
# 1. makes an arithmetic task, a noisy pretraining corpus and a sentencepiece tokenizer;
# 2. pretrains a small DeepSeek-V3-architecture MoE (MLA, DeepSeekMoE, MTP) on it  -> the base model;
# 3. evaluates the base model on held-out problems (pass@1 at T=1 over 4 samples, and greedy);
# 4. runs R1-Zero GRPO (accuracy + format rewards, the paper's template) with a co-located vLLM;
# 5. evaluates the final policy and prints before/after, plus where the logs, plot and checkpoint are.
# Everything lands in $RUN_DIR (default runs/r1_zero_tiny). Re-running skips the finished stages and
# resumes the others from their newest checkpoint. A training stage is finished only when its run dir has
# DONE (written after its last step and export); one stopped by SIGTERM / SIGUSR1 / Ctrl-C saves a
# checkpoint, exports nothing and exits 75, which ends this script with 75 (under Slurm: requeued).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
RUN=${RUN_DIR:-runs/r1_zero_tiny}
CFG=examples/r1_zero_tiny.yaml
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1000}
GRPO_STEPS=${GRPO_STEPS:-40}
HELD_OUT_EVALS=${HELD_OUT_EVALS:-1}  # 0: no stages 3 and 5 and no report (r1_tiny.sh evaluates both models itself)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "error: unknown argument $arg (expected --dry-run)" >&2; exit 2 ;;
  esac
done

if [ -z "${MR1:-}" ]; then   # MR1=path/to/megatron-r1 uses an existing install
    bash tools/setup_env.sh
    MR1=.venv/bin/megatron-r1
fi
[ "$DRY_RUN" = 1 ] || mkdir -p "$RUN"
start=$(date +%s)
stage() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }
EXIT_STOPPED=75  # megatron_r1/training.py: stopped by a signal after saving; run again to resume
# a signal to the whole job (scancel, Slurm's time limit) also reaches this shell: outlive it, so the
# trainer's exit status (75 after its save) decides what happens next
trap 'echo "signal: waiting for the running stage to save and stop"' TERM USR1
run_or_stop() {
    local rc=0
    "$@" || rc=$?
    if [ "$rc" = "$EXIT_STOPPED" ]; then
        echo "stopped by a signal after saving a checkpoint; run this script again to resume"
        if [ -n "${SLURM_JOB_ID:-}" ]; then
            scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue failed: resubmit by hand (the run resumes)"
        fi
    fi
    [ "$rc" = 0 ] || exit "$rc"
}

# run_stage DONE_FILE DRY_INPUT -- CMD...: skip when DONE_FILE exists (a trainer's <run_dir>/DONE, written after
# its last step and export; never hf/config.json, which a stopped run of older code could leave); in a dry run
# print the command and run its own --dry-run when its inputs (DRY_INPUT, made by an earlier stage) exist, else
# check its config only
run_stage() {
  local done=$1 input=$2; shift 3
  if [ -e "$done" ]; then echo "done: $done exists"; return 0; fi
  if [ "$DRY_RUN" = 0 ]; then run_or_stop "$@"; return; fi
  echo "would run: $*"
  if [ -z "$input" ]; then return 0; fi
  if [ -e "$input" ]; then "$@" --dry-run
  else echo "  (its input $input is made by an earlier stage; checking the config only)"; fi
}
CONFIG_ONLY=(params "$CFG")
PRETRAIN_OVR=(run_dir="$RUN/pretrain" train.train_steps="$PRETRAIN_STEPS" train.save_interval=250
              ${PRETRAIN_ARGS:-})  # PRETRAIN_ARGS / GRPO_ARGS: extra dotted overrides (a quick check, a sweep)
# RL keeps the router bias fixed (γ=0): moving it at pretraining speed re-routes tokens under the policy
# and measurably destroyed accuracy in calibration (benchmarks/r1_zero_tiny.md)
GRPO_OVR=(run_dir="$RUN/grpo" data.train_path="$RUN/data/train.jsonl" train.train_steps="$GRPO_STEPS" train.lr=1e-4
          train.min_lr=1e-4 train.lr_warmup_steps=0 train.lr_decay_style=constant train.micro_batch_size=32
          train.save_interval=10 model.bias_update_speed=0 rl.updates_per_batch=4 ${GRPO_ARGS:-})
if [ "$DRY_RUN" = 1 ]; then  # the configs of both training stages load and validate, whatever exists yet
  $MR1 "${CONFIG_ONLY[@]}" "${PRETRAIN_OVR[@]}" > /dev/null
  $MR1 "${CONFIG_ONLY[@]}" "${GRPO_OVR[@]}" > /dev/null
  echo "configs ok: $CFG with the pretraining and GRPO overrides"
fi

stage "1/5 data, tokenizer, tokenised corpus"
run_stage "$RUN/data/info.json" "" -- $MR1 prepare-tiny --run-dir "$RUN" ${PREPARE_ARGS:-}  # r1_tiny.sh: bilingual

stage "2/5 pretraining the base model ($PRETRAIN_STEPS steps)"
run_stage "$RUN/pretrain/DONE" "$RUN/data/corpus.bin" -- $MR1 pretrain --config "$CFG" \
    --data "$RUN/data/corpus" --tokenizer "$RUN/tokenizer" "${PRETRAIN_OVR[@]}"

if [ "$HELD_OUT_EVALS" = 1 ]; then
  stage "3/5 held-out accuracy of the base model"
  run_stage "$RUN/eval_base.json" "" -- $MR1 eval --model "$RUN/pretrain/hf" --data "$RUN/data/eval.jsonl" --both \
      --samples 4 --temperature 1.0 --max-tokens 96 --out "$RUN/eval_base.json"
fi

stage "4/5 R1-Zero GRPO ($GRPO_STEPS steps)"
run_stage "$RUN/grpo/DONE" "$RUN/pretrain/DONE" -- $MR1 grpo --config "$CFG" \
    --init-hf "$RUN/pretrain/hf" --eval "$RUN/data/eval.jsonl" --eval-every 10 "${GRPO_OVR[@]}"

if [ "$HELD_OUT_EVALS" = 0 ]; then
  [ "$DRY_RUN" = 0 ] || { echo; echo "dry run only: nothing trained"; }
  echo "held-out evaluations skipped (HELD_OUT_EVALS=0); total time: $(( $(date +%s) - start ))s"
  exit 0
fi
stage "5/5 held-out accuracy of the final policy"
if [ "$DRY_RUN" = 1 ]; then
  echo "would run: $MR1 eval --model $RUN/grpo/hf ... --out $RUN/eval_final.json; $MR1 report-tiny --run-dir $RUN"
  echo; echo "dry run only: nothing trained"
  exit 0
fi
# written whole after GRPO's DONE: a re-run (e.g. from examples/r1_tiny.sh) does not evaluate again
[ -e "$RUN/eval_final.json" ] || $MR1 eval --model "$RUN/grpo/hf" --data "$RUN/data/eval.jsonl" --both --samples 4 \
    --temperature 1.0 --max-tokens 96 --out "$RUN/eval_final.json" > /dev/null
$MR1 report-tiny --run-dir "$RUN"
echo "total time: $(( $(date +%s) - start ))s"
