"""Every RL option of issue 16 that is wired into the trainer runs in a real GRPO step (vLLM rollout, rewards,
old/ref logprobs, update, sync) on CPU: GSPO, CISPO, dual-clip PPO, truncated and masked importance
sampling at token and sequence level, PPO epochs, DAPO dynamic sampling with refill, rollout routing
replay (R3: the engine's routes replayed in both passes), and token-budget packing with chunked logprobs. One engine serves all steps (the options are
switched between steps; it is built returning routes), so the test costs one vLLM start."""
import dataclasses
import math

from megatron_r1.parallel.spawn import run_ranks

STEPS = [
    dict(policy_loss="gspo", loss_agg="seq_mean_token_mean", eps_low=3e-4, eps_high=4e-4, rollout_is="tis",
         rollout_is_level="token"),
    dict(policy_loss="cispo", rollout_is="mis", rollout_is_level="sequence", rollout_is_cap=1.5),
    dict(policy_loss="ppo", dual_clip_c=3.0, ppo_epochs=2, rollout_is="tis", rollout_is_level="sequence"),
    dict(dynamic_sampling=True, dynamic_sampling_max_rounds=2),
    dict(routing_replay="all", rollout_is="tis"),
    # micro-batches packed to a token budget, logprobs in chunks of 16 tokens (recomputed in backward)
    dict(pack_tokens=64, logprob_chunk_tokens=16),
]


def _odd_length(response, reference=None):
    """A coin flip per sample: with groups of 2, about half the groups are all-equal, so refill runs."""
    return float(len(response) % 2)


def _steps(hf_dir, train_path, run_dir):
    from megatron_r1.config import load_config, validate
    from megatron_r1.rl.rewards import register_reward
    from megatron_r1.rl.trainer import GRPOTrainer
    register_reward("test_odd_length")(_odd_length)
    cfg = load_config("examples/r1_zero_tiny.yaml", [
        "model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
        "model.moe_intermediate_size=32", "train.train_steps=4", "train.lr=3e-3", "rl.prompts_per_step=4",
        "rl.group_size=2", "rl.max_response_len=16", "rl.beta=0.01", "rl.updates_per_batch=2",
        "rl.rewards={test_odd_length: 1.0}", f"data.train_path={train_path}", f"run_dir={run_dir}",
        "rollout.max_model_len=256", "train.micro_batch_size=4", "rl.routing_replay=all"])
    trainer = GRPOTrainer(cfg, hf_dir)  # an engine that returns routes; the steps without replay ignore them
    base_rl = dataclasses.replace(cfg.rl, routing_replay="none")
    out = []
    for step, opts in enumerate(STEPS):
        trainer.cfg.rl = dataclasses.replace(base_rl, **opts)
        validate(trainer.cfg, 1, rl=True)
        out.append(trainer.train_step(step))
    trainer.session.close()
    return out


def test_every_option_runs_a_grpo_step(tiny_policy, tmp_path):
    hf_dir, info = tiny_policy
    (hist,) = run_ranks(_steps, 1, hf_dir, info["train"], str(tmp_path / "run"), timeout=900, start_method="spawn")
    for opts, m in zip(STEPS, hist):
        bad = {k: v for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, (opts, bad)
        assert m["kept_groups"] > 0, (opts, m)
        assert m["ratio/min"] <= m["ratio/mean"] + 1e-6 and m["ratio/mean"] <= m["ratio/max"] + 1e-6, (opts, m)
        assert 0 <= m["clip_fraction/low"] + m["clip_fraction/high"] <= 1 + 1e-6
        if opts.get("rollout_is"):
            # float32 engine and trainer: the importance weights are ~1, nothing truncated or masked
            assert abs(m["rollout_is/weight_mean"] - 1) < 1e-2 and m["rollout_is/clipped_frac"] == 0, m
            assert m["rollout_is/ratio_min"] <= 1 + 1e-3 and m["rollout_is/ratio_max"] >= 1 - 1e-3
        else:
            assert "rollout_is/weight_mean" not in m
    for opts, m in zip(STEPS, hist):
        assert ("routing/flip_frac" in m) == ("routing_replay" in opts), (opts, m)
    # float32 engine and trainer: the trainer's own top-k agrees with vLLM's routes but for rare near-ties
    r3 = hist[4]
    assert r3["routing/pairs"] >= 8 * 10 and 0 <= r3["routing/flip_frac"] < 0.05, r3  # 8 samples, 1 MoE layer
    assert r3["mismatch/mean_abs_logprob"] < 1e-3, r3
    # GSPO's sequence-level clip range is tiny, so on a second mini-batch update most tokens clip
    assert hist[0]["clip_fraction"] >= 0
    # dynamic sampling reported its refill rounds (0..2) and the share of informative groups it kept
    ds = hist[3]
    assert 0 <= ds["dynamic_sampling/extra_rounds"] <= 2
    assert ds["dynamic_sampling/extra_rounds"] >= 1 or ds["kept_groups"] == 1.0, ds  # refilled when short
