"""Activation memory each `train.recompute` setting saves, measured on the tiny MoE model.

    python benchmarks/recompute_memory.py                    # tiny-moe, batch 4 × 256 tokens, float32
    python benchmarks/recompute_memory.py --preset tiny-qwen2 --seq 512

What is measured: the bytes the CPU allocator holds at the end of the forward (loss computed, backward
not started) minus what it held before, i.e. every tensor kept for backward plus the loss; from
torch.profiler's memory events (allocations minus frees during the forward). Also the wall time of
forward + backward (the price of recompute). One process, pp = 1, float32; the setting is applied to
the whole model exactly as the trainer applies `train.recompute*` (parallel/recompute.py).

The planner (parallel/plan.py) predicts the same drops for bf16 fused kernels; on the torch reference
the RMSNorm keeps float32 internals, so `layernorm` saves more here than the planner assumes.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_r1.config import DEFAULT_RECOMPUTE_MODULES, RECOMPUTE_MODULES, load_config
from megatron_r1.model.gpt import CausalLM, lm_loss
from megatron_r1.parallel.recompute import Recompute
from megatron_r1.engine.runtime import init_parameters


def held_after_forward(model, ids, cfg) -> tuple[float, float]:
    """(bytes held for backward, seconds of forward + backward)."""
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = lm_loss(model(ids), ids, None, cfg.model, model.mesh, float(ids.numel()))
    held = sum(e.self_cpu_memory_usage for e in prof.events())
    loss.backward()
    return held, time.perf_counter() - t0


def settings() -> list[tuple[str, Recompute]]:
    out = [("none", Recompute()),
           (f"selective (default: {', '.join(DEFAULT_RECOMPUTE_MODULES)})",
            Recompute("selective", frozenset(DEFAULT_RECOMPUTE_MODULES)))]
    out += [(f"selective ({m})", Recompute("selective", frozenset([m]))) for m in RECOMPUTE_MODULES]
    out += [("full (every block)", Recompute("full")), ("full (recompute_num_layers=1)", Recompute("full", num_layers=1))]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="only none, the default selective and full")
    a = ap.parse_args(argv)
    cfg = load_config(a.preset)
    ids = torch.randint(0, cfg.model.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    print(f"{a.preset}, batch {a.batch} × {a.seq} tokens, float32, {torch.get_num_threads()} threads")
    print(f"{'setting':<52} {'held MB':>9} {'saved MB':>9} {'saved':>6} {'fwd+bwd s':>9}")
    base = None
    for name, rc in settings():
        if a.quick and "(" in name and not name.startswith(("selective (default", "full (every")):
            continue
        model = CausalLM(cfg.model, recompute=rc)
        init_parameters([model], model.mesh, 0)
        held, sec = held_after_forward(model, ids, cfg)
        base = held if base is None else base
        print(f"{name:<52} {held / 1e6:9.2f} {(base - held) / 1e6:9.2f} {(base - held) / base:6.1%} {sec:9.2f}",
              flush=True)


if __name__ == "__main__":
    main()
