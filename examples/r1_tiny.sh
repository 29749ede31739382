#!/usr/bin/env bash
#SBATCH --job-name=r1-tiny
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:30:00
#SBATCH --output=slurm-r1-tiny-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#
# The whole DeepSeek-R1 pipeline (paper §2.3-2.4) in miniature, on a 2-core CPU, no downloads.
#   bash examples/r1_tiny.sh             # or: sbatch examples/r1_tiny.sh
#   bash examples/r1_tiny.sh --dry-run   # say what each stage would do; train nothing
#  1. base + R1-Zero: examples/r1_zero_tiny.sh itself (same stages), on the bilingual task (English/Chinese
#     problems, a corpus whose solutions sometimes switch language mid-CoT)
#  2. cold-start data: megatron-r1 cold-start-data (R1-Zero's correct outputs rewritten readable + few-shot)
#  3. cold-start SFT of the base                 4. reasoning RL: accuracy + format + language consistency
#     (4b, ABLATE_LANGUAGE=1: the same without the language reward)
#  5. general task family (megatron-r1 general-data: prompts, non-reasoning SFT rows, preference pairs); rejection
#     sampling (correct, readable) + the non-reasoning rows ($GENERAL_SFT, default the generated ones) at 3:1
#  6. SFT of the base on it + the cold-start rows, 2 epochs
#  7. RL for all scenarios: helpfulness and harmlessness reward models (train-rm), then GRPO from stage 6 on
#     reasoning prompts (rule rewards) + general prompts (task: general, routed to the reward models), with the
#     reference policy refreshed every $REF_REFRESH steps: the final R1 model
#  8. export-distill for the students            9. tiny Qwen2 / Llama students distilled; the Qwen2 student
#     also trained by the same RL directly, from the same student base
# 10. one evaluation table: pass@1 (T 0.6, top-p 0.95, k samples), cons@k, format, language, length
# Everything lands in $RUN_DIR (default runs/r1_tiny); a finished stage is skipped on a re-run (each trainer's
# <run_dir>/DONE, each generator's atomically written output), a stopped one resumes. Sizes: the env vars below.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
RUN=${RUN_DIR:-runs/r1_tiny}
CFG=examples/r1_tiny.yaml
STUDENT_CFG=examples/r1_tiny_student.yaml
# sizes (a shrunken run sets them small: tests/e2e/test_r1_tiny.py)
DOCS=${DOCS:-60000}                     # pretraining corpus documents
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1000}  # base (r1_zero_tiny.sh)
ZERO_STEPS=${ZERO_STEPS:-40}            # R1-Zero GRPO
COLD_PROMPTS=${COLD_PROMPTS:-1000}      # prompts sampled for cold-start data
COLD_EPOCHS=${COLD_EPOCHS:-6}           # 2 left the summary after </think> diffuse at T=1 (benchmarks/r1_tiny.md)
RL_STEPS=${RL_STEPS:-20}                # reasoning RL (and its ablation, the student's RL and stage 7): 60-min budget
ABLATE_LANGUAGE=${ABLATE_LANGUAGE:-1}
RS_PROMPTS=${RS_PROMPTS:-1000}          # rejection-sampling prompts
SFT_EPOCHS=${SFT_EPOCHS:-2}
STUDENT_PRETRAIN_STEPS=${STUDENT_PRETRAIN_STEPS:-600}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-2}
EVAL_SAMPLES=${EVAL_SAMPLES:-4}
EVAL_LIMIT=${EVAL_LIMIT:-200}
GENERAL_PROMPTS=${GENERAL_PROMPTS:-400}  # general prompts (general-data): stage 7's RL prompts and stage 5's SFT rows
RM_PAIRS=${RM_PAIRS:-1000}              # preference pairs per reward model (10% of their prompts held out)
RM_STEPS=${RM_STEPS:-60}                # train-rm steps per reward model (examples/r1_tiny_rm.yaml)
GENERAL_RL_STEPS=${GENERAL_RL_STEPS:-$RL_STEPS}      # stage-7 GRPO
GENERAL_RL_REASONING=${GENERAL_RL_REASONING:-400}   # reasoning prompts mixed with the general ones in stage 7
REF_REFRESH=${REF_REFRESH:-10}          # stage 7: rl.ref_refresh_interval (0: never); the KL term needs rl.beta > 0
GENERAL_RL_BETA=${GENERAL_RL_BETA:-0.001}
GENERAL_RL_LR=${GENERAL_RL_LR:-3e-5}     # stage 7's learning rate (1e-4, the reasoning RL's, lost 12 points of pass@1)
GEN=$RUN/general                        # general-data's output
GENERAL_SFT=${GENERAL_SFT-$GEN/general_sft.jsonl}  # non-reasoning SFT rows of stage 5; GENERAL_SFT= for none
SMALL_ARGS=${SMALL_ARGS:-}              # extra dotted overrides for every training stage (a quick check)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
DRY=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=(--dry-run) ;;
    *) echo "error: unknown argument $arg (expected --dry-run)" >&2; exit 2 ;;
  esac
