"""Bad files and configs a user brings, through the commands they run: each is one `error:` line
naming the file (and row or tensor), exit 2, no traceback; the dry run names it on a `problem:` line.

Every case fails before a vLLM engine would start (the commands read their inputs first), so no
engine is built here. `grpo` runs as a subprocess (it joins a process group); `eval`, `convert` and
the dry runs run in this process through `megatron_r1.cli.main`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_r1.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
        "model.moe_intermediate_size=32"]
CFG = str(REPO / "examples/r1_zero_tiny.yaml")


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """(task info from prepare-tiny, HF dir of a random tiny-moe policy with its tokenizer)."""
    from megatron_r1.ckpt.hf import hf_tensors, model_state, save_hf
    from megatron_r1.config import load_config
    from megatron_r1.model import CausalLM
    from megatron_r1.recipes.tiny_r1_zero import prepare
    from megatron_r1.training import copy_tokenizer
    root = tmp_path_factory.mktemp("bad_inputs")
    info = prepare(str(root / "data"), docs=300, difficulty=1)
    cfg = load_config(CFG, TINY)
    torch.manual_seed(0)
    hf = root / "policy"
    save_hf(hf_tensors(model_state(CausalLM(cfg.model)), cfg.model), cfg.model, str(hf), dtype=torch.float32)
    copy_tokenizer(info["tokenizer"], str(hf))
    return info, hf


def _copy_truncated(hf: Path, dst: Path) -> Path:
    """A copy of the policy whose safetensors file was cut short (a copy that died, a full disk)."""
    import shutil
    shutil.copytree(hf, dst)
    st = dst / "model.safetensors"
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size // 2)
    return st


def _latin1(tmp_path: Path, info) -> Path:
    rows = open(info["train"], "rb").read().splitlines(keepends=True)[:40]
    rows[2] = rows[2].replace(b'"prompt": "', b'"prompt": "caf\xe9 ', 1)  # one Latin-1 byte in row 3
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b"".join(rows))
    return p


def _one_error_line(out: str, rc: int, starts: str) -> str:
    assert rc == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"error: {starts}"), out[-3000:]
    return last


def _grpo(argv, tmp_path):
    cmd = [sys.executable, "-m", "megatron_r1.cli", "grpo", "--config", CFG, *argv, *TINY,
           "rl.prompts_per_step=4", "rl.group_size=2", "rollout.max_model_len=256", f"run_dir={tmp_path / 'run'}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    return r.returncode, r.stdout + r.stderr


def test_grpo_bad_files_and_unfit_config_are_one_line(policy, tmp_path):
    info, hf = policy
    st = _copy_truncated(hf, tmp_path / "cut")
    rc, out = _grpo(["--init-hf", str(tmp_path / "cut"), f"data.train_path={info['train']}"], tmp_path)
    _one_error_line(out, rc, f"{st}: truncated safetensors file")
    bad = _latin1(tmp_path, info)
    rc, out = _grpo(["--init-hf", str(hf), f"data.train_path={bad}", "data.on_error=raise"], tmp_path)
    _one_error_line(out, rc, f"{bad}:3: not UTF-8 (byte 0xe9")
    # refused at start-up, before any weight is read: no prompt of max_prompt_len tokens fits
    rc, out = _grpo(["--init-hf", str(hf), f"data.train_path={info['train']}", "rl.max_prompt_len=256"], tmp_path)
    _one_error_line(out, rc, "rl.max_prompt_len=256 leaves no room for a response in rollout.max_model_len=256")


def test_eval_bad_files_are_one_line(policy, tmp_path, capsys):
    info, hf = policy
    st = _copy_truncated(hf, tmp_path / "cut")
    rc = cli(["eval", "--model", str(tmp_path / "cut"), "--data", info["eval"]])
    _one_error_line(capsys.readouterr().err, rc, f"{st}: truncated safetensors file")
    pq = tmp_path / "eval.parquet"
    pq.write_bytes(b"PAR1" + b"\0" * 64)
    rc = cli(["eval", "--model", str(hf), "--data", str(pq)])
    _one_error_line(capsys.readouterr().err, rc, f"{pq}: not a readable Parquet file")
    rc = cli(["eval", "--model", str(hf), "--data", str(tmp_path / "missing.jsonl")])
    _one_error_line(capsys.readouterr().err, rc, f"{tmp_path / 'missing.jsonl'}: no such file")


def test_convert_bad_files_are_one_line(policy, tmp_path, capsys):
    info, hf = policy
    st = _copy_truncated(hf, tmp_path / "cut")
    rc = cli(["convert", "--from", "hf", "--to", "megatron_r1", "--input", str(tmp_path / "cut"),
              "--output", str(tmp_path / "out"), "--no-progress"])
    _one_error_line(capsys.readouterr().err, rc, f"{st}: truncated safetensors file")
    ours = tmp_path / "ours"
    assert cli(["convert", "--from", "hf", "--to", "megatron_r1", "--input", str(hf), "--output", str(ours),
                "--no-progress"]) == 0
    shard = next(ours.glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    capsys.readouterr()
    rc = cli(["convert", "--from", "megatron_r1", "--to", "hf", "--input", str(ours), "--output",
              str(tmp_path / "back"), "--no-progress"])
    _one_error_line(capsys.readouterr().err, rc, f"{shard}: truncated checkpoint shard")


def test_dry_run_reads_rows_headers_and_checkpoints(policy, tmp_path, capsys):
    """The dry run parses every row, checks the safetensors headers against the config's shapes and the
    checkpoints resume would use: each bad file is one `problem:`/`warning:` line naming it."""
    info, hf = policy
    base = ["grpo", "--config", CFG, "--dry-run", *TINY, "rollout.max_model_len=256", f"run_dir={tmp_path / 'run'}"]

    def dry(init_hf, *overrides):
        return cli(base[:4] + ["--init-hf", str(init_hf)] + base[4:] + list(overrides))
    # a good job: every row and tensor is read, and says so
    assert dry(hf, f"data.train_path={info['train']}") == 0
    out = capsys.readouterr().out
    assert "4000 rows parsed and validated; every prompt tokenized (limit 128 tokens)" in out, out
    assert "tensors: names, shapes, file sizes)" in out and "dry run OK" in out, out

    bad = _latin1(tmp_path, info)
    long_row = json.dumps({"prompt": "1 + 1 " * 300, "answer": "2"}).encode() + b"\n"
    bad.write_bytes(bad.read_bytes() + long_row)
    st = _copy_truncated(hf, tmp_path / "cut")
    damaged = tmp_path / "run" / "ckpt" / "step_000003"
    damaged.mkdir(parents=True)
    (damaged / ".metadata").write_bytes(b"\x80\x04torn")
    (damaged / "COMPLETE").write_text("x\n")
    assert dry(tmp_path / "cut", f"data.train_path={bad}") == 1
    out = capsys.readouterr().out
    assert "Traceback" not in out
    problems = [x for x in out.splitlines() if x.startswith(("problem:", "missing:"))]
    assert problems[0].startswith(f"problem: {st}: truncated safetensors file"), out
    assert any(x.startswith(f"warning: {bad}: skipped 1 of 41 rows as malformed: {bad}:3: not UTF-8") for x in
               out.splitlines()), out
    assert any(x.startswith(f"warning: {bad}: dropped 1 of 41 prompts too long to fit (limit 128 tokens): {bad}:41 (")
               for x in out.splitlines()), out
    assert problems[-1] == f"problem: resume: none of the 1 checkpoints in {tmp_path / 'run' / 'ckpt'} loads", out
    assert f"warning: resume: would skip {damaged}: {damaged}/.metadata: unreadable checkpoint metadata" in out, out
    # with data.on_error=raise the malformed row is the problem, named
    assert dry(hf, f"data.train_path={bad}", "data.on_error=raise") == 1
    out = capsys.readouterr().out
    assert f"problem: prompts (data.train_path): {bad}:3: not UTF-8 (byte 0xe9" in out, out
