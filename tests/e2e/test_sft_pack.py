"""(Two short SFT runs: 11 s at load ~7 here, 145 s at load 15.) SFT padding-free micro-batches equal the padded run (loss and gradient norm, float32, 1e-6), and
--epochs sets the step count."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_r1.data import arith
from megatron_r1.data.tokenizer import train_sentencepiece
from megatron_r1.sft.trainer import micro_batches

REPO = Path(__file__).resolve().parents[2]


def test_micro_batches_cut_after_the_last_target():
    ids = torch.arange(4 * 10).view(4, 10)
    mask = torch.zeros(4, 10, dtype=torch.long)
    for r, last in enumerate((2, 9, 4, 0)):  # row 3 has no target
        mask[r, 1:last + 1] = 1 if last else 0
    mbs = micro_batches(ids, mask, 2, 1.0, trim_multiple=4)
    assert [mb["input_ids"].shape for mb in mbs] == [(2, 10), (2, 4)]  # 10 (cap), then 3 -> 4
    assert mbs[0]["input_ids"][:, 0].tolist() == [10, 20] and mbs[1]["input_ids"][:, 0].tolist() == [0, 30]
    assert sum(int(mb["loss_mask"].sum()) for mb in mbs) == int(mask.sum())  # no target lost


def _sft(tmp_path, name, data, tok, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "megatron_r1.cli", "sft", "--config", "tiny-qwen2", "--data", str(data),
                        "--tokenizer", str(tok), *extra, f"run_dir={tmp_path / name}", "train.seq_length=128",
                        "train.global_batch_size=8", "train.micro_batch_size=2", "train.params_dtype=float32",
                        "train.lr=1e-3"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if "loss" in line]


def test_padding_free_equals_padded_and_epochs(tmp_path):
    sp = train_sentencepiece(arith.build_corpus(300, "{prompt}", 0, arith.DIFFICULTY[1]), tmp_path / "sp",
                             vocab_size=400)
    problems = arith.sample_problems(12, 0, arith.DIFFICULTY[2])
    rows = [{"prompt": p.question, "response": (" " + arith.worked_solution(p)) * (1 + i % 3)}
            for i, p in enumerate(problems)]  # 12 rows of very different lengths
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    packed = _sft(tmp_path, "packed", data, sp, "--epochs", "2")  # 2 * 12 / 8 -> 3 steps
    padded = _sft(tmp_path, "padded", data, sp, "--no-pack", "--epochs", "2")
    assert len(packed) == len(padded) == 3
    for a, b in zip(packed, padded):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-6 * max(1.0, b["grad_norm"]), (a, b)
