"""Readability of a reasoning sample (DeepSeek-R1 §2.3.1 cold start, §2.3.3 rejection sampling).

    problem = unreadable(response, lang="zh", max_paragraph_chars=1000)  # None when readable

Notable choices
- The readable R1 format is ``<think> reasoning </think> summary``: the paper's
  ``|special_token|<reasoning_process>|special_token|<summary>`` with the two special tokens being the
  ``<think>``/``</think>`` pair our tokenizers already hold as single pieces (data/tokenizer.py THINK_TAGS),
  so no new vocabulary rows are needed and the format reward's ``r1``/``r1_boxed`` variants read it as is.
- The paper's filters, in the order checked, each a reason string so callers can count them:
  ``markup`` (the think pair not exactly once, R1-Zero's ``<answer>`` tags or an empty summary),
  ``mixed_language`` (the thought's share of words in the prompt's language below ``min_language``;
  ``lang=None`` uses the thought's dominant language), ``code_block`` (a fenced ````` block: arithmetic
  reasoning has no code), ``long_paragraph`` (a paragraph, text between blank lines, over
  ``max_paragraph_chars``).
- The prompt's language: the row's ``lang`` field when it has one, else Chinese when the question holds
  Han characters (``prompt_language``).
"""
from __future__ import annotations

import re

from megatron_r1.rl.rewards.formatting import format_reward
from megatron_r1.rl.rewards.language import _HAN, chain_of_thought, language_share

FILTERS = ("markup", "mixed_language", "code_block", "long_paragraph")
_HAN_RE = re.compile(f"[{_HAN}]")


def prompt_language(question, lang: str | None = None) -> str:
    if lang:
        return lang
    text = question if isinstance(question, str) else " ".join(m["content"] for m in question)
    return "zh" if _HAN_RE.search(text) else "en"


def unreadable(response: str, lang: str | None = None, *, min_language: float = 1.0,
               max_paragraph_chars: int = 1000, markup: bool = True) -> str | None:
    """The first filter (FILTERS) the response fails, or None. `markup=False` leaves the format to the
    caller (rejection sampling scores it with the template's own format reward)."""
    if markup and (format_reward(response, variant="r1") != 1.0 or "<answer>" in response or "</answer>" in response):
        return "markup"
    if language_share(chain_of_thought(response), lang or "auto") < min_language:
        return "mixed_language"
    if "```" in response:
        return "code_block"
    if any(len(p) > max_paragraph_chars for p in re.split(r"\n\s*\n", response)):
        return "long_paragraph"
    return None
