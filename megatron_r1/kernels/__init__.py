"""Kernel registry: one name, several backends; the best available one is picked at first use.

Notable choices
- The torch reference backends run everywhere (CPU, tests); faster backends (Transformer Engine,
  Triton, flash attention) register themselves when importable and are preferred on CUDA.
- Numerics of every backend are checked against the torch reference in float32 (tests/unit/test_kernels.py).
- `MEGATRON_R1_KERNELS=attention:torch,...` forces a backend, e.g. to compare two of them.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

_REGISTRY: dict[str, dict[str, tuple[int, Callable[[], bool], Callable]]] = {}
_CHOSEN: dict[str, Callable] = {}


def register(name: str, backend: str, priority: int = 0, available: Callable[[], bool] = lambda: True):
    def deco(fn):
        _REGISTRY.setdefault(name, {})[backend] = (priority, available, fn)
        _CHOSEN.pop(name, None)
        return fn
    return deco


def backends(name: str) -> list[str]:
    return [b for b, (_, ok, _) in sorted(_REGISTRY[name].items(), key=lambda kv: -kv[1][0]) if ok()]


def get_kernel(name: str, backend: str | None = None) -> Callable:
    if backend is not None:
        return _REGISTRY[name][backend][2]
    if name not in _CHOSEN:
        forced = dict(kv.split(":") for kv in os.environ.get("MEGATRON_R1_KERNELS", "").split(",") if ":" in kv)
        choice = forced.get(name) or backends(name)[0]
        _CHOSEN[name] = _REGISTRY[name][choice][2]
    return _CHOSEN[name]


@register("attention", "torch", priority=0)
def attention_torch(q, k, v, q_pos, k_pos, scale):
    """q: [B, N, Sq, Dq], k: [B, N, Sk, Dq], v: [B, N, Sk, Dv]; causal by global positions."""
    mask = q_pos.unsqueeze(-1) >= k_pos.unsqueeze(-2)  # [B, Sq, Sk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), scale=scale)


@register("experts", "loop", priority=0)
def experts_loop(x, counts, experts):
    """x: [T, H] rows grouped by local expert (counts[e] rows each); experts: list of MLP modules."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        n = int(n)
        if n:
            outs.append(experts[e](x[start:start + n]))
        start += n
    if outs:
        return torch.cat(outs, 0)
    # no rows at all: the empty result must still depend on x, or autograd would skip the backward of
    # the all-to-all that produced x on this rank while its expert-parallel peers wait in it
    return x[:0] * 0 + 0 * sum(p.sum() for m in experts for p in m.parameters())
