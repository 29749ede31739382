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
