"""kernels/fp8.py: block quantisation bit for bit against a float32 per-block loop, and the FP8 linear's
forward and both gradients inside the error bound that block quantisation implies.

The bound: per element |x̂ - x| <= e(x) = max(|x|·2^-4, 2^-10·scale_inv) (E4M3: 3 mantissa bits, subnormals
below 2^-6 in scaled units), so for a product over k: |Σ x̂ŵ - Σ xw| <= Σ_k (e_x|w| + |x|e_w + e_x e_w),
plus float32 summation slack."""
import pytest
import torch

from megatron_r1.kernels.fp8 import (E4M3, E4M3_MAX, MIN_SCALE, dequantize_blocks, dispatch_bytes_per_token,
                                     element_error_bound, fake_quant, fp8_linear, quantize_blocks)


def _loop_quantize(x, br, bc):
    R, C = x.shape
    nr, nc = -(-R // br), -(-C // bc)
    codes = torch.empty(R, C, dtype=E4M3)
    scales = torch.empty(nr, nc)
    for i in range(nr):
        for j in range(nc):
            blk = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float()
            s = max(blk.abs().max().item() / E4M3_MAX, MIN_SCALE)
            s = torch.tensor(s, dtype=torch.float32)
            scales[i, j] = s
            codes[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (blk / s).to(E4M3)
    return codes, scales


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(130, 300, generator=g)  # partial edge blocks both ways
    x[:128, 128:256] = 0  # an all-zero block
    outliers = x.clone()
    outliers[5, 7] = 3e4
    outliers[129, 299] = -1e-5
    outliers[60:70, 10] *= 1e3
    return {"random": x, "outliers": outliers, "bf16": x.to(torch.bfloat16)}


@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
@pytest.mark.parametrize("kind", ["random", "outliers", "bf16"])
def test_quantize_equals_the_block_loop_bit_for_bit(block, kind):
    x = _inputs()[kind]
    codes, scales = quantize_blocks(x, block)
    ref_codes, ref_scales = _loop_quantize(x, *block)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
    deq = dequantize_blocks(codes, scales, block)
    ref = ref_codes.float() * ref_scales.repeat_interleave(block[0], 0)[:x.shape[0]].repeat_interleave(block[1], 1)[:, :x.shape[1]]
    assert torch.equal(deq, ref)
    if block == (128, 128) and kind != "bf16":
        assert torch.all(codes[:128, 128:256].float() == 0) and scales[0, 1] == MIN_SCALE


def test_the_checkpoint_converter_writes_the_same_format():
    from megatron_r1.ckpt.hf import dequantize_fp8, quantize_fp8
    x = _inputs()["outliers"]
    codes, scales = quantize_blocks(x)
    c2, s2 = quantize_fp8(x)
    assert torch.equal(scales, s2) and torch.equal(codes.view(torch.uint8), c2.view(torch.uint8))
    assert torch.equal(dequantize_fp8(c2, s2, torch.float32), dequantize_blocks(codes, scales))


@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
@pytest.mark.parametrize("kind", ["random", "outliers"])
def test_element_error_within_the_format_bound(block, kind):
    x = _inputs()[kind]
    err = (fake_quant(x, block) - x).abs()
    bound = element_error_bound(x, block)
    assert torch.all(err <= bound * (1 + 1e-6)), (err - bound).max()
    assert err.max() > 0  # the test would notice a quantiser that does nothing


def _product_bound(a, b, block_a, block_b):
    """|â b̂ - a b| bound for a [M, K] @ b [K, N], with a tiled `block_a` and bᵀ tiled `block_b` along K."""
    ea = element_error_bound(a, block_a)
    eb = element_error_bound(b.t().contiguous(), block_b).t()
    slack = 1e-5 * (a.abs() @ b.abs())
    return ea @ b.abs() + a.abs() @ eb + ea @ eb + slack


@pytest.mark.parametrize("kind", ["random", "outliers"])
def test_fp8_linear_forward_and_gradients_within_the_bound(kind):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(70, 300, generator=g) * (1 if kind == "random" else torch.rand(70, 300, generator=g) ** -2)
         ).requires_grad_()
    w = torch.randn(200, 300, generator=g).mul(0.02)
    if kind == "outliers":
        w[3, :] *= 100
    w.requires_grad_()
    dy = torch.randn(70, 200, generator=g)

    y = fp8_linear(x, w)
    y.backward(dy)
    with torch.no_grad():
        exact_y, exact_dx, exact_dw = x @ w.t(), dy @ w, dy.t() @ x
        assert torch.all((y - exact_y).abs() <= _product_bound(x, w.t(), (1, 128), (128, 128)))
        # Dgrad: dy [T, N] in 1×128 tiles along N; W [N, K] in its 128×128 blocks
        assert torch.all((x.grad - exact_dx).abs() <= _product_bound(dy, w, (1, 128), (128, 128)))
        # Wgrad: dyᵀ [N, T] and xᵀ [K, T], both in 1×128 tiles along T
        assert torch.all((w.grad - exact_dw).abs() <= _product_bound(dy.t(), x, (1, 128), (1, 128)))
        # and FP8 is really in the loop: the result is not the float32 product
        assert (y - exact_y).abs().max() > 0 and (w.grad - exact_dw).abs().max() > 0


def test_dispatch_bytes():
    assert dispatch_bytes_per_token(7168, "bf16") == 14336
    assert dispatch_bytes_per_token(7168, "fp8") == 7168 + 4 * 56  # 0.516 of bf16
