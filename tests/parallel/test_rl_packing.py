"""RL micro-batches packed to a token budget (rows sorted by length, each micro-batch trimmed to its longest
row) and logprobs taken in checkpointed chunks give the same old logprobs, GRPO loss and gradients as
right-padded fixed-size micro-batches with whole-sequence logprobs (float32, 1e-6 relative): at one rank,
at ep2 (dp2: the two dp ranks pack differently and must agree on one micro-batch count for the all-to-alls)
and at tp2 (the MoE's token split over tp).

The trainer runs without its vLLM engine: a GRPOTrainer shell holds a real TrainSession, and its own
build_batch / rank_batch / old_logprobs / micro_batches / loss_fn run on a synthetic rollout with a
realistic length spread and engine routes replayed in both passes (rl.routing_replay=all), the packed
old-logprob pass under the --strict-device guard. aux_loss_alpha=0: pad tokens count in the padded run's sequence-balance loss and
not in the packed one's (packing is the correct one)."""
import random

import pytest

from megatron_r1.parallel.spawn import run_ranks


def _rollout(n: int, seed: int):
    from megatron_r1.rl.trainer import Rollout
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(6, 12))] for _ in range(n)]
    responses = [[rng.randrange(3, 500) for _ in range(rng.choice([3, 6, 10, 25, 60]))] for _ in range(n)]
    lps = [[-rng.random() for _ in r] for r in responses]
    rewards = [float(rng.random() > 0.5) for _ in range(n)]
    # engine routes for routing replay: layer 0 is dense (-1), layer 1 routes to 2 of 8 experts
    import numpy as np
    g = np.random.default_rng(seed)
    routes = []
    for p, r in zip(prompts, responses):
        x = np.full((len(p) + len(r), 2, 2), -1, dtype=np.int16)
        x[:, 1] = np.argsort(g.random((len(x), 8)), axis=1)[:, :2]
        routes.append(x)
    return Rollout(prompts, responses, lps, [False] * n, [""] * n, rewards, {}, routes)


def _learn(overrides: list[str], pack: bool, run_dir: str):
    import types

    import torch

    from megatron_r1.config import load_config
    from megatron_r1.engine.runtime import forward_backward, gather_full_state
    from megatron_r1.rl.trainer import GRPOTrainer
    from megatron_r1.training import TrainSession
    cfg = load_config("examples/r1_zero_tiny.yaml", [
        "model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
        "model.moe_intermediate_size=32", "model.aux_loss_alpha=0", "rl.prompts_per_step=8", "rl.group_size=2",
        "rl.beta=0", "train.micro_batch_size=4", "rl.routing_replay=all", f"run_dir={run_dir}"] + overrides +
        (["rl.pack_tokens=160", "rl.logprob_chunk_tokens=48"] if pack else ["rl.logprob_chunk_tokens=0"]))
    t = object.__new__(GRPOTrainer)  # the learning half of the trainer: no engine, no prompts
    t.cfg, t.session = cfg, TrainSession(cfg, rl=True, logger=False)
    t.mesh, t.ref_chunks, t.tok = t.session.mesh, None, types.SimpleNamespace(pad_id=0)
    t._ratio_ext = torch.full((2,), -torch.inf, dtype=torch.float64, device=t.mesh.device)
    rb = t.rank_batch(t.build_batch(_rollout(16, seed=3)))
    from megatron_r1.engine.strict import StrictDevice
    with StrictDevice():  # the packed, replayed logprob pass makes nothing off the device, syncs nothing new
        metrics = t.old_logprobs(rb)
    assert metrics["routing/pairs"] > 0
    # the update's policy differs from the old one: perturb old logprobs so the ratio and the clip matter
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(rb.data["mask"].shape, generator=g) - 0.5) * 0.4
    if "old_logp" in rb.data:
        rb.data["old_logp"] += noise.to(rb.data["old_logp"].device) * rb.data["mask"]
    mbs = [mb for _, mb in t.micro_batches(rb, 0)]
    widths = sorted({mb["input_ids"].shape[1] for mb in mbs})
    m = forward_backward(t.session.chunks, t.session.optimizer, mbs, t.loss_fn, t.mesh)
    t.session.optimizer.grads.gather_reduced_grads()
    grads = gather_full_state(t.session.chunks, t.mesh, grads=t.session.optimizer.grads)
    old = rb.data.get("old_logp")
    return {"loss": m["loss"], "grads": grads, "rows": rb.rows, "mask": rb.data["mask"].cpu(),
            "old": None if old is None else old.cpu(),
            "n_micro": len(mbs), "widths": widths}


def _both(overrides, run_dir):
    return _learn(overrides, False, f"{run_dir}/padded"), _learn(overrides, True, f"{run_dir}/packed")


@pytest.mark.parametrize("world,overrides", [(1, []), (2, ["parallel.ep=2"]), (2, ["parallel.tp=2"])],
                         ids=["one-rank", "ep2", "tp2"])
def test_packed_equals_padded(world, overrides, tmp_path):
    import torch

    from megatron_r1.engine.check import rel
    results = run_ranks(_both, world, overrides, str(tmp_path), timeout=300)
    padded, packed = results[0]
    assert packed["n_micro"] != padded["n_micro"] or packed["widths"] != padded["widths"]
    assert max(packed["widths"]) == max(padded["widths"]) and min(packed["widths"]) < max(padded["widths"])
    assert rel(torch.tensor(packed["loss"]), torch.tensor(padded["loss"])) <= 1e-6, (packed["loss"], padded["loss"])
    worst = max((rel(packed["grads"][k], padded["grads"][k]), k) for k in padded["grads"])
    assert worst[0] <= 1e-6, worst
    assert any(padded["grads"][k].abs().max() > 0 for k in padded["grads"] if ".experts." in k)
    for r in results:  # every rank with old logprobs (last stage): identical at the response tokens (targets)
        pa, pk = r
        if pa["old"] is not None:
            assert torch.equal(pa["rows"], pk["rows"])
            d = ((pa["old"] - pk["old"]) * pa["mask"]).abs().max()
            assert d <= 1e-6 * pa["old"].abs().max(), d


def test_pack_rows_budget_and_count():
    from megatron_r1.rl.trainer import pack_rows
    lengths = [5, 60, 7, 33, 12, 60, 3, 25]
    groups = pack_rows(lengths, budget=64, multiple=4)
    assert sorted(i for g in groups for i in g) == list(range(8))  # every row once
    for g in groups:  # longest first, within the budget unless alone
        assert lengths[g[0]] == max(lengths[i] for i in g)
        assert len(g) == 1 or len(g) * (-(-lengths[g[0]] // 4) * 4) <= 64
    assert [len(g) for g in groups] == [1, 1, 1, 2, 3]
    more = pack_rows(lengths, budget=64, multiple=4, count=7)  # an ep peer needs 7: split the fullest
    assert len(more) == 7 and sorted(i for g in more for i in g) == list(range(8))
