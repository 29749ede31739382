"""Rule-based math accuracy reward (R1-Zero): 1.0 if the final answer equals the reference.

Notable choices:
- The answer is the content of the last ``<answer>…</answer>`` (and, inside it, of its last
  ``\\boxed{}`` if any); without answer tags, the last ``\\boxed{…}``/``\\fbox{…}`` with
  balanced braces. A truncated (unbalanced) last box is no answer: it scores 0.
- Three tiers, cheapest first: normalised exact string match, exact rational match
  (``0.5`` = ``1/2`` = ``\\frac{1}{2}``, ``1,000`` = ``1000``, ``50\\%`` = ``50``), then symbolic
  equivalence (math-verify, else sympy) in a killable worker (verifier.py). The first two
  run in-process and never evaluate anything: a regex decides what is a number, and long
  digit strings are refused before ``Fraction`` sees them.
- Two plain numbers that differ are wrong without asking sympy; numbers compare exactly (no
  rounding), so ``0.333`` is not ``1/3``.
- A symbolic check that times out or crashes scores 0 and is logged by the verifier.
- Hedging earns nothing: several different ``\\boxed{}`` in the final answer (the last
  ``<answer>``, or the text after ``</think>``) is no answer, and an answer joining
  alternatives (``3 \\lor 4``, ``3 \\text{ or } 4``, ``\\mid``, ``\\cup``, ``\\\\``) is wrong unless the
  reference has the same connective (math-verify would otherwise compare its last part).
  Without answer tags or ``</think>``, intermediate boxes are allowed and the last one counts.
- Extraction is linear in the response length (``rfind``, no backtracking regex): a 1 MB
  response of unclosed tags takes milliseconds, not minutes.
"""

from __future__ import annotations

import os
import re
import threading
from fractions import Fraction
from typing import Sequence

from megatron_r1.rl.rewards.registry import register_reward
from megatron_r1.rl.rewards.verifier import SymbolicVerifier

MAX_SYMBOLIC_CHARS = 1000  # longer "answers" are rambling, not math; don't feed them to sympy
_MAX_NUMBER_CHARS = 64

