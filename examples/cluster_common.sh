# shellcheck shell=bash
# Shared body of the cluster sbatch scripts (r1_*_671b.sh, r1_distill_qwen.sh). Sourced, never run.
#
# A stage script sets, then sources this file and calls `mr1_main "$@"`:
#   STAGE          name of the stage: run dir runs/$STAGE, log names
#   CMD            megatron-r1 subcommand: grpo | sft | pretrain | rejection-sample | train-rm
#   CFG            YAML config (relative to the repo root)
#   DEFAULT_NODES  the node count the YAML's layout is planned for; keep it equal to `#SBATCH --nodes`
#   CMD_ARGS       bash array: the subcommand's flags (--init-hf ..., --data ...)
#   OVERRIDES      bash array (optional): dotted config overrides (data.train_path=...)
#   REQUIRES       bash array (optional): more inputs whose producing stage must have finished (reward models)
# The script's own arguments are --dry-run and dotted overrides (train.lr=1e-6 ...), which win over all others.
#
# Notable choices (why the scripts look the way they do):
# - One `srun` per job, one process per GPU (--ntasks-per-node = GPUs per node). launch.py turns
#   SLURM_PROCID/NTASKS/LOCALID + the first host of the node list into the rendezvous; MASTER_ADDR /
#   MASTER_PORT are exported too (same values launch.py derives: first host, 20000 + job id % 20000),
#   for tools that read the torchrun variables.
# - Every submission first runs the entry point with --dry-run on the batch host: config + overrides,
#   layout arithmetic, the memory plan (parallel/plan.py; non-zero exit when it does not fit), paths and
#   versions, in seconds and without a GPU. `sbatch script.sh --dry-run` stops there. The dry run plans
#   NODES (default DEFAULT_NODES) whatever it runs on, so a 1-node dry run checks the 64-node layout; a
#   real run plans its allocation and refuses a NODES that differs from it.
# - Preemption / time limit: `#SBATCH --requeue --signal=B:USR1@300` sends the batch shell SIGUSR1 five
#   minutes before the end. The trap waits (up to SAVE_WAIT s) for the trainer's next complete checkpoint
#   and then requeues the job; the next run resumes from the newest complete checkpoint by itself
#   (TrainSession.resume). The trap forwards SIGUSR1 to the job step (srun relays it to every task): the
#   trainers finish the current step, agree over all ranks, save (atomically, a COMPLETE marker last) and
#   exit, so nothing is lost. Without the forward, the next regular checkpoint (train.save_interval) is used.
# - The run dir does not contain the job id: a requeued or resubmitted job finds its checkpoints.
# - A stopped run is not a finished one. A trainer stopped by a signal (the USR1 above, or SIGTERM
#   from a preemption or scancel) saves, writes no export and exits 75 (EXIT_STOPPED in
#   megatron_r1/training.py); the script requeues the job on that status. A stage is finished only
#   when its run dir has DONE (written after the last step and the export, or after
#   rejection-sample's output): a submission of a finished stage exits 0 at once, and a stage whose
#   INIT_HF / DATA comes from another stage's run dir refuses to start until that one has DONE.

set -euo pipefail

mr1_log() { echo "[$(date '+%F %T')] [$STAGE] $*"; }

