#!/usr/bin/env python
"""Convert checkpoints between Hugging Face directories and megatron-r1's sharded (DCP) format.

    # a HF release (bf16, or DeepSeek's FP8 with weight_scale_inv) -> our checkpoint
    megatron-r1 convert --from hf --to megatron_r1 --input /ckpt/DeepSeek-V3 \\
        --output /ckpt/dsv3_mr1 --layout pp16,ep64,dp2
    # a training checkpoint (a step_* dir, or a save dir: its newest complete one) -> HF
    megatron-r1 convert --from megatron_r1 --to hf --input runs/r1/ckpt \\
        --output /ckpt/r1_hf --dtype bf16        # or --dtype fp8: DeepSeek's block-scaled release format

Both directions stream: memory per worker stays within a few --budget-mb chunks whatever the model
size, and --workers N (default: the cores available) converts N shards at once, byte-identical to
--workers 1 (benchmarks/convert.md: peak memory, GB/s and the 671B extrapolation).

Our checkpoints are layout-independent: `--layout` is validated and recorded, and any layout loads
any checkpoint (megatron_r1/ckpt/checkpoint.py). Exit codes: 0 done; 2 a problem with the input or
the arguments, printed as one line `error: <what, naming the file and the tensor>`.
"""
from __future__ import annotations

import argparse
import sys

from megatron_r1.ckpt.hf import CheckpointError
from megatron_r1.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 convert", description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="src", choices=["hf", "megatron_r1"], required=True)
    ap.add_argument("--to", dest="dst", choices=["hf", "megatron_r1"], required=True)
    ap.add_argument("--input", required=True, help="HF dir, or a checkpoint dir / save dir")
    ap.add_argument("--output", required=True, help="must not exist (or be empty)")
    ap.add_argument("--layout", default=None, help="e.g. tp2,pp2 or pp16,ep64,dp2 (to megatron_r1: validated "
                                                  "against the model and recorded)")
    ap.add_argument("--dtype", default=None, help="to hf: bf16 (default), fp32 or fp8; to megatron_r1: "
                                                 "bf16 or fp32 (default: the source dtype, FP8 -> bf16)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="to hf: safetensors shard size")
    ap.add_argument("--workers", type=int, default=None, help="processes converting shards in parallel, same "
                    "output for any N (default: the cores available; 1 for checkpoints under 1 GB)")
    ap.add_argument("--budget-mb", type=float, default=64, help="rows are converted in chunks of at most this "
                                                                "many MB in float32; memory per worker is a few times it")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        from megatron_r1.ckpt.convert import hf_to_megatron, megatron_to_hf
        if args.src == args.dst:
            raise ConfigError(f"--from {args.src} --to {args.dst}: nothing to convert")
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers {args.workers}: expected 1 or more")
        if not args.budget_mb > 0:
            raise ConfigError(f"--budget-mb {args.budget_mb}: expected a positive size")
        common = dict(progress=not args.no_progress, workers=args.workers,
                      budget_bytes=int(args.budget_mb * 2 ** 20))
        if args.dst == "megatron_r1":
            out = hf_to_megatron(args.input, args.output, layout=args.layout, dtype=args.dtype, **common)
        else:
            if args.layout:
                raise ConfigError("--layout applies to --to megatron_r1 only (HF directories have no layout)")
            out = megatron_to_hf(args.input, args.output, dtype=args.dtype or "bf16",
                                 max_shard_bytes=int(args.max_shard_gb * 2 ** 30), **common)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
