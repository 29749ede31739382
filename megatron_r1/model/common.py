"""Pieces every architecture shares: RMSNorm, rotary embeddings with YaRN, the SwiGLU MLP, attention glue.

Notable choices
- RMSNorm computes in float32 and casts back, like DeepSeek's and HF's reference code.
- RoPE frequencies follow YaRN (NTK-by-parts ramp between interpolated and extrapolated frequencies,
  attention-factor mscale) exactly as DeepSeek-V3's release code and transformers compute them.
  Llama 3.1's scaling (``rope_type: llama3``: wavelengths beyond the original context divided by
  ``factor``, short ones kept, a smooth blend between) is its own rule, as in Meta's and transformers' code.
- Rotary angles are computed from *global* position ids, so context-parallel chunks stay correct.
- The MLP's gate/up are column-parallel and down is row-parallel: one all-reduce per MLP under TP.
Shapes: B batch, S sequence (local to this rank), H hidden, N heads on this tp rank, D head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_r1.parallel.placement import Spec
from megatron_r1.parallel.recompute import checkpoint_region
from megatron_r1.parallel.tensor import ColumnParallelLinear, RowParallelLinear, tp_enter, tp_exit


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.specs = {"weight": Spec(init="ones")}

    def forward(self, x):
        from megatron_r1.kernels import get_kernel
        return get_kernel("rms_norm")(x, self.weight, self.eps)  # torch: float32 inside, cast back, × weight


# ------------------------------------------------------------------------------------------- rotary
def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: dict | None, max_pos: int,
                     device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin amplitude factor (YaRN's attention factor)."""
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    kind = scaling.get("type", scaling.get("rope_type")) if scaling else None
    if kind in (None, "default"):
        return 1.0 / pos_freqs, 1.0
    if kind == "llama3":
        return llama3_inv_freq(1.0 / pos_freqs, scaling), 1.0
    factor = scaling.get("factor") or max_pos / scaling["original_max_position_embeddings"]
    orig = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    attn = scaling.get("attention_factor")
    if attn is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = yarn_get_mscale(factor, m) / yarn_get_mscale(factor, m_all) if m and m_all else yarn_get_mscale(factor)
    return inv, float(attn)


def llama3_inv_freq(inv: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: low frequencies (wavelength > orig/low_freq_factor) slowed by `factor`, high ones
    (wavelength < orig/high_freq_factor) kept, and a linear blend in 1/wavelength between."""
    factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv
    smooth = ((orig / wavelen - low) / (high - low)).clamp(0, 1)  # 0: slowed, 1: kept
    return (1 - smooth) * inv / factor + smooth * inv


class Rotary(nn.Module):
    def __init__(self, dim: int, theta: float, scaling: dict | None, max_pos: int, interleaved: bool):
        super().__init__()
        self._args = (dim, theta, scaling, max_pos)
        inv, self.amplitude = rope_frequencies(*self._args)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.interleaved = interleaved

    def reset_buffers(self):
        """After materialising from `meta` (parallel/placement.py): the frequencies, on their device."""
        self.inv_freq = rope_frequencies(*self._args, device=self.inv_freq.device)[0]

    def cos_sin(self, pos: torch.Tensor):  # pos: [B, S] global positions -> [B, S, D/2] each
        ang = pos.unsqueeze(-1).float() * self.inv_freq
        return ang.cos() * self.amplitude, ang.sin() * self.amplitude

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [B, N, S, D]; cos/sin: [B, S, D/2]. Interleaved pairs (x0,x1),(x2,x3).. (DeepSeek) or halves."""
        cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------- attention
def attention(q, k, v, scale: float, q_chunks=None):
    """Causal attention. q: [B, N, Sq, Dqk], k: [B, N, Sk, Dqk], v: [B, N, Sk, Dv], keys in position order.

    q_chunks: None when q and k are the same positions; else ((offset, length), ...) of the query rows
    (context parallelism), each chunk seeing the key prefix up to its own positions."""
    from megatron_r1.kernels import get_kernel
    return get_kernel("attention")(q, k, v, scale, q_chunks)


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) · up(x)).

    `parallel=True`: a tensor-parallel region (gate/up column-parallel, down row-parallel, one reduction).
    `parallel=False`: whole weights on this rank (routed experts; shared experts on a token shard).
    `recompute_act`: the SwiGLU is recomputed in backward (Megatron's `moe_act`). `fp8`: its three GEMMs in FP8."""

    def __init__(self, hidden: int, inner: int, mesh, parallel: bool = True, out_std: float = 0.02,
                 recompute_act: bool = False, fp8: bool = False):
        super().__init__()
        self.recompute_act, self.fp8 = recompute_act, fp8  # the experts kernel reads both (kernels/__init__.py)
        from megatron_r1.parallel.mesh import ParallelMesh
        self.mesh = mesh if parallel else ParallelMesh.single()
        self.gate_proj = ColumnParallelLinear(hidden, inner, self.mesh, fp8=fp8)
        self.up_proj = ColumnParallelLinear(hidden, inner, self.mesh, fp8=fp8)
        self.down_proj = RowParallelLinear(inner, hidden, self.mesh, std=out_std, fp8=fp8)

    def forward(self, x):
        x = tp_enter(x, self.mesh)
        g, u = self.gate_proj(x), self.up_proj(x)
        h = checkpoint_region(swiglu, g, u) if self.recompute_act else swiglu(g, u)
        return tp_exit(self.down_proj(h), self.mesh)


def swiglu(g, u):
    return F.silu(g) * u
