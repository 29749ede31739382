"""`bash examples/r1_zero_tiny.sh --dry-run` checks and describes every stage and trains nothing."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_trains_nothing(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "RUN_DIR": str(run)}
    r = subprocess.run(["bash", "examples/r1_zero_tiny.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "configs ok" in out and "dry run only: nothing trained" in out, out
    for what in ("prepare-tiny", "pretrain", "eval", "grpo"):
        assert f"megatron-r1 {what}" in out, (what, out)
    assert not run.exists(), f"a dry run wrote {sorted(p.name for p in run.rglob('*'))}"


def test_unknown_argument_is_refused(tmp_path):
    r = subprocess.run(["bash", "examples/r1_zero_tiny.sh", "--dryrun"], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "RUN_DIR": str(tmp_path / "run")})
    assert r.returncode == 2 and "unknown argument --dryrun" in r.stderr