mr1_init() {
    [ -n "${OVERRIDES+x}" ] || OVERRIDES=()
    DRY_RUN=0
    PASS=()
    for arg in "$@"; do
        if [ "$arg" = "--dry-run" ]; then DRY_RUN=1; else PASS+=("$arg"); fi
    done
    REPO=${MR1_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    if [ ! -f "$REPO/$CFG" ]; then
        echo "error: $REPO/$CFG not found: submit from the repository root or set MR1_REPO" >&2
        exit 2
    fi
    cd "$REPO"
    MR1=${MR1:-megatron-r1}
    PYTHON=${PYTHON:-python}

    # ---- world: GPUS_PER_NODE ranks on each of NODES nodes
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
    ALLOC_NODES=${SLURM_JOB_NUM_NODES:-1}
    if [ "$DRY_RUN" = 1 ]; then
        NODES=${NODES:-$DEFAULT_NODES}
    else
        NODES=${NODES:-$ALLOC_NODES}
        if [ "$NODES" != "$ALLOC_NODES" ]; then
            echo "error: NODES=$NODES but the allocation has $ALLOC_NODES nodes; submit with sbatch -N $NODES" >&2
            exit 2
        fi
    fi
    WORLD=$(( NODES * GPUS_PER_NODE ))

    # ---- layout: the YAML's, overridden by TP/CP/EP/PP/VPP from the environment. With a node count other
    # than the YAML's, EP follows the ranks of a pipeline stage (tp·cp·dp, capped at 64 = DeepSeek-V3's EP).
    eval "$("$PYTHON" -c "from megatron_r1.config import load_config
p = load_config('$CFG').parallel
print(f'Y_TP={p.tp} Y_CP={p.cp} Y_EP={p.ep} Y_PP={p.pp} Y_VPP={p.vpp}')")"
    TP=${TP:-$Y_TP} CP=${CP:-$Y_CP} PP=${PP:-$Y_PP} VPP=${VPP:-$Y_VPP}
    if [ -z "${EP:-}" ]; then
        EP=$Y_EP
        if [ "$NODES" != "$DEFAULT_NODES" ] && [ "$Y_EP" -gt 1 ]; then
            EP=$(( WORLD / PP ))
            [ "$EP" -gt 64 ] && EP=64
        fi
    fi
    LAYOUT=(parallel.tp="$TP" parallel.cp="$CP" parallel.ep="$EP" parallel.pp="$PP" parallel.vpp="$VPP")

    # activation recompute is the config's train.recompute (671B configs: full); RECOMPUTE=x overrides it
    if [ -n "${RECOMPUTE:-}" ]; then LAYOUT+=(train.recompute="$RECOMPUTE"); fi
    # ---- MoE dispatch all-to-all in FP8 (DeepSeek-V3's recipe): moe.dispatch_dtype, the run and the plan alike
    DISPATCH_DTYPE=${DISPATCH_DTYPE:-fp8}
    LAYOUT+=(moe.dispatch_dtype="$DISPATCH_DTYPE")

    # ---- directories: stable across requeues
    RUN_DIR=${RUN_DIR:-runs/$STAGE}
    LOG_DIR=${LOG_DIR:-$RUN_DIR/logs}
    mkdir -p "$LOG_DIR"
    JOB=${SLURM_JOB_ID:-local}

    # ---- rendezvous (launch.py derives the same from SLURM_*; exported for tools that read them)
    if [ -n "${SLURM_JOB_NODELIST:-}" ] && [ -z "${MASTER_ADDR:-}" ]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n1 || true)
        [ -n "$MASTER_ADDR" ] || MASTER_ADDR=$("$PYTHON" -c "from megatron_r1.parallel.launch import expand_hostlist as e
print(e('$SLURM_JOB_NODELIST')[0])")
    fi
    export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
    fi

    # ---- process environment
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}   # per rank; 8 ranks share a node's cores
    export TOKENIZERS_PARALLELISM=false
    export PYTHONUNBUFFERED=1
    # NCCL / InfiniBand. Defaults are right on most clusters; uncomment what yours needs.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed collective aborts the job instead of hanging it
    # export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7  # the compute-fabric HCAs (ibstat)
    # export NCCL_SOCKET_IFNAME=eth0          # bootstrap / TCPStore interface; exclude docker0, lo
    # export GLOO_SOCKET_IFNAME=eth0          # the same for gloo (object collectives, CPU groups)
    # export NCCL_NVLS_ENABLE=0               # NVLink SHARP: disable if NVSwitch multicast is unavailable in the container
    # export NCCL_IB_GID_INDEX=3              # RoCE clusters
    # export NCCL_IB_TIMEOUT=22 NCCL_IB_RETRY_CNT=13   # long all-to-alls over a busy fabric
    # export NCCL_DEBUG=WARN                  # INFO once, to see the chosen rings/trees and transports
    # export NCCL_CROSS_NIC=0 NCCL_P2P_NET_CHUNKSIZE=524288
    # export CUDA_DEVICE_MAX_CONNECTIONS=1    # overlap of TP/SP communication with compute (Megatron's advice)
}

mr1_preflight() {
    mr1_log "job $JOB: $CMD on $NODES nodes × $GPUS_PER_NODE GPUs = $WORLD ranks (allocation: $ALLOC_NODES nodes); layout tp=$TP cp=$CP ep=$EP pp=$PP vpp=$VPP"
    mr1_log "preflight: megatron-r1 $CMD --dry-run (planned world $WORLD ranks, not this allocation)"
    set +e
    "$MR1" "$CMD" --config "$CFG" "${CMD_ARGS[@]}" --dry-run --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" \
        --dispatch-dtype "$DISPATCH_DTYPE" --plan-json "$LOG_DIR/plan-$JOB.json" \
        run_dir="$RUN_DIR" "${LAYOUT[@]}" "${OVERRIDES[@]}" "${PASS[@]}"
    local rc=$?
    set -e
    mr1_log "preflight exit $rc; plan JSON: $LOG_DIR/plan-$JOB.json"
    return $rc
}

