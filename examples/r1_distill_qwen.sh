#!/usr/bin/env bash
#SBATCH --job-name=r1-distill-qwen
#SBATCH --nodes=1
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
# Distil DeepSeek-R1 into a dense student: SFT of Qwen2.5-1.5B (or llama-8b) on the curated R1 samples.
#
#   sbatch examples/r1_distill_qwen.sh --dry-run
#   INIT_HF=/ckpt/Qwen2.5-Math-1.5B DATA=/data/r1/distill_800k.jsonl sbatch examples/r1_distill_qwen.sh
#   sbatch -N 4 examples/r1_distill_qwen.sh                       # more data parallelism, same layout
#   INIT_HF=/ckpt/Llama-3.1-8B sbatch examples/r1_distill_qwen.sh model.preset=llama-8b
#
# Layout: cp2 × dp (no TP/PP: the student fits one GPU; CP halves the 32k-token activations and logits).
STAGE=${STAGE:-r1_distill_qwen}
CMD=sft
CFG=examples/r1_distill_qwen.yaml
DEFAULT_NODES=1
INIT_HF=${INIT_HF:-/ckpt/Qwen2.5-Math-1.5B}
DATA=${DATA:-runs/r1_rejection_sampling_671b/sft_reasoning.jsonl}
CMD_ARGS=(--init-hf "$INIT_HF" --data "$DATA")
RECOMPUTE=${RECOMPUTE:-none}   # the student fits without activation recompute
source "${MR1_REPO:-${SLURM_SUBMIT_DIR:-.}}/examples/cluster_common.sh"
mr1_main "$@"
