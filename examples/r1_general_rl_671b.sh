#!/usr/bin/env bash
#SBATCH --job-name=r1-general-rl-671b
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
# DeepSeek-R1 stage 4: RL for all scenarios, from the stage-3 SFT model. Reasoning prompts get the rule
# rewards, `task: general` prompts the helpfulness and harmlessness reward models (rl.routes in
# examples/r1_general_rl_671b.yaml), trained first by examples/r1_reward_model_671b.sh:
#
#   h=$(KIND=helpful  sbatch --parsable examples/r1_reward_model_671b.sh)
#   s=$(KIND=harmless sbatch --parsable examples/r1_reward_model_671b.sh)
#   sbatch examples/r1_general_rl_671b.sh --dry-run
#   sbatch --dependency=afterok:$SFT3_JOB:$h:$s examples/r1_general_rl_671b.sh
#
# DATA: reasoning and general prompts in one file; a general row carries "task": "general".
# RM_HELPFUL / RM_HARMLESS: the reward models' directories (default: the reward-model stages' exports).
#
# Layout (uneven pipeline stages, known gaps): as in r1_zero_671b.sh. Output: $RUN_DIR/hf = DeepSeek-R1, the teacher
# whose samples r1_distill_qwen.sh trains on.
STAGE=${STAGE:-r1_general_rl_671b}
CMD=grpo
CFG=examples/r1_general_rl_671b.yaml
DEFAULT_NODES=64
INIT_HF=${INIT_HF:-runs/r1_sft_stage3/hf}
DATA=${DATA:-/data/r1/general_prompts.jsonl}
CMD_ARGS=(--init-hf "$INIT_HF")
RM_HELPFUL=${RM_HELPFUL:-runs/r1_rm_helpful/hf}
RM_HARMLESS=${RM_HARMLESS:-runs/r1_rm_harmless/hf}
OVERRIDES=(data.train_path="$DATA" rl.routes.general.rm_helpful.path="$RM_HELPFUL"
           rl.routes.general.rm_harmless.path="$RM_HARMLESS")
REQUIRES=("$RM_HELPFUL" "$RM_HARMLESS")   # their stages must have finished (DONE) before this one starts
source "${MR1_REPO:-${SLURM_SUBMIT_DIR:-.}}/examples/cluster_common.sh"
mr1_main "$@"
