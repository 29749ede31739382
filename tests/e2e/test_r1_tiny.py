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
SMALL = dict(DOCS="1500", PRETRAIN_STEPS="4", ZERO_STEPS="1", COLD_PROMPTS="8", COLD_EPOCHS="1", RL_STEPS="1",
             ABLATE_LANGUAGE="0", RS_PROMPTS="8", SFT_EPOCHS="1", STUDENT_PRETRAIN_STEPS="5", STUDENT_EPOCHS="1",
             EVAL_SAMPLES="2", EVAL_LIMIT="8", EVAL_PROBLEMS="20", GENERAL_PROMPTS="16", RM_PAIRS="40", RM_STEPS="2",
             GENERAL_RL_STEPS="2", GENERAL_RL_REASONING="8", REF_REFRESH="2",
             SMALL_ARGS="rl.prompts_per_step=4 rl.group_size=4 train.micro_batch_size=16 train.save_interval=0")
MODELS = ["base", "r1_zero", "cold_start_sft", "reasoning_rl", "r1_sft", "r1", "qwen2_student_base",
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
    out = r.stdout
    assert "examples/r1_tiny_rm.yaml, examples/r1_tiny.yaml with stage 7's reward routing" in out
    # stage 7: the general data (made in stage 5 and fed to its rejection sampling), two reward models, then
    # GRPO from the stage-6 SFT model on mixed prompts routed to them, with the reference refreshed; evaluated
    stage7 = out[out.index("7/10 RL for all scenarios"):out.index("8/10 ")]
    run = tmp_path / "run"
    assert "would run: general_data --prompts 16 --pairs 40" in out
    assert f"--extra {run}/general/general_sft.jsonl --extra-ratio 3" in out
    for kind in ("helpful", "harmless"):
        assert f"train-rm --config examples/r1_tiny_rm.yaml --kind {kind} --data {run}/general/{kind}_train.jsonl" \
            f" --eval {run}/general/{kind}_heldout.jsonl" in stage7
    grpo = next(line for line in stage7.splitlines() if " grpo " in line)
    assert f"--init-hf {run}/r1_sft/hf" in grpo and f"data.train_path={run}/general_rl_prompts.jsonl" in grpo
    assert f'"rm_helpful": {{"weight": 1.0, "path": "{run}/rm_helpful/hf"}}' in grpo
    assert "rl.ref_refresh_interval=2" in grpo and "rl.beta=0.001" in grpo
    # stage 10: one eval of every model, a result file per model (same-architecture models in a row share an engine);
    # the base models are prompted as R1-Zero was
    (ev,) = [line for line in out.splitlines() if " eval " in line and "--out-dir" in line]
    assert f"--model r1_sft={run}/r1_sft/hf --model r1={run}/r1/hf" in ev and f"--out-dir {run}/eval" in ev
    assert ev.count("--model ") == len(MODELS) and f"--model llama_student_distilled={run}/student_llama_distill/hf" in ev
    assert "--model-template base=r1_zero --model-template r1_zero=r1_zero --model-template qwen2_student_base=r1_zero " \
        "--template r1_chat" in ev
    assert "would run: rm_scores\n" in out and "held-out evaluations skipped (HELD_OUT_EVALS=0)" in out
    assert not run.exists()


# ~25 process starts, mostly single-threaded imports (torch, vLLM): ~300 s that keep ~1.2 of the 2 cores busy, so
# tests/run.sh runs it in a second pytest beside the rest of the suite (benchmarks/r1_tiny.md, "CI budget"); slowed
# by that company (555-590 s there), it gets more than pytest.ini's default 900 s
@pytest.mark.beside
@pytest.mark.timeout(1500)
def test_shrunken_pipeline_end_to_end(tmp_path):
    r = _run(tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    run = tmp_path / "run"
    for done in ("zero/pretrain/DONE", "zero/grpo/DONE", "cold_sft/DONE", "reasoning_rl/DONE", "rejection/DONE",
                 "r1_sft/DONE", "general/general_sft.jsonl", "rm_helpful/DONE", "rm_harmless/DONE", "r1/DONE",
                 "student_qwen2_base/DONE", "student_qwen2_distill/DONE", "student_qwen2_rl/DONE",
                 "student_llama_distill/DONE", "distill_qwen2/train.jsonl", "distill_llama3/train.jsonl"):
        assert (run / done).exists(), done
    rows = [json.loads(line) for line in (run / "cold_start.jsonl").read_text().splitlines()]
    assert rows and all(row["response"].lstrip().startswith("<think>") for row in rows)
    stats = json.loads((run / "cold_start.jsonl.stats.json").read_text())
    prompts = int(SMALL["COLD_PROMPTS"])
    assert stats["r1_zero/candidates"] == prompts * 4 and stats["few_shot/candidates"] == prompts * 4
    # stage 5 mixed in the general rows (at 3:1 to the correct, readable reasoning rows); stage 7 logged the reward models'
    # held-out accuracy, routed the general prompts to them and refreshed the reference at step 2
    sft_rows = [json.loads(line) for line in (run / "rejection.jsonl").read_text().splitlines()]
    assert sum(row.get("source") == "non_reasoning" for row in sft_rows) == round((len(sft_rows) - sum(
        row.get("source") == "non_reasoning" for row in sft_rows)) / 3)
    for kind in ("helpful", "harmless"):
        assert f'reward model {kind}: "heldout_accuracy":' in r.stdout
        assert json.loads((run / f"rm_{kind}/hf/rm.json").read_text())["kind"] == kind
    steps = [json.loads(line) for line in (run / "r1/metrics.jsonl").read_text().splitlines()]
    assert any("reward/route/general" in m for m in steps) and steps[-1].get("ref_refreshed") == 1.0
    assert out.count("swapped into the running engine") >= 4, out[-6000:]  # stage 10 shares engines
    # the distillation rows are rendered with each student's chat template, and the students keep it (Qwen2.5-style:
    # no BOS; Llama-3.1-style: a BOS and header tokens), so eval and GRPO render prompts as their SFT did
    from megatron_r1.data.templates import render_prompt
    from megatron_r1.data.tokenizer import load_tokenizer
    for style, students, opening in (("qwen2", ["student_qwen2_distill", "student_qwen2_rl"], "<|im_start|>user\n"),
                                     ("llama3", ["student_llama_distill"], "<|begin_of_text|><|start_header_id|>user")):
        rows = [json.loads(line) for line in (run / f"distill_{style}/train.jsonl").read_text().splitlines()]
        assert rows and all(row["prompt"].startswith(opening) for row in rows), rows[:2]
        for student in students:
            tok = load_tokenizer(run / student / "hf")
            assert tok.chat_template and (tok.bos_id is None) == (style == "qwen2"), student
            assert render_prompt("r1_chat", "What is 2 + 2?", tok).startswith(opening), student
    table = (run / "table.md").read_text()
    for m in MODELS:
        assert f"| {m} | " in table, (m, table)
    rm_rows = table[table.index("| model | rm_helpful | rm_harmless |"):].splitlines()[2:]
    assert [row.split(" | ")[0] for row in rm_rows] == ["| r1_sft", "| r1"]
    assert all(float(x) == float(x) for row in rm_rows for x in row.strip(" |").split(" | ")[1:]), rm_rows
    again = _run(tmp_path)  # every stage finished: nothing runs again
    assert again.returncode == 0 and "would run" not in again.stdout
    assert again.stdout.count("done: ") >= 20, again.stdout[-3000:]
