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
