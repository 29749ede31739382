"""benchmarks/gpu_first_look.py --smoke: every section runs at toy sizes on this CPU, in under 2 minutes
of section time, and appends one run to the JSON; a bad section name is one `error:` line."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gfl.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "benchmarks/gpu_first_look.py", "--smoke", "--out", str(out), "--device", "cpu"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = json.loads(out.read_text())["runs"][-1]
    assert set(run["sections"]) == {"gemm", "experts", "attention", "slice", "weight_sync", "fp8"}
    assert sum(s["elapsed_s"] for s in run["sections"].values()) < 120
    for name, sec in run["sections"].items():
        bad = [c for c in sec["cases"] if c["status"] == "error"]
        assert not bad, (name, bad)
        assert any(c["status"] == "ok" for c in sec["cases"]), name
    att = run["sections"]["attention"]["cases"]
    assert {c["backend"] for c in att if c["status"] == "ok"} >= {"torch", "dense_mask"}
    assert {c["backend"] for c in att if c["status"] == "skipped"} == {"flex", "te"}  # CUDA-only here
    experts = {(c["backend"], c["routing"]) for c in run["sections"]["experts"]["cases"] if c["status"] == "ok"}
    assert ("grouped", "skewed") in experts and ("loop", "balanced") in experts
    assert run["sections"]["slice"]["cases"][0]["seconds_per_step"] > 0
    assert run["sections"]["weight_sync"]["cases"][0]["gb_per_s"] > 0
    fp8 = {(c["what"], c["backend"]): c["status"] for c in run["sections"]["fp8"]["cases"]}
    assert fp8[("linear_fwd_bwd", "reference")] == fp8[("grouped_fwd_bwd", "reference")] == "ok"
    assert fp8[("linear_fwd_bwd", "bf16")] == fp8[("grouped_fwd_bwd", "bf16")] == "ok"
    # CUDA / Transformer Engine only: recorded as skipped with the reason, not silently absent
    assert fp8[("gemm", "torch_scaled_mm_blockwise")] == fp8[("linear_fwd_bwd", "te")] == "skipped"

    bad = subprocess.run(cmd[:-2] + ["--sections", "gemm,nope"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown section(s) nope")
