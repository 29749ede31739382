#!/usr/bin/env bash
#SBATCH --job-name=r1-reasoning-rl-671b
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
# DeepSeek-R1 stage 2: reasoning RL (GRPO) from the cold-start SFT model, with accuracy + format +
# language-consistency rewards.
#
#   sbatch examples/r1_reasoning_rl_671b.sh --dry-run
#   sbatch --dependency=afterok:$SFT_JOB examples/r1_reasoning_rl_671b.sh
#
# Layout (uneven pipeline stages, known gaps): as in r1_zero_671b.sh. Output: $RUN_DIR/hf, the policy that
# r1_rejection_sampling_671b.sh samples from.
STAGE=${STAGE:-r1_reasoning_rl_671b}
CMD=grpo
CFG=examples/r1_reasoning_rl_671b.yaml
DEFAULT_NODES=64
INIT_HF=${INIT_HF:-runs/r1_cold_start_sft_671b/hf}
DATA=${DATA:-/data/r1/reasoning_prompts.jsonl}
CMD_ARGS=(--init-hf "$INIT_HF")
OVERRIDES=(data.train_path="$DATA")
source "${MR1_REPO:-${SLURM_SUBMIT_DIR:-.}}/examples/cluster_common.sh"
mr1_main "$@"
