"""FP8 as DeepSeek-V3 trains with it: fine-grained block scaling, E4M3 everywhere.

Notable choices (DeepSeek-V3 technical report §3.3)
- Scales are computed online from each block's amax: `scale_inv = amax / 448` (448 = E4M3's largest
  finite value), stored as DeepSeek's `weight_scale_inv` (the factor that dequantises: x ≈ q · scale_inv).
  An all-zero block gets scale_inv 1e-12 (its codes are 0), as the release converter writes it.
- Block shapes: activations and gradients in 1×128 tiles along the GEMM's reduction dimension, weights
  in 128×128 blocks (the same quantised weight serves Fprop and, transposed, Dgrad). For Wgrad the
  reduction runs over tokens, so both operands are re-tiled 1×128 along tokens (DeepSeek's 128×1).
  Edge blocks may be partial; they are scaled by their own amax.
- `quantize_blocks` / `dequantize_blocks` are THE quantiser: training, FP8 dispatch, checkpoint
  conversion and the rollout push use them, so every FP8 byte in the project has one format.
- `fp8_linear`: an autograd function whose three GEMMs take FP8 operands with their scales. The
  reference backend multiplies the dequantised operands in float32: what an FP32-accumulating FP8 GEMM
  computes, up to summation order. It runs everywhere (CPU `torch._scaled_mm` refuses block-wise scales).
- Error bound (tested): E4M3 keeps 3 mantissa bits, so a normal value is rounded with relative error
  ≤ 2^-4; values below the smallest normal (2^-6 in scaled units) are rounded to a spacing of 2^-9,
  absolute error ≤ 2^-10 · scale_inv. `element_error_bound` gives that bound per element; a product's
  error is bounded by Σ_k (e_a|b| + |a|e_b + e_a e_b) (see tests/unit/test_fp8.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = 1e-12  # scale_inv of an all-zero block
BLOCK = 128


def _pad_to(x: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    r, c = x.shape
    pr, pc = -r % br, -c % bc
    return torch.nn.functional.pad(x, (0, pc, 0, pr)) if pr or pc else x


def block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x [R, C] -> amax of each (br × bc) block [ceil(R/br), ceil(C/bc)], float32."""
    br, bc = block
    xp = _pad_to(x.float().abs(), br, bc)
    R, C = xp.shape
    return xp.view(R // br, br, C // bc, bc).amax(dim=(1, 3))


def _expand(s: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    br, bc = block
    return s.repeat_interleave(br, 0)[:shape[0]].repeat_interleave(bc, 1)[:, :shape[1]]


def quantize_blocks(x: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] (any float dtype) -> (codes [R, C] float8_e4m3fn, scale_inv [ceil(R/br), ceil(C/bc)] float32)
    with x ≈ codes · scale_inv per block. (1, 128): activation tiles; (128, 128): weight blocks."""
    if x.dim() != 2:
        raise ValueError(f"quantize_blocks takes a 2-D tensor, got shape {tuple(x.shape)}")
    scale_inv = (block_amax(x, block) / E4M3_MAX).clamp(min=MIN_SCALE)
    codes = (x.float() / _expand(scale_inv, block, x.shape)).to(E4M3)
    return codes, scale_inv


def dequantize_blocks(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK),
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [R, C] float8 · scale_inv per block -> [R, C] in `dtype` (the product is formed in float32)."""
    return (codes.float() * _expand(scale_inv.float(), block, codes.shape)).to(dtype)


def element_error_bound(x: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)) -> torch.Tensor:
    """Largest |dequantize(quantize(x)) - x| the format allows, per element (float32): relative 2^-4 for
    values in E4M3's normal range, absolute 2^-10 · scale_inv below it (subnormals)."""
    scale = _expand((block_amax(x, block) / E4M3_MAX).clamp(min=MIN_SCALE), block, x.shape)
    return torch.maximum(x.float().abs() * 2.0 ** -4, scale * 2.0 ** -10)


def fake_quant(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The float32 values an FP8 GEMM sees for x: quantise, then dequantise."""
    return dequantize_blocks(*quantize_blocks(x, block), block=block)


@dataclass(frozen=True)
class FP8Use:
    """What runs in FP8, from train.fp8 and moe.dispatch_dtype; handed to the model like `Recompute`."""
    linears: bool = False  # train.fp8=blockwise: MLA / GQA projections, dense MLP, shared and routed experts
    dispatch: bool = False  # moe.dispatch_dtype=fp8: tokens cross the expert-parallel all-to-all in FP8

    @classmethod
    def from_config(cls, cfg) -> "FP8Use":
        return cls(cfg.train.fp8 == "blockwise", cfg.moe.dispatch_dtype == "fp8")


NO_FP8 = FP8Use()


# ------------------------------------------------------------------------------------ the linear
class _FP8Linear(torch.autograd.Function):
    """y = x Wᵀ with Fprop, Dgrad and Wgrad on block-scaled FP8 operands (reference: float32 products of the
    dequantised codes). x [T, K], W [N, K], dy [T, N]."""

    @staticmethod
    def forward(ctx, x_TK, w_NK):
        xq_TK = fake_quant(x_TK, (1, BLOCK))  # 1×128 tiles along K
        wq_NK = fake_quant(w_NK, (BLOCK, BLOCK))  # 128×128 blocks
        ctx.save_for_backward(x_TK, wq_NK)
        ctx.out_dtype = x_TK.dtype
        return (xq_TK @ wq_NK.t()).to(x_TK.dtype)

    @staticmethod
    def backward(ctx, dy_TN):
        x_TK, wq_NK = ctx.saved_tensors
        dy_TN = dy_TN.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad: reduction over N; dy in 1×128 tiles along N, W's blocks as stored
            dx = (fake_quant(dy_TN, (1, BLOCK)) @ wq_NK).to(ctx.out_dtype)
        if ctx.needs_input_grad[1]:  # Wgrad: reduction over tokens; both operands tiled 1×128 along T
            dyq_NT = fake_quant(dy_TN.t().contiguous(), (1, BLOCK))
            xq_KT = fake_quant(x_TK.t().contiguous(), (1, BLOCK))
            dw = (dyq_NT @ xq_KT.t()).to(ctx.out_dtype)
        return dx, dw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in block-scaled FP8 (reference backend; `kernels.get_kernel("fp8_linear")` picks the backend).
    x [..., K], weight [N, K]."""
    shape = x.shape
    y = _FP8Linear.apply(x.reshape(-1, shape[-1]), weight).reshape(*shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------- grouped (experts)
def fake_quant_token_tiles(x_TK: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Wgrad operand of a grouped GEMM: x [T, K] in 1×128 tiles along T that restart at every group start
    (offs [L] int32 cumulative row counts), so no tile mixes two experts' tokens; float32 values.
    Equal, bit for bit, to fake_quant(x_g.t(), (1, 128)).t() per group g. On the device, no host sync:
    the tile count is bounded by T/128 + L. Rows past offs[-1] belong to no group (the GEMM ignores them)."""
    t, k = x_TK.shape
    dev = x_TK.device
    offs = offs.long()
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    rows = torch.arange(t, device=dev)
    grp = torch.searchsorted(offs, rows, right=True).clamp(max=offs.numel() - 1)  # [T] group of each row
    tiles = (counts + BLOCK - 1) // BLOCK
    tile_of_row = (torch.cumsum(tiles, 0) - tiles)[grp] + (rows - (offs - counts)[grp]) // BLOCK  # [T]
    n_tiles = t // BLOCK + offs.numel() + 1
    xf = x_TK.float()
    amax = torch.zeros(n_tiles, k, device=dev).scatter_reduce_(0, tile_of_row.unsqueeze(1).expand(t, k), xf.abs(),
                                                                "amax", include_self=True)
    scale = (amax / E4M3_MAX).clamp(min=MIN_SCALE)[tile_of_row]  # [T, K]
    return (xf / scale).to(E4M3).float() * scale


class _FP8GroupedMM(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e]ᵀ with FP8 operands, per-expert blocks (reference: float32 grouped
    products of the dequantised codes). x [T, K] in 1×128 tiles along K; each expert's w[e] [N, K] (the
    stack's [out, in] layout) in its own 128×128 blocks; Dgrad dy in 1×128 tiles along N; Wgrad x and dy in
    1×128 tiles along T within a group. The gradient of w comes back in the stack's layout."""

    @staticmethod
    def forward(ctx, x_TK, w_LNK, offs):
        wq_LNK = torch.stack([fake_quant(w, (BLOCK, BLOCK)) for w in w_LNK.unbind(0)])
        ctx.save_for_backward(x_TK, wq_LNK, offs)
        ctx.out_dtype = x_TK.dtype
        return torch._grouped_mm(fake_quant(x_TK, (1, BLOCK)), wq_LNK.transpose(-2, -1), offs=offs).to(x_TK.dtype)

    @staticmethod
    def backward(ctx, dy_TN):
        x_TK, wq_LNK, offs = ctx.saved_tensors
        dy_TN = dy_TN.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch._grouped_mm(fake_quant(dy_TN, (1, BLOCK)), wq_LNK, offs=offs).to(ctx.out_dtype)
        if ctx.needs_input_grad[1]:
            dyq_NT = fake_quant_token_tiles(dy_TN, offs).t()
            dw = torch._grouped_mm(dyq_NT, fake_quant_token_tiles(x_TK, offs), offs=offs).to(ctx.out_dtype)
        return dx, dw, None


def fp8_grouped_mm(x_TK: torch.Tensor, w_LNK: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The experts' GEMM in block-scaled FP8: what torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    computes, per expert; w is the [L, out, in] stack (model/experts.py)."""
    return _FP8GroupedMM.apply(x_TK.contiguous(), w_LNK, offs)


def dispatch_quantize(x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens before the expert-parallel all-to-all: 1×128 tiles along hidden (scales travel with them)."""
    return quantize_blocks(x_TH, (1, BLOCK))


def dispatch_bytes_per_token(hidden: int, dtype: str) -> float:
    """Bytes one token's activations occupy in the dispatch all-to-all (fp8: codes + one fp32 scale per tile)."""
    if dtype == "bf16":
        return 2.0 * hidden
    if dtype == "fp8":
        return hidden + 4.0 * math.ceil(hidden / BLOCK)
    raise ValueError(f"dispatch dtype {dtype!r}: expected bf16 or fp8")
