"""Tensor and sequence parallelism: collectives as forward/backward pairs, and the layers built on them.

Notable choices
- Collectives are tiny `autograd.Function`s, as in Megatron's mappings.py; each is the identity when its
  group is None (one rank), so the same model code runs on one rank and on many.
- "Entering" a tensor-parallel region: without SP the input is replicated (identity forward, all-reduce
  backward); with SP it is sequence-sharded (all-gather forward, reduce-scatter backward). Leaving it:
  all-reduce, or reduce-scatter with SP. `tp_enter`/`tp_exit` pick the right pair.
- Parameters that are replicated over tp but only see part of the work (norms under SP, MLA's low-rank
  projections, the router and shared experts that run on a token shard) get *partial* gradients: their
  modules list them (`TP_PARTIAL` / `SP_PARTIAL`, parallel/placement.py) and the gradient sync sums them
  over tp. Each layer here declares its parameters' shard dim and init in `specs`.
- The sequence dimension is dim 1 everywhere: activations are [B, S, H] (B batch, S sequence, H hidden).
- Vocab-parallel cross-entropy never gathers full logits.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_r1.parallel.placement import Spec

SEQ_DIM = 1


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    if group is None:
        return x
    n = _size(group)
    chunks = [c.contiguous() for c in x.chunk(n, dim=dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    if group is None:
        return x
    return x.chunk(_size(group), dim=dim)[_rank(group)].contiguous()


class _CopyToRegion(torch.autograd.Function):
    """Identity forward, all-reduce backward."""
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward, identity backward."""
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather forward along `dim`, split (keep own part) backward."""
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.group, ctx.dim), None, None


class _ScatterToRegion(torch.autograd.Function):
    """Split forward (keep own part), all-gather backward."""
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group, ctx.dim), None, None


class _GatherReduceScatter(torch.autograd.Function):
    """All-gather forward, reduce-scatter backward (SP's entry, CP's key/value gather)."""
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.group, ctx.dim), None, None


class _ReduceScatterGather(torch.autograd.Function):
    """Reduce-scatter forward, all-gather backward (SP's exit)."""
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group, ctx.dim), None, None


def copy_to_region(x, group):
    return x if group is None else _CopyToRegion.apply(x, group)


def reduce_from_region(x, group):
    return x if group is None else _ReduceFromRegion.apply(x, group)


def gather_from_region(x, group, dim=-1):
    return x if group is None else _GatherFromRegion.apply(x, group, dim)


def scatter_to_region(x, group, dim=-1):
    return x if group is None else _ScatterToRegion.apply(x, group, dim)


def all_gather_rs(x, group, dim):
    return x if group is None else _GatherReduceScatter.apply(x, group, dim)


def reduce_scatter_ag(x, group, dim):
    return x if group is None else _ReduceScatterGather.apply(x, group, dim)


def tp_enter(x: torch.Tensor, mesh) -> torch.Tensor:
    """Into a tensor-parallel region: the full sequence, replicated over tp."""
    if mesh.sp:
        return all_gather_rs(x, mesh.tp_group, SEQ_DIM)
    return copy_to_region(x, mesh.tp_group)


def tp_exit(x: torch.Tensor, mesh) -> torch.Tensor:
    """Out of a tensor-parallel region: sum the partial outputs (sequence-sharded under SP)."""
    if mesh.sp:
        return reduce_scatter_ag(x, mesh.tp_group, SEQ_DIM)
    return reduce_from_region(x, mesh.tp_group)


