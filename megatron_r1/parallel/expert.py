"""Expert parallelism: route token copies to the ranks that own their experts and bring them back.

Notable choices
- Token copies are sorted by expert id, so the rows for each destination rank are contiguous; one
  all-to-all with variable splits sends them (the per-expert counts go first, in a tiny all-to-all).
- On arrival rows are grouped by (source rank, expert); they are regrouped by expert for the expert
  kernel (`kernels` registry: the per-expert loop, or grouped GEMMs) and ungrouped afterwards. The
  regrouping permutation is built on the device; the only host sync is the split sizes.
- Router weights are applied on the token's home rank, after the combine, so the router's gradient
  never crosses ranks. Every collective is an autograd pair (the backward all-to-all reverses splits).
- `fp8_dispatch` (moe.dispatch_dtype=fp8, DeepSeek-V3): the dispatched copies cross the all-to-all as E4M3
  codes in 1×128 tiles along H with their float32 scales (kernels/fp8.py's quantiser), and are dequantised
  on arrival; the combine and every backward all-to-all stay in the activations' dtype (the quantisation
  is straight-through for the gradient, as in the FP8 linear). With ep = 1 the rows are quantised and
  dequantised all the same, so a layout changes only who computes, not what.
Shapes: N tokens on this rank, K experts per token, H hidden, E experts in total, L = E / ep local experts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_r1.kernels import get_kernel
from megatron_r1.kernels.fp8 import BLOCK, E4M3, dequantize_blocks, dispatch_quantize


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out = g.new_empty((sum(ctx.in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(out, g.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


class _AllToAllFP8(torch.autograd.Function):
    """Forward: quantise rows per 1×128 tile, send codes (as bytes) and scales, dequantise on arrival
    (group None: no transfer, the rows only go through FP8). Backward: the gradient in its own dtype."""
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        codes, scale = dispatch_quantize(x)  # [R, H] e4m3, [R, ceil(H/128)] float32
        if group is not None:
            n = sum(out_splits)
            got = codes.new_empty((n, codes.shape[1]), dtype=torch.uint8)
            dist.all_to_all_single(got, codes.view(torch.uint8).contiguous(), out_splits, in_splits, group=group)
            got_scale = scale.new_empty((n, scale.shape[1]))
            dist.all_to_all_single(got_scale, scale.contiguous(), out_splits, in_splits, group=group)
            codes, scale = got.view(E4M3), got_scale
        return dequantize_blocks(codes, scale, (1, BLOCK), x.dtype)

    @staticmethod
    def backward(ctx, g):
        if ctx.group is None:
            return g, None, None, None
        return _AllToAll.backward(ctx, g)


def moe_dispatch_combine(x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor,
                         local_experts, num_experts: int, mesh, fp8_dispatch: bool = False) -> torch.Tensor:
    """x: [N, H]; topk_idx, topk_w: [N, K]; local_experts: this rank's L experts in global order (the
    model's stacked experts, handed to the `experts` kernel as they are).

    Returns Σ_k w[n,k] · expert_{idx[n,k]}(x[n]) as [N, H]. Host syncs: one with ep > 1 (the all-to-all
    split sizes, which also give the loop kernel its counts); with ep = 1 one only if the expert kernel
    needs host counts (the loop), none for the grouped kernel."""
    n, k = topk_idx.shape
    flat = topk_idx.reshape(-1)  # [N·K]
    order = torch.argsort(flat, stable=True)
    rows = x[order // k]  # [N·K, H], grouped by expert
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    kernel = get_kernel("experts")
    if mesh.ep == 1:
        if fp8_dispatch:
            rows = _AllToAllFP8.apply(rows, None, None, None)
        y = kernel(rows, counts, local_experts, counts.tolist() if kernel.host_counts else None)
    else:
        ep, local = mesh.ep, num_experts // mesh.ep
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=mesh.ep_group)  # [ep·L]: per source, per local expert
        # the one host sync: split sizes for both all-to-alls and the per-expert row counts
        host = torch.cat([counts, recv_counts]).tolist()
        sent, got = host[:num_experts], host[num_experts:]
        in_splits = [sum(sent[r * local:(r + 1) * local]) for r in range(ep)]
        out_splits = [sum(got[r * local:(r + 1) * local]) for r in range(ep)]
        per_expert = [sum(got[r * local + e] for r in range(ep)) for e in range(local)]
        send = _AllToAllFP8 if fp8_dispatch else _AllToAll
        recv = send.apply(rows, out_splits, in_splits, mesh.ep_group)  # grouped by (source, expert)
        # regroup by expert, on the device: each received row's block (source s, expert e), sorted by (e, s)
        blocks = torch.arange(ep * local, device=x.device)
        block_of_row = torch.repeat_interleave(blocks, recv_counts, output_size=sum(out_splits))
        perm = torch.argsort((block_of_row % local) * ep + block_of_row // local, stable=True)
        y_by_expert = kernel(recv[perm], recv_counts.view(ep, local).sum(0), local_experts, per_expert)
        y_recv = torch.empty_like(y_by_expert).index_copy(0, perm, y_by_expert)
        y = _AllToAll.apply(y_recv, in_splits, out_splits, mesh.ep_group)
    out = torch.empty_like(y).index_copy(0, order, y).view(n, k, -1)  # back to (token, slot) order
    return (out * topk_w.to(out.dtype).unsqueeze(-1)).sum(1)
