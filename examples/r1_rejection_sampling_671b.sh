#!/usr/bin/env bash
#SBATCH --job-name=r1-rejection-sampling-671b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=2-00:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# DeepSeek-R1 stage 3a: rejection sampling. Samples 16 responses per prompt from the reasoning-RL policy
# (vLLM, tp=32: 4 replicas on 16 nodes), keeps the ones the rule rewards accept (correct + format + one
# language; `megatron-r1 rejection-sample --help`) and the paper's readability filters pass (--readable: mixed
# languages, long paragraphs, code blocks), at most one per prompt, as SFT rows in $OUT. GENERAL_SFT=FILE mixes
# non-reasoning rows in at 3:1 (the paper's ~600k : ~200k), as stage 5 of examples/r1_tiny.sh does.
#
#   sbatch examples/r1_rejection_sampling_671b.sh --dry-run
#   sbatch --dependency=afterok:$RL_JOB examples/r1_rejection_sampling_671b.sh
#
# No checkpoints: a requeued job generates again from the start ($OUT is written at the end, atomically).
# Then stage 3b: STAGE=r1_sft_stage3 DATA=$OUT EPOCHS=2 sbatch examples/r1_cold_start_sft_671b.sh.
STAGE=${STAGE:-r1_rejection_sampling_671b}
CMD=rejection-sample
CFG=examples/r1_rejection_sampling_671b.yaml
DEFAULT_NODES=16
INIT_HF=${INIT_HF:-runs/r1_reasoning_rl_671b/hf}
DATA=${DATA:-/data/r1/reasoning_prompts.jsonl}
OUT=${OUT:-runs/$STAGE/sft_reasoning.jsonl}
GENERAL_SFT=${GENERAL_SFT:-}
CMD_ARGS=(--init-hf "$INIT_HF" --data "$DATA" --out "$OUT" --samples 16 --keep-per-prompt 1 --readable
          ${GENERAL_SFT:+--extra "$GENERAL_SFT" --extra-ratio 3})
source "${MR1_REPO:-${SLURM_SUBMIT_DIR:-.}}/examples/cluster_common.sh"
mr1_main "$@"
