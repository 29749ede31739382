#!/usr/bin/env python
"""Plan a parallel layout without a cluster: per-GPU memory of the worst pipeline stage, bubble, all-to-all.

    megatron-r1 plan --model deepseek-v3-671b --gpus 2048 --pp 16 --ep 64 \\
        --global-batch-size 15360 --recompute full

Exit codes: 0 a plan was printed (it may say FITS: no); 1 with --require-fit when the worst stage does
not fit --gpu-mem-gb; 2 the layout is impossible (one line `error: <reason>`). The formulas are in
megatron_r1/parallel/plan.py.
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_r1.config import ConfigError, ParallelConfig, load_config
from megatron_r1.parallel.plan import DTYPE_BYTES, PlanOptions, format_plan, make_plan, plan_to_dict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 plan", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model preset (deepseek-v3-671b, qwen2-1.5b, ...), YAML or HF dir")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=1, help="model chunks per pipeline rank (interleaved schedule)")
    ap.add_argument("--sp", action=argparse.BooleanOptionalAction, default=True,
                    help="sequence parallelism when tp > 1 (default on)")
    ap.add_argument("--zero1", action=argparse.BooleanOptionalAction, default=True,
                    help="shard master weights and Adam states over dp (default on)")
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--global-batch-size", type=int, default=None, help="sequences per step (default 4·pp micro-batches)")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--schedule", choices=["1f1b", "interleaved"], default=None,
                    help="default: interleaved when --vpp > 1, else 1f1b")
    ap.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                    help="as train.recompute; selective default = DeepSeek-V3's (layernorm, mla_up_proj, moe_act)")
    ap.add_argument("--recompute-modules", default=None,
                    help="selective: comma-separated train.recompute_modules, e.g. core_attn,moe_act")
    ap.add_argument("--recompute-num-layers", type=int, default=None, help="full: blocks recomputed per chunk")
    dtypes = list(DTYPE_BYTES)
    ap.add_argument("--param-dtype", choices=dtypes, default="bf16")
    ap.add_argument("--grad-dtype", choices=dtypes, default="fp32", help="main grads (Megatron default fp32)")
    ap.add_argument("--master-dtype", choices=dtypes, default="fp32")
    ap.add_argument("--optimizer-dtype", choices=dtypes, default="fp32", help="Adam m and v")
    ap.add_argument("--dispatch-dtype", choices=["bf16", "fp8"], default="bf16", help="MoE token dispatch")
    ap.add_argument("--first-stage-layers", type=int, default=None, help="uneven pipeline: layers of stage 0")
    ap.add_argument("--last-stage-layers", type=int, default=None, help="uneven pipeline: layers of the last stage")
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0)
    ap.add_argument("--reserved-gb", type=float, default=4.0, help="CUDA context, NCCL buffers, fragmentation")
    ap.add_argument("--require-fit", action="store_true", help="exit 1 when the worst stage does not fit")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = ap.parse_args(argv)

    try:
        model = load_config(a.model).model
        par = ParallelConfig(tp=a.tp, sp=a.sp, cp=a.cp, ep=a.ep, pp=a.pp, vpp=a.vpp, zero1=a.zero1)
        opts = PlanOptions(
            gpus=a.gpus, parallel=par, seq_length=a.seq_length, micro_batch_size=a.micro_batch_size,
            global_batch_size=a.global_batch_size, schedule=a.schedule, recompute=a.recompute,
            recompute_modules=tuple(a.recompute_modules.split(",")) if a.recompute_modules else None,
            recompute_num_layers=a.recompute_num_layers,
            param_dtype=a.param_dtype, grad_dtype=a.grad_dtype, master_dtype=a.master_dtype,
            optimizer_dtype=a.optimizer_dtype, dispatch_dtype=a.dispatch_dtype,
            first_stage_layers=a.first_stage_layers, last_stage_layers=a.last_stage_layers,
            gpu_mem_gb=a.gpu_mem_gb, reserved_gb=a.reserved_gb)
        plan = make_plan(model, opts, model_name=a.model)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan_to_dict(plan), indent=2) if a.json else format_plan(plan))
    return 1 if a.require_fit and not plan.fits else 0


if __name__ == "__main__":
    sys.exit(main())
