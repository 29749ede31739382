"""The rollout/trainer mismatch of a bf16 vLLM engine against the float32 trainer on the tiny MoE, and what
truncated importance sampling (TIS) and rollout routing replay (R3) do about it.

    python benchmarks/rl_mismatch.py --run-dir runs/r1_zero_tiny          # a run whose stages 1-2 are done
    python benchmarks/rl_mismatch.py --run-dir DIR --steps 8 --variants none,tis,r3,r3+tis --json runs/mm.json

`--run-dir` is a tiny R1-Zero run directory after `bash examples/r1_zero_tiny.sh`'s data and pretraining
stages (data/train.jsonl, data/eval.jsonl, pretrain/hf). Each variant is a fresh process: a GRPO trainer
with the recipe's overrides (examples/r1_zero_tiny.sh: lr 1e-4 constant, router bias frozen, 4 updates per
batch), the engine in bfloat16 (`rollout.dtype=bfloat16`) and the trainer in float32, the same seeds, for
--steps steps; then held-out pass@1 (T=1, --eval-samples per problem on the first --eval-problems).

Per step it records
- routing/flip_frac: of the (token, MoE layer) pairs of prompts and responses, the share whose trainer
  top-k (in the old-logprob pass) differs from the experts the engine routed them to;
- mismatch/mean_abs_logprob, mismatch/max_abs_logprob: |log π_trainer_old − log π_engine| of sampled tokens;
- mismatch/ratio_std: the spread of the token-level IS weight π_trainer_old / π_engine (std of ratio − 1);
  with TIS also rollout_is/ratio_max, ratio_min and the truncated fraction;
- the training reward (accuracy, format) as the learning curve.
Variants: none (routes only measured), tis (token-level, C = 2), r3 (routes replayed in both passes), r3+tis.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {
    "none": ["rl.routing_replay=measure"],
    "tis": ["rl.routing_replay=measure", "rl.rollout_is=tis", "rl.rollout_is_cap=2.0"],
    "r3": ["rl.routing_replay=all"],
    "r3+tis": ["rl.routing_replay=all", "rl.rollout_is=tis", "rl.rollout_is_cap=2.0"],
}
KEYS = ("routing/flip_frac", "mismatch/mean_abs_logprob", "mismatch/max_abs_logprob", "mismatch/ratio_std",
        "rollout_is/ratio_max", "rollout_is/ratio_min", "rollout_is/clipped_frac", "reward/accuracy",
        "reward/format", "time/step")


def run_variant(run_dir: str, variant: str, steps: int, eval_problems: int, eval_samples: int, extra: list[str]):
    from megatron_r1.config import load_config
    from megatron_r1.data.prompts import load_prompts
    from megatron_r1.rl.trainer import GRPOTrainer
    cfg = load_config("examples/r1_zero_tiny.yaml", [
        f"run_dir={tempfile.mkdtemp(prefix='rl_mismatch_')}", f"data.train_path={run_dir}/data/train.jsonl",
        f"train.train_steps={steps}", "train.lr=1e-4", "train.min_lr=1e-4", "train.lr_warmup_steps=0",
        "train.lr_decay_style=constant", "train.micro_batch_size=32", "train.save_interval=0",
        "model.bias_update_speed=0", "rl.updates_per_batch=4", "rollout.dtype=bfloat16"] + VARIANTS[variant] + extra)
    t = GRPOTrainer(cfg, f"{run_dir}/pretrain/hf")
    t0 = time.time()
    hist = [{k: m[k] for k in KEYS if k in m} for m in t.fit(steps)]
    out = {"variant": variant, "steps": hist, "train_seconds": time.time() - t0}
    if eval_problems:
        ex = list(load_prompts(f"{run_dir}/data/eval.jsonl", "prompt", "answer", "skip"))[:eval_problems]
        out["eval"] = {k: v for k, v in t.evaluate(ex, samples=eval_samples).items() if isinstance(v, float)}
    t.session.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--variants", default="none,tis,r3,r3+tis")
    ap.add_argument("--eval-problems", type=int, default=100)
    ap.add_argument("--eval-samples", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every variant")
    a = ap.parse_args()
    for need in ("data/train.jsonl", "data/eval.jsonl", "pretrain/hf/config.json"):
        if not os.path.exists(os.path.join(a.run_dir, need)):
            print(f"error: {a.run_dir}/{need} missing: run examples/r1_zero_tiny.sh's stages 1-2 first",
                  file=sys.stderr)
            return 2
    from megatron_r1.parallel.spawn import run_ranks
    results = []
    for v in a.variants.split(","):
        if v not in VARIANTS:
            print(f"error: variant {v!r}: expected one of {', '.join(VARIANTS)}", file=sys.stderr)
            return 2
        (r,) = run_ranks(run_variant, 1, a.run_dir, v, a.steps, a.eval_problems, a.eval_samples, a.overrides,
                         timeout=3600, start_method="spawn")
        results.append(r)
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            json.dump(results, open(a.json, "w"), indent=1)
    print(f"{'variant':<7} {'step':>4} {'flip':>6} {'|dlp|':>7} {'max':>6} {'w std':>6} {'w max':>6} {'trunc':>6} "
          f"{'acc':>5} {'fmt':>5}")
    for r in results:
        for i, m in enumerate(r["steps"], 1):
            g = lambda k: m.get(k, float("nan"))  # noqa: E731
            print(f"{r['variant']:<7} {i:>4} {g('routing/flip_frac'):6.3f} {g('mismatch/mean_abs_logprob'):7.4f} "
                  f"{g('mismatch/max_abs_logprob'):6.2f} {g('mismatch/ratio_std'):6.3f} {g('rollout_is/ratio_max'):6.2f} "
                  f"{g('rollout_is/clipped_frac'):6.4f} {g('reward/accuracy'):5.2f} {g('reward/format'):5.2f}")
    print()
    for r in results:
        ev = r.get("eval", {})
        mean = lambda k: sum(m.get(k, 0.0) for m in r["steps"]) / len(r["steps"])  # noqa: E731
        print(f"{r['variant']:<7} mean flip {mean('routing/flip_frac'):.3f}  mean |dlp| "
              f"{mean('mismatch/mean_abs_logprob'):.4f}  train acc first/last {r['steps'][0].get('reward/accuracy', 0):.2f}"
              f"/{r['steps'][-1].get('reward/accuracy', 0):.2f}  held-out pass@1 {ev.get('pass@1', float('nan')):.3f}"
              f"  ({r['train_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
