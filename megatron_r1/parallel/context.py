"""Context parallelism for causal attention: the sequence in 2·cp chunks, each rank taking a pair.

Notable choices
- Rank r holds chunks r and 2·cp−1−r, so every rank has the same causal work (the load-balanced
  split of Megatron and Llama-3).
- Attention gathers keys and values over cp (all-gather forward, reduce-scatter backward). For MLA we
  gather the *compressed* latent (kv_lora_rank + rope dims per token, shared by all heads) and
  up-project after the gather, so the exchanged bytes do not grow with the number of heads.
- Masks are built from global position ids, so the gathered order of keys does not matter.
"""
from __future__ import annotations

import torch

from megatron_r1.parallel.tensor import _all_gather, all_gather_rs


def cp_positions(seq_len: int, mesh, device=None) -> torch.Tensor:
    """Global positions [S/cp] of this rank's two chunks, on `device` (default: the mesh's)."""
    device = mesh.device if device is None else device
    if mesh.cp == 1:
        return torch.arange(seq_len, device=device)
    n = 2 * mesh.cp
    if seq_len % n:
        raise ValueError(f"sequence length {seq_len} is not divisible by 2·cp = {n}")
    c = seq_len // n
    r = mesh.cp_rank
    return torch.cat([torch.arange(r * c, (r + 1) * c, device=device),
                      torch.arange((n - 1 - r) * c, (n - r) * c, device=device)])


def gather_kv(x: torch.Tensor, mesh, dim: int) -> torch.Tensor:
    """Keys/values (or MLA latents) of the whole sequence, from every cp rank."""
    return all_gather_rs(x, mesh.cp_group, dim)


def gather_positions(pos: torch.Tensor, mesh) -> torch.Tensor:
    """pos: [B, S/cp] -> [B, S] in the same (rank-major) order as `gather_kv`."""
    return pos if mesh.cp_group is None else _all_gather(pos, mesh.cp_group, dim=1)