EXIT_STOPPED=75

# the run dir a path was produced in (runs/<stage>/hf, runs/<stage>/out.jsonl), when it is one of ours
mr1_producer() {
    local d
    d=$(dirname "$1")
    if [ -f "$d/config.yaml" ] || [ -d "$d/ckpt" ] || [ -f "$d/DONE" ]; then echo "$d"; fi
}

mr1_require_done() {
    local p d
    for p in "$@"; do
        [ -n "$p" ] || continue
        d=$(mr1_producer "$p")
        if [ -n "$d" ] && [ ! -f "$d/DONE" ]; then
            echo "error: $p comes from the run dir $d, which has not finished (no $d/DONE: stopped, failed or still running); finish that stage first" >&2
            exit 2
        fi
    done
}

mr1_newest_ckpt() {
    local d
    d=$(ls -d "$RUN_DIR"/ckpt/step_*/COMPLETE 2>/dev/null | sort | tail -n1 || true)
    echo "${d%/COMPLETE}"
}

mr1_on_usr1() {
    local before wait_s=${SAVE_WAIT:-240} start=$SECONDS
    before=$(mr1_newest_ckpt)
    mr1_log "SIGUSR1 (time limit or preemption ahead): asking the trainers to save; waiting up to ${wait_s}s for a checkpoint newer than '${before:-none}'"
    kill -USR1 "$SRUN_PID" 2>/dev/null || true   # srun relays it to the tasks: save after this step, then exit
    while [ $(( SECONDS - start )) -lt "$wait_s" ] && [ "$(mr1_newest_ckpt)" = "$before" ] && kill -0 "$SRUN_PID" 2>/dev/null; do
        sleep 5
    done
    mr1_log "newest complete checkpoint: $(mr1_newest_ckpt || true); requeueing job $JOB"
    REQUEUED=1
    scontrol requeue "$SLURM_JOB_ID" || mr1_log "scontrol requeue failed; resubmit by hand (the run resumes)"
}

mr1_srun() {
    local gpu_args=()
    # only ask for GPUs when the allocation has them (CPU test clusters run the same script)
    if [ "${SLURM_GPUS_PER_NODE:-0}" != 0 ]; then gpu_args=(--gpus-per-node="$GPUS_PER_NODE"); fi
    REQUEUED=0
    trap mr1_on_usr1 USR1
    mr1_log "srun: $WORLD ranks, rendezvous $MASTER_ADDR:${MASTER_PORT:-auto}; run dir $RUN_DIR (resumes from its newest complete checkpoint)"
    # in the background, so the trap runs while the job step is alive (bash defers traps during a foreground wait)
    srun --kill-on-bad-exit=1 --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" "${gpu_args[@]}" \
        "$MR1" "$CMD" --config "$CFG" "${CMD_ARGS[@]}" run_dir="$RUN_DIR" "${LAYOUT[@]}" "${OVERRIDES[@]}" "${PASS[@]}" &
    SRUN_PID=$!
    local rc=0
    while true; do
        wait "$SRUN_PID" && rc=0 || rc=$?
        kill -0 "$SRUN_PID" 2>/dev/null || break   # a trap interrupted `wait`: the step is still running
    done
    trap - USR1
    mr1_log "srun exit $rc"
    if [ "$rc" = "$EXIT_STOPPED" ] && [ "$REQUEUED" = 0 ]; then   # e.g. SIGTERM from a preemption
        mr1_log "stopped by a signal after saving a checkpoint (exit $EXIT_STOPPED): requeueing job $JOB"
        REQUEUED=1
        if [ -n "${SLURM_JOB_ID:-}" ]; then
            scontrol requeue "$SLURM_JOB_ID" || mr1_log "scontrol requeue failed; resubmit by hand (the run resumes)"
        fi
    fi
    return $rc
}

mr1_main() {
    mr1_init "$@"
    if [ "$DRY_RUN" = 0 ] && [ -f "$RUN_DIR/DONE" ]; then
        mr1_log "already finished: $RUN_DIR/DONE exists (delete it, or choose another RUN_DIR, to run again)"
        exit 0
    fi
    [ "$DRY_RUN" = 1 ] || mr1_require_done "${INIT_HF:-}" "${DATA:-}" ${REQUIRES[@]+"${REQUIRES[@]}"}
    mr1_preflight || exit $?
    if [ "$DRY_RUN" = 1 ]; then
        mr1_log "dry run only: nothing launched"
        exit 0
    fi
    mr1_srun
}
