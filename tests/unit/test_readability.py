"""Readability filters (cold start, rejection sampling), the cold-start rewrite of R1-Zero outputs, the
non-reasoning mix of rejection sampling."""
import io
import json

from megatron_r1.rl.readability import prompt_language, unreadable
from megatron_r1.rl.rejection import _write_extra, select
from megatron_r1.sft.cold_start import few_shot_prompt, few_shot_response, keep, readable_from_r1_zero

ZH = "<think> 3 加 8 得 11，进 1。 所以 23 + 48 = 71。 </think> 答案是 \\boxed{71}。"
EN = "<think> 3 + 8 = 11, carry 1. So 23 + 48 = 71. </think> The answer is \\boxed{71}."


def test_the_papers_filters_each_with_its_reason():
    assert unreadable(ZH, "zh") is None and unreadable(EN, "en") is None
    assert unreadable(EN, "zh") == "mixed_language"  # wholly in the wrong language
    assert unreadable(EN.replace("So", "所以"), "en") == "mixed_language"
    assert unreadable(EN.replace("So", "所以")) == "mixed_language"  # dominant language, still mixed
    assert unreadable("<think> a </think> <answer> 71 </answer>", "en") == "markup"  # R1-Zero's tags
    assert unreadable("<think> So <think> x </think> 71", "en") == "markup"
    assert unreadable("<think> So it is 71 </think>", "en") == "markup"  # no summary
    assert unreadable(EN.replace("So", "So ```print(71)``` so"), "en") == "code_block"
    assert unreadable(EN.replace("So", "So " + "it is " * 300), "en") == "long_paragraph"
    assert unreadable(EN.replace("So", "So " + "it is\n\n" * 300), "en") is None  # short paragraphs
    assert unreadable("<think> So it is </think> <answer> 71 </answer>", "en", markup=False) is None
    assert prompt_language("23 + 48 等于多少？") == "zh" and prompt_language("What is 1 + 2?") == "en"
    assert prompt_language("What is 1 + 2?", "zh") == "zh"
    assert prompt_language([{"role": "user", "content": "你好"}]) == "zh"


def test_r1_zero_output_rewritten_readable():
    zero = " <think> 3 加 8 得 11，进 1。 所以 23 + 48 = 71。 </think> <answer> 71 </answer>"
    assert readable_from_r1_zero(zero, "zh") == ZH
    assert readable_from_r1_zero(" <think> x </think> 71", "en") is None  # not R1-Zero's format
    assert readable_from_r1_zero(" <think>  </think> <answer> 71 </answer>", "en") is None


def test_keep_counts_every_filter_and_deduplicates():
    from collections import Counter
    stats = Counter()
    mixed = ZH.replace("所以", "So")
    cands = [ZH, ZH, mixed, ZH.replace("71}", "72}"), EN, "garbage \\boxed{71}"]
    kept = keep(cands, ["71"] * 6, ["zh", "zh", "zh", "zh", "en", "en"], 3, 2, stats, 1.0, 1000)
    assert kept == [[0], [4]]
    assert stats == Counter(duplicate=1, mixed_language=1, wrong_answer=1, markup=1)


def test_few_shot_prompt_and_answer_line():
    ex = [{"prompt": "What is 1 + 2?", "response": EN}]
    assert few_shot_prompt(ex, "What is 5 + 5?") == f"Question: What is 1 + 2?\nAnswer: {EN}\n\nQuestion: What is 5 + 5?\nAnswer:"
    assert few_shot_response(f" {EN}\n\nQuestion: more") == EN


def test_rejection_select_drops_rejected_and_extra_rows_in_proportion(tmp_path):
    comps = {"accuracy": [1.0] * 4}
    assert select(["a", "b", "c", "d"], [False] * 4, [1.0] * 4, comps, 2, {"accuracy": 1.0}, 1,
                  rejected=["mixed_language", None, "code_block", "long_paragraph"]) == [[1], []]
    extra = tmp_path / "general.jsonl"
    extra.write_text("".join(json.dumps({"question": f"Say hi {i}", "response": f"hi {i}"}) + "\n" for i in range(50)))
    out = io.StringIO()

    class Tok:
        chat_template = None
    n = _write_extra(out, [str(extra)], 30, 3.0, "chat", Tok(), seed=0)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert n == len(rows) == 10 and len({r["question"] for r in rows}) == 10
    assert all(r["source"] == "non_reasoning" and r["prompt"].startswith("<|user|>\nSay hi") for r in rows)
    out2 = io.StringIO()
    assert _write_extra(out2, [str(extra)], 600, 3.0, "chat", Tok(), seed=0) == 50  # all there are


def test_cold_start_bad_inputs_are_one_line(tmp_path, capsys):
    from megatron_r1.cli import main as cli
    rc = cli(["cold-start-data", "--init-hf", str(tmp_path / "nope"), "--data", "x.jsonl", "--out", "o.jsonl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "config.json" in err[0]
    assert cli(["cold-start-data", "--init-hf", "x", "--data", "x", "--out", "o", "--shots", "0"]) == 2
