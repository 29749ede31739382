"""Runtime API on 2 ranks: forward_only logprobs, optimizer state resharding, full-state round trip, bf16."""
import torch
import torch.distributed as dist

from megatron_r1.model.gpt import lm_loss
from megatron_r1.engine.check import default_batch, make_config, parse_layout, reference, target_count
from megatron_r1.parallel.mesh import ParallelMesh
from megatron_r1.engine.runtime import (build_optimizer, build_parallel_model, forward_only, gather_full_state,
                                          shard_from_full, train_step)
from megatron_r1.parallel.tensor import vocab_parallel_logprobs
from tests.parallel.harness import run_ranks


def _setup(cfg, layout):
    par, _ = parse_layout(layout)
    cfg = make_config("tiny-moe") if cfg is None else cfg
    cfg.parallel = par
    mesh = ParallelMesh.build(par, cfg.model)
    return cfg, mesh, build_parallel_model(cfg, mesh)


def _logprobs(mesh):
    def fn(out, mb):  # [B, S/cp] log π(next token) at this rank's positions (last position: 0)
        ids = mb["input_ids"]
        tgt = ids[:, (out.positions + 1).clamp(max=ids.shape[1] - 1)]
        return out.positions, vocab_parallel_logprobs(out.logits, tgt, mesh)
    return fn


def _gather_pieces(opt):
    """Assemble every optimizer state into full canonical 1-D tensors, on every rank."""
    mine = [(k, opt.piece_meta()[k], t.clone()) for k, t in opt.sharded_state_dict().items() if k != "optim.step"]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    full = {}
    for pieces in everyone:
        for k, (off, numel), t in pieces:
            full.setdefault(k, torch.full((numel,), float("nan")))[off:off + t.numel()] = t
    return full


def _body(batch, ref):
    out = {}
    # forward_only through an interleaved pipeline: per-token logprobs on the last stage
    cfg, mesh, chunks = _setup(None, "pp2,vpp2")
    res = forward_only(chunks, batch[:4], _logprobs(mesh), mesh, broadcast=True)
    out["logprobs_pp"] = [lp for _, lp in res]
    # the same under tp2 + sp
    cfg, mesh, chunks = _setup(None, "tp2,sp")
    out["logprobs_tp"] = [lp for _, lp in forward_only(chunks, batch[:4], _logprobs(mesh), mesh)]

    # optimizer state: ZeRO-1 over dp2 -> assembled -> loaded into tp2 -> assembled again
    n = target_count(batch)
    cfg, mesh, chunks = _setup(None, "dp2")
    opt = build_optimizer(chunks, cfg, mesh)
    mine = batch[mesh.dp_rank * 4:(mesh.dp_rank + 1) * 4]
    train_step(chunks, opt, mine, lambda o, mb: lm_loss(o, mb["input_ids"], mb["loss_mask"], cfg.model, mesh, n),
               mesh)
    out["early_launches"] = opt.grads.early_launches
    full_a = _gather_pieces(opt)
    state = gather_full_state(chunks, mesh)
    cfg2, mesh2, chunks2 = _setup(None, "tp2")
    shard_from_full(chunks2, state, mesh2)
    opt2 = build_optimizer(chunks2, cfg2, mesh2)
    opt2.load_sharded_state_dict({**full_a, "optim.step": torch.tensor(1)})
    full_b = _gather_pieces(opt2)
    out["optim_a"], out["optim_b"] = full_a, full_b
    state2 = gather_full_state(chunks2, mesh2)
    out["state_roundtrip"] = max((state2[k] - v).abs().max().item() for k, v in state.items())

    # bf16: weights bf16, masters and gradient buffers fp32, a step runs and changes the weights
    cfg = make_config("tiny-moe", ["train.params_dtype=bfloat16"])
    cfg, mesh, chunks = _setup(cfg, "tp2,pp2" if dist.get_world_size() == 4 else "pp2")
    opt = build_optimizer(chunks, cfg, mesh)
    w0 = {k: v.clone() for k, v in gather_full_state(chunks, mesh).items()}
    m = train_step(chunks, opt, batch[:2], lambda o, mb: lm_loss(o, mb["input_ids"], None, cfg.model, mesh, n), mesh)
    w1 = gather_full_state(chunks, mesh)
    out["bf16"] = (m["loss"], {str(p.dtype) for c in chunks for p in c.parameters()},
                   {str(s["master"].dtype) for s in opt.state}, sum(not torch.equal(w0[k], w1[k]) for k in w0))
    return out if dist.get_rank() == 0 else None


def test_runtime_api_two_ranks():
    cfg = make_config("tiny-moe")
    batch = default_batch(cfg, ["tp2,sp"])
    ref = reference(cfg, batch)
    out = run_ranks(_body, 2, batch, ref, timeout=300)[0]

    # single-rank logprobs
    from megatron_r1.model.gpt import CausalLM
    from megatron_r1.engine.runtime import init_parameters
    model = CausalLM(cfg.model)
    init_parameters([model], ParallelMesh.single(), cfg.train.seed)
    for i, mb in enumerate(batch[:4]):
        ids = mb["input_ids"]
        lp = torch.log_softmax(model.full_logits(ids).float(), -1)
        want = lp.gather(-1, ids[:, list(range(1, ids.shape[1])) + [ids.shape[1] - 1]].unsqueeze(-1)).squeeze(-1)
        for key in ("logprobs_pp", "logprobs_tp"):
            torch.testing.assert_close(out[key][i], want, rtol=1e-5, atol=1e-5)

    # ZeRO-1 pieces assemble to exactly torch.optim.AdamW's state, and survive a reshard to tp2
    a, b = out["optim_a"], out["optim_b"]
    assert set(a) == set(b)
    for k, want in ref["optim"].items():
        torch.testing.assert_close(a[k], want, rtol=1e-5, atol=1e-9)
        assert torch.equal(a[k], b[k]), k
    assert all(not torch.isnan(t).any() for t in a.values())
    assert out["state_roundtrip"] == 0.0
    assert out["early_launches"] > 0  # some buckets started reducing during backward

    loss, dtypes, masters, changed = out["bf16"]
    assert torch.isfinite(torch.tensor(loss)) and dtypes == {"torch.bfloat16"} and masters == {"torch.float32"}
    assert changed > 0
