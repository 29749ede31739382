"""The whole R1 pipeline in miniature, shrunken (examples/r1_tiny.sh with a few steps per stage): every stage
runs through the real commands, in order, and the evaluation table has a row per model. Then a re-run skips
every finished stage, and --dry-run checks the configs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(DOCS="1500", PRETRAIN_STEPS="10", ZERO_STEPS="1", COLD_PROMPTS="16", COLD_EPOCHS="1", RL_STEPS="1",
             ABLATE_LANGUAGE="0", RS_PROMPTS="16", SFT_EPOCHS="1", STUDENT_PRETRAIN_STEPS="5", STUDENT_EPOCHS="1",
             EVAL_SAMPLES="2", EVAL_LIMIT="8", EVAL_PROBLEMS="20",
             SMALL_ARGS="rl.prompts_per_step=4 rl.group_size=4 train.micro_batch_size=16 train.save_interval=0")
MODELS = ["base", "r1_zero", "cold_start_sft", "reasoning_rl", "r1_sft", "qwen2_student_base",
          "qwen2_student_distilled", "qwen2_student_rl", "llama_student_distilled"]


def _run(tmp_path, *args, timeout=5400):
    env = dict(os.environ, PYTHONPATH=str(REPO), RUN_DIR=str(tmp_path / "run"),
               MR1=str(Path(sys.executable).parent / "megatron-r1"), **SMALL)
    return subprocess.run(["bash", "examples/r1_tiny.sh", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, errors="replace", timeout=timeout)


def test_dry_run_checks_configs_and_trains_nothing(tmp_path):
    r = _run(tmp_path, "--dry-run", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "configs ok: examples/r1_tiny.yaml" in r.stdout and "dry run only: nothing trained" in r.stdout
    assert "7/10 RL for all scenarios: SLOT" in r.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.long  # 11 trainings + 9 evaluations, then a re-run: 429 s at load ~1 (benchmarks/r1_tiny.md)
def test_shrunken_pipeline_end_to_end(tmp_path):
    r = _run(tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    run = tmp_path / "run"
    for done in ("zero/pretrain/DONE", "zero/grpo/DONE", "cold_sft/DONE", "reasoning_rl/DONE", "rejection/DONE",
                 "r1_sft/DONE", "student_qwen2_base/DONE", "student_qwen2_distill/DONE", "student_qwen2_rl/DONE",
                 "student_llama_distill/DONE", "distill_qwen2/train.jsonl", "distill_llama3/train.jsonl"):
        assert (run / done).exists(), done
    rows = [json.loads(line) for line in (run / "cold_start.jsonl").read_text().splitlines()]
    assert rows and all(row["response"].lstrip().startswith("<think>") for row in rows)
    stats = json.loads((run / "cold_start.jsonl.stats.json").read_text())
    assert stats["r1_zero/candidates"] == 16 * 4 and stats["few_shot/candidates"] == 16 * 4
    table = (run / "table.md").read_text()
    for m in MODELS:
        assert f"| {m} | " in table, (m, table)
    again = _run(tmp_path)  # every stage finished: nothing runs again
    assert again.returncode == 0 and "would run" not in again.stdout
    assert again.stdout.count("done: ") >= 20, again.stdout[-3000:]
