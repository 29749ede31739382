"""The training-fault battery (issue 17): real runs of `megatron-r1 pretrain` / `grpo`, broken where real faults
strike by the test-only hooks of megatron_r1/faults.py, and checked for what must hold afterwards.

Every command runs in its own session with a private TMPDIR (`_run`): when it ends, no process of that session
may be left (a rank that outlived the job, a daemonised helper) and the TMPDIR must be empty. Each case is listed
with its outcome and time in benchmarks/reliability.md (benchmarks/reliability.py runs this file).
"""
import getpass
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megatron_r1.faults import ENV
from tests.e2e.test_pretrain_resume import OVERRIDES, corpus  # noqa: F401 - the corpus fixture

INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                                          f"torchinductor_{getpass.getuser()}")
KILL_BOUND_S = 90.0  # a rank's death to the whole job's exit, on a loaded 2-core machine (seen: ~15 s)


def _session_procs(sid: int) -> list[str]:
    """Processes of session `sid` still alive (zombies excluded): `pid cmdline`."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(f"{d} {open(f'/proc/{d}/cmdline').read().replace(chr(0), ' ')[:120]}")
        except (OSError, ValueError, IndexError):
            continue
    return out


def _run(cmd, tmp_path: Path, faults: str = "", timeout: float = 600, prefix: list[str] | None = None):
    """Run `cmd` in a new session with a private TMPDIR; returns (rc, stdout, stderr, end time). Asserts that
    nothing it started survives and that it left no file in its TMPDIR."""
    tmpdir = tmp_path / f"TMPDIR.{time.monotonic_ns()}"
    tmpdir.mkdir()
    # torch inductor's compile cache (vLLM compiles) is a cache meant to outlive runs: kept where it would be
    env = {**os.environ, "TMPDIR": str(tmpdir), ENV: faults, "TORCHINDUCTOR_CACHE_DIR": INDUCTOR_CACHE}
    p = subprocess.Popen((prefix or []) + [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, errors="replace", env=env, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    end = time.time()
    left = _session_procs(p.pid)
    for _ in range(20):  # a child may still be between its parent's exit and its own
        if not left:
            break
        time.sleep(0.25)
        left = _session_procs(p.pid)
    if left:
        os.killpg(p.pid, signal.SIGKILL)
    assert not left, f"processes survived {cmd[:4]}: {left}"
    # torch puts its compiled-header cache under $TMPDIR whatever TORCHINDUCTOR_CACHE_DIR says (codecache.py
    # _HEADER_DIR): a cache by design, the one thing allowed to stay
    left = sorted(str(x.relative_to(tmpdir)) for x in tmpdir.rglob("*")
                  if not str(x.relative_to(tmpdir)).startswith(f"torchinductor_{getpass.getuser()}"))
    assert not left, f"left in TMPDIR: {left}"
    assert {str(x.relative_to(tmpdir)) for x in tmpdir.glob("*/*")} <= {f"torchinductor_{getpass.getuser()}/"
                                                                         "precompiled_headers"}
    shutil.rmtree(tmpdir)
    return p.returncode, out, err, end


def _pretrain_cmd(corpus, run, steps, *extra, ranks: int = 1):  # noqa: F811
    # torchrun's own per-run directory (left behind even by a clean run) goes to the run dir, not TMPDIR
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                 f"--log-dir={run}/torchrun"] if ranks > 1 else [sys.executable])
    return [*launcher, "-m", "megatron_r1.cli", "pretrain", "--config", "tiny-moe", "--data", corpus, *OVERRIDES,
            f"train.train_steps={steps}", f"run_dir={run}", *extra]


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in open(path) if x.endswith("\n")]


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_ledger(ledger: list[dict], reference: list[dict]) -> None:
    """Each step once, in order; the same rows as the uninterrupted run; within an epoch no row twice."""
    assert [r["step"] for r in ledger] == list(range(1, len(ledger) + 1))
    assert [r["rows"] for r in ledger] == [r["rows"] for r in reference]
    seen = [tuple(x) if isinstance(x, list) else x for r in ledger for x in r["rows"]]
    assert len(seen) == len(set(seen)), "a row consumed twice"


# ------------------------------------------------------------------------------- a rank killed mid-step
@pytest.mark.long
def test_rank_killed_mid_step_stops_the_job_and_resume_is_bit_exact(corpus, tmp_path):  # noqa: F811
    """2 ranks (dp=2) under torchrun; SIGKILL of rank 1 inside step 3's forward (rank 0 is in the step's
    gradient all-reduce): the job exits non-zero within KILL_BOUND_S, nothing survives; started again it
    resumes from step 2 (the newest complete checkpoint), and its losses, gradient norms, exported weights
    and sample ledger equal those of an uninterrupted 2-rank run, bit for bit."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    rc, _, err, _ = _run(_pretrain_cmd(corpus, ref, 4, ranks=2), tmp_path)
    assert rc == 0, err[-3000:]
    rc, _, err, end = _run(_pretrain_cmd(corpus, run, 4, ranks=2), tmp_path, faults="kill@3:1")
    assert rc != 0
    killed_at = float((run / "fault.kill.1").read_text())
    assert end - killed_at < KILL_BOUND_S, f"the job took {end - killed_at:.0f} s to go down after the kill"
    assert sorted(d.name for d in (run / "ckpt").iterdir() if d.name.startswith("step_")) == ["step_000002"]
    assert max(r["step"] for r in _rows(run / "metrics.jsonl")) == 2
    rc, out, err, _ = _run(_pretrain_cmd(corpus, run, 4, ranks=2), tmp_path)
    assert rc == 0, err[-3000:]
    assert f"resumed from {run / 'ckpt' / 'step_000002'} at step 2" in out, out[-2000:]
    a, b = _rows(ref / "metrics.jsonl"), _rows(run / "metrics.jsonl")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in b] == [(r["step"], r["loss"], r["grad_norm"]) for r in a]
    assert _digest(run / "hf" / "model.safetensors") == _digest(ref / "hf" / "model.safetensors")
    _check_ledger(_rows(run / "ledger.jsonl"), _rows(ref / "ledger.jsonl"))
    assert len(_rows(run / "ledger.jsonl")) == 4


