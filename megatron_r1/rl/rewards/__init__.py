"""Rule-based rewards (R1-Zero): math accuracy, format, language consistency, code execution; and the
model-based helpfulness / harmlessness rewards (rewards/model.py) of the general RL stage.

Importing this package registers every built-in reward; ``RewardCombiner`` turns a weights
config into per-component and total scores for a rollout batch.
"""

from megatron_r1.rl.rewards.registry import (
    RewardCombiner,
    RewardOutput,
    RewardRouter,
    get_reward,
    list_rewards,
    register_reward,
)
from megatron_r1.rl.rewards.accuracy import accuracy_reward, accuracy_reward_batch, extract_answer
from megatron_r1.rl.rewards.code import code_reward, code_reward_batch
from megatron_r1.rl.rewards.formatting import format_reward
from megatron_r1.rl.rewards.language import language_reward
from megatron_r1.rl.rewards.model import rm_harmless, rm_helpful
from megatron_r1.rl.rewards.verifier import SymbolicVerifier

__all__ = [
    "RewardCombiner",
    "RewardOutput",
    "RewardRouter",
    "SymbolicVerifier",
    "accuracy_reward",
    "accuracy_reward_batch",
    "code_reward",
    "code_reward_batch",
    "extract_answer",
    "format_reward",
    "get_reward",
    "language_reward",
    "list_rewards",
    "register_reward",
    "rm_harmless",
    "rm_helpful",
]
