"""The placement table: one entry per parameter and persistent buffer, read from the layers' declarations;
full shapes, shards and box offsets derived from it; nothing hung on nn.Parameter."""
import torch

from megatron_r1.config import load_config
from megatron_r1.model.gpt import CausalLM
from megatron_r1.parallel.mesh import ParallelMesh


def _table(tp=1, sp=False, pp=1, pre=True, post=True, tp_rank=1, preset="tiny-moe", ep=1, ep_rank=0):
    cfg = load_config(preset)
    mesh = ParallelMesh.single(device="meta")
    mesh.tp, mesh.sp, mesh.pp, mesh.tp_rank = tp, sp, pp, tp_rank  # degrees only: building needs no groups
    mesh.ep, mesh.ep_rank = ep, ep_rank
    with torch.device("meta"):
        model = CausalLM(cfg.model, mesh, pre_process=pre, post_process=post)
    return model, mesh


def test_groups_and_shard_dims_tp2_sp():
    model, mesh = _table(tp=2, sp=True)
    t = model.placement
    q_b, o = t["model.layers.1.self_attn.q_b_proj.weight"], t["model.layers.1.self_attn.o_proj.weight"]
    assert (q_b.shard_dim, q_b.group, o.shard_dim, o.group) == (0, "dp_cp", 1, "dp_cp")
    for name in ("model.layers.1.self_attn.q_a_proj.weight", "model.layers.1.self_attn.kv_a_layernorm.weight",
                 "model.layers.2.mlp.gate.weight", "model.layers.2.mlp.shared_experts.down_proj.weight",
                 "model.layers.1.input_layernorm.weight", "model.norm.weight", "model.layers.4.eh_proj.weight",
                 "model.layers.4.shared_head.norm.weight"):
        assert (t[name].shard_dim, t[name].group) == (None, "stage"), name
    e = t["model.layers.2.mlp.experts.3.down_proj.weight"]
    assert (e.shard_dim, e.group, e.expert, e.canonical_dim) == (None, "edp", True, 0)
    assert t["model.embed_tokens.weight"].group == "dp_cp" and t["model.embed_tokens.weight"].primary
    assert t["model.layers.2.mlp.gate.e_score_correction_bias"].group == ""  # a buffer: whole, no reduction
    assert t["model.norm.weight"].init == "ones" and isinstance(q_b.init, float)


def test_without_sp_norms_are_replicas_and_at_tp1_nothing_is_partial():
    t = _table(tp=2)[0].placement
    assert t["model.layers.1.input_layernorm.weight"].group == "dp_cp"
    assert t["model.layers.1.self_attn.q_a_proj.weight"].group == "stage"
    t1 = _table(tp=1)[0].placement
    assert {p.group for _, p in t1.items()} <= {"dp_cp", "edp", ""}
    assert t1["model.layers.1.self_attn.o_proj.weight"].shard_dim == 1  # stated at tp=1 too (ZeRO order)


def test_mtp_embedding_copy_on_the_last_stage():
    first, _ = _table(pp=2, post=False)
    last, _ = _table(pp=2, pre=False)
    a, b = first.placement["model.embed_tokens.weight"], last.placement["model.embed_tokens.weight"]
    assert (a.group, a.primary, b.group, b.primary) == ("embed", True, "embed", False)


def test_table_covers_exactly_the_state_and_derives_shapes():
    model, mesh = _table(tp=2, tp_rank=1)
    from megatron_r1.ckpt.hf import model_state
    # parameters + persistent buffers, and the per-expert views of the expert stacks
    assert {k for k, _ in model.placement.items()} == set(model.state_dict()) | set(model_state(model))
    p = dict(model.named_parameters())["model.layers.1.self_attn.o_proj.weight"]
    place = model.placement["model.layers.1.self_attn.o_proj.weight"]
    full_shape = place.full_shape(p.shape, mesh)
    assert full_shape == (p.shape[0], 2 * p.shape[1]) and place.offsets(p.shape, mesh) == (0, p.shape[1])
    full = torch.arange(full_shape[0] * full_shape[1]).view(full_shape)
    assert torch.equal(place.shard(full, mesh), full[:, p.shape[1]:])


def test_nothing_is_hung_on_parameters():
    from megatron_r1.engine.check import make_config
    from megatron_r1.engine.runtime import build_optimizer, build_parallel_model
    cfg = make_config("tiny-moe")
    mesh = ParallelMesh.single()
    chunks = build_parallel_model(cfg, mesh)
    build_optimizer(chunks, cfg, mesh)
    hung = {(n, k) for c in chunks for n, p in c.named_parameters() for k in vars(p)}
    assert not hung, sorted(hung)[:5]


def test_expert_stacks_are_sharded_over_ep_and_named_per_expert():
    """tiny-moe (8 experts) at ep2, rank 1: the stack [4, F, H] is rows 4..7 of the global [8, F, H]
    (full shape, box offsets, ZeRO's flat offset, the shard of a full tensor); its views are experts 4..7,
    whole and reduced over edp like the stack."""
    from megatron_r1.ckpt.hf import model_state
    model, mesh = _table(ep=2, ep_rank=1)
    name = "model.layers.2.mlp.experts.up_proj"
    p, place = dict(model.named_parameters())[name], model.placement[name]
    assert place.stacked and place.group == "edp" and place.shard_dim is None and p.shape[0] == 4
    assert place.full_shape(p.shape, mesh) == (8,) + tuple(p.shape[1:])
    assert place.offsets(p.shape, mesh) == (4, 0, 0) and place.flat_offset(p.shape, mesh) == p.numel()
    assert place.views == tuple(f"model.layers.2.mlp.experts.{e}.up_proj.weight" for e in (4, 5, 6, 7))
    full = torch.arange(8 * 6).view(8, 2, 3)
    assert torch.equal(place.shard(full, mesh), full[4:])
    state = model_state(model)
    assert name not in state and "model.layers.2.mlp.experts.3.up_proj.weight" not in state
    view = model.placement["model.layers.2.mlp.experts.5.up_proj.weight"]
    assert (view.stacked, view.group, view.full_shape(p.shape[1:], mesh)) == (False, "edp", tuple(p.shape[1:]))
    assert tuple(state["model.layers.2.mlp.experts.5.up_proj.weight"].shape) == tuple(p.shape[1:])
