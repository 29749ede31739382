"""`megatron-r1 pretrain` stopped after its step-2 checkpoint and started again continues exactly:
the losses of steps 3-4 equal those of an uninterrupted run, bit for bit (CPU, float32)."""
import json
import subprocess
import sys

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


def test_sigusr1_saves_and_stops(corpus, tmp_path):
    """Preemption: SIGUSR1 makes the trainer finish its step, save a complete checkpoint and exit 0."""
    import os
    import signal
    import time
    run = tmp_path / "c"
    cmd = [sys.executable, "-m", "megatron_r1.cli", "pretrain", "--config", "tiny-moe", "--data", corpus,
           *OVERRIDES, "train.save_interval=0", "train.train_steps=100000", f"run_dir={run}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    steps = [int(d.name.split("_")[1]) for d in (run / "ckpt").iterdir() if (d / "COMPLETE").exists()]
    assert len(steps) == 1 and 0 < steps[0] < 100000
    # the next start resumes from it
    resumed = _pretrain(corpus, run, steps[0] + 1)
    assert max(resumed) == steps[0] + 1
    assert os.path.exists(run / "ckpt" / f"step_{steps[0] + 1:06d}" / "COMPLETE")
