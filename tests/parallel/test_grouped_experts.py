"""Grouped experts (`MEGATRON_R1_KERNELS=experts:grouped`, torch._grouped_mm forward and a hand-written
grouped-GEMM backward) on the expert-parallel layouts.

1. check-parallel with the grouped kernel in the ranks against the one-rank reference (which always runs
   the per-expert loop): loss, grads, params after AdamW, router bias within the usual 1e-5.
2. The same layout with the loop and with the grouped kernel, in the same ranks: float32 loss and every
   gradient within 1e-6 relative (max|a-b| / max|b| per tensor); bf16 within 1e-2 (see test_kernels.py
   for why that bound; on this CPU the difference measured is 0).
"""
import copy
import os

import pytest

from megatron_r1.engine.check import check_layouts, default_batch, layout_step, make_config, rel, world_size_of
from megatron_r1.parallel.spawn import run_ranks

EP_LAYOUTS = ["ep2", "tp2,ep2", "cp2,ep2", "tp2,sp,cp2,ep2", "pp2,vpp2,dp2,ep2"]


def test_grouped_experts_pass_the_equivalence_check(monkeypatch):
    from megatron_r1 import kernels
    monkeypatch.setenv("MEGATRON_R1_KERNELS", "experts:grouped")
    kernels.reset_choices()
    try:
        reports = check_layouts("tiny-moe", EP_LAYOUTS, verbose=False)
    finally:
        kernels.reset_choices()
    bad = [str(r) for r in reports if not r.ok]
    assert not bad, "\n".join(bad)
    assert all("experts=grouped" in r.mesh for r in reports), [r.mesh for r in reports]


def _loop_vs_grouped(cfg, layout, batch):
    from megatron_r1 import kernels
    out = {}
    for backend in ("loop", "grouped"):
        os.environ["MEGATRON_R1_KERNELS"] = f"experts:{backend}"
        kernels.reset_choices()
        r = layout_step(copy.deepcopy(cfg), layout, batch)
        out[backend] = (r["loss"], r["grads"], r["mesh"])
    del os.environ["MEGATRON_R1_KERNELS"]
    kernels.reset_choices()
    return out


@pytest.mark.parametrize("layout,dtype,tol", [("ep2", "float32", 1e-6), ("tp2,sp,cp2,ep2", "float32", 1e-6),
                                              ("tp2,ep2", "bfloat16", 1e-2)])
def test_grouped_equals_loop(layout, dtype, tol):
    cfg = make_config("tiny-moe", [f"train.params_dtype={dtype}"])
    out = run_ranks(_loop_vs_grouped, world_size_of(layout), cfg, layout, default_batch(cfg, [layout]),
                    timeout=600)[0]
    (l0, g0, m0), (l1, g1, m1) = out["loop"], out["grouped"]
    assert "experts=loop" in m0 and "experts=grouped" in m1
    assert abs(l1 - l0) <= tol * abs(l0)
    worst = max((rel(g1[k], g0[k]), k) for k in g0)
    assert worst[0] <= tol, worst
    assert any(".mlp.experts." in k and g0[k].abs().max() > 0 for k in g0)  # experts were exercised


def _count_host_syncs(backend):
    """Host transfers inside one MoE dispatch + combine (forward and backward) on this rank."""
    import torch
    from torch.overrides import TorchFunctionMode

    from megatron_r1 import kernels
    from megatron_r1.config import ParallelConfig, load_config
    from megatron_r1.model.experts import GroupedExperts
    from megatron_r1.parallel.expert import moe_dispatch_combine
    from megatron_r1.parallel.mesh import ParallelMesh

    cfg = load_config("tiny-moe").model
    mesh = ParallelMesh.build(ParallelConfig(ep=2), cfg)
    ex = GroupedExperts(64, 32, list(range(4 * mesh.ep_rank, 4 * mesh.ep_rank + 4)), out_std=0.02)
    torch.manual_seed(mesh.ep_rank)
    x = torch.randn(12, 64, requires_grad=True)
    idx = torch.randint(0, 8, (12, 2))
    w = torch.rand(12, 2)
    syncs = []
    host = {"tolist", "item", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy"}

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in host:
                syncs.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with kernels.using(experts=backend), Count():
        moe_dispatch_combine(x, idx, w, ex, 8, mesh).sum().backward()
    return syncs


def test_dispatch_has_one_host_sync_per_layer():
    """ep2: the split sizes are the only host transfer, with either kernel (the loop gets its counts
    from that same sync)."""
    for backend in ("grouped", "loop"):
        per_rank = run_ranks(_count_host_syncs, 2, backend, timeout=120)
        assert all(s == ["tolist"] for s in per_rank), (backend, per_rank)


def test_grouped_and_recompute_under_the_strict_device_guard(monkeypatch):
    """The new paths make no device-less tensor and no host transfer beyond the split sizes: grouped
    experts (ep1: no sync at all; ep2: the split sizes) with every selective recompute region, and full
    recompute, under check-parallel --strict-device."""
    from megatron_r1 import kernels
    monkeypatch.setenv("MEGATRON_R1_KERNELS", "experts:grouped")
    kernels.reset_choices()
    try:
        reports = check_layouts("tiny-moe", ["tp2", "cp2,ep2"], ["train.recompute=selective",
                                "train.recompute_modules=[core_attn,mla_up_proj,layernorm,moe_act,shared_experts,moe]"],
                                verbose=False, strict_device=True)
        reports += check_layouts("tiny-moe", ["tp2,pp2"], ["train.recompute=full"], verbose=False, strict_device=True)
    finally:
        kernels.reset_choices()
    bad = [str(r) for r in reports if not r.ok]
    assert not bad, "\n".join(bad)
