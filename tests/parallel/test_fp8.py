"""check-parallel --fp8 blockwise: tp2, ep2 and pp2 in block-scaled FP8 (with FP8 dispatch) against one rank
in FP8, at engine/check.py's per-quantity FP8_TOL (loss and router bias 1e-5; gradients 0.125 of max|g|,
because Wgrad's token tiles end where a rank's tokens end). tiny-moe with 8 heads and a 256-wide dense MLP,
so that every tp shard of an FP8 linear is a whole number of 128-blocks (config.validate_fp8_shards)."""
from megatron_r1.engine.check import FP8_TOL, check_layouts

FP8 = ["train.fp8=blockwise", "moe.dispatch_dtype=fp8", "model.num_attention_heads=8", "model.intermediate_size=256"]


def test_fp8_tp2_ep2_pp2_against_one_rank():
    reports = check_layouts("tiny-moe", ["tp2", "ep2", "pp2"], FP8, tol=FP8_TOL, strict_device=True)
    for rep in reports:
        assert rep.ok, str(rep)
        assert "fp8_linear=reference" in rep.mesh, rep.mesh  # FP8 really ran on the ranks
        assert rep.worst["loss"][0] <= 1e-5
    assert reports[2].worst["grad"][0] <= 1e-5  # pp2: every rank sees the reference's tokens, so even Wgrad is exact


def test_fp8_dispatch_alone_at_ep2():
    """moe.dispatch_dtype=fp8 without FP8 GEMMs: the rows are quantised per 1×128 tile before the all-to-all
    (codes as bytes + float32 scales) and dequantised on arrival, the gradient goes back unquantised. Each row
    is quantised on its own, so ep2 equals one rank (which quantises the same rows): loss, norm, params and
    router bias at the float32 1e-5; gradients at 1e-3, because float32 noise in a layer's input can flip one
    E4M3 rounding (a 2^-4 step of that element) on one side (measured 1.1e-4)."""
    from megatron_r1.engine.check import TOL
    tol = {q: TOL for q in ("loss", "grad_norm", "param", "bias")} | {"grad": 1e-3}
    rep, = check_layouts("tiny-moe", ["ep2"], ["moe.dispatch_dtype=fp8"], tol=tol, strict_device=True)
    assert rep.ok, str(rep)
