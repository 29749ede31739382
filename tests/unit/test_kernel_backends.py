"""Transformer Engine and apex backends against the reference backends, wherever they import.

On the CPU machines of the tests neither is installed: each test skips and says why (the registry's
availability check: TE with Float8BlockScaling on a Hopper GPU; apex's amp_C and fused RMSNorm on CUDA).
What runs here: the registry picks the reference backends, and `fp8_path` says so, truthfully."""
import pytest
import torch

from megatron_r1 import kernels
from megatron_r1.kernels import backends, get_kernel
from megatron_r1.kernels.fp8 import BLOCK, element_error_bound


def _need(name, backend):
    if backend not in backends(name):
        why = {"te": "transformer_engine with Float8BlockScaling on a CUDA Hopper GPU" if name.startswith("fp8")
               else "transformer_engine on CUDA", "apex": "apex with its amp_C / fused_layer_norm_cuda extensions on CUDA"}
        pytest.skip(f"{name}:{backend} needs {why[backend]}; not available here (available: {', '.join(backends(name))})")


def _bound(a, b):
    """|FP8 product − exact| per element for a [M, K] @ bᵀ (b [N, K]): 1×128 tiles of a, 128×128 blocks of b,
    doubled for a backend whose scales are rounded to powers of two (TE's default)."""
    ea, eb = element_error_bound(a, (1, BLOCK)), element_error_bound(b, (BLOCK, BLOCK))
    return 2 * (ea @ b.abs().t() + a.abs() @ eb.t() + ea @ eb.t()) + 1e-3 * (a.abs() @ b.abs().t())


def test_fp8_linear_te_within_the_block_fp8_bound():
    _need("fp8_linear", "te")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 512, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(384, 512, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02).requires_grad_()
    y = get_kernel("fp8_linear", "te")(x, w)
    exact = x.float() @ w.float().t()
    assert torch.all((y.float() - exact).abs() <= _bound(x.float(), w.float()))
    y.sum().backward()
    assert w.grad is not None and x.grad is not None  # our Parameter got TE's Wgrad


def test_fp8_grouped_mm_te_matches_reference():
    _need("fp8_grouped_mm", "te")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(4, 128, 256, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02  # [L, out, in]
    offs = torch.tensor([100, 100, 250, 300], device="cuda", dtype=torch.int32)
    got = get_kernel("fp8_grouped_mm", "te")(x, w, offs).float()
    ref = get_kernel("fp8_grouped_mm", "reference")(x.float(), w.float(), offs)
    assert (got - ref).abs().max() <= 0.1 * ref.abs().max()


@pytest.mark.parametrize("backend", ["te", "apex"])
def test_rms_norm_backends_equal_torch(backend):
    _need("rms_norm", backend)
    x = torch.randn(8, 33, 512, device="cuda", requires_grad=True)
    w = (torch.rand(512, device="cuda") + 0.5).requires_grad_()
    got = get_kernel("rms_norm", backend)(x, w, 1e-6)
    ref = get_kernel("rms_norm", "torch")(x, w, 1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_adamw_apex_equals_torch():
    _need("adamw", "apex")
    torch.manual_seed(0)
    state = [torch.randn(1000, device="cuda") for _ in range(4)]  # param, grad, m, v
    state[3] = state[3].abs()
    a, b = [t.clone() for t in state], [t.clone() for t in state]
    for step in (1, 2, 3):
        get_kernel("adamw", "apex")(*a, step, 1e-3, 0.9, 0.95, 1e-8, 0.1)
        get_kernel("adamw", "torch")(*b, step, 1e-3, 0.9, 0.95, 1e-8, 0.1)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_registry_and_dry_run_state_the_fp8_path_truthfully():
    """Here (no TE): the reference backends run, and fp8_path says so and why; with train.fp8=none it says
    the GEMMs run in the params dtype."""
    from megatron_r1.config import load_config
    kernels.reset_choices()
    fp8 = load_config("tiny-moe", ["train.fp8=blockwise", "moe.dispatch_dtype=fp8"])
    line = kernels.fp8_path(fp8)
    if "te" in backends("fp8_linear"):
        assert "Transformer Engine Float8BlockScaling" in line
    else:
        assert get_kernel("fp8_linear") is get_kernel("fp8_linear", "reference")
        assert "reference backend" in line and "no FP8 speed-up" in line and "Transformer Engine" in line
    assert line.endswith("moe.dispatch_dtype=fp8")
    assert kernels.fp8_path(load_config("tiny-moe", ["train.params_dtype=bfloat16"])).startswith(
        "train.fp8=none: GEMMs in bfloat16")
