"""RL micro-batches: right-padded to the step's longest row vs packed to a token budget (rl.pack_tokens).

    python benchmarks/rl_packing.py                   # 64 rows, responses log-normal (median 96, cap 768)
    python benchmarks/rl_packing.py --rows 128 --budget 4096 --repeats 3

One rank, float32, the tiny R1-Zero policy (examples/r1_zero_tiny.yaml) at random init. The GRPO trainer's
learning half runs on a synthetic rollout whose lengths spread like real R1-Zero samples (a few long
reasoning traces, many short answers): old logprobs (forward), then one update (forward + backward) over the
same micro-batches, timed per mode (the shortest of --repeats). tokens/s counts real tokens (prompt +
response), not padding. Padded micro-batches hold train.micro_batch_size rows at the step's longest length;
packed ones hold rows sorted by length while rows × longest <= --budget tokens.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rollout(rows: int, seed: int, median: float, cap: int):
    from megatron_r1.rl.trainer import Rollout
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(20, 60))] for _ in range(rows)]
    lens = [min(cap, max(4, int(rng.lognormvariate(0, 0.9) * median))) for _ in range(rows)]
    responses = [[rng.randrange(3, 500) for _ in range(n)] for n in lens]
    return Rollout(prompts, responses, [[-1.0] * n for n in lens], [n == cap for n in lens], [""] * rows,
                   [float(rng.random() > 0.5) for _ in range(rows)], {})


def run(a, pack: bool) -> dict:
    import types

    import torch

    from megatron_r1.config import load_config
    from megatron_r1.engine.runtime import forward_backward
    from megatron_r1.rl.trainer import GRPOTrainer
    from megatron_r1.training import TrainSession
    torch.set_num_threads(a.threads)
    cfg = load_config("examples/r1_zero_tiny.yaml", [
        f"rl.prompts_per_step={a.rows // 2}", "rl.group_size=2", "rl.beta=0", f"train.micro_batch_size={a.mbs}",
        f"run_dir={tempfile.mkdtemp()}", f"rl.pack_tokens={a.budget if pack else 0}",
        f"rl.logprob_chunk_tokens={a.chunk}"])
    t = object.__new__(GRPOTrainer)  # the learning half only (as tests/parallel/test_rl_packing.py)
    t.cfg, t.session = cfg, TrainSession(cfg, rl=True, logger=False)
    t.mesh, t.ref_chunks, t.tok = t.session.mesh, None, types.SimpleNamespace(pad_id=0)
    t._ratio_ext = torch.full((2,), -torch.inf, dtype=torch.float64, device=t.mesh.device)
    ro = rollout(a.rows, a.seed, a.median, a.cap)
    real = sum(len(p) + len(r) for p, r in zip(ro.prompt_ids, ro.response_ids))
    best = None
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        rb = t.rank_batch(t.build_batch(ro))
        t.old_logprobs(rb)
        mbs = [mb for _, mb in t.micro_batches(rb, 0)]
        forward_backward(t.session.chunks, t.session.optimizer, mbs, t.loss_fn, t.mesh)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    computed = sum(mb["input_ids"].numel() for mb in mbs)
    return {"mode": "packed" if pack else "padded", "micro_batches": len(mbs), "real_tokens": real,
            "computed_tokens": computed, "seconds": best, "tokens_per_s": real / best}


def both(a):
    return [run(a, False), run(a, True)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--median", type=float, default=96.0, help="median response length (tokens)")
    ap.add_argument("--cap", type=int, default=768, help="rl.max_response_len")
    ap.add_argument("--mbs", type=int, default=8, help="train.micro_batch_size of the padded mode")
    ap.add_argument("--budget", type=int, default=3072, help="rl.pack_tokens of the packed mode")
    ap.add_argument("--chunk", type=int, default=4096, help="rl.logprob_chunk_tokens (both modes)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from megatron_r1.parallel.spawn import run_ranks
    padded, packed = run_ranks(both, 1, a, timeout=3600)[0]
    for r in (padded, packed):
        print(f"{r['mode']:>6}: {r['micro_batches']:3d} micro-batches, {r['computed_tokens']:6d} tokens computed "
              f"for {r['real_tokens']} real, {r['seconds']:.2f} s, {r['tokens_per_s']:.0f} tokens/s")
    print(f"packed / padded: {packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x tokens/s, "
          f"{padded['computed_tokens'] / packed['computed_tokens']:.2f}x fewer tokens computed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