_BOX_CMDS = ("\\boxed", "\\fbox")
_HEDGE_RE = re.compile(r"\\(?:lor|vee|land|wedge|mid|cup)(?![a-zA-Z])|\\\\|\b(?:or|and)\b")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` / ``\\fbox{…}`` (nested braces ok), or of
    ``\\boxed 5``; None if there is none or its braces never close."""
    start, cmd = max((text.rfind(c), c) for c in _BOX_CMDS)
    return _box_at(text, start, cmd) if start >= 0 else None


_BARE_RE = re.compile(r"[^\s$]*")


def _box_at(text: str, start: int, cmd: str) -> str | None:
    i = start + len(cmd)
    if text.startswith(" ", i) and not text.startswith(" {", i):  # "\boxed 5"
        return _BARE_RE.match(text, i + 1).group() or None
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _all_boxed(text: str, limit: int = 16) -> list[str]:
    """The closed boxes of ``text``, last first; at most ``limit`` tried (linear time)."""
    out, end = [], len(text)
    for _ in range(limit):
        start, cmd = max((text.rfind(c, 0, end), c) for c in _BOX_CMDS)
        if start < 0:
            break
        box = _box_at(text, start, cmd)
        if box is not None:
            out.append(box)
        end = start
    return out


def _final_box(region: str) -> str | None:
    """The box of a final-answer region; None when it hedges between different boxes."""
    normalized = [normalize_answer(b) for b in _all_boxed(region)]
    boxes = {v if (v := parse_number(n)) is not None else n for n in normalized}  # 1/2 and 0.5 agree
    return last_boxed(region) if len(boxes) <= 1 else None


def extract_answer(response: str) -> str | None:
    end = response.rfind("</answer>")
    start = response.rfind("<answer>", 0, end) if end >= 0 else -1
    if start >= 0:
        tagged = response[start + len("<answer>"):end]
        if len(_all_boxed(tagged)) > 1:
            boxed = _final_box(tagged)
            return boxed.strip() if boxed is not None else None
        boxed = last_boxed(tagged)
        return (boxed if boxed is not None else tagged).strip()
    think_end = response.rfind("</think>")
    if think_end >= 0 and len(_all_boxed(response[think_end:])) > 1:
        boxed = _final_box(response[think_end:])
        return boxed.strip() if boxed is not None else None
    boxed = last_boxed(response)
    return boxed.strip() if boxed is not None else None


def extract_reference(reference: str) -> str:
    """References may come boxed (MATH solutions) or bare (GSM8K-style numbers)."""
    boxed = last_boxed(reference)
    return (boxed if boxed is not None else reference).strip()


_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def normalize_answer(s: str) -> str:
    """Canonical spelling for string comparison; only rewrites that never change the value."""
    s = s.strip()
    for left, right in _DELIMS:
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
            break
    s = _TEXT_CMD_RE.sub(r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                     ("\\:", ""), ("\\ ", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                     ("^{\\circ}", ""), ("^\\circ", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s).rstrip(".")
    # "x=5" answers a question whose reference is "5"; single-letter lhs only, so equations
    # such as "y=2x+1" vs "2x+1" still reach the symbolic check on both sides alike.
    return re.sub(r"^[a-zA-Z]=(?=[^=])", "", s)


_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+"
_NUM_RE = re.compile(rf"(?:{_NUM})")
_SLASH_RE = re.compile(rf"({_NUM})/({_NUM})")
_FRAC_RE = re.compile(rf"([-+]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_FRAC_SHORT_RE = re.compile(r"([-+]?)\\frac(\d)(\d)")  # \frac12


def _to_fraction(num: str) -> Fraction:
    return Fraction(num.replace(",", ""))


def parse_number(s: str) -> Fraction | None:
    """Exact value of a normalised plain number, fraction or percentage; None otherwise."""
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    s = s.replace("\\%", "").rstrip("%")
    if _NUM_RE.fullmatch(s):
        return _to_fraction(s)
    for pattern in (_SLASH_RE, _FRAC_RE, _FRAC_SHORT_RE):
        m = pattern.fullmatch(s)
        if m:
            sign, num, den = m.groups() if len(m.groups()) == 3 else ("", *m.groups())
            den_value = _to_fraction(den)
            if den_value == 0:
                return None
            value = _to_fraction(num) / den_value
            return -value if sign == "-" else value
    return None


def fast_match(pred: str, gold: str) -> bool | None:
    """In-process tiers. True/False when decided, None when only sympy can tell."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p:
        return False
    if p == g:
        return True
    p_num, g_num = parse_number(p), parse_number(g)
    if p_num is not None and g_num is not None:
        return p_num == g_num
    if len(pred) > MAX_SYMBOLIC_CHARS:
        return False
    if _HEDGE_RE.search(pred) and not _HEDGE_RE.search(gold):
        return False
    return None


_default: tuple[int, SymbolicVerifier] | None = None
_default_lock = threading.Lock()  # threads scoring at once must not each start a worker


def default_verifier() -> SymbolicVerifier:
    """One single-worker verifier per process, made on first use (a forked data-loader
    worker gets its own: pipes to the parent's workers are not shared)."""
    global _default
    with _default_lock:
        if _default is None or _default[0] != os.getpid():
            _default = (os.getpid(), SymbolicVerifier(num_workers=1))
        return _default[1]


def accuracy_reward_batch(
    responses: Sequence[str],
    references: Sequence[str],
    verifier: SymbolicVerifier | None = None,
    symbolic: bool = True,
    batch_timeout: float | None = None,
) -> list[float]:
    """Fast tiers for every sample in-process, then all undecided ones to the worker pool at once."""
    scores = [0.0] * len(responses)
    pending: list[tuple[int, str, str]] = []
    for i, (response, reference) in enumerate(zip(responses, references, strict=True)):
        pred = extract_answer(response)
        if pred is None:
            continue
        gold = extract_reference(reference)
        decided = fast_match(pred, gold)
        if decided is None:
            pending.append((i, pred, gold))
        else:
            scores[i] = float(decided)
    if pending and symbolic:
        verifier = verifier or default_verifier()
        results = verifier.equivalent_many([(p, g) for _, p, g in pending], batch_timeout=batch_timeout)
        for (i, _, _), equal in zip(pending, results):
            scores[i] = 1.0 if equal else 0.0
    return scores


@register_reward("accuracy", batch_fn=accuracy_reward_batch)
def accuracy_reward(
    response: str,
    reference: str,
    verifier: SymbolicVerifier | None = None,
    symbolic: bool = True,
    batch_timeout: float | None = None,
) -> float:
    return accuracy_reward_batch([response], [reference], verifier, symbolic, batch_timeout)[0]
