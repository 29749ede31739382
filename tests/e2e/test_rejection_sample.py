"""`megatron-r1 rejection-sample` and `megatron-r1 eval` end to end on a random tiny policy (one
process each, vLLM on CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
        "model.moe_intermediate_size=32"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """(task info from prepare-tiny, HF dir of a random tiny-moe policy with its tokenizer)."""
    from megatron_r1.ckpt.hf import hf_tensors, model_state, save_hf
    from megatron_r1.config import load_config
    from megatron_r1.model import CausalLM
    from megatron_r1.recipes.tiny_r1_zero import prepare
    from megatron_r1.training import copy_tokenizer
    root = tmp_path_factory.mktemp("policy")
    info = prepare(str(root / "data"), docs=300, difficulty=1)
    cfg = load_config(str(REPO / "examples/r1_zero_tiny.yaml"), TINY)
    torch.manual_seed(0)
    hf = root / "policy"
    save_hf(hf_tensors(model_state(CausalLM(cfg.model)), cfg.model), cfg.model, str(hf), dtype=torch.float32)
    copy_tokenizer(info["tokenizer"], str(hf))
    return info, hf


def test_rejection_sample_writes_sft_rows(tmp_path, policy, capsys):
    info, hf = policy
    out = tmp_path / "sft.jsonl"
    # a random policy is never right: accept everything to check the plumbing; select() has its own test
    argv = [sys.executable, "-m", "megatron_r1.cli", "rejection-sample", "--config", str(REPO / "examples/r1_zero_tiny.yaml"),
            "--init-hf", str(hf), "--data", info["train"], "--out", str(out), "--samples", "3", "--keep-per-prompt", "2",
            "--limit", "4", "--min-score", "accuracy=0", "--min-score", "format=0", "--keep-truncated",
            *TINY, "rl.max_response_len=16", "rollout.max_model_len=256"]
    from megatron_r1.cli import main as cli
    assert cli(argv[3:] + ["--dry-run"]) == 0  # in this process: the dry run starts no vLLM
    assert "dry run OK" in capsys.readouterr().out
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8, rows  # 4 prompts × 2 distinct samples
    for row in rows:
        assert row["prompt"].startswith("A conversation between User and Assistant") and row["prompt"].endswith("Assistant:")
        assert set(row["rewards"]) == {"accuracy", "format"} and isinstance(row["response"], str)
    assert "rejection-sample done" in r.stdout and not (tmp_path / "sft.jsonl.tmp").exists()
    # offline scoring of its output with the same config reproduces every row's rewards exactly
    rescored = tmp_path / "rescored.jsonl"
    assert cli(["score", "--config", str(REPO / "examples/r1_zero_tiny.yaml"), "--input", str(out),
                "--output", str(rescored), "--no-progress"]) == 0
    again = [json.loads(line) for line in rescored.read_text().splitlines()]
    assert [x["rewards"] for x in again] == [row["rewards"] for row in rows]
    assert [x["reward"] for x in again] == [row["reward"] for row in rows]

    # the rows feed the distillation export: the raw question rides along, the rendered prompt is not re-read
    assert all(row["question"] and row["question"] in row["prompt"] for row in rows)
    from megatron_r1.tools.export_distill_dataset import export
    stats = export([str(out)], str(tmp_path / "distill"), val_fraction=0.0)
    exported = [json.loads(line) for line in (tmp_path / "distill" / "train.jsonl").read_text().splitlines()]
    assert stats["rows_in"] == 8 and len(exported) == stats["after_dedup"]
    assert {e["messages"][0]["content"] for e in exported} <= {row["question"] for row in rows}


def _eval(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "megatron_r1.cli", "eval", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})


def test_eval_shares_one_engine_across_models_and_resumes(tmp_path, policy, capsys):
    """Models vLLM builds the same engine for share it (weights swapped in), with the results of a fresh engine;
    --out-dir writes a result per model and skips the ones already there; --model-template gives one model its
    own template without a new engine. The fresh engine's run also checks --both (sampled and greedy from one
    engine) against its --dump."""
    import shutil

    from safetensors.torch import load_file, save_file
    info, hf = policy
    other = tmp_path / "other"
    shutil.copytree(hf, other)
    (shard,) = other.glob("*.safetensors")
    weights = load_file(shard)
    torch.manual_seed(1)
    weights = {k: v + 0.05 * torch.randn_like(v) if v.dim() == 2 else v for k, v in weights.items()}
    # stored in bf16, as `sft` exports: the engine computes in float32 either way, so it is still shared
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, shard, metadata={"format": "pt"})
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, torch_dtype="bfloat16")))
    common = ["--data", info["eval"], "--samples", "2", "--temperature", "1.0", "--limit", "4", "--max-tokens", "12"]
    from megatron_r1.cli import main as cli
    for bad, why in (("x=r1_chat", "with the LABEL of a --model (a, b)"), ("a=nope", "unknown template 'nope'")):
        # one error line, before vLLM starts (in this process)
        assert cli(["eval", "--model", f"a={hf}", "--model", f"b={other}", "--model-template", bad, *common]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1, err
    both = _eval(tmp_path, "--model", f"a={hf}", "--model", f"b={other}", "--model", f"c={hf}", "--model", f"d={hf}",
                 "--model-template", "d=r1_chat", "--out-dir", str(tmp_path / "res"),
                 "--dump", str(tmp_path / "abc.jsonl"), *common)
    assert both.returncode == 0, both.stdout[-3000:] + both.stderr[-3000:]
    assert both.stderr.count("swapped into the running engine") == 3, both.stderr[-3000:]
    assert both.stderr.count("starting a vLLM engine") == 1, both.stderr[-3000:]
    alone = _eval(tmp_path, "--model", f"b={other}", "--dump", str(tmp_path / "b.jsonl"), "--out",
                  str(tmp_path / "b.json"), "--both", *common)
    assert alone.returncode == 0, alone.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())
    dumped = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    sampled, greedy = [x for x in dumped if x["temperature"] == 1.0], [x for x in dumped if x["temperature"] == 0.0]
    assert len(sampled) == 4 * 2 and len(greedy) == 4, len(dumped)
    assert (res["sampled"]["samples"], res["greedy"]["samples"], res["sampled"]["problems"]) == (2, 1, 4)
    for mode, got in (("sampled", sampled), ("greedy", greedy)):
        assert res[mode]["pass@1"] == pytest.approx(sum(x["correct"] for x in got) / len(got))
        assert res[mode]["format"] == pytest.approx(sum(x["format"] for x in got) / len(got))
    # T=1 draws differ within a prompt (a perturbed random 512-token policy); the summary's length is theirs
    assert len({x["completion"] for x in sampled}) > 4 and 0 < res["sampled"]["response_length"] <= 12
    rows = [json.loads(line) for line in (tmp_path / "abc.jsonl").read_text().splitlines()]
    per = {m: [r["completion"] for r in rows if r["model"] == m] for m in "abcd"}
    assert per["b"] == [x["completion"] for x in sampled] and per["a"] == per["c"]  # swapped in = freshly built
    assert per["a"] != per["b"]  # ... and the swap changed the weights
    # d: a's weights prompted with r1_chat: other prompts, other completions; its format rate is r1_chat's
    assert {r["template"] for r in rows if r["model"] == "d"} == {"r1_chat"} and per["d"] != per["a"]
    assert {r["template"] for r in rows if r["model"] != "d"} == {"r1_zero"}
    from megatron_r1.rl.rewards.formatting import format_reward
    d_json = json.loads((tmp_path / "res" / "d.json").read_text())
    assert d_json["format"] == pytest.approx(sum(format_reward(c, variant="r1_boxed") for c in per["d"]) / 8)
    assert json.loads((tmp_path / "res" / "b.json").read_text()) == res["sampled"]
    # in this process: every result is there, so no engine starts
    assert cli(["eval", "--model", f"a={hf}", "--model", f"b={other}", "--out-dir", str(tmp_path / "res"), *common]) == 0
    again = capsys.readouterr().err
    assert again.count("exists, skipped") == 2 and "starting a vLLM engine" not in again and "swapped" not in again
