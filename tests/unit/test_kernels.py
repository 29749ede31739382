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
