"""`megatron-r1 export-distill` (megatron_r1/tools/export_distill_dataset.py) on real files and real
student tokenizers (Qwen2.5- and Llama-3.1-style, built from our vocabulary with their chat templates)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1.data import arith
from megatron_r1.data.templates import render_prompt
from megatron_r1.data.tokenizer import load_tokenizer, train_sentencepiece, write_student_tokenizer
from megatron_r1.tools.export_distill_dataset import export, ngrams

REPO = Path(__file__).resolve().parents[2]
THOUGHT = "<think>\nFirst add the tens: 20 + 10 = 30. Then the units: 3 + 4 = 7. So 30 + 7 = 37.\n</think>\n"


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    corpus = arith.build_corpus(300, "{prompt}", 0, arith.DIFFICULTY[1]) + [THOUGHT + "The sum is $\\boxed{37}$."]
    sp = train_sentencepiece(corpus, root / "sp", vocab_size=400)
    return {s: write_student_tokenizer(sp, root / s, s) for s in ("qwen2", "llama3")}


def rs_row(question: str, response: str, template: str = "r1_chat") -> dict:
    """A row as `megatron-r1 rejection-sample` writes it."""
    return {"prompt": render_prompt(template, question), "question": question, "response": response,
            "answer": "37", "reward": 3.0, "rewards": {"accuracy": 1.0}, "origin": "prompts.jsonl:1"}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dedup_keeps_the_first_of_identical_conversations(tmp_path):
    a = rs_row("What is 23 + 14?", THOUGHT + "The sum is $\\boxed{37}$.")
    same_but_spaces = dict(a, response=a["response"].replace(" = ", "  =  "))
    other_answer = rs_row("What is 23 + 14?", THOUGHT + "So it is $\\boxed{37}$.")
    rs = write_jsonl(tmp_path / "rs.jsonl", [a, same_but_spaces, other_answer])
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"messages": [{"role": "user", "content": "What is 23 + 14?"},
                                                                 {"role": "assistant", "content": a["response"]}]}])
    stats = export([str(rs), str(extra)], str(tmp_path / "out"), val_fraction=0.0)
    assert (stats["rows_in"], stats["after_dedup"], stats["train"]) == (4, 2, 2)
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert [r["origin"] for r in rows] == [f"{rs}:1", f"{rs}:3"]


def test_decontamination_by_ngram_overlap_counts_what_it_removes(tmp_path):
    q_leak = "A farmer has 23 cows and buys 14 more. How many cows does the farmer have now?"
    q_near = "A farmer has 23 cows and buys 14 more. How many goats does the farmer have now?"
    q_clean = "What is 5 * 6?"
    q_sum = "What is 5 + 6?"  # differs from an eval prompt by its operator only
    rs = write_jsonl(tmp_path / "rs.jsonl", [rs_row(q, THOUGHT + "$\\boxed{1}$") for q in (q_leak, q_near, q_clean, q_sum)])
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": q_leak, "answer": "37"}, {"prompt": "What is 5 * 6?", "answer": "30"}])
    ev2 = write_jsonl(tmp_path / "eval2.jsonl", [{"problem": "Something else entirely, with no overlap at all."}])
    assert ngrams("What is 5 * 6?", 8) != ngrams("What is 5 + 6?", 8)

    # the near copy shares 4 of its 12 8-grams with the leaked prompt (1/3): kept at 0.5 ...
    stats = export([str(rs)], str(tmp_path / "half"), decontam=[str(ev), str(ev2)], ngram=8, overlap=0.5,
                   val_fraction=0.0)
    assert stats["decontaminated"] == {str(ev): 2, str(ev2): 0}  # the leak and the 5 * 6
    assert [r["messages"][0]["content"] for r in read_jsonl(tmp_path / "half" / "train.jsonl")] == [q_near, q_sum]
    # ... and removed at 0.3
    stats = export([str(rs)], str(tmp_path / "third"), decontam=[str(ev)], ngram=8, overlap=0.3, val_fraction=0.0)
    assert stats["decontaminated"] == {str(ev): 3}
    assert [r["messages"][0]["content"] for r in read_jsonl(tmp_path / "third" / "train.jsonl")] == [q_sum]


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_rows_are_rendered_with_the_student_chat_template(students, style, tmp_path):
    from megatron_r1.sft.trainer import _sft_rows

    response = THOUGHT + "The sum is $\\boxed{37}$."
    rs = write_jsonl(tmp_path / "rs.jsonl", [rs_row("What is 23 + 14?", response),
                                              rs_row("What is 1 + 1?", "2</think> $\\boxed{2}$", template="r1_zero")])
    stats = export([str(rs)], str(tmp_path / "out"), tokenizer=str(students[style]), val_fraction=0.0)
    assert stats["chat_template"] is True
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    by_q = {r["messages"][0]["content"]: r for r in rows}
    row = by_q["What is 23 + 14?"]
    assert row["messages"] == [{"role": "user", "content": "What is 23 + 14?"},
                               {"role": "assistant", "content": response}]  # the teacher's reasoning kept
    if style == "qwen2":
        assert row["prompt"] == "<|im_start|>user\nWhat is 23 + 14?<|im_end|>\n<|im_start|>assistant\n"
        assert row["response"] == response  # "<|im_end|>" is Qwen's eos: sft appends it
    else:
        assert row["prompt"] == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 23 + 14?"
                                 "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert row["response"] == response  # "<|eot_id|>" is the eos
    # an r1_zero-rendered prompt is read back to its question; a prefilled <think> is put back
    assert by_q["What is 1 + 1?"]["messages"][1]["content"] == "<think>\n2</think> $\\boxed{2}$"

    # what sft trains on: the template's prompt (its bos once), then the response and one eos as targets
    tok = load_tokenizer(students[style])
    (ids, mask), _ = _sft_rows([str(tmp_path / "out" / "train.jsonl")], tok, 4096, "prompt", "response")[0]
    targets = [i for i, m in zip(ids, mask) if m]
    assert targets == tok.encode(response, eos=True) and targets.count(tok.eos_id) == 1
    assert ids[:len(ids) - len(targets)] == tok.encode(row["prompt"], bos=True)
    assert ids.count(tok.bos_id) == (style == "llama3")


def test_a_template_that_prefills_think_and_drops_reasoning_from_history(students, tmp_path):
    """DeepSeek-R1-Distill-style: the generation prompt ends with "<think>\\n" and assistant turns are
    rendered without their reasoning; the exported response still holds the whole thought, once."""
    import shutil

    tok_dir = tmp_path / "r1distill"
    shutil.copytree(students["qwen2"], tok_dir)
    (tok_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' + m['content'].split('</think>')[-1] + '<|im_end|>' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")
    response = THOUGHT + "The sum is $\\boxed{37}$."
    rs = write_jsonl(tmp_path / "rs.jsonl", [rs_row("What is 23 + 14?", response)])
    export([str(rs)], str(tmp_path / "out"), tokenizer=str(tok_dir), val_fraction=0.0)
    (row,) = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert row["prompt"].endswith("<|im_start|>assistant\n<think>\n")
    assert row["response"] == response[len("<think>\n"):]  # the prompt opened the thought
    assert row["messages"][1]["content"] == response


def test_without_a_chat_template_rows_use_the_plain_chat_format(tmp_path):
    rs = write_jsonl(tmp_path / "rs.jsonl", [{"prompt": "What is 2 + 2?", "response": "<think>2+2=4</think> 4"}])
    export([str(rs)], str(tmp_path / "out"), val_fraction=0.0)
    (row,) = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert (row["prompt"], row["response"]) == ("<|user|>\nWhat is 2 + 2?\n<|assistant|>\n", "<think>2+2=4</think> 4")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_output_is_readable_by_datasets_readers_and_by_sft(students, fmt, tmp_path):
    """`datasets.load_dataset("json"|"parquet")` reads with pyarrow's JSON and Parquet readers (datasets
    itself is not installed here): the same readers, then our sft row reader."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    from megatron_r1.sft.trainer import _sft_rows

    rows = [rs_row(f"What is {a} + {b}?", THOUGHT + f"$\\boxed{{{a + b}}}$") for a in range(10) for b in range(2)]
    rs = write_jsonl(tmp_path / "rs.jsonl", rows)
    stats = export([str(rs)], str(tmp_path / "out"), fmt=fmt, tokenizer=str(students["qwen2"]), val_fraction=0.2,
                   seed=3)
    assert (stats["train"], stats["validation"]) == (16, 4)
    train, val = tmp_path / "out" / f"train.{fmt}", tmp_path / "out" / f"validation.{fmt}"
    read = pj.read_json if fmt == "jsonl" else pq.read_table
    table = read(str(train))
    assert table.num_rows == 16 and set(table.column_names) >= {"messages", "prompt", "response"}
    first = table.to_pylist()[0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    # one question's rows never straddle the split
    questions = lambda t: {r["messages"][0]["content"] for r in t.to_pylist()}  # noqa: E731
    assert not questions(table) & questions(read(str(val)))
    tok = load_tokenizer(students["qwen2"])
    sft_rows, truncated = _sft_rows([str(train)], tok, 4096, "prompt", "response")
    assert len(sft_rows) == 16 and truncated == 0 and all(isinstance(i, int) for i in sft_rows[0][0])


def _cli(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_malformed_row_is_one_error_naming_file_and_line(tmp_path):
    good = rs_row("What is 1 + 1?", "<think>1+1=2</think> $\\boxed{2}$")
    rs = write_jsonl(tmp_path / "rs.jsonl", [good, good, '{"prompt": "What is 2 + 2?", "respon'])
    r = _cli("-m", "megatron_r1.cli", "export-distill", "--input", str(rs), "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {rs}:3: invalid JSON")
    no_response = write_jsonl(tmp_path / "bad.jsonl", [good, {"question": "What is 2 + 2?"}])
    r = _cli("tools/export_distill_dataset.py", "--input", str(no_response), "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.startswith(f"error: {no_response}:2: expected 'messages'")
    rendered = write_jsonl(tmp_path / "rendered.jsonl", [{"prompt": "<|im_start|>user\nhi<|im_end|>\n", "response": "x"}])
    r = _cli("tools/export_distill_dataset.py", "--input", str(rendered), "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.startswith(f"error: {rendered}:1: 'prompt' is rendered")
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_cli_prints_the_summary(tmp_path):
    rows = [rs_row(f"What is {a} + 1?", THOUGHT + f"$\\boxed{{{a + 1}}}$") for a in range(6)]
    rs = write_jsonl(tmp_path / "rs.jsonl", rows + rows[:2])
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "What is 0 + 1?", "answer": "1"}])
    r = _cli("-m", "megatron_r1.cli", "export-distill", "--input", str(rs), "--output", str(tmp_path / "out"),
             "--decontaminate", str(ev), "--format", "parquet", "--val-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "rows          8  read" in out and "dedup         2  duplicates removed -> 6" in out
    assert f"decon         1  removed, 8-gram overlap >= 0.5 with {ev}" in out
    assert "out           4  train" in out and "out           1  validation" in out
    assert "length histogram of the rows written (word/symbol tokens (no --tokenizer)" in out
    assert (tmp_path / "out" / "train.parquet").exists()
