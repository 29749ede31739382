"""Every layout of issue 3 equals one rank: loss, every gradient (gathered), parameters after one AdamW
step and the router bias after its update, float32, within 1e-5 relative (max|a-b| / max|b| per tensor).

The single-rank reference is plain PyTorch (`loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW`),
see megatron_r1/engine/check.py. Global batch: 8 micro-batches of [2, 16] with a random loss mask, so
each rank accumulates over ≥ 4 micro-batches (> pp). Layouts of one world size share one spawn.

Every check runs with `strict_device=True` (`check-parallel --strict-device`): each rank's step fails if
it creates a tensor without an explicit device or moves data to the host off the allow-list
(megatron_r1/engine/strict.py), so these layouts are also the proof that a step stays on the device.
"""
import pytest

from megatron_r1.engine.check import check_layouts as _check_layouts

TWO_RANKS = ["tp2", "tp2,sp", "cp2", "ep2", "pp2", "pp2,vpp2", "dp2", "dp2,nozero", "tp2,ep2", "cp2,ep2",
             "pp2,first3"]  # uneven stages (Megatron's first/last_pipeline_num_layers), as 671B needs
FOUR_RANKS = ["tp2,pp2", "pp2,dp2", "tp2,sp,cp2,ep2", "pp2,vpp2,dp2,ep2", "tp2,pp2,last3"]
EIGHT_RANKS = ["tp2,pp2,dp2", "tp2,cp2,pp2,ep2", "tp2,sp,cp2,pp2,vpp2,ep2"]


def check_layouts(*args, **kw):
    return _check_layouts(*args, strict_device=True, **kw)


def _assert_all_ok(reports):
    bad = [str(r) for r in reports if not r.ok]
    assert not bad, "\n".join(bad)


def test_moe_two_ranks():
    _assert_all_ok(check_layouts("tiny-moe", TWO_RANKS))


def test_moe_four_ranks():
    _assert_all_ok(check_layouts("tiny-moe", FOUR_RANKS))


def test_moe_eight_ranks():
    _assert_all_ok(check_layouts("tiny-moe", EIGHT_RANKS))


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-llama"])
def test_dense_student(preset):
    _assert_all_ok(check_layouts(preset, ["tp2,pp2", "tp2,sp,dp2", "tp2,cp2"]))  # cp2: GQA over a key prefix


def test_moe_sequence_balance_loss():
    """α large enough that a wrong balance-loss gradient (tp/cp partial sums, normaliser) would show."""
    _assert_all_ok(check_layouts("tiny-moe", ["tp2,cp2,ep2", "tp2,sp,ep2,dp2", "pp2,dp2,ep2"],
                                 ["model.aux_loss_alpha=0.1"]))


def test_many_small_buckets():
    """~40 KB buckets: several buckets per kind and chunk, launched from hooks in order, ZeRO-1 slices
    cutting through parameters."""
    _assert_all_ok(check_layouts("tiny-moe", ["dp2", "pp2,dp2,ep2", "tp2,sp,dp2"], ["parallel.grad_bucket_mb=0.04"]))


def test_routing_replay_layouts():
    """Rollout routing replay (R3): the same given routes give the same loss, gradients and step at one rank
    and at ep2, tp2·ep2, pp2 (and under sp + cp), so the routes are sliced to each rank's tokens and layers
    and dispatched over ep like computed ones."""
    _assert_all_ok(check_layouts("tiny-moe", ["ep2", "tp2,ep2", "pp2", "tp2,sp,ep2"], replay_routes=True))


def test_routing_replay_changes_the_step():
    """The given routes are really used: with them the one-rank expert and router gradients differ from the
    model's own routing (at random init the MoE barely moves the loss), and routes equal to the model's own
    top-k change nothing."""
    import torch
    from megatron_r1.engine.check import default_batch, make_config, reference
    from megatron_r1.model.deepseek_v3 import Router
    cfg = make_config("tiny-moe")
    batch = default_batch(cfg, ["ep2"], replay_routes=True)
    own = [{k: v for k, v in mb.items() if k != "routes"} for mb in batch]
    from megatron_r1.engine.check import rel
    given, plain = reference(cfg, batch)["grads"], reference(cfg, own)["grads"]
    assert max(rel(given[k], plain[k]) for k in plain if ".mlp." in k) > 0.1
    # the model's own routes, recorded from a plain forward, replayed: the same step
    from megatron_r1.engine.runtime import init_parameters
    from megatron_r1.model.gpt import CausalLM
    from megatron_r1.parallel.mesh import ParallelMesh
    model = CausalLM(cfg.model, ParallelMesh.single())
    init_parameters([model], ParallelMesh.single(), cfg.train.seed)
    recorded = []
    for mb in own:
        layers = {}
        hooks = [m.register_forward_hook(lambda m, a, o, i=i: layers.__setitem__(i, o[1]))
                 for i, m in ((int(n.split(".")[2]), m) for n, m in model.named_modules() if isinstance(m, Router))]
        with torch.no_grad():
            model(mb["input_ids"])
        for h in hooks:
            h.remove()
        b, s = mb["input_ids"].shape
        r = torch.full((b, s, cfg.model.num_hidden_layers, cfg.model.num_experts_per_tok), -1, dtype=torch.int16)
        for i, idx in layers.items():
            if i < cfg.model.num_hidden_layers:  # the MTP block routes itself (no given routes)
                r[:, :, i] = idx.view(b, s, -1).to(torch.int16)
        recorded.append(dict(mb, routes=r))
    a, b = reference(cfg, recorded), reference(cfg, own)
    assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"])
    assert all(torch.allclose(a["grads"][k], b["grads"][k], rtol=1e-5, atol=1e-8) for k in b["grads"])