# ------------------------------------------------------------------------------------------- layers
def _init_(w: torch.Tensor, std: float) -> torch.Tensor:
    return nn.init.normal_(w, mean=0.0, std=std)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp8: bool) -> torch.Tensor:
    """F.linear, or its block-scaled FP8 form (train.fp8=blockwise; the kernel registry picks the backend).
    A tp shard is quantised on its own: config.validate_fp8_shards keeps shard edges on 128-block edges."""
    if not fp8:
        return F.linear(x, weight, bias)
    from megatron_r1.kernels import get_kernel
    return get_kernel("fp8_linear")(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (whole on every rank: MLA's low-rank projections) with the FP8 switch of the parallel ones."""
    def __init__(self, in_features: int, out_features: int, bias: bool = False, fp8: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.fp8 = fp8

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.fp8)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ with W's output rows split over tp; input already inside the tp region.

    `weight` is [out/tp, in]; its shard is a contiguous block of rows (heads, FFN columns)."""
    def __init__(self, in_features: int, out_features: int, mesh, bias: bool = False, std: float = 0.02,
                 fp8: bool = False):
        super().__init__()
        assert out_features % mesh.tp == 0, f"{out_features} not divisible by tp={mesh.tp}"
        self.in_features, self.out_features, self.fp8 = in_features, out_features, fp8
        self.weight = nn.Parameter(_init_(torch.empty(out_features // mesh.tp, in_features), std))
        self.bias = nn.Parameter(torch.zeros(out_features // mesh.tp)) if bias else None
        # the shard dim is part of the layer's definition, stated at tp = 1 too: ZeRO orders a
        # parameter's elements by it, so optimizer state does not depend on the layout
        self.specs = {"weight": Spec(0, std), "bias": Spec(0, "zeros")}

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.fp8)


class RowParallelLinear(nn.Module):
    """y = x Wᵀ with W's input columns split over tp; returns partial sums (caller calls `tp_exit`).

    Leaving the sum to the caller lets a block add its residual after one reduction."""
    def __init__(self, in_features: int, out_features: int, mesh, bias: bool = False, std: float = 0.02,
                 fp8: bool = False):
        super().__init__()
        assert in_features % mesh.tp == 0, f"{in_features} not divisible by tp={mesh.tp}"
        self.in_features, self.out_features, self.fp8 = in_features, out_features, fp8
        self.weight = nn.Parameter(_init_(torch.empty(out_features, in_features // mesh.tp), std))
        # a bias would be added tp times by the reduction: none of our models has one here
        assert not bias
        self.specs = {"weight": Spec(1, std)}

    def forward(self, x):
        return linear(x, self.weight, None, self.fp8)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows over tp; output summed over tp (reduce-scattered with SP)."""
    def __init__(self, vocab: int, hidden: int, mesh, std: float = 0.02):
        super().__init__()
        self.mesh = mesh
        per = vocab // mesh.tp
        self.start = mesh.tp_rank * per
        self.weight = nn.Parameter(_init_(torch.empty(per, hidden), std))
        self.specs = {"weight": Spec(0, std)}

    def forward(self, ids):  # ids: [B, S] (full sequence of this cp rank)
        if self.mesh.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return tp_exit(out, self.mesh)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over vocab-sharded logits [N, V/tp]; returns per-token loss [N]."""
    @staticmethod
    def forward(ctx, logits, target, start, group):
        logits = logits.float()
        lmax = logits.max(dim=-1).values
        lmax = _all_reduce_max(lmax, group)
        shifted = logits - lmax.unsqueeze(-1)
        local = target - start
        inside = (local >= 0) & (local < logits.shape[-1])
        idx = local.clamp(0, logits.shape[-1] - 1)
        tgt = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * inside
        tgt = _all_reduce(tgt, group)
        exp = shifted.exp()
        denom = _all_reduce(exp.sum(-1), group)
        loss = denom.log() - tgt
        ctx.save_for_backward(exp, denom, idx, inside)
        return loss

    @staticmethod
    def backward(ctx, g):
        exp, denom, idx, inside = ctx.saved_tensors
        grad = exp / denom.unsqueeze(-1)
        grad.scatter_add_(-1, idx.unsqueeze(-1), -inside.to(grad.dtype).unsqueeze(-1))
        return grad * g.unsqueeze(-1), None, None, None


def _all_reduce_max(x, group):
    if group is None:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mesh) -> torch.Tensor:
    """Per-token CE. logits: [..., V/tp] (this rank's vocab slice), target: [...] global ids."""
    shape = target.shape
    lg = logits.reshape(-1, logits.shape[-1])
    tg = target.reshape(-1)
    if mesh.tp == 1:
        return F.cross_entropy(lg.float(), tg, reduction="none").reshape(shape)
    start = mesh.tp_rank * lg.shape[-1]
    return _VocabParallelCE.apply(lg, tg, start, mesh.tp_group).reshape(shape)


def vocab_parallel_logprobs(logits: torch.Tensor, target: torch.Tensor, mesh) -> torch.Tensor:
    """log π(target) from vocab-sharded logits (the negative of the cross-entropy)."""
    return -vocab_parallel_cross_entropy(logits, target, mesh)


def chunked_logprobs(logits: torch.Tensor, target: torch.Tensor, mesh, temperature: float = 1.0,
                     chunk_tokens: int = 0) -> torch.Tensor:
    """log π(target) at `temperature`, float32 [B, S], from logits [B, S, V/tp] of any dtype, `chunk_tokens`
    tokens (whole positions of all B rows) at a time: each chunk's float32 logits and softmax are made,
    used and dropped, and rebuilt from the chunk's slice of `logits` in backward (a checkpointed region),
    so no [B·S, V/tp] float32 copy is ever alive. 0: one chunk (no checkpoint)."""
    b, s = target.shape
    per = s if chunk_tokens <= 0 else max(1, chunk_tokens // max(b, 1))
    if per >= s:
        return vocab_parallel_logprobs(logits.float() / temperature, target, mesh)
    from megatron_r1.parallel.recompute import checkpoint_region

    def piece(lg, tg):
        return vocab_parallel_logprobs(lg.float() / temperature, tg, mesh)

    return torch.cat([checkpoint_region(piece, logits[:, a:a + per], target[:, a:a + per])
                      for a in range(0, s, per)], dim=1)


def chunked_entropy(logits: torch.Tensor, mesh, temperature: float = 1.0, chunk_tokens: int = 0) -> torch.Tensor:
    """`vocab_parallel_entropy` of logits / temperature, [B, S], `chunk_tokens` tokens at a time (no grad)."""
    b, s = logits.shape[:2]
    per = s if chunk_tokens <= 0 else max(1, chunk_tokens // max(b, 1))
    return torch.cat([vocab_parallel_entropy(logits[:, a:a + per].float() / temperature, mesh)
                      for a in range(0, s, per)], dim=1)


def vocab_parallel_entropy(logits: torch.Tensor, mesh) -> torch.Tensor:
    """Entropy of the softmax over the full vocabulary, from vocab-sharded logits (no grad)."""
    with torch.no_grad():
        lg = logits.float()
        lmax = _all_reduce_max(lg.max(-1).values, mesh.tp_group)
        e = (lg - lmax.unsqueeze(-1)).exp()
        z = _all_reduce(e.sum(-1), mesh.tp_group)
        ez = _all_reduce((e * (lg - lmax.unsqueeze(-1))).sum(-1), mesh.tp_group)
        return z.log() - ez / z


def gather_vocab(logits: torch.Tensor, mesh) -> torch.Tensor:
    """Full logits from vocab shards (inference and tests only: [.., V] is large)."""
    return gather_from_region(logits, mesh.tp_group, dim=-1)


def init_std_scaled(std: float, num_layers: int) -> float:
    """Output projections get std / sqrt(2·layers) (GPT-2 / Megatron)."""
    return std / math.sqrt(2.0 * max(1, num_layers))
