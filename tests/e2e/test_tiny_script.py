"""`bash examples/r1_zero_tiny.sh` stopped during GRPO by SIGTERM, then run again: the second run resumes
GRPO from its checkpoint instead of taking the half-trained policy as the stage's result.

Shrunk, not stubbed: the real script, commands and config with few, small steps (PRETRAIN_STEPS=3,
GRPO_STEPS=3, smaller batches through PRETRAIN_ARGS / GRPO_ARGS), a small corpus and an 8-problem
held-out set made beforehand (the script skips its data stage when info.json is there). One row of
the prompt file is too long for the rollout engine: GRPO must train, reporting it.
Several minutes on the 2-core CPU (five vLLM engine starts), hence `long`.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        return []


def _run_script(env, log: Path, timeout, on_poll=None):
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "examples/r1_zero_tiny.sh"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while proc.poll() is None:
            assert time.time() < deadline, log.read_text(errors="replace")[-4000:]
            if on_poll is not None:
                on_poll(proc)
            time.sleep(0.2)
        return proc.returncode, log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.long
def test_tiny_script_stopped_in_grpo_resumes_on_the_next_run(tmp_path):
    from megatron_r1.recipes.tiny_r1_zero import prepare
    run = tmp_path / "tiny"
    info = prepare(str(run), docs=300, difficulty=1)
    train, held_out = Path(info["train"]), Path(info["eval"])
    held_out.write_text("".join(held_out.read_text().splitlines(keepends=True)[:8]))  # 8 problems: quick evals
    with open(train, "a") as f:  # row 4001: a prompt far beyond rl.max_prompt_len=128 tokens
        f.write(json.dumps({"prompt": "1 + 1 " * 200, "answer": "2"}) + "\n")
    env = dict(os.environ, RUN_DIR=str(run), PRETRAIN_STEPS="3", GRPO_STEPS="3", PYTHONPATH=str(REPO),
               PRETRAIN_ARGS="train.global_batch_size=4 train.micro_batch_size=4 train.seq_length=128",
               GRPO_ARGS="rl.prompts_per_step=4 rl.group_size=4 rl.max_response_len=32 train.micro_batch_size=4",
               MR1=str(Path(sys.executable).parent / "megatron-r1"), OMP_NUM_THREADS="2")
    grpo_dir = run / "grpo"
    sent = {}

    def stop_grpo_after_step_1(proc):
        if sent or not (grpo_dir / "metrics.jsonl").exists():
            return
        rows = [json.loads(x) for x in open(grpo_dir / "metrics.jsonl") if x.endswith("\n")]
        if not any(r["step"] >= 1 for r in rows):
            return
        for pid in _descendants(proc.pid):  # the trainer, as srun would signal the task
            cmd = _cmdline(pid)
            if "grpo" in cmd and "--init-hf" in cmd:
                os.kill(pid, signal.SIGTERM)
                sent["pid"] = pid

    rc, out = _run_script(env, tmp_path / "first.log", 1200, stop_grpo_after_step_1)
    assert sent, out[-4000:]
    assert rc == 75, out[-4000:]
    assert "Traceback" not in out, out[-6000:]
    assert f"dropped 1 of 4001 prompts too long to fit (rl.max_prompt_len=128; rollout.max_model_len=384): " \
           f"{train}:4001 (" in out, out[-6000:]
    assert "stopped by SIGTERM at step" in out and "run this script again to resume" in out, out[-4000:]
    assert (run / "pretrain" / "DONE").exists()
    assert not (grpo_dir / "DONE").exists() and not (grpo_dir / "hf").exists()  # no export of a stopped run
    stopped = sorted(d.name for d in (grpo_dir / "ckpt").glob("step_*") if (d / "COMPLETE").exists())
    assert stopped and stopped[-1] < "step_000003", stopped
    pretrain_log = (run / "pretrain" / "metrics.jsonl").read_text()

    rc, out = _run_script(env, tmp_path / "second.log", 1200)
    assert rc == 0, out[-4000:]
    assert f"resumed from {grpo_dir / 'ckpt' / stopped[-1]}" in out, out[-4000:]
    assert (run / "pretrain" / "metrics.jsonl").read_text() == pretrain_log  # finished: not run again
    done = json.loads((grpo_dir / "DONE").read_text())
    assert done["step"] == 3 and (grpo_dir / "hf" / "config.json").exists()
    steps = [json.loads(x)["step"] for x in open(grpo_dir / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3], steps  # the step-0 evaluation, then each step once
    assert json.loads((run / "eval_final.json").read_text())["sampled"]["problems"] == 8
