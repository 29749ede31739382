"""Kernel registry: one name, several backends; the best available one is picked at first use.

Notable choices
- The torch reference backends run everywhere (CPU, tests); faster backends (Transformer Engine,
  flex attention) register themselves when importable and are preferred on CUDA.
- Numerics of every backend that runs here are checked against a reference in float32
  (tests/unit/test_kernels.py); `report()` says which backend ran (check-parallel prints it).
- `MEGATRON_R1_KERNELS=attention:torch,experts:grouped` forces a backend, e.g. to compare two of them.
- FP8 (train.fp8=blockwise): `fp8_linear` and `fp8_grouped_mm` have a reference backend (float32 products of
  dequantised block-FP8 operands: FP8 numerics everywhere, no FP8 speed) and Transformer Engine's
  `Linear` / `GroupedLinear` under `fp8_autocast(Float8BlockScaling())` when TE imports on a Hopper GPU;
  `fp8_path(cfg)` says which a launch would use (the dry run prints it). TE and apex also serve
  `rms_norm` and `adamw`. Every TE/apex backend computes with OUR parameters (a TE module's own weights are
  dropped and the model's Parameter is handed to it per call), so names, placement, checkpoints and weight
  sync do not depend on the backend.
- Attention never builds an S² mask: causal SDPA when queries and keys are the same positions, and
  for context parallelism the query chunks' offsets (each chunk sees a key prefix).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
import torch.nn.functional as F

_REGISTRY: dict[str, dict[str, tuple[int, Callable[[], bool], Callable]]] = {}
_CHOSEN: dict[str, tuple[str, Callable]] = {}
_RAN: dict[str, set] = {}  # kernel -> backends handed out by get_kernel since the last reset


def register(name: str, backend: str, priority: int = 0, available: Callable[[], bool] = lambda: True):
    def deco(fn):
        _REGISTRY.setdefault(name, {})[backend] = (priority, available, fn)
        _CHOSEN.pop(name, None)
        return fn
    return deco


def backends(name: str) -> list[str]:
    return [b for b, (_, ok, _) in sorted(_REGISTRY[name].items(), key=lambda kv: -kv[1][0]) if ok()]


def get_kernel(name: str, backend: str | None = None) -> Callable:
    if backend is None:
        if name not in _CHOSEN:
            forced = dict(kv.split(":") for kv in os.environ.get("MEGATRON_R1_KERNELS", "").split(",") if ":" in kv)
            choice = forced.get(name) or backends(name)[0]
            if choice not in _REGISTRY[name]:
                from megatron_r1.config import ConfigError
                raise ConfigError(f"MEGATRON_R1_KERNELS={name}:{choice}: no such backend; registered: "
                                  f"{', '.join(_REGISTRY[name])} (available here: {', '.join(backends(name))})")
            _CHOSEN[name] = (choice, _REGISTRY[name][choice][2])
        backend, fn = _CHOSEN[name]
    else:
        fn = _REGISTRY[name][backend][2]
    _RAN.setdefault(name, set()).add(backend)
    return fn


def report(reset: bool = False) -> dict[str, str]:
    """Which backend ran for each kernel used since the last reset, e.g. {"attention": "torch"}."""
    out = {k: ",".join(sorted(v)) for k, v in sorted(_RAN.items())}
    if reset:
        _RAN.clear()
    return out


@contextlib.contextmanager
def using(**choice: str):
    """Within the block, get_kernel(name) gives the named backend, e.g. using(experts="loop")."""
    saved = dict(_CHOSEN)
    _CHOSEN.update({k: (b, _REGISTRY[k][b][2]) for k, b in choice.items()})
    try:
        yield
    finally:
        _CHOSEN.clear()
        _CHOSEN.update(saved)


def reset_choices() -> None:
    """Forget the chosen backends (after changing MEGATRON_R1_KERNELS in-process, e.g. in tests)."""
    _CHOSEN.clear()
    _RAN.clear()


# ---------------------------------------------------------------------------------------- attention
# attention(q, k, v, scale, q_chunks) -> [B, N, Sq, Dv]. q: [B, N, Sq, Dqk], k: [B, N, Sk, Dqk],
# v: [B, N, Sk, Dv], keys in position order. q_chunks None: q and k are the same positions (causal);
# else ((offset, length), ...) of consecutive query rows, each row at global position offset + i and
# seeing keys [0, offset + i] (context parallelism: a key prefix, causal aligned bottom-right).

def _chunks(q, q_chunks):
    """(query rows, number of visible keys) per chunk."""
    start = 0
    for off, n in q_chunks:
        yield q[:, :, start:start + n], off + n
        start += n


@register("attention", "torch", priority=0)
def attention_torch(q, k, v, scale, q_chunks=None):
    """SDPA with is_causal, or per query chunk with a lower-right causal bias over its key prefix: no mask
    tensor on CUDA (torch passes the alignment to flash / memory-efficient attention); on CPU torch
    materialises the chunk's [rows, prefix] bias (torch/nn/attention/bias.py), still not S²."""
    if q_chunks is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    from torch.nn.attention.bias import causal_lower_right
    return torch.cat([F.scaled_dot_product_attention(qc, k[:, :, :kv], v[:, :, :kv], scale=scale,
                                                     attn_mask=causal_lower_right(qc.shape[2], kv))
                      for qc, kv in _chunks(q, q_chunks)], dim=2)


