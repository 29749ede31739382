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
- A reward registered with ``needs_prompt=True`` (the reward models) also receives
  ``prompts=[...]``, the user prompt of each sample. One registered with ``arg="path"`` may be
  named ``NAME:VALUE`` in a config or on the command line (``rm_helpful:runs/rm/hf``), which
  passes ``path=VALUE``.
- ``RewardRouter`` routes each sample by its prompt's task type: ``rl.routes`` maps a task
  (``general``) to its own rewards mapping; every other task uses ``rl.rewards``. A GRPO group
  is one prompt, so one route: group-normalised advantages never compare a rule reward with a
  reward-model score.
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
    needs_prompt: bool = False  # called with prompts=[...] too
    arg: str | None = None  # "NAME:VALUE" passes VALUE as this keyword
    check: Callable[..., None] | None = None  # check(**options): cheap (the dry run calls it)
    prepare: Callable[..., None] | None = None  # prepare(**options) at construction (loads a reward model):
    # bad options or files fail before step 1, not as zero scores at every step


_REWARDS: dict[str, RewardSpec] = {}


def register_reward(name: str, batch_fn: BatchRewardFn | None = None, needs_prompt: bool = False,
                    arg: str | None = None, check: Callable[..., None] | None = None,
                    prepare: Callable[..., None] | None = None):
    """Decorator: ``@register_reward("format")`` over ``def f(response, reference, **kw)``."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REWARDS and _REWARDS[name].fn is not fn:
            raise ValueError(f"reward {name!r} is already registered ({_REWARDS[name].fn.__module__})")
        _REWARDS[name] = RewardSpec(name, fn, batch_fn, needs_prompt, arg, check, prepare)
        return fn

    return decorator


def split_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"rm_helpful:DIR"`` -> ("rm_helpful", {"path": "DIR"}) for a reward registered with ``arg="path"``;
    a plain name -> (name, {}). KeyError for an unknown reward."""
    base, sep, value = name.partition(":")
    spec = get_reward_spec(base)
    if not sep:
        return base, {}
    if spec.arg is None:
        raise KeyError(f"reward {base!r} takes no ':' argument (got {name!r})")
    return base, {spec.arg: value}


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
        """Batch means for logging (a routed component: the mean over its route's samples)."""
        n = max(len(self.total), 1)
        out = {f"{prefix}total": sum(self.total) / n}
        out.update({f"{prefix}{k}": component_mean(v) for k, v in self.components.items()})
        out.update({f"{prefix}{k}_errors": float(c) for k, c in self.errors.items()})
        return out


def component_mean(scores: Sequence[float | None]) -> float:
    """Mean over the samples a component scored (None: the sample went to another route)."""
    xs = [x for x in scores if x is not None]
    return sum(xs) / len(xs) if xs else 0.0


class RewardCombiner:
    """Scores a batch with several registered rewards and sums them with weights."""

    def __init__(self, config: Mapping[str, float | Mapping[str, Any]]):
        self.weights: dict[str, float] = {}
        self.kwargs: dict[str, dict[str, Any]] = {}
        self.specs: dict[str, RewardSpec] = {}
        for full, value in config.items():
            name, kw = split_name(full)  # fail at construction on a typo, not at step 1
            if name in self.weights:
                raise ValueError(f"reward {name!r} is given twice ({full!r})")
            self.specs[name] = get_reward_spec(name)
            if isinstance(value, Mapping):
                opts = dict(value)
                if "weight" not in opts:
                    raise ValueError(f"reward {full!r}: options {sorted(opts)} need a 'weight' key")
                self.weights[name] = float(opts.pop("weight"))
                self.kwargs[name] = {**kw, **opts}
            else:
                self.weights[name], self.kwargs[name] = float(value), kw
            spec = self.specs[name]
            if spec.check is not None:
                spec.check(**self.kwargs[name])
            if spec.prepare is not None:
                spec.prepare(**self.kwargs[name])

    def __call__(self, responses: Sequence[str], references: Sequence[str],
                 prompts: Sequence[Any] | None = None) -> RewardOutput:
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        components, errors, seconds = {}, {}, {}
        for name in self.weights:
            spec = self.specs[name]
            kwargs = self.kwargs[name]
            if spec.needs_prompt:
                kwargs = dict(kwargs, prompts=list(prompts) if prompts is not None else [""] * len(responses))
            t0 = time.perf_counter()
            scores, errors[name] = self._score(spec, responses, references, kwargs)
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
        prompts = kwargs.pop("prompts", None) if spec.needs_prompt else None
        for i, (response, reference) in enumerate(zip(responses, references)):
            try:
                kw = dict(kwargs, prompt=prompts[i]) if prompts is not None else kwargs
                scores.append(float(spec.fn(response, reference, **kw)))
            except Exception:
                if n_errors == 0:
                    logger.exception("reward %r raised; the sample scores 0", spec.name)
                scores.append(0.0)
                n_errors += 1
        return scores, n_errors


class RewardRouter:
    """Per-prompt reward routing: `routes` maps a task type to a rewards mapping; a sample whose task has
    no route is scored by `default` (``rl.rewards``). Components of the default route keep their names;
    another route's are ``"<task>/<reward>"`` and hold None for samples of other routes; ``"route/<task>"``
    (and ``"route/default"``) is each route's weighted total on its samples."""

    DEFAULT = "default"

    def __init__(self, default: Mapping[str, Any], routes: Mapping[str, Mapping[str, Any]] | None = None):
        self.routes = {self.DEFAULT: RewardCombiner(default)}
        for task, cfg in (routes or {}).items():
            if task == self.DEFAULT:
                raise ValueError(f"rl.routes: {task!r} is reserved (it is rl.rewards)")
            self.routes[task] = RewardCombiner(cfg)

    @property
    def routed(self) -> bool:
        return len(self.routes) > 1

    def route_of(self, task: str | None) -> str:
        return task if task in self.routes else self.DEFAULT

    def __call__(self, responses: Sequence[str], references: Sequence[Any], tasks: Sequence[str | None] | None = None,
                 prompts: Sequence[Any] | None = None) -> RewardOutput:
        n = len(responses)
        if not self.routed:
            return self.routes[self.DEFAULT](responses, references, prompts)
        if tasks is None or len(tasks) != n:
            raise ValueError(f"routed rewards need one task per sample ({n} samples)")
        route = [self.route_of(t) for t in tasks]
        total: list[float] = [0.0] * n
        components: dict[str, list] = {}
        errors: dict[str, int] = {}
        seconds: dict[str, float] = {}
        for name, combiner in self.routes.items():
            idx = [i for i, r in enumerate(route) if r == name]
            prefix = "" if name == self.DEFAULT else f"{name}/"
            keys = [f"{prefix}{k}" for k in combiner.weights] + [f"route/{name}"]
            for k in keys:
                components[k] = [None] * n
            if not idx:
                continue
            out = combiner([responses[i] for i in idx], [references[i] for i in idx],
                           [prompts[i] for i in idx] if prompts is not None else None)
            for j, i in enumerate(idx):
                total[i] = out.total[j]
                components[f"route/{name}"][i] = out.total[j]
                for k, v in out.components.items():
                    components[f"{prefix}{k}"][i] = v[j]
            errors.update({f"{prefix}{k}": c for k, c in out.errors.items()})
            seconds.update({f"{prefix}{k}": c for k, c in out.seconds.items()})
        return RewardOutput(total, components, errors, seconds)
