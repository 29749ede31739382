"""The arithmetic task: exact answers, deterministic seeds, the noise mix, disjoint splits."""

import random
import re
from collections import Counter

import pytest

from megatron_r1.data import arith
from megatron_r1.data.arith import DIFFICULTY, ArithConfig, NoiseMix, Problem

TEMPLATE = ("A conversation between User and Assistant. The user asks a question, and the Assistant "
            "solves it. User: {prompt}. Assistant:")
FORMAT = re.compile(r"^ <think> .+ </think> <answer> .+ </answer>$")
ANSWER = re.compile(r"<answer> (.*?) </answer>")


def _eval(expression: str) -> int:
    return eval(expression, {"__builtins__": {}})  # only digits, spaces and + - * reach here


@pytest.mark.parametrize("level", sorted(DIFFICULTY))
def test_answers_and_worked_solutions_are_exact(level):
    rng = random.Random(level)
    cfg = DIFFICULTY[level]
    for _ in range(2000):
        p = arith.sample_problem(rng, cfg)
        n = len(p.expression.split()) // 2 + 1
        assert cfg.min_operands <= n <= cfg.max_operands
        assert int(p.answer) == _eval(p.expression) >= 0
        solution = arith.worked_solution(p)
        assert solution.endswith(f"= {p.answer}.")
        # Every fact the solution states is true arithmetic.
        for lhs, rhs in re.findall(r"(\d+(?: [-+*] \d+)+) = (\d+)", solution):
            assert _eval(lhs) == int(rhs), (p, solution)


def test_column_solutions_read_as_designed():
    assert arith.worked_solution(Problem("23 + 48", "71")) == "3 + 8 = 11, carry 1. 2 + 4 + 1 = 7. So 23 + 48 = 71."
    assert arith.worked_solution(Problem("71 - 15", "56")) == "11 - 5 = 6, borrow 1. 7 - 1 - 1 = 5. So 71 - 15 = 56."
    assert arith.worked_solution(Problem("5 + 23 * 4", "97")) == (
        "3 * 4 = 12, carry 1. 2 * 4 + 1 = 9. So 23 * 4 = 92. 5 + 2 = 7. So 5 + 92 = 97.")


def test_slips_are_one_wrong_fact_and_a_wrong_answer():
    rng = random.Random(0)
    for _ in range(1000):
        p = arith.sample_problem(rng, DIFFICULTY[3])
        reasoning, answer = arith.slipped_solution(p, rng)
        assert answer != p.answer and reasoning.endswith(f"= {answer}.")
        facts = re.findall(r"(?:^|\. )(\d+(?: [-+*] \d+)+) = (\d+)", reasoning)
        assert sum(_eval(lhs) != int(rhs) for lhs, rhs in facts) == 1, reasoning  # "So ..." lines excluded


def test_same_seed_same_data_other_seed_other_data():
    a = arith.build_corpus(200, TEMPLATE, 7, DIFFICULTY[2])
    assert a == arith.build_corpus(200, TEMPLATE, 7, DIFFICULTY[2])
    assert a != arith.build_corpus(200, TEMPLATE, 8, DIFFICULTY[2])
    assert arith.build_prompt_sets(50, 20, 3, DIFFICULTY[1]) == arith.build_prompt_sets(50, 20, 3, DIFFICULTY[1])


def test_noise_mix_proportions_and_completion_kinds():
    mix = NoiseMix(clean=0.4, slip=0.2, format=0.3, bare=0.1)
    samples = arith.build_corpus_samples(4000, TEMPLATE, 0, DIFFICULTY[1], mix=mix, plain_fraction=0.25)
    plain = [d for d, s in samples if s is None]
    assert abs(len(plain) / len(samples) - 0.25) < 0.03
    templated = [(d, s) for d, s in samples if s is not None]
    kinds = Counter(s.kind.split(":")[0] for _, s in templated)
    for kind, share in [("clean", 0.4), ("slip", 0.2), ("format", 0.3), ("bare", 0.1)]:
        assert abs(kinds[kind] / len(templated) - share) < 0.03, kinds
    for doc, s in templated:
        assert doc == TEMPLATE.replace("{prompt}", s.problem.question) + s.completion
        tagged = ANSWER.findall(s.completion)
        well_formed = bool(FORMAT.match(s.completion))
        assert well_formed == (s.kind in ("clean", "slip")), s
        if s.kind == "clean":
            assert tagged == [s.problem.answer]
        if s.kind == "slip":
            assert tagged == [s.stated_answer] != [s.problem.answer]
        if s.kind in ("format:no_tags", "format:answer_outside", "bare"):
            assert tagged == [] and s.stated_answer == s.problem.answer
    for doc in plain:
        expression, solution = doc.split(": ", 1)
        assert solution.endswith(f"= {_eval(expression)}.")


