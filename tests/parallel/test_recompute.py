"""Activation recompute changes no number: with `train.recompute` at each setting, the loss and every
reduced gradient of a layout equal the same layout without recompute BIT FOR BIT (float32, CPU), and
the router's token counts are not counted twice. Also: `check-parallel --recompute` against one rank.

Bit-exactness holds because a recomputed region re-runs the same ops on the same inputs (RNG state
restored) and its backward is the same graph; anything else (a missed RNG replay, a side effect run
twice, a region that recomputes from different inputs) shows as a nonzero difference.
"""
import copy

import pytest
import torch

from megatron_r1.config import RECOMPUTE_MODULES
from megatron_r1.engine.check import check_layout, default_batch, layout_step, make_config
from megatron_r1.parallel.spawn import run_ranks

SETTINGS = [("none", None, None), ("selective", None, None), ("selective", list(RECOMPUTE_MODULES), None),
            ("full", None, None), ("full", None, 1)]


def _steps(cfg, layout, batch):
    out = []
    for mode, modules, layers in SETTINGS:
        c = copy.deepcopy(cfg)
        c.train.recompute, c.train.recompute_modules, c.train.recompute_num_layers = mode, modules, layers
        r = layout_step(c, layout, batch)
        out.append((r["loss"], r["grad_norm"], r["grads"], r["after"]))
    return out


@pytest.mark.parametrize("layout", ["tp2,pp2", "ep2,cp2", "tp2,sp,cp2,ep2"])
def test_recompute_is_bit_exact(layout):
    cfg = make_config("tiny-moe")
    batch = default_batch(cfg, [layout])
    from megatron_r1.engine.check import world_size_of
    results = run_ranks(_steps, world_size_of(layout), cfg, layout, batch, timeout=600)[0]
    loss0, norm0, grads0, after0 = results[0]
    for (mode, modules, layers), (loss, norm, grads, after) in zip(SETTINGS[1:], results[1:]):
        what = f"{layout} recompute={mode} modules={modules} layers={layers}"
        assert loss == loss0 and norm == norm0, what
        differ = [k for k in grads0 if not torch.equal(grads[k], grads0[k])]
        assert not differ, f"{what}: gradients differ: {differ[:5]}"
        # the router bias update reads the token counts: counted twice, it would differ
        differ = [k for k in after0 if not torch.equal(after[k], after0[k])]
        assert not differ, f"{what}: parameters/buffers after the step differ: {differ[:5]}"


def test_recompute_dense_student_bit_exact():
    cfg = make_config("tiny-qwen2")
    layout = "tp2,pp2"
    results = run_ranks(_steps, 4, cfg, layout, default_batch(cfg, [layout]), timeout=600)[0]
    for r in results[1:]:
        assert r[0] == results[0][0] and all(torch.equal(r[2][k], results[0][2][k]) for k in results[0][2])


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_check_parallel_recompute_cli(mode, capsys):
    from megatron_r1.engine.check import main
    assert main(["--preset", "tiny-moe", "--layout", "tp2,ep2", "--recompute", mode]) == 0
    assert f"recompute={mode}" in capsys.readouterr().out
