"""Synthetic arithmetic task: problems, worked solutions, a noisy R1-Zero pretraining corpus.

The tiny-model demo needs a base model that *sometimes* reasons correctly in the R1-Zero format,
so GRPO has something to reinforce. Everything here is built for that:

- Problems are `+ - *` expressions over small integers (`ArithConfig`, or a `DIFFICULTY` preset).
  Every product has one factor <= `max_mul_factor` and every intermediate result is >= 0, so the
  worked solution is always a single column pass with carries or borrows, never long
  multiplication or negative numbers.
- The worked solution is column-wise, one sentence per column ("3 + 8 = 11, carry 1."), with
  `*` evaluated before `+ -`. A small model can do one-digit facts plus copying; it cannot add
  two-digit numbers in one step reliably. Columns with nothing to do (a lone digit, no carry)
  are skipped because they are a copy.
- The template corpus mixes completion kinds (`NoiseMix`): `clean` (right reasoning, right
  answer, right format), `slip` (one column fact off by one, propagated consistently to a wrong
  final answer), `format` (right reasoning, broken format: no tags, answer outside the tags,
  no <think>, unclosed <think>) and `bare` (the answer with no reasoning, half of them tagged).
  A base model that imitates this mix is right well under half the time, yet correct reasoning
  in the correct format is its most common mode: that is the headroom R1-Zero GRPO exploits.
  The default weights (0.3 / 0.1 / 0.3 / 0.3) were measured against 0.35 / 0.2 / 0.25 / 0.2
  (benchmarks/r1_zero_tiny.md): with one slip in four reasoned completions, 40-60 GRPO steps
  learned the format but not fewer slips; with one in seven the base reasons right more often
  and GRPO also lifts the accuracy of the reasoned answers.
- Untemplated worked solutions (`plain_fraction`) are always correct: more arithmetic per token
  (no ~80-token template prefix) and correct facts outnumber slips.
- Problems are identified by their expression ("23 + 48"). The held-out eval set is drawn first
  and excluded from the RL train prompts *and* from the pretraining corpus, so eval accuracy
  measures generalisation, not recall.
- Bilingual mode (`Languages`, off by default so the R1-Zero data stay byte-identical): a share of
  the problems is posed in Chinese ("23 + 48 等于多少？") with a Chinese worked solution ("3 加 8 得 11，
  进 1。 ... 所以 23 + 48 = 71。"), and a share of the reasoned completions switches language at a
  sentence boundary mid-CoT. That gives the R1 pipeline language mixing to measure and to train away
  (rl/rewards/language.py counts Han characters as Chinese words, ASCII words as English).
- Everything is a pure function of an integer seed (one `random.Random` per purpose, seeded by
  a string, which Python hashes deterministically).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

OPS = "+-*"


@dataclass(frozen=True)
class ArithConfig:
    min_operands: int = 2
    max_operands: int = 3
    max_value: int = 99  # operands of + and - are drawn from 1..max_value
    ops: str = "+-"  # subset of "+-*"
    max_mul_factor: int = 9  # right factor of every product is drawn from 2..max_mul_factor

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(f"need 2 <= min_operands={self.min_operands} <= max_operands={self.max_operands}")
        if not self.ops or set(self.ops) - set(OPS):
            raise ValueError(f"ops={self.ops!r} must be a non-empty subset of {OPS!r}")
        if self.max_value < 1 or not 2 <= self.max_mul_factor <= 9:
            raise ValueError(f"need max_value >= 1 and 2 <= max_mul_factor={self.max_mul_factor} <= 9")


# Roughly increasing length of the worked solution. 0-1 fit the CPU demo's budget.
DIFFICULTY = {
    0: ArithConfig(min_operands=2, max_operands=2, ops="+"),
    1: ArithConfig(min_operands=2, max_operands=2, ops="+-"),
    2: ArithConfig(min_operands=2, max_operands=3, ops="+-"),
    3: ArithConfig(min_operands=2, max_operands=3, ops="+-*"),
}


LANGS = ("en", "zh")


@dataclass(frozen=True)
class Languages:
    """Bilingual task mix: `zh` of the problems posed in Chinese; `switch` of the reasoned
    completions change language once, at a sentence boundary, mid-CoT (the mixing R1 trains away)."""

    zh: float = 0.0
    switch: float = 0.0

    def __post_init__(self):
        if not (0 <= self.zh <= 1 and 0 <= self.switch <= 1):
            raise ValueError(f"Languages fractions must be in [0, 1], got {self}")

    @property
    def bilingual(self) -> bool:
        return self.zh > 0


@dataclass(frozen=True)
class Problem:
    expression: str  # "23 + 48 - 5"; the problem's identity
    answer: str  # "66"
    lang: str = "en"  # the language the question is posed in (LANGS)

    @property
    def question(self) -> str:
        return f"{self.expression} 等于多少？" if self.lang == "zh" else f"What is {self.expression}?"

    def posed_in(self, lang: str) -> "Problem":
        if lang not in LANGS:
            raise ValueError(f"unknown language {lang!r}; choose from {LANGS}")
        return Problem(self.expression, self.answer, lang)


def sample_problem(rng: random.Random, cfg: ArithConfig) -> Problem:
    """Rejection-samples until every subtraction stays >= 0 (usually a few tries)."""
    while True:
        n = rng.randint(cfg.min_operands, cfg.max_operands)
        ops = [rng.choice(cfg.ops) for _ in range(n - 1)]
        nums = [rng.randint(1, cfg.max_value)]
        for op in ops:
            nums.append(rng.randint(2, cfg.max_mul_factor) if op == "*" else rng.randint(1, cfg.max_value))
        steps = _solve(nums, ops)
        if steps is not None:
            expression = " ".join([str(nums[0])] + [f"{op} {x}" for op, x in zip(ops, nums[1:])])
            return Problem(expression, str(steps[-1].result))


# ---- worked solutions ---------------------------------------------------------------------------
# A solution is a list of binary operations in evaluation order; each is a list of column facts.
# A slip perturbs one fact and is propagated through every later operation, so the reasoning is
# consistent with its (wrong) final answer except at that one fact.


@dataclass
class _Op:
    a: int
    op: str
    b: int
    facts: list[str]
    result: int


def _parse(expression: str) -> tuple[list[int], list[str]]:
    tokens = expression.split()
    return [int(t) for t in tokens[0::2]], tokens[1::2]


def _solve(nums: list[int], ops: list[str], slip: tuple[int, int] | None = None) -> list[_Op] | None:
    """Worked solution, or None if a subtraction would go negative. `slip` = (fact index, +-1)."""
    nums, ops = list(nums), list(ops)
    steps: list[_Op] = []
    n_facts = 0
    for wanted in ("*", "+-"):  # precedence: products first, then left to right
        i = 0
        while i < len(ops):
            if ops[i] not in wanted:
                i += 1
                continue
            a, op, b = nums[i], ops[i], nums[i + 1]
            if op == "-" and a < b:
                return None
            local = None
            if slip is not None and slip[0] >= n_facts:
                local = (slip[0] - n_facts, slip[1])
            step = _binary(a, op, b, local)
            n_facts += len(step.facts)
            steps.append(step)
            nums[i : i + 2] = [step.result]
            del ops[i]
    return steps


def _binary(a: int, op: str, b: int, slip: tuple[int, int] | None) -> _Op:
    """Column-wise a op b. `slip` = (fact index within this operation, +-1), ignored if out of range."""
    slip_at, delta = slip if slip is not None else (-1, 0)
    facts: list[str] = []

    def off(value: int, lo: int, hi: int) -> int:
        # The slipped value must stay a legal column value, else flip the direction.
        if len(facts) != slip_at:
            return value
        return value + delta if lo <= value + delta <= hi else value - delta

    if a < 10 and b < 10:  # one fact: "6 * 7 = 42."
        r = off({"+": a + b, "-": a - b, "*": a * b}[op], 0, 99)
        facts.append(f"{a} {op} {b} = {r}.")
        return _Op(a, op, b, facts, r)

    if op == "*":  # multi-digit a times one digit b (b <= 9 by construction)
        top, m = (a, b) if b < 10 else (b, a)
        da = [int(c) for c in reversed(str(top))]
        digits, carry = [], 0
        for i, d in enumerate(da):
            v = off(d * m + carry, 0, 99)
            facts.append(f"{d} * {m}" + (f" + {carry}" if carry else "") + f" = {v}" + _tail(v // 10, "carry", i, len(da)))
            digits.append(v % 10)
            carry = v // 10
        return _Op(a, op, b, facts, _number(digits, carry))

    da = [int(c) for c in reversed(str(a))]
    db = [int(c) for c in reversed(str(b))]
    width = max(len(da), len(db))
    digits, carry = [], 0  # carry doubles as the borrow for "-"
    for i in range(width):
        # A missing digit is absent, not a written 0 (a >= b for "-", so only b runs out there).
        x = da[i] if i < len(da) else None
        y = db[i] if i < len(db) else None
        if (x is None or y is None) and not carry:  # nothing to compute: the digit is copied
            digits.append(y if x is None else x)
            continue
        if op == "+":
            terms = [t for t in (x, y) if t is not None] + ([carry] if carry else [])
            v = off(sum(terms), 0, 19)
            facts.append(" + ".join(map(str, terms)) + f" = {v}" + _tail(v // 10, "carry", i, width))
            digits.append(v % 10)
            carry = v // 10
        else:
            subtrahends = ([y] if y is not None else []) + ([carry] if carry else [])
            borrow = int(x < sum(subtrahends))
            top = x + 10 * borrow
            v = off(top - sum(subtrahends), 0, 9)
            facts.append(" - ".join(map(str, [top] + subtrahends)) + f" = {v}" + _tail(borrow, "borrow", i, width))
            digits.append(v)
            carry = borrow
    return _Op(a, op, b, facts, _number(digits, carry if op == "+" else 0))


def _tail(c: int, word: str, i: int, width: int) -> str:
    return f", {word} {c}." if c and i < width - 1 else "."


def _number(digits_low_first: list[int], carry: int) -> int:
    return int("".join(map(str, reversed(digits_low_first + ([carry] if carry else [])))))


# Chinese facts name their operation ("3 加 8 得 11"), so every Chinese sentence holds Chinese words and a
# switch from Chinese to English is always visible to the language reward; English facts stay symbolic
# (the R1-Zero corpus is unchanged), so only a switch after a worded English sentence is.
_ZH_FACT = {" + ": " 加 ", " - ": " 减 ", " * ": " 乘 ", " = ": " 得 ", ", carry": "，进", ", borrow": "，借"}


def _sentences(steps: list[_Op]) -> list[tuple[str, str]]:
    """Each sentence of the reasoning as (English, Chinese)."""
    out = []
    for s in steps:
        for fact in s.facts:
            zh = fact
            for en_word, zh_word in _ZH_FACT.items():
                zh = zh.replace(en_word, zh_word)
            out.append((fact, zh[:-1] + "。"))
        out.append((f"So {s.a} {s.op} {s.b} = {s.result}.", f"所以 {s.a} {s.op} {s.b} = {s.result}。"))
    return out


def _reasoning(steps: list[_Op], lang: str = "en", switch_at: int | None = None) -> str:
    """The sentences in `lang`; from sentence `switch_at` on (if given) in the other language."""
    col = LANGS.index(lang)
    return " ".join(pair[1 - col if switch_at is not None and i >= switch_at else col]
                    for i, pair in enumerate(_sentences(steps)))


def n_sentences(problem: Problem) -> int:
    return len(_sentences(_solve(*_parse(problem.expression))))


def worked_solution(problem: Problem, lang: str | None = None, switch_at: int | None = None) -> str:
    """Correct column-wise reasoning, e.g. "3 + 8 = 11, carry 1. 2 + 4 + 1 = 7. So 23 + 48 = 71."
    (Chinese: "3 加 8 得 11，进 1。 2 加 4 加 1 得 7。 所以 23 + 48 = 71。"), in the problem's language unless
    `lang` says otherwise; `switch_at`: the sentence index from which it continues in the other language."""
    return _reasoning(_solve(*_parse(problem.expression)), lang or problem.lang, switch_at)


def slipped_solution(problem: Problem, rng: random.Random, switch_at: int | None = None) -> tuple[str, str]:
    """(reasoning, answer) with one column fact off by one; the answer is always wrong."""
    nums, ops = _parse(problem.expression)
    n_facts = sum(len(s.facts) for s in _solve(nums, ops))
    for _ in range(20):  # a slip can vanish (e.g. into a later "- x" going negative): try another
        steps = _solve(nums, ops, slip=(rng.randrange(n_facts), rng.choice((-1, 1))))
        if steps is not None and str(steps[-1].result) != problem.answer:
            return _reasoning(steps, problem.lang, switch_at), str(steps[-1].result)
    # The last fact feeds the final answer directly, so slipping it always changes the answer.
    steps = _solve(nums, ops, slip=(n_facts - 1, 1))
    return _reasoning(steps, problem.lang, switch_at), str(steps[-1].result)


# ---- completions and the corpus -----------------------------------------------------------------


@dataclass(frozen=True)
class NoiseMix:
    """Fractions of completion kinds in the templated corpus (normalised, need not sum to 1)."""

    clean: float = 0.3
    slip: float = 0.1
    format: float = 0.3
    bare: float = 0.3

    def kinds(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        weights = (self.clean, self.slip, self.format, self.bare)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"NoiseMix weights must be >= 0 with a positive sum, got {self}")
        return ("clean", "slip", "format", "bare"), weights


FORMAT_VIOLATIONS = ("no_tags", "answer_outside", "no_think", "unclosed_think")


@dataclass(frozen=True)
class Sample:
    problem: Problem
    kind: str  # clean | slip | format:<violation> | bare | bare:tagged
    completion: str  # starts with a space: it follows the template's "Assistant:"
    stated_answer: str  # what the completion claims, inside or outside tags


def make_completion(problem: Problem, kind: str, rng: random.Random, switch_at: int | None = None) -> Sample:
    """One completion of `kind` ("clean", "slip", "format", "bare"); sub-kinds drawn from rng.
    `switch_at`: the reasoning changes language from that sentence on (bilingual corpora)."""
    answer = problem.answer
    if kind == "clean":
        text = f" <think> {worked_solution(problem, switch_at=switch_at)} </think> <answer> {answer} </answer>"
    elif kind == "slip":
        reasoning, answer = slipped_solution(problem, rng, switch_at)
        text = f" <think> {reasoning} </think> <answer> {answer} </answer>"
    elif kind == "format":
        kind = f"format:{rng.choice(FORMAT_VIOLATIONS)}"
        reasoning = worked_solution(problem, switch_at=switch_at)
        text = {
            "format:no_tags": f" {reasoning} The answer is {answer}.",
            "format:answer_outside": f" <think> {reasoning} </think> The answer is {answer}.",
            "format:no_think": f" {reasoning} <answer> {answer} </answer>",
            "format:unclosed_think": f" <think> {reasoning} <answer> {answer} </answer>",
        }[kind]
    elif kind == "bare":
        # Tagged bare answers pass the answer extraction but not the format check.
        kind = rng.choice(("bare", "bare:tagged"))
        text = f" <answer> {answer} </answer>" if kind == "bare:tagged" else f" {answer}"
    else:
        raise ValueError(f"unknown completion kind {kind!r}")
    if switch_at is not None and not kind.startswith("bare"):
        kind += ":switched"
    return Sample(problem, kind, text, answer)


def apply_template(template: str, question: str) -> str:
    # str.replace, not str.format: a template may contain other braces.
    if "{prompt}" not in template:
        raise ValueError(f"template has no '{{prompt}}' placeholder: {template!r}")
    return template.replace("{prompt}", question)


def sample_problems(n: int, seed: int, cfg: ArithConfig, *, exclude: set[str] = frozenset(),
                    unique: bool = True, stream: str = "problems") -> list[Problem]:
    """n problems not in `exclude` (by expression); `unique` forbids repeats within the list."""
    rng = random.Random(f"{stream}-{seed}")
    seen, out = set(exclude), []
    misses = 0
    while len(out) < n:
        p = sample_problem(rng, cfg)
        if p.expression in seen:
            misses += 1
            if misses > 100 * n + 10_000:
                raise ValueError(f"cannot draw {n} distinct problems outside the {len(exclude)} excluded "
                                 f"ones from {cfg}; raise max_value or the operand counts")
            continue
        if unique:
            seen.add(p.expression)
        out.append(p)
    return out


def assign_languages(problems: list[Problem], seed: int, langs: Languages, stream: str) -> list[Problem]:
    """Poses `langs.zh` of the problems in Chinese (seeded per stream); unchanged when monolingual."""
    if not langs.bilingual:
        return problems
    rng = random.Random(f"lang-{stream}-{seed}")
    return [p.posed_in("zh" if rng.random() < langs.zh else "en") for p in problems]


def build_prompt_sets(n_train: int, n_eval: int, seed: int, cfg: ArithConfig,
                      langs: Languages = Languages()) -> tuple[list[Problem], list[Problem]]:
    """(RL train problems, held-out eval problems), distinct within and across the two sets."""
    eval_set = sample_problems(n_eval, seed, cfg, stream="eval")
    train = sample_problems(n_train, seed, cfg, exclude={p.expression for p in eval_set}, stream="train")
    return assign_languages(train, seed, langs, "train"), assign_languages(eval_set, seed, langs, "eval")


def build_corpus(n_docs: int, template: str, seed: int, cfg: ArithConfig, *, mix: NoiseMix = NoiseMix(),
                 plain_fraction: float = 0.3, exclude: set[str] = frozenset(),
                 langs: Languages = Languages()) -> list[str]:
    """Pretraining documents: `plain_fraction` untemplated worked solutions, the rest templated
    prompts with completions drawn from `mix`. Problems may repeat; `exclude`d ones never appear."""
    return [doc for doc, _ in build_corpus_samples(n_docs, template, seed, cfg, mix=mix,
                                                   plain_fraction=plain_fraction, exclude=exclude, langs=langs)]


def build_corpus_samples(n_docs: int, template: str, seed: int, cfg: ArithConfig, *, mix: NoiseMix = NoiseMix(),
                         plain_fraction: float = 0.3, exclude: set[str] = frozenset(),
                         langs: Languages = Languages()) -> list[tuple[str, Sample | None]]:
    """As `build_corpus`, with each document's `Sample` (None for plain documents) for inspection.
    Languages draw from their own stream, so a monolingual corpus is the same with or without them."""
    rng = random.Random(f"corpus-{seed}")
    lang_rng = random.Random(f"corpus-lang-{seed}")
    kinds, weights = mix.kinds()
    problems = assign_languages(sample_problems(n_docs, seed, cfg, exclude=set(exclude), unique=False,
                                                stream="corpus"), seed, langs, "corpus")
    out: list[tuple[str, Sample | None]] = []
    for p in problems:
        switch_at = None
        if langs.bilingual and lang_rng.random() < langs.switch:
            n = n_sentences(p)  # switch after the first sentence at the earliest, before the last at the latest
            switch_at = lang_rng.randint(1, n - 1) if n > 1 else None
        if rng.random() < plain_fraction:
            out.append((f"{p.expression}: {worked_solution(p, switch_at=switch_at)}", None))
        else:
            s = make_completion(p, rng.choices(kinds, weights)[0], rng, switch_at)
            out.append((apply_template(template, p.question) + s.completion, s))
    return out


# ---- files ---------------------------------------------------------------------------------------


def write_jsonl(path: str | Path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_task(run_dir: str | Path, template: str, *, seed: int = 0, cfg: ArithConfig = DIFFICULTY[1],
               n_docs: int = 50_000, n_train: int = 2_000, n_eval: int = 200, mix: NoiseMix = NoiseMix(),
               plain_fraction: float = 0.3, langs: Languages = Languages()) -> dict[str, Path]:
    """Writes the whole task into `run_dir`/data:
    corpus.jsonl ({"text"}: Megatron's preprocess_data input), train.jsonl and eval.jsonl
    ({"prompt", "answer"}; the prompt is the bare question, the RL pipeline applies the template;
    bilingual tasks add "lang", the question's language, which the eval's language rate reads)."""
    data = Path(run_dir) / "data"
    train, eval_set = build_prompt_sets(n_train, n_eval, seed, cfg, langs)
    corpus = build_corpus(n_docs, template, seed, cfg, mix=mix, plain_fraction=plain_fraction,
                          exclude={p.expression for p in eval_set}, langs=langs)

    def rows(ps):
        for p in ps:
            yield {"prompt": p.question, "answer": p.answer, **({"lang": p.lang} if langs.bilingual else {})}

    return {
        "corpus": write_jsonl(data / "corpus.jsonl", ({"text": t} for t in corpus)),
        "train": write_jsonl(data / "train.jsonl", rows(train)),
        "eval": write_jsonl(data / "eval.jsonl", rows(eval_set)),
    }
