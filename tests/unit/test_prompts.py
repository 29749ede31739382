"""Prompt datasets (JSONL, Parquet, malformed rows, resumable order) and templates."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_r1.data.prompts import DataError, PromptLoader, load_prompts
from megatron_r1.data.templates import R1_ZERO_TEMPLATE, get_template, render_prompt

# ---------------------------------------------------------------- loading

JSONL_LINES = [
    json.dumps({"prompt": "1+1?", "answer": "2", "source": "toy"}),  # 1 ok
    json.dumps({"prompt": "2+2?", "answer": 4}),  # 2 ok: numeric answer
    '{"prompt": "broken", "answer": ',  # 3 bad JSON
    json.dumps({"prompt": "no answer"}),  # 4 missing field
    "",  # 5 blank: not an error
    json.dumps({"prompt": "list answer", "answer": [1, 2]}),  # 6 wrong type
    json.dumps(["not", "an", "object"]),  # 7 not an object
    json.dumps({"prompt": [{"role": "user", "content": "3+3?"}], "answer": "6"}),  # 8 ok: chat
    json.dumps({"prompt": 5, "answer": "6"}),  # 9 wrong prompt type
]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(JSONL_LINES) + "\n")
    return path


def test_jsonl_skip_counts_and_reports(jsonl):
    from megatron_r1.data.prompts import report
    ds = load_prompts(jsonl, on_error="skip")
    assert [ex.prompt for ex in ds][:2] == ["1+1?", "2+2?"]
    assert [ex.answer for ex in ds] == ["2", "4", "6"]
    assert ds[0].extra == {"source": "toy"}
    assert ds[0].origin == f"{jsonl}:1"
    assert ds.skipped == 5
    assert [e.split(": ", 1)[0] for e in ds.errors] == [f"{jsonl}:{n}" for n in (3, 4, 6, 7, 9)]
    assert ds.errors[1] == f"{jsonl}:4: missing field 'answer'"
    assert report(ds, "data") == [f"data: skipped 5 of 8 rows as malformed: {jsonl}:3: invalid JSON "
                                  f"(Expecting value at column 1); {jsonl}:4: missing field 'answer'; "
                                  f"{jsonl}:6: {ds.errors[2].split(': ', 1)[1]} ..."]


def test_jsonl_raise_names_path_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(JSONL_LINES[:2] + [JSONL_LINES[3]]) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: missing field 'answer'")):
        load_prompts(path, on_error="raise")
    path.write_text(JSONL_LINES[2] + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:1: invalid JSON")):
        load_prompts(path, on_error="raise")


def test_custom_and_nested_field_names(tmp_path):
    path = tmp_path / "verl_style.parquet"
    table = pa.table({
        "question": ["1+1?", "2+2?", "3+3?"],
        "reward_model": [{"ground_truth": "2"}, {"ground_truth": None}, {"ground_truth": "6"}],
    })
    pq.write_table(table, path)
    ds = load_prompts(path, prompt_key="question", answer_key="reward_model.ground_truth")
    assert [ex.answer for ex in ds] == ["2", "6"]
    assert ds.errors == [f"{path}:row 2: missing field 'reward_model.ground_truth'"]
    with pytest.raises(DataError, match=re.escape(f"{path}:row 2: missing field")):
        load_prompts(path, prompt_key="question", answer_key="reward_model.ground_truth", on_error="raise")


def test_parquet_rows_and_missing_column(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", None, "d"], "answer": ["1", None, "3", "4"]}), path)
    ds = load_prompts(path)
    assert [ex.prompt for ex in ds] == ["a", "d"]
    assert ds.skipped == 2
    with pytest.raises(DataError, match=re.escape(f"{path}:row 2: missing field 'answer'")):
        load_prompts(path, on_error="raise")
    with pytest.raises(DataError, match="no column 'solution'"):
        load_prompts(path, answer_key="solution")


def test_empty_dataset_and_bad_arguments(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text(JSONL_LINES[3] + "\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_prompts(path)
    with pytest.raises(DataError, match="unsupported extension"):
        load_prompts(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="on_error"):
        load_prompts(path, on_error="ignore")


# ---------------------------------------------------------------- order and resume


def test_loader_deterministic_epochs():
    data = list(range(10))
    a, b = PromptLoader(data, batch_size=3, seed=7), PromptLoader(data, batch_size=3, seed=7)
    batches_a = [next(a) for _ in range(6)]
    assert batches_a == [next(b) for _ in range(6)]
    epoch0, epoch1 = sum(batches_a[:3], []), sum(batches_a[3:], [])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9  # no repeats; 10th dropped (partial batch)
    assert epoch0 != epoch1  # reshuffled per epoch
    assert next(PromptLoader(data, batch_size=3, seed=8)) != batches_a[0]
    assert next(PromptLoader(data, batch_size=3, shuffle=False)) == [0, 1, 2]


def test_loader_resume_across_epoch_boundary():
    data = list(range(10))
    loader = PromptLoader(data, batch_size=3, seed=1)
    for _ in range(2):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(4)]  # crosses into epoch 1

    resumed = PromptLoader(data, batch_size=3, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert [next(resumed) for _ in range(4)] == expected
    assert resumed.state_dict() == loader.state_dict()

    with pytest.raises(DataError, match="seed 1"):
        PromptLoader(data, batch_size=3, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="batch_size=11"):
        PromptLoader(data, batch_size=11)


# ---------------------------------------------------------------- templates


def test_r1_zero_template_is_the_paper_text():
    text = render_prompt("r1_zero", "What is {x} if x=2?")
    assert text == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
        "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
        "</answer>. User: What is {x} if x=2?. Assistant:"
    )
    assert R1_ZERO_TEMPLATE.endswith("User: {prompt}. Assistant:")
    with pytest.raises(TypeError):
        render_prompt("r1_zero", [{"role": "user", "content": "hi"}])


def test_chat_template_plain_and_r1_instruction():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    assert render_prompt("chat", messages) == "<|system|>\nBe brief.\n<|user|>\n1+1?\n<|assistant|>\n"
    assert render_prompt("chat", "1+1?") == "<|user|>\n1+1?\n<|assistant|>\n"
    assert "1+1?\nPlease reason step by step, and put your final answer within \\boxed{}." in render_prompt(
        "r1_chat", "1+1?"
    )
    assert messages[1]["content"] == "1+1?"  # caller's messages untouched
    with pytest.raises(KeyError, match="unknown template"):
        get_template("llama9")


def test_chat_template_uses_hf_apply_chat_template():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    assert render_prompt("r1_chat", "1+1?", tokenizer=tok) == (
        "[user]1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.\n[assistant]"
    )
    tok.chat_template = None  # no template: the plain format
    assert render_prompt("chat", "hi", tokenizer=tok) == "<|user|>\nhi\n<|assistant|>\n"


def test_non_utf8_row_is_a_row_error(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "3"}\n'
                  b'{"prompt": "2+2", "answer": "4"}\n')
    ds = load_prompts(p)
    assert len(ds) == 2 and ds.skipped == 1
    assert ds.errors == [f"{p}:2: not UTF-8 (byte 0xe9 at column 16)"]
    with pytest.raises(DataError, match=rf"^{p}:2: not UTF-8"):
        load_prompts(p, on_error="raise")


def test_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path}/nope.jsonl: no such file$"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=rf"^{tmp_path}/dir.jsonl: cannot read"):
        load_prompts(tmp_path / "dir.jsonl")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=rf"^{bad}: not a readable Parquet file"):
        load_prompts(bad)
    import pyarrow as pa
    import pyarrow.parquet as pq
    cut = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"prompt": ["a"] * 1000, "answer": ["b"] * 1000}), cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # truncated: the footer is gone
    with pytest.raises(DataError, match=rf"^{cut}: not a readable Parquet file"):
        load_prompts(cut)


def test_overlong_prompts_dropped_counted_and_reported(tmp_path):
    from megatron_r1.data.prompts import drop_overlong, report
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": "x" * n, "answer": "1"}) + "\n" for n in (3, 50, 4, 60, 70, 80, 5)))
    ds = drop_overlong(load_prompts(p), lambda e: len(e.prompt), 10)
    assert [e.prompt for e in ds] == ["xxx", "xxxx", "xxxxx"] and ds.too_long == 4
    assert ds.too_long_origins[:2] == [f"{p}:2 (50 tokens)", f"{p}:4 (60 tokens)"]
    lines = report(ds, "data", " (limit 10)")
    assert lines == [f"data: dropped 4 of 7 prompts too long to fit (limit 10): {p}:2 (50 tokens), "
                     f"{p}:4 (60 tokens), {p}:5 (70 tokens) ..."]
    with pytest.raises(DataError, match="every one of the 3 prompts is longer than 2 tokens"):
        drop_overlong(ds, lambda e: len(e.prompt), 2)