# -------------------------------------------------------------------------- NaN / inf: skip, count, stop
def test_nan_stop_is_one_error_line(corpus, tmp_path):  # noqa: F811
    """The CLI: NaN gradients at steps 2-3 with train.max_skipped_steps=1: the reason is logged for each
    skipped step, and the run stops with exit 1 and one `error:` line, last."""
    rc, out, err, _ = _run(_pretrain_cmd(corpus, tmp_path / "run", 6, "train.max_skipped_steps=1"), tmp_path,
                           faults="nan_grad@2,nan_loss@3")
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    assert "step 2: optimizer step skipped: non-finite gradient norm (nan) (1 in a row" in out, out[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: step 3: 2 optimizer steps in a row skipped for NaN/inf gradients (last: "
                           "non-finite gradient norm (nan), loss nan), more than train.max_skipped_steps=1"), last


# -------------------------------------------------------------------------------- checkpoint checksums
def test_corrupted_shard_is_refused_by_checksum_and_resume_falls_back(corpus, tmp_path):  # noqa: F811
    """One flipped byte in the newest checkpoint's shard (same size: the cheap checks pass): the checksum
    recorded at save refuses it, naming the file; resume warns loudly and falls back to the previous one."""
    from megatron_r1.ckpt.checkpoint import CHECKSUMS, verify_checkpoint
    from megatron_r1.ckpt.hf import CheckpointError
    run = tmp_path / "run"
    rc, _, err, _ = _run(_pretrain_cmd(corpus, run, 4), tmp_path)
    assert rc == 0, err[-3000:]
    newest = run / "ckpt" / "step_000004"
    sums = (newest / CHECKSUMS).read_text().splitlines()
    assert any(line.endswith("  __0_0.distcp") for line in sums) and any("rng/rank_00000.pt" in x for x in sums)
    check = subprocess.run(["sha256sum", "-c", CHECKSUMS], cwd=newest, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr  # the coreutils format: checkable by hand
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"^{shard}: checksum mismatch, the file is corrupted"):
        verify_checkpoint(str(newest))
    rc, out, err, _ = _run(_pretrain_cmd(corpus, run, 5), tmp_path)
    assert rc == 0, err[-3000:]
    assert f"resume: skipping {newest}: {shard}: checksum mismatch" in out, out[-3000:]
    assert f"WARNING: checkpoint {newest} refused ({shard}: checksum mismatch" in err, err[-3000:]
    assert f"resumed from {run / 'ckpt' / 'step_000002'} at step 2 (skipped 1 newer" in out, out[-3000:]
    assert [r["step"] for r in _rows(run / "ledger.jsonl")] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------- disk full
def _can_mount_tmpfs(tmp_path) -> bool:
    d = tmp_path / "probe"
    d.mkdir()
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs -o size=1m tmpfs {d}"], capture_output=True)
    return r.returncode == 0


def test_save_on_a_full_disk_keeps_the_previous_checkpoint_and_stops(corpus, tmp_path):  # noqa: F811
    """A real ENOSPC: the save dir is a 20 MB tmpfs (in a private mount namespace) that holds one tiny-moe
    checkpoint (13 MB) but not two. The step-4 save fails; the run stops with exit 2 and one error line that
    names the error and the checkpoint that is still the newest; the partial save is gone, and step 2 still
    passes its checksums."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (needs root / CAP_SYS_ADMIN)")
    run, save, after = tmp_path / "run", tmp_path / "save", tmp_path / "after"
    save.mkdir()
    cmd = _pretrain_cmd(corpus, run, 4, f"train.save_dir={save}")
    # inside the namespace: mount, train, then copy what the disk holds out (the mount dies with the namespace)
    script = (f'mount -t tmpfs -o size=20m tmpfs {save} || exit 99; "$@"; rc=$?; cp -a {save} {after}; exit $rc')
    rc, out, err, _ = _run(cmd, tmp_path, prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                                   script, "sh"])
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    # torch's zip writer reports the failed write as 'unexpected pos'; the filesystem's free space names the cause
    assert re.fullmatch(rf"error: {save}/step_000004.tmp: checkpoint save failed: .* \(no space left on the device: "
                        rf"\d+ bytes free of 20971520\); removed the partial save, the newest complete checkpoint is "
                        rf"still {save}/step_000002", last), last
    assert sorted(x.name for x in after.iterdir()) == ["latest", "step_000002"]
    from megatron_r1.ckpt.checkpoint import verify_checkpoint
    assert verify_checkpoint(str(after / "step_000002"))["step"] == 2
    assert not (run / "DONE").exists() and not (run / "hf").exists()


# ------------------------------------------------------------------------------------------------- GRPO
GRPO_TINY = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
             "model.moe_intermediate_size=32", "rl.prompts_per_step=4", "rl.group_size=2", "rl.max_response_len=16",
             "rollout.max_model_len=256", "train.save_interval=1"]


def _grpo_cmd(hf, info, run, steps):
    return [sys.executable, "-m", "megatron_r1.cli", "grpo", "--config", "examples/r1_zero_tiny.yaml", "--init-hf", hf,
            *GRPO_TINY, f"data.train_path={info['train']}", f"train.train_steps={steps}", f"run_dir={run}"]


@pytest.mark.long
def test_grpo_kill_rollout_error_and_resume_keep_the_prompt_ledger(tiny_policy, tmp_path):
    """GRPO (one rank, co-located vLLM, a checkpoint every step). SIGKILL inside step 2's update; the restart
    meets an exception inside the rollout engine at step 3 (vLLM's own input validation refusing a token id):
    the step stops with one error line and no checkpoint of step 3 (complete or partial); the next restart
    finishes. The prompt ledger (`path:LINE` per step) then equals an uninterrupted run's: no prompt row
    skipped or used twice across the kill and the error."""
    hf, info = tiny_policy
    ref, run = tmp_path / "ref", tmp_path / "run"
    rc, _, err, _ = _run(_grpo_cmd(hf, info, ref, 3), tmp_path)
    assert rc == 0, err[-3000:]
    rc, _, err, _ = _run(_grpo_cmd(hf, info, run, 3), tmp_path, faults="kill@2")
    assert rc == -signal.SIGKILL, err[-3000:]
    assert (run / "fault.kill.0").exists()
    assert sorted(d.name for d in (run / "ckpt").iterdir() if d.name.startswith("step_")) == ["step_000001"]
    rc, out, err, _ = _run(_grpo_cmd(hf, info, run, 3), tmp_path, faults="rollout_error@3")
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: step 3: the rollout failed on rank 0: \w*Error: .*Token id -1 is out of vocabulary.*; "
                        rf"nothing saved for this step \(checkpoints in {run / 'ckpt'}\)", last), last
    assert sorted(d.name for d in (run / "ckpt").iterdir() if d.name.startswith("step_")) == ["step_000001",
                                                                                              "step_000002"]
    assert not (run / "DONE").exists()
    rc, out, err, _ = _run(_grpo_cmd(hf, info, run, 3), tmp_path)
    assert rc == 0, err[-3000:]
    assert f"resumed from {run / 'ckpt' / 'step_000002'} at step 2" in out, out[-2000:]
    ledger = _rows(run / "ledger.jsonl")
    _check_ledger(ledger, _rows(ref / "ledger.jsonl"))
    assert len(ledger) == 3 and all(len(r["rows"]) == 4 and ":" in r["rows"][0] for r in ledger)
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2, 3]
