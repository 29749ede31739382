"""Two GRPO steps on two ranks (dp2) with a co-located vLLM engine per rank.

The policy is a random tiny-moe with the project's own tokenizer. A test reward (share of digit
characters in the response) varies within every group, so the policy gradient is not zero and the
update must change the weights. Checks: every metric finite, the weights changed, vLLM and the
trainer agree on the sampled tokens' logprobs (same weights, float32), before and after a sync.
"""
import json
import math

import torch

from megatron_r1.parallel.spawn import run_ranks


def _digits(response, reference=None):
    return sum(c.isdigit() for c in response) / max(len(response), 1)


def _grpo_two_steps(hf_dir, train_path, run_dir, eval_path):
    from megatron_r1.config import load_config
    from megatron_r1.data.prompts import load_prompts
    from megatron_r1.rl.rewards import register_reward
    from megatron_r1.rl.trainer import GRPOTrainer
    register_reward("test_digits")(_digits)
    cfg = load_config("examples/r1_zero_tiny.yaml", [
        "model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
        "model.moe_intermediate_size=32", "train.train_steps=2", "train.lr=3e-3", "train.micro_batch_size=4",
        "rl.prompts_per_step=4", "rl.group_size=4", "rl.max_response_len=24", "rl.beta=0.01",
        "rl.rewards={test_digits: 1.0, format: 0.5}", f"data.train_path={train_path}", f"run_dir={run_dir}",
        "rollout.max_model_len=256"])
    trainer = GRPOTrainer(cfg, hf_dir, eval_set=list(load_prompts(eval_path))[:3])
    before = {k: v.clone() for k, v in trainer.session.full_state()}
    history = trainer.fit(eval_every=2)
    after = dict(trainer.session.full_state())
    changed = max((after[k].float() - before[k].float()).abs().max().item() for k in before)
    trainer.session.close()
    return history, changed


def test_two_grpo_steps_on_two_ranks(tiny_policy, tmp_path):
    hf_dir, info = tiny_policy
    results = run_ranks(_grpo_two_steps, 2, hf_dir, info["train"], str(tmp_path / "run"), info["eval"], timeout=600,
                        start_method="spawn")
    (hist0, changed0), (hist1, changed1) = results
    assert len(hist0) == 2
    for step in hist0:
        bad = {k: v for k, v in step.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
        assert step["reward/test_digits"] > 0
        # same float32 weights in vLLM and the trainer: the sampled tokens' logprobs agree
        assert step["mismatch/max_abs_logprob"] < 1e-3, step
    assert hist0[0]["grad_norm"] > 0
    assert changed0 > 0 and changed0 == changed1  # both ranks hold the same (updated) weights
    local = ("time/", "tokens_per_s", "sync/")  # wall-clock measurements are per rank
    same = lambda h: [{k: v for k, v in m.items() if not k.startswith(local)} for m in h]  # noqa: E731
    assert same(hist0) == same(hist1)  # everything else is reduced over ranks: identical everywhere
    # the held-out eval runs before the first step (the starting policy) and at the last one
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2], rows
    assert set(rows[0]) == {"step", "time", "eval/pass@1", "eval/cons@2", "eval/format", "eval/response_length",
                            "eval/temperature", "eval/top_p", "eval/language"}, rows[0]
    assert "eval/pass@1" not in rows[1] and "eval/pass@1" in rows[2]
