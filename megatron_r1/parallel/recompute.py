"""Activation recompute: drop a region's saved tensors in forward, recompute them in backward.

    rc = Recompute.from_train(cfg.train)        # none | selective (+ modules) | full (+ layer count)
    y = rc.run("core_attn", attention, q, k, v, ...)   # checkpointed iff the setting selects it

Notable choices
- Names are Megatron's (`--recompute-granularity`, `--recompute-modules`, `--recompute-num-layers`):
    selective  core_attn       the attention kernel (q, k, v kept; softmax internals dropped)
               mla_up_proj     MLA's q/kv up-projections and RoPE, from the normed latents to q, k, v
               layernorm       the RMSNorms of the residual stream (their float32 internals)
               moe_act         the SwiGLU of routed experts (silu(gate) kept only as gate)
               mlp             the whole dense FFN
               shared_experts  the shared expert's FFN
               moe             the whole MoE layer (router, dispatch, experts, combine)
    full       each decoder block (and MTP block) of a chunk, the first `recompute_num_layers` of it
               (Megatron's "block" method; None = every block), keeping only the block's input.
  The default module list is DeepSeek-V3's recipe (tech report §3.2.2: RMSNorm and MLA
  up-projections recomputed, plus the SwiGLU of the experts); `parallel/plan.py` drops the tensors of
  exactly the listed modules, so the plan and the runtime share one list.
- A region is `torch.utils.checkpoint` (non-reentrant, RNG state saved and restored, so stochastic
  ops recompute exactly). Unlike Megatron's output-discarding checkpoint, a region's output stays
  alive if the next op saves it; regions are chosen so what is dropped is internal to them.
- Recompute must not repeat side effects (the router's token counts, the last balance loss):
  `recomputing()` is True while a region re-runs, and such code checks it.
- Collectives inside a region (the MoE all-to-all, cp gathers, tp reductions) run again in backward;
  every rank recomputes the same regions in the same backward order, so they still pair up.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from megatron_r1.config import DEFAULT_RECOMPUTE_MODULES, RECOMPUTE_MODULES  # noqa: F401  (one list)

_state = threading.local()


def recomputing() -> bool:
    """True while a checkpointed region runs a second time (in backward)."""
    return getattr(_state, "recomputing", False)


@contextlib.contextmanager
def _recompute_ctx():
    prev = recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = prev


def _contexts():
    return contextlib.nullcontext(), _recompute_ctx()


@dataclass(frozen=True)
class Recompute:
    mode: str = "none"
    modules: frozenset = field(default_factory=frozenset)  # selective only
    num_layers: int | None = None  # full only: blocks per chunk (None: all)

    @classmethod
    def from_train(cls, train) -> "Recompute":
        """From TrainConfig's recompute, recompute_modules, recompute_num_layers (validated there)."""
        mode = train.recompute
        mods = frozenset(train.recompute_modules if train.recompute_modules is not None else DEFAULT_RECOMPUTE_MODULES)
        return cls(mode, mods if mode == "selective" else frozenset(),
                   train.recompute_num_layers if mode == "full" else None)

    def selects(self, module: str) -> bool:
        return self.mode == "selective" and module in self.modules

    def full_layer(self, index_in_chunk: int) -> bool:
        return self.mode == "full" and (self.num_layers is None or index_in_chunk < self.num_layers)

    def run(self, module: str, fn: Callable, *args):
        """fn(*args), checkpointed when the selective setting lists `module`."""
        if self.selects(module):
            return checkpoint_region(fn, *args)
        return fn(*args)


def checkpoint_region(fn: Callable, *args):
    """fn(*args) keeping only args for backward. Outside autograd (eval, forward_only) a plain call."""
    if not torch.is_grad_enabled():
        return fn(*args)
    # no early stop: a region re-runs to its end, so every collective in it runs again on every rank
    # (stopping after the last needed tensor could skip a collective on one rank and not on its peer)
    with set_checkpoint_early_stop(False):
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_contexts)


NONE = Recompute()
