"""pass@1 / cons@k / format aggregation of `megatron_r1.eval.runner.evaluate` on scripted completions.

The generator is replaced by a list of fixed completions (the sampling itself is vLLM's, tested in
tests/e2e/test_eval_cli.py); the rewards, answer extraction and aggregation are the real ones."""
from dataclasses import dataclass

import pytest

from megatron_r1.eval.runner import evaluate

RIGHT = "<think> 3 + 4 = 7. </think> <answer> 7 </answer>"


@dataclass
class Ex:
    prompt: str
    answer: str


@dataclass
class Out:
    token_ids: list[int]


class CharTokenizer:
    def encode(self, text, bos=False):
        return ([1] if bos else []) + [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class Scripted:
    """generate() returns the next k completions per prompt from a fixed list, recording the call."""

    def __init__(self, completions):
        self.completions, self.calls = completions, []

    def generate(self, prompts, *, n, temperature, max_tokens, seed, top_p=1.0):
        self.calls.append((len(prompts), n, temperature))
        tok = CharTokenizer()
        rows = [self.completions[i * n:(i + 1) * n] for i in range(len(prompts))]
        return [[Out(tok.encode(t)) for t in row] for row in rows]


def test_pass_at_1_cons_at_k_format_and_dump():
    examples = [Ex("What is 3 + 4?", "7"), Ex("What is 1 + 1?", "2")]
    completions = [
        # problem 1: 2 of 4 right; the vote is 7 (2) over 8 (1): cons right
        RIGHT, "<answer> 8 </answer>", "<think> x </think> <answer> 7.0 </answer>", "no answer at all",
        # problem 2: 1 of 4 right (a bare tagged answer: right, bad format); vote tie 3 vs 2: earliest (3) wins
        "<think> a </think> <answer> 3 </answer>", "<answer> 2 </answer>", "junk", "<think></think>",
    ]
    dump = []
    res = evaluate(Scripted(completions), CharTokenizer(), examples, samples=4, temperature=1.0, dump=dump)
    assert res["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert res["cons@4"] == pytest.approx(0.5)
    assert res["format"] == pytest.approx(3 / 8)  # RIGHT, the 7.0 one, and the "3" one
    assert res["samples"] == 4 and res["problems"] == 2
    assert res["response_length"] == pytest.approx(sum(len(c) for c in completions) / 8)
    assert [r["correct"] for r in dump] == [1, 0, 1, 0, 0, 1, 0, 0]
    assert [r["extracted"] for r in dump][:4] == ["7", "8", "7.0", None]
    assert {r["prompt"] for r in dump[:4]} == {"What is 3 + 4?"} and dump[4]["answer"] == "2"


def test_greedy_draws_one_sample_whatever_samples_says():
    engine = Scripted([RIGHT, "<answer> 5 </answer>"])
    res = evaluate(engine, CharTokenizer(), [Ex("q1", "7"), Ex("q2", "2")], samples=8, temperature=0.0)
    assert engine.calls == [(2, 1, 0.0)]
    assert res["pass@1"] == 0.5 and res["cons@1"] == 0.5 and res["samples"] == 1


def test_cons_at_k_votes_by_value_not_spelling():
    # raw strings: 3 (2 votes) beats each spelling of 1/2 (1 vote each); by value 1/2 has 3
    examples = [Ex("half of 1?", r"\frac{1}{2}")]
    completions = [f"<think> t </think> <answer> {a} </answer>" for a in ("3", r"\frac{1}{2}", "0.5", "3", "1/2")]
    res = evaluate(Scripted(completions), CharTokenizer(), examples, samples=5, temperature=1.0)
    assert res["pass@1"] == pytest.approx(3 / 5)
    assert res["cons@5"] == 1.0


def test_majority_vote_groups_symbolic_equivalents():
    from megatron_r1.eval.runner import majority_vote
    from megatron_r1.rl.rewards import SymbolicVerifier

    with SymbolicVerifier(num_workers=1, timeout=5.0) as v:
        # sqrt(2)/2 and 1/sqrt(2) agree only symbolically; 0.7 and 7/10 agree exactly
        assert majority_vote([r"0.7", r"\frac{\sqrt{2}}{2}", "7/10", r"\frac{1}{\sqrt{2}}",
                              r"\sqrt{2}/2"], verifier=v) == r"\frac{\sqrt{2}}{2}"
        assert majority_vote([None, "2", None, "3"], verifier=v) == "2"  # tie: the first seen
        assert majority_vote([None, None], verifier=v) is None


def test_prompts_are_rendered_with_the_tokenizers_chat_template():
    class ChatCharTokenizer(CharTokenizer):
        chat_template = "set"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"

    seen = []

    class Recording(Scripted):
        def generate(self, prompts, **kw):
            seen.extend(prompts)
            return super().generate(prompts, **kw)

    evaluate(Recording([RIGHT]), ChatCharTokenizer(), [Ex("What is 3 + 4?", "7")], template="r1_chat")
    assert CharTokenizer().decode(seen[0][1:]).startswith("[user]What is 3 + 4?\nPlease reason")


def test_format_rate_follows_the_template():
    r1_style = "<think> 3 + 4 = 7. </think> The answer is $\\boxed{7}$."
    examples = [Ex("q1", "7"), Ex("q2", "7")]
    res = evaluate(Scripted([r1_style, r1_style]), CharTokenizer(), examples, template="r1_chat")
    assert res["pass@1"] == 1.0 and res["format"] == 1.0
    res = evaluate(Scripted([r1_style, RIGHT]), CharTokenizer(), examples, template="r1_chat")
    assert res["format"] == 0.5  # <answer> tags are not what r1_chat asks for
    res = evaluate(Scripted([r1_style, RIGHT]), CharTokenizer(), examples, template="r1_zero")
    assert res["format"] == 0.5


def test_language_rate_against_each_prompts_language_and_the_table(tmp_path):
    """The language column reads each prompt's own language (row `lang`, else its script); one table for
    several models, from `eval --out` files (megatron-r1 eval-table)."""
    import json

    from megatron_r1.cli import main as cli
    from megatron_r1.eval.runner import table

    @dataclass
    class LEx:
        prompt: str
        answer: str
        extra: dict

    zh = "<think> 3 加 8 得 11。 </think> 答案是 \\boxed{11}。"
    en = "<think> So 3 + 8 = 11. </think> The answer is \\boxed{11}."
    examples = [LEx("3 + 8 等于多少？", "11", {}), LEx("What is 3 + 8?", "11", {"lang": "en"})]
    # both answered in Chinese: right for the first prompt, wholly the wrong language for the second
    res = evaluate(Scripted([zh, zh, zh, zh]), CharTokenizer(), examples, template="r1_chat", samples=2,
                   temperature=1.0, top_p=0.95)
    assert res["language"] == 0.5 and res["pass@1"] == 1.0 and res["format"] == 1.0 and res["top_p"] == 0.95
    res2 = evaluate(Scripted([zh, zh, en, en]), CharTokenizer(), examples, template="r1_chat", samples=2,
                    temperature=1.0, top_p=0.95)
    assert res2["language"] == 1.0
    md = table({"a": res, "b": res2})
    assert md.splitlines()[0] == "| model | pass@1 | cons@k | format | language | length |"
    assert md.splitlines()[2].startswith("| a | 100.0% | 100.0% | 100.0% | 50.0% |")
    assert "T=1, top-p=0.95, k=2" in md
    for name, r in (("a", res), ("b", {"sampled": res2, "greedy": res2})):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    assert cli(["eval-table", f"one={tmp_path / 'a.json'}", str(tmp_path / "b.json"),
                "--out", str(tmp_path / "t.md")]) == 0
    assert "| one | 100.0%" in (tmp_path / "t.md").read_text() and "| b | " in (tmp_path / "t.md").read_text()
    assert cli(["eval-table", f"x={tmp_path / 'missing.json'}"]) == 2
