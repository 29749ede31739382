"""Format reward: 1.0 when the response has the required tag structure, else 0.0.

Variants (``variant=``):
- ``"r1_zero"``: exactly ``<think> … </think> <answer> … </answer>``: each tag once, in that
  order, only whitespace outside them (DeepSeek-R1 paper, R1-Zero training template).
- ``"r1"``: ``<think> … </think>`` then a non-empty summary/answer text (R1 output format);
  each think tag once, only whitespace before ``<think>``.
- ``"r1_boxed"``: ``"r1"`` whose summary holds the final answer in a closed ``\\boxed{…}``: what
  the ``r1_chat`` template asks for ("put your final answer within \\boxed{}"). The answer
  tags of ``r1_zero`` are not part of it.

Each template names the variant its outputs follow (``answer_format`` in data/templates.py);
config validation refuses a ``format`` reward whose variant differs from the template's, since
a mismatch scores every well-formed output 0 and rejection sampling then keeps nothing.

``prefilled_think=True`` is for templates that end the prompt with ``<think>`` (R1's chat
template, many R1-Zero reproductions): the response then starts inside the thought, so the
tag is put back before checking. The paper's R1-Zero template ends at "Assistant:" and the
model writes ``<think>`` itself (the default).
"""

from __future__ import annotations

import re

from megatron_r1.rl.rewards.accuracy import last_boxed
from megatron_r1.rl.rewards.registry import register_reward

_R1_ZERO_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
_R1_RE = re.compile(r"\s*<think>.*?</think>(.*)", re.DOTALL)
_TAGS = {
    "r1_zero": ("<think>", "</think>", "<answer>", "</answer>"),
    "r1": ("<think>", "</think>"),
    "r1_boxed": ("<think>", "</think>"),
}


def _each_tag_once(response: str, tags: tuple[str, ...]) -> bool:
    return all(response.count(tag) == 1 for tag in tags)


@register_reward("format")
def format_reward(
    response: str, reference: str | None = None, variant: str = "r1_zero", prefilled_think: bool = False
) -> float:
    if variant not in _TAGS:
        raise ValueError(f"unknown format variant {variant!r}; choose from {sorted(_TAGS)}")
    if prefilled_think:
        response = "<think>" + response
    if not _each_tag_once(response, _TAGS[variant]):
        return 0.0
    if variant == "r1_zero":
        return float(_R1_ZERO_RE.fullmatch(response) is not None)
    m = _R1_RE.fullmatch(response)
    if m is None or m.group(1).strip() == "":
        return 0.0
    if variant == "r1_boxed":
        return float(last_boxed(m.group(1)) is not None)
    return 1.0
