"""This rank's routed experts, their weights stacked: one SwiGLU FFN per local expert.

Notable choices
- One parameter per projection holds all L local experts, each in its Hugging Face [out, in] layout:
  `gate_proj`, `up_proj`: [L, F, H], `down_proj`: [L, H, F]. Expert e is `stack[e]`, a contiguous view,
  so the loop kernel multiplies views (no copy) and the grouped kernel hands the stack itself to
  `torch._grouped_mm` as `stack.transpose(-2, -1)` (a strided view, as torchtitan's GroupedExperts does):
  no per-call stacking. Its backward produces the weight gradient directly in this layout.
- The stacks are `Spec(stacked=True)` (parallel/placement.py): dim 0 is the expert dim, sharded over ep
  (rows [ep_rank·L, (ep_rank+1)·L) of the global [E, F, H] tensor); the optimizer, gradient buckets and
  ZeRO-1 work on the stacks.
- Names stay one per expert outside: `expert_views()` gives `{global id}.{proj}.weight` -> `stack[e]`;
  the placement table has an entry for each, and `ckpt/hf.model_state` lists the views instead of the
  stacks, so HF loading and export, checkpoints, layout-independent initialisation and vLLM weight sync
  see the names and shapes they always did (`model.layers.L.mlp.experts.E.gate_proj.weight`, [F, H]).
- The computation is one kernel (`kernels` registry, "experts"): `loop` (the reference) or `grouped`.
  Experts are not split over tp (tp ranks route different token shards instead, model/deepseek_v3.py).
Shapes: T rows (token copies) grouped by local expert, H hidden, F expert FFN width, L local experts.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from megatron_r1.parallel.placement import Spec

PROJ = ("gate_proj", "up_proj", "down_proj")


class GroupedExperts(nn.Module):
    def __init__(self, hidden: int, inner: int, expert_ids: list[int], out_std: float, recompute_act: bool = False,
                 std: float = 0.02, fp8: bool = False):  # std: as model/common.py's MLP's linears' default
        super().__init__()
        n = len(expert_ids)
        self.expert_ids = list(expert_ids)
        self.recompute_act = recompute_act  # Megatron's moe_act: the SwiGLU is recomputed in backward
        self.fp8 = fp8  # train.fp8=blockwise: every expert GEMM on block-FP8 operands, per-expert 128×128 blocks
        self.gate_proj = nn.Parameter(torch.empty(n, inner, hidden))  # [L, F, H]
        self.up_proj = nn.Parameter(torch.empty(n, inner, hidden))  # [L, F, H]
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inner))  # [L, H, F]
        self.specs = {"gate_proj": Spec(init=std, stacked=True), "up_proj": Spec(init=std, stacked=True),
                      "down_proj": Spec(init=out_std, stacked=True)}
        with torch.no_grad():  # as nn.Linear would (a model built on meta skips this; init_parameters redraws)
            for k in PROJ:
                getattr(self, k).normal_(std=self.specs[k].init)

    def expert_views(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{"{global id}.{proj}.weight": stack[e]} of `tensors` (default: the parameters), by projection."""
        tensors = tensors if tensors is not None else {k: getattr(self, k) for k in PROJ}
        return {f"{gid}.{k}.weight": tensors[k][e] for e, gid in enumerate(self.expert_ids) for k in PROJ
                if tensors.get(k) is not None}