@register("attention", "dense_mask", priority=-1)
def attention_dense_mask(q, k, v, scale, q_chunks=None):
    """The reference: an explicit [Sq, Sk] boolean mask from global positions (what we had before)."""
    sk = k.shape[2]
    if q_chunks is None:
        q_pos = torch.arange(q.shape[2], device=q.device) + (sk - q.shape[2])
    else:
        q_pos = torch.cat([torch.arange(off, off + n, device=q.device) for off, n in q_chunks])
    mask = q_pos.unsqueeze(-1) >= torch.arange(sk, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


_FLEX: dict = {}


def _flex_ok() -> bool:
    # flex_attention refuses backward on CPU (torch 2.13: "FlexAttention does not support backward on
    # CPU"), so it is a CUDA backend only
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@register("attention", "flex", priority=-1, available=_flex_ok)
def attention_flex(q, k, v, scale, q_chunks=None):
    """flex_attention with a block mask built from the chunk offsets (fully masked blocks skipped);
    compiled once per process. Select with MEGATRON_R1_KERNELS=attention:flex."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    sq, sk = q.shape[2], k.shape[2]
    key = (q_chunks or ((sk - sq, sq),), sq, sk, q.device)
    if key not in _FLEX:
        q_pos = torch.cat([torch.arange(off, off + n, device=q.device) for off, n in key[0]])

        def causal(b, h, qi, ki):
            return q_pos[qi] >= ki
        _FLEX[key] = create_block_mask(causal, None, None, sq, sk, device=q.device)
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"](q, k, v, block_mask=_FLEX[key], scale=scale)


def _te_ok() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match this torch/CUDA
        return False
    return torch.cuda.is_available()


_TE: dict = {}


@register("attention", "te", priority=2, available=_te_ok)
def attention_te(q, k, v, scale, q_chunks=None):
    """Transformer Engine's DotProductAttention (cuDNN / flash), "causal" or "causal_bottom_right" per
    query chunk; kv_channels (Dqk, Dv) for MLA's 192/128. Registered when TE imports on a CUDA machine;
    not run on the CPU of the tests."""
    import transformer_engine.pytorch as te
    b, n, _, dqk = q.shape
    dv = v.shape[-1]
    key = (n, dqk, dv, scale)
    if key not in _TE:
        _TE[key] = te.DotProductAttention(n, (dqk, dv), qkv_format="bshd", softmax_scale=scale,
                                          attn_mask_type="causal")
    mod = _TE[key]

    def run(qc, kc, vc, mask_type):
        out = mod(qc.transpose(1, 2).contiguous(), kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous(),
                  attn_mask_type=mask_type)  # [B, S, N·Dv]
        return out.view(b, qc.shape[2], n, dv).transpose(1, 2)

    if q_chunks is None:
        return run(q, k, v, "causal")
    return torch.cat([run(qc, k[:, :, :kv], v[:, :, :kv], "causal_bottom_right") for qc, kv in _chunks(q, q_chunks)],
                     dim=2)


# ------------------------------------------------------------------------------------------ experts
# experts(x, counts, experts, counts_host) -> [T, H]: x [T, H] rows grouped by local expert, counts [L]
# rows per expert (x's device), `experts` this rank's model.experts.GroupedExperts (stacks gate_proj,
# up_proj [L, F, H], down_proj [L, H, F], each expert in its [out, in] layout; recompute_act, fp8), counts_host
# the counts as a list (given when `fn.host_counts`). Both backends read the stacks in place, no copy.

def _swiglu(g, u):
    return F.silu(g) * u


def _act(g, u, recompute: bool):
    if recompute:
        from megatron_r1.parallel.recompute import checkpoint_region
        return checkpoint_region(_swiglu, g, u)
    return _swiglu(g, u)


@register("experts", "loop", priority=0)
def experts_loop(x, counts, experts, counts_host):
    """The reference: one expert at a time, on views of the stacks (needs the counts on the host)."""
    from megatron_r1.parallel.tensor import linear  # F.linear, or block-FP8 per expert (train.fp8=blockwise)
    wg, wu, wd = experts.gate_proj, experts.up_proj, experts.down_proj
    outs, start = [], 0
    for e, n in enumerate(counts_host):
        if n:
            xe = x[start:start + n]
            g, u = linear(xe, wg[e], None, experts.fp8), linear(xe, wu[e], None, experts.fp8)
            outs.append(linear(_act(g, u, experts.recompute_act), wd[e], None, experts.fp8))
        start += n
    if outs:
        return torch.cat(outs, 0)
    # no rows at all: the empty result must still depend on x, or autograd would skip the backward of
    # the all-to-all that produced x on this rank while its expert-parallel peers wait in it
    return x[:0] * 0 + 0 * sum(p.sum() for p in experts.parameters())


experts_loop.host_counts = True


class _GroupedMM(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e]ᵀ with torch._grouped_mm, w the [L, N, K] stack itself (handed to
    the kernel as the strided view w.transpose(-2, -1): no copy), and its backward as two grouped GEMMs:
    dx = dy @ w[e] per group, dw[e] = dy[rows of e]ᵀ @ x[rows of e] (the K-grouped form, directly in the
    stack's layout; an expert with no rows gets a zero gradient). torch's own autograd formula fails on
    CPU (strides of the incoming gradient), and the explicit form keeps both GEMMs grouped on GPU too."""

    @staticmethod
    def forward(ctx, x, w, offs):  # x: [T, K], w: [L, N, K], offs: [L] int32 cumulative row counts
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, w, offs=offs) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(dy.t(), x, offs=offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def _grouped_ok() -> bool:
    # preferred on CUDA; on CPU it runs (tested against the loop) but only when asked for
    return hasattr(torch, "_grouped_mm") and torch.cuda.is_available()


@register("experts", "grouped", priority=1, available=_grouped_ok)
def experts_grouped(x, counts, experts, counts_host=None):
    """Grouped GEMMs (torch._grouped_mm) on the parameter stacks themselves, forward and backward; no host
    sync, no copy of the weights. bf16 needs H and F multiples of 8 (16-byte strides). Select with
    MEGATRON_R1_KERNELS=experts:grouped."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = x.contiguous()
    mm = _expert_gemm(experts.fp8)
    g = mm(x, experts.gate_proj, offs)
    u = mm(x, experts.up_proj, offs)
    return mm(_act(g, u, experts.recompute_act).contiguous(), experts.down_proj, offs)


def _expert_gemm(fp8: bool) -> Callable:
    """The experts' grouped GEMM (x [T, K], w [L, N, K] stack, offs) -> [T, N]: bf16, or FP8 with per-expert
    blocks (train.fp8=blockwise; the one hook the FP8 experts need)."""
    if fp8:
        return get_kernel("fp8_grouped_mm")
    return _GroupedMM.apply


experts_grouped.host_counts = False


# --------------------------------------------------------------------------------------------- FP8
# fp8_linear(x [..., K], weight [N, K], bias) -> [..., N]; fp8_grouped_mm(x [T, K], w [L, N, K], offs) -> [T, N].
# Block scaling as DeepSeek-V3 (kernels/fp8.py): 1×128 activation tiles, 128×128 weight blocks, E4M3.

@register("fp8_linear", "reference", priority=0)
def fp8_linear_reference(x, weight, bias=None):
    """Float32 products of the dequantised block-FP8 operands (Fprop, Dgrad, Wgrad): what an FP8 GEMM with
    FP32 accumulation computes, up to summation order; runs everywhere (CPU `_scaled_mm` refuses blocks)."""
    from megatron_r1.kernels.fp8 import fp8_linear
    return fp8_linear(x, weight, bias)


@register("fp8_grouped_mm", "reference", priority=0)
def fp8_grouped_mm_reference(x, w, offs):
    """torch._grouped_mm on the dequantised operands, per-expert weight blocks, Wgrad tiles within an expert."""
    from megatron_r1.kernels.fp8 import fp8_grouped_mm
    return fp8_grouped_mm(x, w, offs)


# ---------------------------------------------------------------------- Transformer Engine and apex
# Present in the NGC image, absent on the CPU machines of the tests: these backends are written against
# TE >= 2.3 (Float8BlockScaling) and apex's amp_C / fused_rms_norm_affine, and their numerics tests
# (tests/unit/test_kernel_backends.py) run wherever they import and skip with the reason elsewhere.

def _te_fp8_ok() -> bool:
    """TE with the block-scaling recipe, on a GPU that runs it (Hopper, sm_90+)."""
    if not _te_ok():
        return False
    try:
        from transformer_engine.common.recipe import Float8BlockScaling  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability() >= (9, 0)


def _apex_ok() -> bool:
    try:
        import amp_C  # noqa: F401
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine  # noqa: F401
    except Exception:  # ImportError, or an apex built for another torch / CUDA
        return False
    return torch.cuda.is_available()


_TE_MODULES: dict = {}  # (kind, shape, dtype, device) -> a TE module without weights of its own


def _te_module(key: tuple, make: Callable, weights: dict):
    """A TE module per shape (built once, on `meta`), computing with the tensors given for this call: its
    own parameters are dropped, ours are set before each call (only the last call's stay referenced).
    Float8BlockScaling computes every scale from the current block (no amax history), so modules of one
    shape can be shared by every weight of that shape."""
    mod = _TE_MODULES.get(key)
    if mod is None:
        mod = make()
        for name in weights:
            delattr(mod, name)
        _TE_MODULES[key] = mod
    for name, w in weights.items():
        object.__setattr__(mod, name, w)  # a plain attribute: the Parameter stays registered in OUR model only
    return mod


def _block_recipe():
    from transformer_engine.common.recipe import Float8BlockScaling
    if "recipe" not in _TE:
        _TE["recipe"] = Float8BlockScaling()  # E4M3, 1×128 activation tiles, 128×128 weight blocks
    return _TE["recipe"]


@register("fp8_linear", "te", priority=2, available=_te_fp8_ok)
def fp8_linear_te(x, weight, bias=None):
    """transformer_engine.pytorch.Linear on our weight under fp8_autocast(Float8BlockScaling): DeepSeek-V3's
    recipe with real FP8 tensor-core GEMMs (Fprop, Dgrad, Wgrad)."""
    import transformer_engine.pytorch as te
    key = ("linear", tuple(weight.shape), weight.dtype, weight.device)
    mod = _te_module(key, lambda: te.Linear(weight.shape[1], weight.shape[0], bias=False, params_dtype=weight.dtype,
                                            device="meta"), {"weight": weight})
    with te.fp8_autocast(enabled=True, fp8_recipe=_block_recipe()):
        y = mod(x)
    return y if bias is None else y + bias


@register("fp8_grouped_mm", "te", priority=2, available=_te_fp8_ok)
def fp8_grouped_mm_te(x, w, offs):
    """transformer_engine.pytorch.GroupedLinear (one GEMM per expert, block-FP8) on the experts' [L, N, K]
    stack (model/experts.py). TE wants the per-expert row counts on the host: one sync per call."""
    import transformer_engine.pytorch as te
    n_exp, n, k = w.shape
    mod = _te_module(("grouped", tuple(w.shape), w.dtype, w.device),
                     lambda: te.GroupedLinear(n_exp, k, n, bias=False, params_dtype=w.dtype, device="meta"),
                     {f"weight{e}": w[e] for e in range(n_exp)})  # [N, K] views of the stack
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1, dtype=torch.long)).tolist()
    counts[-1] += x.shape[0] - sum(counts)  # rows past the last offset: none in practice
    with te.fp8_autocast(enabled=True, fp8_recipe=_block_recipe()):
        return mod(x, counts)


# rms_norm(x [..., D], weight [D], eps) -> [..., D] in x's dtype
@register("rms_norm", "torch", priority=0)
def rms_norm_torch(x, weight, eps):
    """In float32, cast back, times the weight (DeepSeek's and HF's reference code)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


@register("rms_norm", "apex", priority=1, available=_apex_ok)
def rms_norm_apex(x, weight, eps):
    """apex's fused RMSNorm (one kernel forward and backward, float32 inside)."""
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    return fused_rms_norm_affine(x, weight, weight.shape, eps)


@register("rms_norm", "te", priority=2, available=_te_ok)
def rms_norm_te(x, weight, eps):
    """transformer_engine.pytorch.RMSNorm on our weight (zero_centered_gamma off: y = x / rms · weight)."""
    import transformer_engine.pytorch as te
    mod = _te_module(("rmsnorm", tuple(weight.shape), eps, weight.dtype, weight.device),
                     lambda: te.RMSNorm(weight.shape[0], eps=eps, params_dtype=weight.dtype, device="meta"),
                     {"weight": weight})
    return mod(x)


# adamw(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay): one step, in place,
# on a flat owned shard (parallel/data.py's DistributedAdamW)
@register("adamw", "torch", priority=0)
def adamw_torch(*args):
    from megatron_r1.parallel.data import adamw_
    adamw_(*args)


@register("adamw", "apex", priority=1, available=_apex_ok)
def adamw_apex(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """apex's fused multi-tensor Adam kernel (FusedAdam's, adam_w_mode=1: decoupled weight decay, bias
    correction on), float32 master shards."""
    import amp_C
    from apex.multi_tensor_apply import multi_tensor_applier
    flag = torch.zeros(1, dtype=torch.int, device=param.device)
    multi_tensor_applier(amp_C.multi_tensor_adam, flag, [[grad.contiguous()], [param], [exp_avg], [exp_avg_sq]],
                         lr, beta1, beta2, eps, step, 1, 1, weight_decay)


def fp8_path(cfg) -> str:
    """What FP8 a launch of `cfg` would run, on this machine, in one line (the dry run prints it)."""
    disp = f"moe.dispatch_dtype={cfg.moe.dispatch_dtype}"
    if cfg.train.fp8 == "none":
        return f"train.fp8=none: GEMMs in {cfg.train.params_dtype}; {disp}"
    te = _te_fp8_ok()
    here = ("Transformer Engine Float8BlockScaling (fp8_linear=te, fp8_grouped_mm=te)" if te else
            "the reference backend (fp8_linear=reference, fp8_grouped_mm=reference: FP8 numerics as float32 "
            "products of dequantised block-FP8 operands, no FP8 speed-up)")
    why = "" if te else (" — Transformer Engine " + ("is installed but needs CUDA on Hopper (sm_90+) and "
                                                       "Float8BlockScaling" if _te_installed() else "is not installed"))
    return f"train.fp8=blockwise: on this machine {here}{why}; {disp}"


def _te_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("transformer_engine") is not None
