#!/usr/bin/env bash
#SBATCH --job-name=r1-zero-671b
#SBATCH --nodes=64
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
# DeepSeek-R1-Zero: GRPO from the DeepSeek-V3 base model with the rule rewards (accuracy + format) and the
# paper's template. Stage 1 of examples/README.md ("Run on a cluster").
#
#   sbatch examples/r1_zero_671b.sh --dry-run                    # check config, layout, 80 GB plan, paths
#   INIT_HF=/ckpt/dsv3_base_bf16 DATA=/data/r1_zero_math.jsonl sbatch examples/r1_zero_671b.sh
#   sbatch -N 128 examples/r1_zero_671b.sh                        # another node count: layout re-derived
#   PP=16 CP=8 EP=32 sbatch examples/r1_zero_671b.sh rl.max_response_len=16384   # layout / config overrides
#
# Layout (examples/r1_zero_671b.yaml, 64 nodes × 8 GPUs): pp16 × cp8 × ep32, dp4, no TP — DeepSeek-V3's
# PP16 × EP without TP, with context parallelism for the 33k-token rollouts. The planner's worst stage
# needs about 41 GB of 80 GB with full recompute (train.recompute: full) and FP8 dispatch
# (moe.dispatch_dtype=fp8, set by DISPATCH_DTYPE). 61 layers run as uneven stages [4 ×15, 1]
# (parallel.last_stage_layers: 1, Megatron's decoder_last_pipeline_num_layers).
#
# Inputs (environment): INIT_HF  the base model as a bf16 Hugging Face dir (README: convert the FP8 release)
#                       DATA     prompts with reference answers (JSONL/Parquet: prompt, answer)
#                       NODES, GPUS_PER_NODE, TP/CP/EP/PP/VPP, RUN_DIR, MR1 (the megatron-r1 executable)
STAGE=${STAGE:-r1_zero_671b}
CMD=grpo
CFG=examples/r1_zero_671b.yaml
DEFAULT_NODES=64
INIT_HF=${INIT_HF:-/ckpt/deepseek-v3-base-bf16}
DATA=${DATA:-/data/r1/zero_prompts.jsonl}
CMD_ARGS=(--init-hf "$INIT_HF")
OVERRIDES=(data.train_path="$DATA")
source "${MR1_REPO:-${SLURM_SUBMIT_DIR:-.}}/examples/cluster_common.sh"
mr1_main "$@"
