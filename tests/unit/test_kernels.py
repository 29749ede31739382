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
def _experts_run(backend, dtype, counts, recompute_act=False, seed=0):
    from megatron_r1.model.common import MLP
    from megatron_r1.parallel.mesh import ParallelMesh
    torch.manual_seed(seed)
    ex = [MLP(64, 32, ParallelMesh.single(), parallel=False, recompute_act=recompute_act).to(dtype) for _ in range(4)]
    with torch.no_grad():
        for p in (p for m in ex for p in m.parameters()):
            p.normal_(std=0.5)
    x = torch.randn(sum(counts), 64, dtype=dtype, requires_grad=True)
    y = get_kernel("experts", backend)(x, torch.tensor(counts), ex, counts)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach().float(), x.grad.float()] + [
        p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        for m in ex for p in m.parameters()]


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
