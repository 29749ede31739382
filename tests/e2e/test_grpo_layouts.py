"""One real GRPO step (vLLM rollout, rewards, old/ref logprobs, 2 updates, sync) gives the same losses and
parameters at dp 1 and dp 2, and with a micro-batch size that does not divide the mini-batch.

This guards the batch bookkeeping: every sample must train against its own old and reference logprobs.
Before RankBatch, an update at dp > 1 rebuilt its mini-batch as the dp slice of a row range but paired it
with micro-batch `u·len(mini)+j` of the dp slice of the whole batch, i.e. with other rows' logprobs.
"""
import pytest
import torch

from megatron_r1.parallel.spawn import run_ranks
from megatron_r1.rl.trainer import update_shares

REL = 1e-5  # float32; the layouts differ only in summation order


def _digits(response, reference=None):
    return sum(c.isdigit() for c in response) / max(len(response), 1)


def _one_step(hf_dir, train_path, run_dir, overrides, strict=False):
    from megatron_r1.config import load_config
    from megatron_r1.rl.rewards import register_reward
    from megatron_r1.rl.trainer import GRPOTrainer
    register_reward("test_digits")(_digits)
    cfg = load_config("examples/r1_zero_tiny.yaml", [
        "model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
        "model.moe_intermediate_size=32", "train.train_steps=1", "train.lr=3e-3", "rl.prompts_per_step=4",
        "rl.group_size=4", "rl.max_response_len=24", "rl.beta=0.05", "rl.updates_per_batch=2",
        "rl.rewards={test_digits: 1.0, format: 0.5}", f"data.train_path={train_path}", f"run_dir={run_dir}",
        "rollout.max_model_len=256", *overrides])
    trainer = GRPOTrainer(cfg, hf_dir)
    if strict:  # the step's device part (logprobs, updates) under check-parallel's --strict-device guard
        from megatron_r1.engine.strict import StrictDevice
        learn = trainer.learn

        def guarded(*args):
            with StrictDevice():
                return learn(*args)
        trainer.learn = guarded
    m = trainer.train_step(0)
    state = {k: v.detach().clone() for k, v in trainer.session.full_state()}
    ro = trainer.last_rollout
    trainer.session.close()
    return {"metrics": m, "state": state, "responses": ro.response_ids}


def _assert_same(a, b, what):
    assert a["responses"] == b["responses"], f"{what}: the rollouts differ, so the comparison is meaningless"
    # the loss is a mean of ±|advantage|·ratio terms of order 1 that nearly cancel (advantages sum to 0 in a
    # group): its rounding is relative to those terms, hence the floor of 1e-2 on the scale
    for key in ("loss", "kl", "clip_fraction", "grad_norm", "mismatch/mean_abs_logprob"):
        x, y = a["metrics"][key], b["metrics"][key]
        assert abs(x - y) <= REL * max(abs(y), 1e-2), f"{what}: {key} {x} vs {y}"
    for name, want in b["state"].items():
        got = a["state"][name]
        err = (got.float() - want.float()).abs().max().item()
        assert err <= REL * max(want.float().abs().max().item(), 1e-6), f"{what}: {name} off by {err}"


def test_update_shares_cover_every_row_once():
    for n, k, dp in ((16, 2, 2), (64, 16, 4), (128, 4, 1), (12, 3, 2)):
        rows = [r for rank in range(dp) for a, b in update_shares(n, k, dp, rank) for r in range(a, b)]
        assert sorted(rows) == list(range(n))
        for u in range(k):  # update u of every rank draws from mini-batch u only
            for rank in range(dp):
                a, b = update_shares(n, k, dp, rank)[u]
                assert u * n // k <= a < b <= (u + 1) * n // k
    with pytest.raises(Exception, match="updates_per_batch=3"):
        update_shares(16, 3, 1, 0)


def test_dp2_with_uneven_micro_batches_equals_dp1(tiny_policy, tmp_path):
    hf_dir, info = tiny_policy
    run = lambda world, name, ovr, strict=False: run_ranks(  # noqa: E731
        _one_step, world, hf_dir, info["train"], str(tmp_path / name), ovr, strict, timeout=600, start_method="spawn")
    (ref,) = run(1, "dp1", ["train.micro_batch_size=4"])
    assert ref["metrics"]["kl"] > 0 and ref["metrics"]["grad_norm"] > 0  # both updates moved the policy
    # dp 2 with micro-batches that do not divide a rank's share (4 rows per update: 3 + 1), against dp 1 in
    # micro-batches of 4: the dp bookkeeping and the uneven cut must both hold for losses and parameters to agree.
    # It runs its logprob pass and updates under the --strict-device guard: no tensor made off the device, no
    # host read but the allow-listed per-step metrics
    dp2 = run(2, "dp2", ["train.micro_batch_size=3"], strict=True)
    _assert_same(dp2[0], ref, "dp2, micro_batch_size=3")
    _assert_same(dp2[1], ref, "dp2 rank 1, micro_batch_size=3")
