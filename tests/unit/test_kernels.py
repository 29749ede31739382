"""Kernel backends against references, float32, on this CPU.

Attention: the mask-free backends (causal SDPA; per-chunk SDPA with a lower-right causal bias for the
context-parallel query chunks) against an explicit S² boolean mask built from global positions, forward
and backward, at MLA's unequal head dims (Dqk ≠ Dv)."""
import pytest
import torch

from megatron_r1 import kernels
from megatron_r1.kernels import get_kernel


def _qkv(sq, sk, n=3, dqk=24, dv=16, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    return mk(b, n, sq, dqk), mk(b, n, sk, dqk), mk(b, n, sk, dv)


def _run(backend, q, k, v, chunks):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = get_kernel("attention", backend)(q, k, v, 0.3, chunks)
    (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("cp,rank", [(1, 0), (2, 0), (2, 1), (4, 1), (4, 3)])
def test_attention_without_mask_equals_dense_mask(cp, rank):
    s = 32
    if cp == 1:
        chunks, sq = None, s
    else:
        c = s // (2 * cp)
        chunks, sq = ((rank * c, c), ((2 * cp - 1 - rank) * c, c)), 2 * c
    q, k, v = _qkv(sq, s)
    ref = _run("dense_mask", q, k, v, chunks)
    got = _run("torch", q, k, v, chunks)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_attention_is_causal_by_global_position():
    """A query chunk must not see keys after its own positions: changing those keys changes nothing."""
    q, k, v = _qkv(4, 16)
    chunks = ((4, 4),)  # rows at positions 4..7
    o = get_kernel("attention", "torch")(q, k, v, 0.3, chunks)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 8:] += 5
    v2[:, :, 8:] -= 3
    assert torch.equal(o, get_kernel("attention", "torch")(q, k2, v2, 0.3, chunks))


def test_registry_reports_the_backend_and_refuses_unknown(monkeypatch):
    kernels.reset_choices()
    q, k, v = _qkv(8, 8)
    get_kernel("attention")(q, k, v, 0.3, None)
    assert kernels.report() == {"attention": "torch"}
    assert "flex" not in kernels.backends("attention")  # no backward on CPU: not offered here
    monkeypatch.setenv("MEGATRON_R1_KERNELS", "attention:nope")
    kernels.reset_choices()
    from megatron_r1.config import ConfigError
    with pytest.raises(ConfigError, match="attention:nope: no such backend"):
        get_kernel("attention")
    monkeypatch.delenv("MEGATRON_R1_KERNELS")
    kernels.reset_choices()


# ------------------------------------------------------------------------------------------ experts
def _experts_run(backend, dtype, counts, recompute_act=False, seed=0, fp8=False):
    from megatron_r1.model.experts import GroupedExperts
    torch.manual_seed(seed)
    ex = GroupedExperts(64, 32, [0, 1, 2, 3], out_std=0.5, recompute_act=recompute_act, std=0.5, fp8=fp8).to(dtype)
    x = torch.randn(sum(counts), 64, dtype=dtype, requires_grad=True)
    y = get_kernel("experts", backend)(x, torch.tensor(counts), ex, counts)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach().float(), x.grad.float()] + [
        p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32) for p in ex.parameters()]


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 7], [0, 0, 0, 0]])
@pytest.mark.parametrize("recompute_act", [False, True])
def test_grouped_experts_equal_loop(counts, recompute_act):
    """float32: grouped GEMMs (forward and the hand-written backward) within 1e-6 of the loop, experts
    without rows included (zero gradient)."""
    ref = _experts_run("loop", torch.float32, counts, recompute_act)
    got = _experts_run("grouped", torch.float32, counts, recompute_act)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        if b.numel():
            assert (a - b).abs().max() <= 1e-6 * max(b.abs().max().item(), 1e-30)


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 7], [130, 0, 1, 140]])
def test_fp8_grouped_experts_equal_fp8_loop(counts):
    """train.fp8=blockwise: the grouped FP8 GEMM (per-expert weight blocks, Wgrad tiles restarting at each
    expert's first row) equals each expert's own FP8 linear run one at a time, forward and gradients, up to
    float32 summation order; and FP8 is really on (the result differs from the float32 experts)."""
    ref = _experts_run("loop", torch.float32, counts, fp8=True)
    got = _experts_run("grouped", torch.float32, counts, fp8=True)
    plain = _experts_run("loop", torch.float32, counts)
    for a, b in zip(got, ref):
        if b.numel():
            assert (a - b).abs().max() <= 1e-6 * max(b.abs().max().item(), 1e-30)
    assert (ref[0] - plain[0]).abs().max() > 1e-3 * plain[0].abs().max()


def test_grouped_experts_bf16_tolerance():
    """bf16 bound: 1e-2 of max|ref| per tensor. Both backends accumulate in float32 and round each GEMM
    output to bf16 (half an ulp = 2^-9 ≈ 2e-3 relative); a different accumulation order can flip one
    rounding of the SwiGLU product h, and that ulp (2^-8 ≈ 4e-3) goes through the down projection, so a
    few ulps of max|y| is the honest bound on a GPU whose grouped GEMM sums in another order. Measured on
    this CPU: 0 (its _grouped_mm runs the same per-group GEMMs)."""
    ref = _experts_run("loop", torch.bfloat16, [3, 0, 5, 8])
    got = _experts_run("grouped", torch.bfloat16, [3, 0, 5, 8])
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_expert_kernels_read_the_stacks_in_place(backend, monkeypatch):
    """No per-call stacking or copy of the expert weights: every weight operand the kernel hands to a
    GEMM (F.linear for the loop, torch._grouped_mm for grouped) shares storage with a parameter stack,
    and the stacks' gradients come back in their own [L, out, in] layout."""
    from megatron_r1.model.experts import GroupedExperts
    ex = GroupedExperts(64, 32, [4, 5, 6, 7], out_std=0.5)
    stacks = {p.untyped_storage().data_ptr() for p in ex.parameters()}
    seen = []
    real_mm, real_linear = torch._grouped_mm, torch.nn.functional.linear

    def grouped_mm(a, b, offs=None, **kw):
        seen.append(b)
        return real_mm(a, b, offs=offs, **kw)

    def linear(x, w, *args):
        seen.append(w)
        return real_linear(x, w, *args)

    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm)
    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    counts = [3, 0, 5, 2]
    x = torch.randn(sum(counts), 64)
    with torch.no_grad():  # the forward only: the backward's grouped GEMMs take activations as operand b
        get_kernel("experts", backend)(x, torch.tensor(counts), ex, counts)
    assert len(seen) == (3 if backend == "grouped" else 9)
    assert all(w.untyped_storage().data_ptr() in stacks for w in seen)
    assert [tuple(p.shape) for p in ex.parameters()] == [(4, 32, 64), (4, 32, 64), (4, 64, 32)]
    assert list(ex.expert_views())[:3] == ["4.gate_proj.weight", "4.up_proj.weight", "4.down_proj.weight"]
    assert ex.expert_views()["5.up_proj.weight"].data_ptr() == ex.up_proj[1].data_ptr()
