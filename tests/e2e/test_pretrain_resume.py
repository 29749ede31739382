"""`megatron-r1 pretrain` stopped after its step-2 checkpoint and started again continues exactly:
the losses of steps 3-4 equal those of an uninterrupted run, bit for bit (CPU, float32)."""
import json
import signal
import subprocess
import sys
import time

import pytest

from megatron_r1.data.indexed import build_indexed_dataset


class _ByteTokenizer:
    vocab_size, bos_id, eos_id, pad_id = 259, 256, 257, 258

    def encode(self, text, bos=False, eos=False):
        return ([self.bos_id] if bos else []) + list(text.encode()) + ([self.eos_id] if eos else [])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    src = d / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}. "}) + "\n" for i in range(400)))
    return build_indexed_dataset(str(src), str(d / "corpus"), _ByteTokenizer(), progress=False)


OVERRIDES = ["model.preset=tiny-moe", "model.vocab_size=320", "model.hidden_size=64", "model.num_hidden_layers=2",
             "train.params_dtype=float32", "train.seq_length=32", "train.micro_batch_size=2",
             "train.global_batch_size=4", "train.lr=1e-2", "train.save_interval=2"]


def _pretrain(corpus, run_dir, steps):
    cmd = [sys.executable, "-m", "megatron_r1.cli", "pretrain", "--config", "tiny-moe", "--data", corpus,
           *OVERRIDES, f"train.train_steps={steps}", f"run_dir={run_dir}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {row["step"]: row["loss"] for row in map(json.loads, open(f"{run_dir}/metrics.jsonl"))}


def test_resume_is_exact(corpus, tmp_path):
    straight = _pretrain(corpus, tmp_path / "a", 4)
    first = _pretrain(corpus, tmp_path / "b", 2)
    assert (tmp_path / "b" / "ckpt" / "step_000002" / "COMPLETE").exists()
    resumed = _pretrain(corpus, tmp_path / "b", 4)  # same run dir: picks up step_000002
    assert [first[1], first[2]] == [straight[1], straight[2]]
    assert [resumed[3], resumed[4]] == [straight[3], straight[4]]
    assert straight[4] < straight[1]


def _steps(run):
    return sorted(int(d.name.split("_")[1]) for d in (run / "ckpt").iterdir() if (d / "COMPLETE").exists())


def _start(corpus, run, *extra):
    cmd = [sys.executable, "-m", "megatron_r1.cli", "pretrain", "--config", "tiny-moe", "--data", corpus,
           *OVERRIDES, *extra, f"run_dir={run}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(run, n, proc, timeout=240):
    """Until metrics.jsonl has a row of step >= n (the trainer is then mid-run)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        try:
            rows = [json.loads(x) for x in open(run / "metrics.jsonl") if x.endswith("\n")]
        except FileNotFoundError:
            rows = []
        if rows and rows[-1]["step"] >= n:
            return rows[-1]["step"]
        time.sleep(0.05)
    raise AssertionError(f"no metrics row {n} in {timeout}s")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_signal_saves_stops_without_export_and_resumes(corpus, tmp_path, sig):
    """Preemption (SIGTERM, Slurm's SIGUSR1) and Ctrl-C (SIGINT): finish the step, save a complete
    checkpoint, no export, no DONE, exit 75; the next start resumes from it and only then finishes."""
    from megatron_r1.training import EXIT_STOPPED
    run = tmp_path / "c"
    proc = _start(corpus, run, "train.save_interval=0", "train.train_steps=100000")
    _wait_for_rows(run, 1, proc)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_STOPPED == 75, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    steps = _steps(run)
    assert len(steps) == 1 and 0 < steps[0] < 100000
    assert f"stopped by {sig} at step {steps[0]}: checkpoint saved" in err, err[-2000:]
    assert not (run / "hf").exists() and not (run / "DONE").exists()
    # the next start resumes from it, finishes, exports and marks the run done
    resumed = _pretrain(corpus, run, steps[0] + 1)
    assert sorted(resumed) == list(range(1, steps[0] + 2))  # each step once
    assert (run / "ckpt" / f"step_{steps[0] + 1:06d}" / "COMPLETE").exists()
    assert (run / "hf" / "config.json").exists()
    assert json.loads((run / "DONE").read_text())["step"] == steps[0] + 1


def test_kill9_between_log_and_save_logs_each_step_once(corpus, tmp_path):
    """kill -9 after steps 11.. were logged but only step 10 saved: the resumed run logs 11.. again,
    and metrics.jsonl (and TensorBoard's view) still has each step once."""
    run = tmp_path / "k"
    proc = _start(corpus, run, "train.save_interval=10", "train.train_steps=100000")
    _wait_for_rows(run, 12, proc)
    proc.kill()
    proc.wait(timeout=60)
    saved = _steps(run)[-1]
    logged = [json.loads(x)["step"] for x in open(run / "metrics.jsonl") if x.endswith("\n")]
    assert max(logged) > saved, (logged, saved)  # the case under test: steps logged past the last save
    final = max(logged) + 2
    cmd = [sys.executable, "-m", "megatron_r1.cli", "pretrain", "--config", "tiny-moe", "--data", corpus,
           *OVERRIDES, "train.save_interval=10", f"train.train_steps={final}", f"run_dir={run}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {run / 'ckpt' / f'step_{saved:06d}'} at step {saved}" in r.stdout, r.stdout[-2000:]
    steps = [json.loads(x)["step"] for x in open(run / "metrics.jsonl")]
    assert steps == list(range(1, final + 1)), steps


def test_truncated_newest_checkpoint_resumes_from_the_previous(corpus, tmp_path):
    run = tmp_path / "t"
    _pretrain(corpus, run, 4)  # checkpoints at 2 and 4
    newest = run / "ckpt" / "step_000004"
    shard = next(newest.glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    cmd = [sys.executable, "-m", "megatron_r1.cli", "pretrain", "--config", "tiny-moe", "--data", corpus,
           *OVERRIDES, "train.train_steps=5", f"run_dir={run}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resume: skipping {newest}: {shard}: truncated checkpoint shard" in r.stdout, r.stdout[-3000:]
    assert f"resumed from {run / 'ckpt' / 'step_000002'} at step 2 (skipped 1 newer" in r.stdout, r.stdout[-3000:]
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    # every checkpoint damaged: a one-line refusal, not a silent fresh start
    for d in (run / "ckpt").glob("step_*"):
        (d / ".metadata").write_bytes(b"")
    r = subprocess.run(cmd[:-2] + ["train.train_steps=6", f"run_dir={run}"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {run / 'ckpt'}: no checkpoint loads (step_"), r.stderr
