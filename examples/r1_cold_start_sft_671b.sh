#!/usr/bin/env bash
#SBATCH --job-name=r1-cold-start-sft-671b
#SBATCH --nodes=64
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=1-00:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# DeepSeek-R1 stage 1: cold-start SFT of the DeepSeek-V3 base model on a few thousand long chain-of-thought
# rows ({"prompt", "response"} JSONL; the prompt already in the chat template the later stages use), as
# `megatron-r1 cold-start-data` writes them from R1-Zero's outputs and few-shot prompting (examples/r1_tiny.sh
# stage 2). Also stage 3's SFT: STAGE=r1_sft_stage3 DATA=<rejection samples + non-reasoning rows> EPOCHS=2
# (examples/README.md). EPOCHS=N sets the steps to N passes over the rows (`sft --epochs`).
#
#   sbatch examples/r1_cold_start_sft_671b.sh --dry-run
#   INIT_HF=/ckpt/deepseek-v3-base-bf16 DATA=/data/r1/cold_start.jsonl sbatch examples/r1_cold_start_sft_671b.sh
#
# Layout (uneven pipeline stages, known gaps): as in r1_zero_671b.sh (pp16 × cp8 × ep32 on 64 nodes; 61 layers).
# Output: $RUN_DIR/hf (a Hugging Face dir with the tokenizer), the --init-hf of r1_reasoning_rl_671b.sh.
STAGE=${STAGE:-r1_cold_start_sft_671b}
CMD=sft
CFG=examples/r1_cold_start_sft_671b.yaml
DEFAULT_NODES=64
INIT_HF=${INIT_HF:-/ckpt/deepseek-v3-base-bf16}
DATA=${DATA:-/data/r1/cold_start.jsonl}
EPOCHS=${EPOCHS:-}
CMD_ARGS=(--init-hf "$INIT_HF" --data "$DATA" ${EPOCHS:+--epochs "$EPOCHS"})
source "${MR1_REPO:-${SLURM_SUBMIT_DIR:-.}}/examples/cluster_common.sh"
mr1_main "$@"
