"""Language-consistency reward (DeepSeek-R1 §2.3.2): the share of chain-of-thought words
written in the target language, in [0, 1].

Notable choices:
- The chain of thought is the text inside ``<think>…</think>`` (up to the end if the tag never
  closes; the whole response if there is no ``<think>``).
- A "word" is a run of letters; digits, punctuation and LaTeX symbols are not words, so
  equations neither help nor hurt. Han characters count one word each, since Chinese has
  no spaces to split on; ``zh`` target therefore weighs per character.
- Math symbols are not words either: a lone Greek letter (``π``, ``θ``, ``Δ``), letter-like
  symbols (``ℝ``, ``ℕ``) and mathematical alphanumerics (``𝑥``). A run of two or more Greek
  letters is a Greek word.
- Script first, then vocabulary: ``zh`` is Han characters. ``en`` is unaccented Latin letters
  in a sentence that is not written in another Latin-script language; a sentence is French,
  German, Spanish, Italian, Portuguese or Dutch when it holds more of those languages'
  function words (le, und, el, che, não, het, …) than English ones. A sentence with neither
  (``x equals 5``) stays English. Accented letters (é, ß, ñ) are not English. LaTeX command
  names (``\\frac``) count as English.
- No words at all scores 0: an empty thought must not collect the bonus.
- ``lang="auto"`` scores the share of the thought's *dominant* language (en or zh): 1 for a
  thought in one language, lower the more it mixes. The paper's target is the prompt's
  language; a reward sees only (response, reference), so on a bilingual prompt set, where one
  fixed target would punish every answer to the other half, "auto" measures the consistency
  the paper is after. It cannot see a whole answer written in the wrong language; the eval's
  language rate (eval/runner.py) checks against each prompt's own ``lang``.
"""

from __future__ import annotations

import re
from typing import Callable

from megatron_r1.rl.rewards.registry import register_reward

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_GREEK = "\u0370-\u03ff\u1f00-\u1fff"
_MATH_LETTERS = "\u2100-\u214f\U0001d400-\U0001d7ff"  # letterlike symbols, math alphanumerics
_WORD_RE = re.compile(rf"[{_HAN}]|[{_GREEK}]+|[^\W\d_{_HAN}{_GREEK}{_MATH_LETTERS}]+")
_SENTENCE_RE = re.compile(r"(?<=[.!?;。！？])\s+|\n+")
_THINK_RE = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)

# Frequent function words, none of them an English word, so one of them in a sentence is
# evidence for another Latin-script language; English ones are the counter-evidence.
_EN_WORDS = frozenset(
    "the and is are of to we this that it so then with for let be which not have has was were will can "
    "if from by at there their what when how each our us you they these those would should could must "
    "into than its because since therefore thus".split())
_OTHER_LATIN_WORDS = frozenset(
    # fr
    "le la les de en un des du une est et nous que qui pour dans avec pas sont donc alors cette ce sur par "
    "ou mais je vous être avons deux aussi "
    # de
    "der das und ist nicht ein eine wir zu mit von auf dass sich dem des ich sie sind wenn oder "
    "auch nach wie dann noch diese zwei "
    # es / pt
    "el los las del una por para con es pero como esto este esta entonces tenemos sumamos "
    "não uma os em dos das então são isso mas "
    # it
    "il che di della delle sono questo questa quindi abbiamo anche gli "
    # nl
    "het een niet zijn dat deze voor met ook wij".split()) - _EN_WORDS


def _is_english(word: str) -> bool:
    return word.isascii()


def _is_han(word: str) -> bool:
    return len(word) == 1 and bool(re.match(f"[{_HAN}]", word))


SCRIPTS: dict[str, Callable[[str], bool]] = {"en": _is_english, "zh": _is_han}


def chain_of_thought(response: str) -> str:
    m = _THINK_RE.search(response)
    return m.group(1) if m else response


def _words(text: str) -> list[str]:
    return [w for w in _WORD_RE.findall(text) if not (len(w) == 1 and re.match(f"[{_GREEK}]", w))]


def _other_latin(words: list[str]) -> bool:
    """Is this sentence written in a Latin-script language other than English?"""
    lower = [w.lower() for w in words]
    return sum(w in _OTHER_LATIN_WORDS for w in lower) > sum(w in _EN_WORDS for w in lower)


def language_share(text: str, lang: str) -> float:
    if lang == "auto":
        return max(language_share(text, code) for code in SCRIPTS)
    if lang not in SCRIPTS:
        raise ValueError(f"unknown language {lang!r}; choose from {sorted(SCRIPTS)} or 'auto'")
    in_lang = SCRIPTS[lang]
    total = hits = 0
    for sentence in _SENTENCE_RE.split(text):
        words = _words(sentence)
        total += len(words)
        if lang == "en" and _other_latin(words):
            continue
        hits += sum(in_lang(w) for w in words)
    return hits / total if total else 0.0


@register_reward("language")
def language_reward(response: str, reference: str | None = None, lang: str = "en") -> float:
    return language_share(chain_of_thought(response), lang)
