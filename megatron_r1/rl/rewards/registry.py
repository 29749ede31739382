"""Reward registry and the weighted combiner the trainer calls once per rollout batch.

Notable choices:
- A reward is a pure function ``(response, reference, **kw) -> float``. It may also register
  a batch version ``(responses, references, **kw) -> list[float]`` (accuracy does, to fan the
  slow symbolic checks out over a worker pool); the combiner prefers it.
- Weights config: ``{"accuracy": 1.0, "format": 0.5}`` or, to pass options, a dict with a
  ``weight`` key: ``{"language": {"weight": 0.1, "lang": "zh"}}`` (YAML friendly).
- A reward that raises on one sample scores 0 for that sample and is counted and logged, not
  re-raised: one odd model output must not end a week-long run. Hangs are the reward's own
  job to bound (see verifier.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

logger = logging.getLogger(__name__)

RewardFn = Callable[..., float]
BatchRewardFn = Callable[..., list]


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: RewardFn
    batch_fn: BatchRewardFn | None = None


_REWARDS: dict[str, RewardSpec] = {}


def register_reward(name: str, batch_fn: BatchRewardFn | None = None):
    """Decorator: ``@register_reward("format")`` over ``def f(response, reference, **kw)``."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REWARDS and _REWARDS[name].fn is not fn:
            raise ValueError(f"reward {name!r} is already registered ({_REWARDS[name].fn.__module__})")
        _REWARDS[name] = RewardSpec(name, fn, batch_fn)
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    return get_reward_spec(name).fn


def get_reward_spec(name: str) -> RewardSpec:
    if name not in _REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(_REWARDS)}")
    return _REWARDS[name]


def list_rewards() -> list[str]:
    return sorted(_REWARDS)


@dataclass
class RewardOutput:
    total: list[float]  # weighted sum per sample, [N]
    components: dict[str, list[float]]  # unweighted score per reward per sample, [N] each
    errors: dict[str, int] = field(default_factory=dict)  # samples whose reward raised
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each reward on the batch

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Batch means for logging."""
        n = max(len(self.total), 1)
        out = {f"{prefix}total": sum(self.total) / n}
        out.update({f"{prefix}{k}": sum(v) / n for k, v in self.components.items()})
        out.update({f"{prefix}{k}_errors": float(c) for k, c in self.errors.items()})
        return out


class RewardCombiner:
    """Scores a batch with several registered rewards and sums them with weights."""

    def __init__(self, config: Mapping[str, float | Mapping[str, Any]]):
        self.weights: dict[str, float] = {}
        self.kwargs: dict[str, dict[str, Any]] = {}
        for name, value in config.items():
            get_reward_spec(name)  # fail at construction on a typo, not at step 1
            if isinstance(value, Mapping):
                opts = dict(value)
                if "weight" not in opts:
                    raise ValueError(f"reward {name!r}: options {sorted(opts)} need a 'weight' key")
                self.weights[name] = float(opts.pop("weight"))
                self.kwargs[name] = opts
            else:
                self.weights[name], self.kwargs[name] = float(value), {}

    def __call__(self, responses: Sequence[str], references: Sequence[str]) -> RewardOutput:
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        components, errors, seconds = {}, {}, {}
        for name in self.weights:
            spec = get_reward_spec(name)
            t0 = time.perf_counter()
            scores, errors[name] = self._score(spec, responses, references, self.kwargs[name])
            seconds[name] = time.perf_counter() - t0
            components[name] = scores
        total = [sum(self.weights[k] * components[k][i] for k in components) for i in range(len(responses))]
        return RewardOutput(total, components, {k: c for k, c in errors.items() if c}, seconds)

    @staticmethod
    def _score(spec: RewardSpec, responses, references, kwargs) -> tuple[list[float], int]:
        if spec.batch_fn is not None:
            try:
                return [float(s) for s in spec.batch_fn(responses, references, **kwargs)], 0
            except Exception:
                logger.exception("batch reward %r failed; scoring sample by sample", spec.name)
        scores, n_errors = [], 0
        for response, reference in zip(responses, references):
            try:
                scores.append(float(spec.fn(response, reference, **kwargs)))
            except Exception:
                if n_errors == 0:
                    logger.exception("reward %r raised; the sample scores 0", spec.name)
                scores.append(0.0)
                n_errors += 1
        return scores, n_errors
