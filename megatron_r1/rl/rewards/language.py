"""Language-consistency reward (DeepSeek-R1 §2.3.2): the share of chain-of-thought words
written in the target language, in [0, 1].

Notable choices:
- The chain of thought is the text inside ``<think>…</think>`` (up to the end if the tag never
  closes; the whole response if there is no ``<think>``).
- A "word" is a run of letters; digits, punctuation and LaTeX symbols are not words, so
  equations neither help nor hurt. Han characters count one word each, since Chinese has
  no spaces to split on; ``zh`` target therefore weighs per character.
- Script, not vocabulary, decides the language ("en" = Latin letters), as in the paper's
  proportion-of-target-language-words; LaTeX command names (``\\frac``) count as Latin.
- No words at all scores 0: an empty thought must not collect the bonus.
"""

from __future__ import annotations

import re
from typing import Callable

from megatron_r1.rl.rewards.registry import register_reward

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD_RE = re.compile(rf"[{_HAN}]|[^\W\d_{_HAN}]+")
_THINK_RE = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


def _is_latin(word: str) -> bool:
    # Basic Latin through Latin Extended-B plus Latin Extended Additional (Vietnamese).
    return all(c < "\u0250" or "\u1e00" <= c <= "\u1eff" for c in word)


def _is_han(word: str) -> bool:
    return len(word) == 1 and bool(re.match(f"[{_HAN}]", word))


SCRIPTS: dict[str, Callable[[str], bool]] = {"en": _is_latin, "zh": _is_han}


def chain_of_thought(response: str) -> str:
    m = _THINK_RE.search(response)
    return m.group(1) if m else response


def language_share(text: str, lang: str) -> float:
    if lang not in SCRIPTS:
        raise ValueError(f"unknown language {lang!r}; choose from {sorted(SCRIPTS)}")
    words = _WORD_RE.findall(text)
    if not words:
        return 0.0
    in_lang = SCRIPTS[lang]
    return sum(in_lang(w) for w in words) / len(words)


@register_reward("language")
def language_reward(response: str, reference: str | None = None, lang: str = "en") -> float:
    return language_share(chain_of_thought(response), lang)
