"""Model-based rewards: the helpfulness and harmlessness reward models of DeepSeek-R1 §2.3.4, trained by
`megatron-r1 train-rm` and served here through the registry.

    rl.rewards / rl.routes.general:  {rm_helpful: {weight: 1.0, path: runs/rm_helpful/hf}}
    megatron-r1 score --reward rm_helpful:runs/rm_helpful/hf --input rows.jsonl --output out.jsonl

`rm_helpful` judges the final summary only, `rm_harmless` the whole response (rl/reward_model.py
`rm_text`); each refuses a reward model trained for the other kind. The score is the RM's raw scalar
(GRPO normalises rewards within each prompt's group, so its scale does not matter there).
"""
from __future__ import annotations

from megatron_r1.config import ConfigError
from megatron_r1.rl.rewards.registry import register_reward


def _check(kind: str, path: str | None = None, **_) -> None:
    """At construction: a path to a reward model of the right kind (reads rm.json only)."""
    import json
    import os
    from megatron_r1.rl.reward_model import RM_META
    if not path:
        raise ConfigError(f"rm_{kind}: needs the reward model's directory: {{weight: ..., path: DIR}} or "
                          f"rm_{kind}:DIR")
    meta = os.path.join(path, RM_META)
    if not os.path.isfile(meta):
        raise ConfigError(f"rm_{kind}: {path} is not a reward model (no {RM_META}); train one with "
                          f"`megatron-r1 train-rm --kind {kind}`")
    found = json.load(open(meta)).get("kind")
    if found != kind:
        raise ConfigError(f"rm_{kind}: {path} is a {found!r} reward model (its {RM_META})")


def _load(path: str, **_) -> None:
    """At construction (trainer, score): load the model once, so a broken checkpoint is an error at start."""
    from megatron_r1.rl.reward_model import load_reward_model
    load_reward_model(path)


def _score(kind: str, responses, references, *, path: str | None = None, prompts=None):
    from megatron_r1.rl.reward_model import load_reward_model
    if not path:
        raise ConfigError(f"rm_{kind}: needs the reward model's directory: {{weight: ..., path: DIR}} or "
                          f"rm_{kind}:DIR")
    rm = load_reward_model(path)
    if rm.kind != kind:
        raise ConfigError(f"rm_{kind}: {path} is a {rm.kind!r} reward model (its rm.json)")
    return rm.score(prompts if prompts is not None else [""] * len(responses), list(responses))


def rm_helpful_batch(responses, references, path=None, prompts=None):
    return _score("helpful", responses, references, path=path, prompts=prompts)


def rm_harmless_batch(responses, references, path=None, prompts=None):
    return _score("harmless", responses, references, path=path, prompts=prompts)


@register_reward("rm_helpful", batch_fn=rm_helpful_batch, needs_prompt=True, arg="path",
                 check=lambda **kw: _check("helpful", **kw), prepare=lambda **kw: _load(**kw))
def rm_helpful(response, reference, path=None, prompt=""):
    return rm_helpful_batch([response], [reference], path=path, prompts=[prompt])[0]


@register_reward("rm_harmless", batch_fn=rm_harmless_batch, needs_prompt=True, arg="path",
                 check=lambda **kw: _check("harmless", **kw), prepare=lambda **kw: _load(**kw))
def rm_harmless(response, reference, path=None, prompt=""):
    return rm_harmless_batch([response], [reference], path=path, prompts=[prompt])[0]