def test_held_out_problems_appear_nowhere_else(tmp_path):
    cfg = DIFFICULTY[1]
    paths = arith.write_task(tmp_path, TEMPLATE, seed=1, cfg=cfg, n_docs=3000, n_train=500, n_eval=100)
    train, held_out = arith.read_jsonl(paths["train"]), arith.read_jsonl(paths["eval"])
    assert len(train) == 500 and len(held_out) == 100
    assert set(train[0]) == {"prompt", "answer"}
    train_q, eval_q = {r["prompt"] for r in train}, {r["prompt"] for r in held_out}
    assert len(train_q) == 500 and len(eval_q) == 100 and not train_q & eval_q
    corpus = [r["text"] for r in arith.read_jsonl(paths["corpus"])]
    assert len(corpus) == 3000
    seen = {m for doc in corpus for m in re.findall(r"What is ([^?]+)\?", doc)}
    seen |= {doc.split(":")[0] for doc in corpus if not doc.startswith("A conversation")}
    assert not seen & {q.removeprefix("What is ").removesuffix("?") for q in eval_q}
    assert len(seen & {q.removeprefix("What is ").removesuffix("?") for q in train_q}) > 50


def test_errors_say_what_to_change():
    with pytest.raises(ValueError, match="raise max_value"):
        arith.sample_problems(100, 0, ArithConfig(min_operands=2, max_operands=2, max_value=3, ops="+"))
    with pytest.raises(ValueError, match="subset"):
        ArithConfig(ops="+/")
    with pytest.raises(ValueError, match="placeholder"):
        arith.apply_template("no slot", "What is 1 + 1?")


# ---- the bilingual task (examples/r1_tiny.sh) ---------------------------------------------------

def test_bilingual_off_is_the_monolingual_corpus():
    """R1-Zero's data must not move: Languages() (and a switch share without Chinese) changes nothing."""
    from megatron_r1.data.templates import R1_ZERO_TEMPLATE as T
    base = arith.build_corpus(300, T, 3, DIFFICULTY[1])
    assert arith.build_corpus(300, T, 3, DIFFICULTY[1], langs=arith.Languages()) == base
    assert arith.build_corpus(300, T, 3, DIFFICULTY[1], langs=arith.Languages(zh=0, switch=0.5)) == base
    assert arith.build_prompt_sets(50, 20, 3, DIFFICULTY[1]) == \
        arith.build_prompt_sets(50, 20, 3, DIFFICULTY[1], arith.Languages())


def test_chinese_solution_and_mid_cot_switch_are_measured_by_the_language_reward():
    from megatron_r1.rl.rewards.language import language_reward
    p = Problem("23 + 48", "71", "zh")
    assert p.question == "23 + 48 等于多少？"
    zh = arith.worked_solution(p)
    assert zh == "3 加 8 得 11，进 1。 2 加 4 加 1 得 7。 所以 23 + 48 = 71。"
    assert arith.worked_solution(p, lang="en") == arith.worked_solution(p.posed_in("en"))
    assert language_reward(f"<think> {zh} </think>", lang="zh") == 1.0
    assert language_reward(f"<think> {zh} </think>", lang="en") == 0.0
    mixed = arith.worked_solution(p, switch_at=2)  # two Chinese sentences, then English
    assert mixed == "3 加 8 得 11，进 1。 2 加 4 加 1 得 7。 So 23 + 48 = 71."
    assert 0 < language_reward(f"<think> {mixed} </think>", lang="auto") < 1
    assert language_reward(f"<think> {zh} </think>", lang="auto") == 1.0
    # the slip keeps the language
    reasoning, wrong = arith.slipped_solution(p, random.Random(0))
    assert wrong != "71" and "所以" in reasoning and "So" not in reasoning


def test_bilingual_corpus_and_prompts():
    from megatron_r1.data.templates import R1_ZERO_TEMPLATE as T
    from megatron_r1.rl.rewards.language import language_reward
    langs = arith.Languages(zh=0.5, switch=0.3)
    docs = arith.build_corpus_samples(2000, T, 0, DIFFICULTY[1], langs=langs)
    zh = [s for _, s in docs if s is not None and s.problem.lang == "zh"]
    switched = [s for _, s in docs if s is not None and s.kind.endswith(":switched")]
    templated = [s for _, s in docs if s is not None]
    assert 0.4 < len(zh) / len(templated) < 0.6
    assert 0.1 < len(switched) / len(templated) < 0.3  # switch 0.3 of the reasoned (non-bare) completions
    # Chinese -> English switches always show (Chinese facts are worded); English -> Chinese ones only
    # after a worded English sentence ("carry", "borrow")
    share = {s: language_reward(s.completion, lang="auto") for s in switched}
    assert all(0 < v < 1 for s, v in share.items() if s.problem.lang == "zh")
    assert sum(v < 1 for v in share.values()) > 0.6 * len(share)
    train, held_out = arith.build_prompt_sets(400, 100, 0, DIFFICULTY[1], langs)
    assert {p.lang for p in train} == {p.lang for p in held_out} == {"en", "zh"}
    assert not {p.expression for p in train} & {p.expression for p in held_out}
    with pytest.raises(ValueError):
        arith.Languages(zh=1.5)
