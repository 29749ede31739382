"""Distillation data end to end: rejection-sample rows -> `megatron-r1 export-distill` with a student
tokenizer (Qwen2.5-style: bos null, ChatML; Llama-3.1-style: no pad token, header template) ->
`megatron-r1 sft` of a tiny Qwen2 / Llama student on the Parquet output -> the student's HF directory keeps
its chat template, so GRPO / eval render prompts as SFT did."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1.data import arith
from megatron_r1.data.templates import render_prompt
from megatron_r1.data.tokenizer import load_tokenizer, train_sentencepiece, write_student_tokenizer

REPO = Path(__file__).resolve().parents[2]


# the Llama-3.1-style student (no pad token, header template) also goes through export-distill and sft in CI's
# shrunken R1 pipeline (tests/e2e/test_r1_tiny.py, which checks its template the same way): `long` here
@pytest.mark.parametrize("style, preset", [("qwen2", "tiny-qwen2"),
                                           pytest.param("llama3", "tiny-llama", marks=pytest.mark.long)])
def test_export_then_sft_a_student(style, preset, tmp_path):
    sp = train_sentencepiece(arith.build_corpus(300, "{prompt}", 0, arith.DIFFICULTY[1]), tmp_path / "sp",
                             vocab_size=400)
    student_tok = write_student_tokenizer(sp, tmp_path / "student_tok", style)
    rows = [{"prompt": render_prompt("r1_chat", f"What is {a} + {b}?"), "question": f"What is {a} + {b}?",
             "response": f"<think>\n{a} + {b} = {a + b}\n</think>\nThe answer is $\\boxed{{{a + b}}}$."}
            for a in range(6) for b in range(3)]
    (tmp_path / "rs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = [sys.executable, "-m", "megatron_r1.cli"]
    r = subprocess.run(cli + ["export-distill", "--input", str(tmp_path / "rs.jsonl"), "--output", str(tmp_path / "d"),
                              "--tokenizer", str(student_tok), "--format", "parquet", "--val-fraction", "0.1"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "the student tokenizer's chat template" in r.stdout
    r = subprocess.run(cli + ["sft", "--config", preset, "--data", str(tmp_path / "d" / "train.parquet"),
                              "--tokenizer", str(student_tok), f"run_dir={tmp_path / 'run'}", "train.train_steps=2",
                              "train.seq_length=128", "train.global_batch_size=4", "train.micro_batch_size=4",
                              "train.params_dtype=float32"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([s for s in steps if "loss" in s]) == 2
    student = load_tokenizer(tmp_path / "run" / "hf")
    assert student.chat_template and (student.bos_id is None) == (style == "qwen2")
    opening = {"qwen2": "<|im_start|>user\n", "llama3": "<|begin_of_text|><|start_header_id|>user"}[style]
    assert render_prompt("r1_chat", "What is 2 + 2?", student).startswith(opening)
