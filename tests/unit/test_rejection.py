"""Acceptance rules of rejection sampling (megatron_r1/rl/rejection.py), without vLLM."""
import pytest

from megatron_r1.config import ConfigError
from megatron_r1.rl.rejection import parse_min_scores, select


def test_select_keeps_passing_untruncated_distinct_best_first():
    # two prompts × 4 samples
    texts = ["a", "b", "b", "c", "d", "e", "f", "g"]
    trunc = [False, False, False, True, False, False, False, False]
    acc = [1, 1, 1, 1, 0, 0, 0, 0]
    fmt = [1, 1, 1, 1, 1, 1, 1, 1]
    total = [1.0, 2.0, 2.0, 3.0, 0, 0, 0, 0]
    kept = select(texts, trunc, total, {"accuracy": acc, "format": fmt}, 4, {"accuracy": 1.0, "format": 1.0}, 2)
    assert kept == [[1, 0], []]  # best total first; the duplicate "b" once; truncated "c" dropped
    assert select(texts, trunc, total, {"accuracy": acc, "format": fmt}, 4, {"accuracy": 1.0}, 1,
                  keep_truncated=True) == [[3], []]
    assert select(texts, trunc, total, {"accuracy": acc, "format": fmt}, 4, {"accuracy": 0.0}, 4)[1] == [4, 5, 6, 7]


def test_min_scores_default_to_perfect_and_reject_unknown_rewards():
    rewards = {"accuracy": 1.0, "language": {"weight": 0.1, "lang": "en"}}
    assert parse_min_scores([], rewards) == {"accuracy": 1.0, "language": 1.0}
    assert parse_min_scores(["language=0.9"], rewards) == {"accuracy": 1.0, "language": 0.9}
    with pytest.raises(ConfigError, match="format"):
        parse_min_scores(["format=1"], rewards)
    with pytest.raises(ConfigError, match="not a number"):
        parse_min_scores(["accuracy=high"], rewards)


R1_STAGE_CONFIGS = ["examples/r1_reasoning_rl_671b.yaml", "examples/r1_rejection_sampling_671b.yaml",
                    "examples/r1_general_rl_671b.yaml"]


@pytest.mark.parametrize("path", R1_STAGE_CONFIGS)
def test_r1_stage_configs_keep_r1_style_correct_outputs(path):
    """The template's own output format passes the configured format reward, so rejection sampling
    with its default thresholds keeps a right, well-formed, one-language sample."""
    from megatron_r1.config import load_config, validate_rewards
    from megatron_r1.data.templates import render_prompt
    from megatron_r1.rl.rewards import RewardCombiner

    cfg = load_config(path)
    validate_rewards(cfg.rl)
    assert "boxed" in render_prompt(cfg.rl.template, "What is 3 + 4?")
    good = "<think>\nAdd three and four: the sum is seven.\n</think>\nThe sum is $\\boxed{7}$."
    wrong = "<think>\nAdd three and four: the sum is eight.\n</think>\nThe sum is $\\boxed{8}$."
    unboxed = "<think>\nAdd three and four: the sum is seven.\n</think>\nThe sum is 7."
    scored = RewardCombiner(cfg.rl.rewards)([good, wrong, unboxed], ["7"] * 3)
    assert scored.components["format"] == [1.0, 1.0, 0.0]
    kept = select([good, wrong, unboxed], [False] * 3, scored.total, scored.components, 3,
                  parse_min_scores([], cfg.rl.rewards), keep_per_prompt=3)
    assert kept == [[0]]


def test_template_and_format_variant_must_agree():
    from megatron_r1.config import load_config, validate_rewards

    cfg = load_config("examples/r1_rejection_sampling_671b.yaml", ["rl.rewards.format=1.0"])
    with pytest.raises(ConfigError, match="r1_boxed"):
        validate_rewards(cfg.rl)
    cfg = load_config("examples/r1_zero_tiny.yaml")
    validate_rewards(cfg.rl)  # r1_zero template, default r1_zero variant
