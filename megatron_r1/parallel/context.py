"""Context parallelism for causal attention: the sequence in 2·cp chunks, each rank taking a pair.

Notable choices
- Rank r holds chunks r and 2·cp−1−r, so every rank has the same causal work (the load-balanced
  split of Megatron and Llama-3).
- Attention gathers keys and values over cp (all-gather forward, reduce-scatter backward). For MLA we
  gather the *compressed* latent (kv_lora_rank + rope dims per token, shared by all heads) and
  up-project after the gather, so the exchanged bytes do not grow with the number of heads.
- Gathered keys are put back in position order (a permutation of 2·cp chunks), so each of this rank's
  two query chunks attends to a key *prefix*: causal, aligned bottom-right. The attention kernel gets the
  chunks' (offset, length), never an S² mask (kernels/: SDPA with a lower-right causal bias, flex, TE).
"""
from __future__ import annotations

import torch

from megatron_r1.parallel.tensor import all_gather_rs


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
    """Keys/values (or MLA latents) of the whole sequence, from every cp rank, in position order."""
    if mesh.cp_group is None:
        return x
    return to_position_order(all_gather_rs(x, mesh.cp_group, dim), mesh.cp, dim)


def to_position_order(x: torch.Tensor, cp: int, dim: int) -> torch.Tensor:
    """Gathered (rank-major: rank r's chunks r and 2·cp−1−r) -> chunks 0, 1, ..., 2·cp−1 along `dim`."""
    parts = x.chunk(2 * cp, dim)  # parts[2r + slot]
    return torch.cat([parts[2 * j if j < cp else 2 * (2 * cp - 1 - j) + 1] for j in range(2 * cp)], dim)


def query_chunks(seq_local: int, mesh) -> tuple[tuple[int, int], ...] | None:
    """(global offset, length) of this rank's query chunks for the attention kernel; None when queries
    and keys are the same positions (cp = 1: plain causal attention)."""
    if mesh.cp == 1:
        return None
    c = seq_local // 2
    r = mesh.cp_rank
    return ((r * c, c), ((2 * mesh.cp - 1 - r) * c, c))
