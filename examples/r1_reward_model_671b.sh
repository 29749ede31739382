#!/usr/bin/env bash
#SBATCH --job-name=r1-reward-model
#SBATCH --nodes=1
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
# DeepSeek-R1 stage 4, before the RL: one reward model per KIND, trained with `megatron-r1 train-rm` on
# preference pairs ({prompt, chosen, rejected} JSONL). helpful judges the final summary, harmless the whole
# response (reasoning included). Held-out pairwise accuracy is logged (eval/accuracy) and kept in hf/rm.json.
#
#   KIND=helpful  sbatch examples/r1_reward_model_671b.sh --dry-run
#   KIND=helpful  DATA=/data/r1/helpful_pairs.jsonl  sbatch examples/r1_reward_model_671b.sh
#   KIND=harmless DATA=/data/r1/harmless_pairs.jsonl sbatch examples/r1_reward_model_671b.sh
#
# RM_INIT_HF: the reward model's starting weights (a local dense HF dir, default /ckpt/qwen2.5-1.5b).
# Output: runs/r1_rm_$KIND/hf (HF dir + tokenizer + rm.json), which examples/r1_general_rl_671b.yaml names in
# rl.routes.general.
KIND=${KIND:-helpful}
case "$KIND" in helpful|harmless) ;; *) echo "error: KIND=$KIND: expected helpful or harmless" >&2; exit 2 ;; esac
STAGE=${STAGE:-r1_rm_$KIND}
CMD=train-rm
CFG=examples/r1_reward_model_671b.yaml
DEFAULT_NODES=1
INIT_HF=${RM_INIT_HF:-/ckpt/qwen2.5-1.5b}   # not INIT_HF: the pipeline exports that as the policy base
DATA=${DATA:-/data/r1/${KIND}_pairs.jsonl}
CMD_ARGS=(--kind "$KIND" --init-hf "$INIT_HF" --data "$DATA" --eval-every 50)
source "${MR1_REPO:-${SLURM_SUBMIT_DIR:-.}}/examples/cluster_common.sh"
mr1_main "$@"