done
if [ -z "${MR1:-}" ]; then bash tools/setup_env.sh; MR1=.venv/bin/megatron-r1; fi
export MR1
start=$(date +%s)
stage() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }
trap 'echo "signal: waiting for the running stage to save and stop"' TERM USR1
# run DONE_FILE CMD...: skip when DONE_FILE exists; a dry run prints the command; exit 75 (stopped after a
# save) ends the script with 75 and requeues under Slurm, as r1_zero_tiny.sh does
run() {
  local done=$1; shift
  if [ -e "$done" ]; then echo "done: $done exists"; return 0; fi
  if [ ${#DRY[@]} -gt 0 ]; then echo "would run: $*"; return 0; fi
  local rc=0; "$@" || rc=$?
  if [ "$rc" = 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then scontrol requeue "$SLURM_JOB_ID" || true; fi
  [ "$rc" = 0 ] || { echo "stage failed or stopped (exit $rc); run this script again to resume"; exit "$rc"; }
}
Z=$RUN/zero; DATA=$Z/data; TOK=$Z/tokenizer
EVAL=(--data "$DATA/eval.jsonl" --samples "$EVAL_SAMPLES" --temperature 0.6 --top-p 0.95 --max-tokens 128
      --limit "$EVAL_LIMIT")
RM_CFG=examples/r1_tiny_rm.yaml
RM=(model.bos_token_id=1 model.eos_token_id=2)  # the policy tokenizer's ids (as r1_tiny.yaml)
# stage 7: general prompts go to the reward models (routed on their `task` field), the rest to rl.rewards
rm_route() { echo "\"rm_$1\": {\"weight\": 1.0, \"path\": \"$RUN/rm_$1/hf\"}"; }
ROUTES="{\"general\": {$(rm_route helpful), $(rm_route harmless)}}"
GENERAL_RL=(rl.routes="$ROUTES" rl.ref_refresh_interval="$REF_REFRESH" rl.beta="$GENERAL_RL_BETA")
if [ ${#DRY[@]} -gt 0 ]; then
  for c in "$CFG" "$STUDENT_CFG"; do $MR1 params "$c" > /dev/null; done
  $MR1 params "$RM_CFG" "${RM[@]}" > /dev/null
  $MR1 params "$CFG" "${GENERAL_RL[@]}" > /dev/null  # the routing table and the refresh option are validated
  echo "configs ok: $CFG, $STUDENT_CFG, $RM_CFG, $CFG with stage 7's reward routing"
fi

stage "1/10 base model and R1-Zero (examples/r1_zero_tiny.sh on the bilingual task)"
# (without its own held-out evaluations at T=1: stage 10 evaluates the base and R1-Zero with the other models)
RUN_DIR=$Z PRETRAIN_STEPS=$PRETRAIN_STEPS GRPO_STEPS=$ZERO_STEPS HELD_OUT_EVALS=0 PREPARE_ARGS="--zh 0.5 --switch 0.2 --docs $DOCS --eval ${EVAL_PROBLEMS:-200}" \
  PRETRAIN_ARGS="$SMALL_ARGS" GRPO_ARGS="$SMALL_ARGS" bash examples/r1_zero_tiny.sh "${DRY[@]}"

stage "2/10 cold-start data from the R1-Zero policy"
run "$RUN/cold_start.jsonl" $MR1 cold-start-data --init-hf "$Z/grpo/hf" --data "$DATA/train.jsonl" \
  --limit "$COLD_PROMPTS" --exemplars "$DATA/exemplars.jsonl" --include-exemplars --samples 4 \
  --out "$RUN/cold_start.jsonl"

stage "3/10 cold-start SFT of the base ($COLD_EPOCHS epochs)"
run "$RUN/cold_sft/DONE" $MR1 sft --config "$CFG" --init-hf "$Z/pretrain/hf" --tokenizer "$TOK" \
  --data "$RUN/cold_start.jsonl" --epochs "$COLD_EPOCHS" run_dir="$RUN/cold_sft" $SMALL_ARGS

RL_OVR=(data.train_path="$DATA/train.jsonl" train.train_steps="$RL_STEPS" train.lr=1e-4 train.min_lr=1e-4
        train.lr_warmup_steps=0 train.lr_decay_style=constant train.micro_batch_size=32 train.save_interval=10
        rl.updates_per_batch=4)
stage "4/10 reasoning RL: accuracy + format + language consistency ($RL_STEPS steps)"
run "$RUN/reasoning_rl/DONE" $MR1 grpo --config "$CFG" --init-hf "$RUN/cold_sft/hf" "${RL_OVR[@]}" \
  run_dir="$RUN/reasoning_rl" $SMALL_ARGS
if [ "$ABLATE_LANGUAGE" = 1 ]; then
  stage "4b/10 the same RL without the language reward (ablation)"
  run "$RUN/reasoning_rl_nolang/DONE" $MR1 grpo --config "$CFG" --init-hf "$RUN/cold_sft/hf" "${RL_OVR[@]}" \
    rl.rewards.language.weight=0 run_dir="$RUN/reasoning_rl_nolang" $SMALL_ARGS
fi

stage "5/10 general task family; rejection sampling (correct and readable${GENERAL_SFT:+, + non-reasoning 3:1})"
general_data() {  # written whole: a stopped run leaves no half directory behind
  rm -rf "$GEN.tmp" && $MR1 general-data --out "$GEN.tmp" "$@" > /dev/null && mv "$GEN.tmp" "$GEN"
}
run "$GEN" general_data --prompts "$GENERAL_PROMPTS" --pairs "$RM_PAIRS" --seed 0
run "$RUN/rejection/DONE" $MR1 rejection-sample --config "$CFG" --init-hf "$RUN/reasoning_rl/hf" \
  --data "$DATA/train.jsonl" --limit "$RS_PROMPTS" --samples 4 --readable --out "$RUN/rejection.jsonl" \
  ${GENERAL_SFT:+--extra "$GENERAL_SFT" --extra-ratio 3} run_dir="$RUN/rejection"

stage "6/10 SFT of the base on the combined data ($SFT_EPOCHS epochs)"
run "$RUN/r1_sft/DONE" $MR1 sft --config "$CFG" --init-hf "$Z/pretrain/hf" --tokenizer "$TOK" \
  --data "$RUN/rejection.jsonl" --data "$RUN/cold_start.jsonl" --epochs "$SFT_EPOCHS" run_dir="$RUN/r1_sft" $SMALL_ARGS
R1=$RUN/r1_sft/hf

stage "7/10 RL for all scenarios: reward models, then GRPO on reasoning + general prompts ($GENERAL_RL_STEPS steps)"
for kind in helpful harmless; do  # helpfulness judges the final summary, harmlessness the whole response
  run "$RUN/rm_$kind/DONE" $MR1 train-rm --config "$RM_CFG" --kind "$kind" --data "$GEN/${kind}_train.jsonl" \
    --eval "$GEN/${kind}_heldout.jsonl" --tokenizer "$TOK" "${RM[@]}" train.train_steps="$RM_STEPS" \
    run_dir="$RUN/rm_$kind" $SMALL_ARGS
  [ ${#DRY[@]} -gt 0 ] || echo "reward model $kind: $(grep -E '"(heldout_accuracy|heldout_pairs|train_pairs|steps)"' \
    "$RUN/rm_$kind/hf/rm.json" | tr -d ' \n')"
done
mix_prompts() {  # reasoning prompts (no task field: rule rewards) + general ones (task: general), written whole
  { head -n "$GENERAL_RL_REASONING" "$DATA/train.jsonl"; cat "$GEN/general_prompts.jsonl"; } > "$1.tmp" && mv "$1.tmp" "$1"
}
run "$RUN/general_rl_prompts.jsonl" mix_prompts "$RUN/general_rl_prompts.jsonl"
run "$RUN/r1/DONE" $MR1 grpo --config "$CFG" --init-hf "$R1" "${RL_OVR[@]}" "${GENERAL_RL[@]}" \
  data.train_path="$RUN/general_rl_prompts.jsonl" train.train_steps="$GENERAL_RL_STEPS" train.lr="$GENERAL_RL_LR" \
  train.min_lr="$GENERAL_RL_LR" run_dir="$RUN/r1" $SMALL_ARGS

stage "8/10 distillation data for the students"
for style in qwen2 llama3; do
  run "$RUN/distill_$style/train.jsonl" $MR1 export-distill --input "$RUN/rejection.jsonl" --input "$RUN/cold_start.jsonl" \
    --output "$RUN/distill_$style" --tokenizer "$Z/student_$style" --decontaminate "$DATA/eval.jsonl"
done

stage "9/10 students: a tiny Qwen2 base, distilled or by RL directly; a tiny Llama distilled"
STUDENT=(model.vocab_size=516 model.hidden_size=128 model.intermediate_size=256 model.bos_token_id=512 model.eos_token_id=513 train.params_dtype=float32 train.seq_length=256 train.micro_batch_size=16
         train.global_batch_size=16 train.lr=1e-3 train.min_lr=1e-4 train.lr_warmup_steps=10)
run "$RUN/student_qwen2_base/DONE" $MR1 pretrain --config "$STUDENT_CFG" --data "$DATA/corpus" \
  --tokenizer "$Z/student_qwen2" train.train_steps="$STUDENT_PRETRAIN_STEPS" run_dir="$RUN/student_qwen2_base" $SMALL_ARGS
run "$RUN/student_qwen2_distill/DONE" $MR1 sft --config "$STUDENT_CFG" --init-hf "$RUN/student_qwen2_base/hf" \
  --data "$RUN/distill_qwen2/train.jsonl" --epochs "$STUDENT_EPOCHS" run_dir="$RUN/student_qwen2_distill" $SMALL_ARGS
run "$RUN/student_qwen2_rl/DONE" $MR1 grpo --config "$STUDENT_CFG" --init-hf "$RUN/student_qwen2_base/hf" \
  "${RL_OVR[@]}" run_dir="$RUN/student_qwen2_rl" $SMALL_ARGS
run "$RUN/student_llama_distill/DONE" $MR1 sft --config tiny-llama --tokenizer "$Z/student_llama3" \
  --data "$RUN/distill_llama3/train.jsonl" --epochs "$STUDENT_EPOCHS" "${STUDENT[@]}" \
  run_dir="$RUN/student_llama_distill" $SMALL_ARGS

stage "10/10 evaluation table"
ev() {  # ev LABEL=HF_DIR...: one eval of every model in r1_chat, the base models (BASE_MODELS) in r1_zero; models of
  # one architecture in a row share a vLLM engine (weights swapped in); each result is $RUN/eval/LABEL.json, and a
  # re-run skips those already there
  local done=$RUN/eval/${1%%=*}.json args=()
  for m in "$@"; do  # done when every result is there (a missing one names the call's done-file)
    args+=(--model "$m"); [ -e "$RUN/eval/${m%%=*}.json" ] || done=$RUN/eval/${m%%=*}.json
  done
  for m in "${BASE_MODELS[@]}"; do args+=(--model-template "$m=r1_zero"); done
  run "$done" $MR1 eval "${args[@]}" --template r1_chat "${EVAL[@]}" --out-dir "$RUN/eval"
}
[ ${#DRY[@]} -gt 0 ] || mkdir -p "$RUN/eval"
NOLANG=(); [ "$ABLATE_LANGUAGE" != 1 ] || NOLANG=(reasoning_rl_no_language="$RUN/reasoning_rl_nolang/hf")
BASE_MODELS=(base r1_zero qwen2_student_base)  # prompted as in R1-Zero; the others were tuned on chat-format rows
ev base="$Z/pretrain/hf" r1_zero="$Z/grpo/hf" cold_start_sft="$RUN/cold_sft/hf" reasoning_rl="$RUN/reasoning_rl/hf" \
  "${NOLANG[@]}" r1_sft="$R1" r1="$RUN/r1/hf" qwen2_student_base="$RUN/student_qwen2_base/hf" \
  qwen2_student_distilled="$RUN/student_qwen2_distill/hf" qwen2_student_rl="$RUN/student_qwen2_rl/hf" \
  llama_student_distilled="$RUN/student_llama_distill/hf"
# the reward models' view of stage 7: their mean scores of the models' samples on the general prompts, before
# (r1_sft) and after (r1). Not held out: the generator has few distinct prompts, all in stage 7's RL set.
rm_scores() {  # one eval of both models (one engine; each sample dumped as `completion` with its `model`), scored
  local d=$RUN/eval_general
  mkdir -p "$d" && $MR1 eval --model r1_sft="$R1" --model r1="$RUN/r1/hf" --template r1_chat \
      --data "$GEN/general_prompts.jsonl" "${EVAL[@]:2}" --dump "$d/samples.jsonl" > /dev/null \
    && $MR1 score --reward "rm_helpful:$RUN/rm_helpful/hf,rm_harmless:$RUN/rm_harmless/hf" --response-key completion \
      --group-by model --input "$d/samples.jsonl" --output "$d/scored.jsonl" --no-progress > "$d/scores.txt.tmp" \
    && mv "$d/scores.txt.tmp" "$d/scores.txt"
}
run "$RUN/eval_general/scores.txt" rm_scores
if [ ${#DRY[@]} -gt 0 ]; then echo; echo "dry run only: nothing trained"; exit 0; fi
$MR1 eval-table --out "$RUN/table.md" $(for f in "$RUN"/eval/*.json; do echo "$(basename "$f" .json)=$f"; done)
{ echo; echo "Mean reward-model scores of the samples on the general prompts, before (r1_sft) and after (r1) stage 7:"
  echo; echo "| model | rm_helpful | rm_harmless |"; echo "|---|---|---|"
  awk '/^mean per model:/ {on = 1; next} on && $1 == "model" {for (i = 1; i <= NF; i++) c[$i] = i; next}
       on && NF {printf "| %s | %s | %s |\n", $1, $c["rm_helpful"], $c["rm_harmless"]}' "$RUN/eval_general/scores.txt"
  } | tee -a "$RUN/table.md"
echo "total time: $(( $(date +%s) - start ))s"
