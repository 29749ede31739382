"""The cluster scripts under a real (single-node) Slurm: the 671B dry run, and GRPO across two srun tasks.

- The 671B script is submitted as is, with the node count overridden to 1 and no GPUs (this test node has
  none); its dry run must still plan the script's 64-node layout and report it fitting 80 GB.
- The GRPO job goes through examples/cluster_common.sh (preflight dry run, one srun, the USR1 trap
  machinery) with a tiny random policy: 2 tasks = 2 ranks on gloo, each with its co-located vLLM.
"""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.slurm import slurm_cluster  # noqa: F401  (pytest fixture)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _job_env(**extra) -> dict:
    return {"MR1_REPO": str(REPO), "MR1": str(BIN / "megatron-r1"), "PYTHON": sys.executable,
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}}


def _sparse_safetensors(path: Path, model) -> None:
    """A bf16 safetensors file with every tensor of `model` in its header and its 1.4 TB of data a hole
    (a sparse file): the dry run checks names, shapes and the file's length, and reads no weight."""
    from megatron_r1.ckpt.hf import expected_shapes, hf_names
    header, offset = {}, 0
    for name, shape in expected_shapes(model).items():
        n = 2 * math.prod(shape)
        for hf in hf_names(name, model):
            header[hf] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)


def test_r1_zero_671b_dry_run_plans_the_real_layout(slurm_cluster, tmp_path):
    from megatron_r1.config import load_config
    hf = tmp_path / "dsv3_base"  # stands in for the converted checkpoint: the dry run reads headers only
    hf.mkdir()
    model = load_config("deepseek-v3-671b").model
    (hf / "config.json").write_text(json.dumps(model.to_hf_dict()))
    _sparse_safetensors(hf / "model.safetensors", model)
    (hf / "tokenizer.json").write_text("{}")
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    run_dir = tmp_path / "run"
    result = slurm_cluster.sbatch_wait(
        REPO / "examples" / "r1_zero_671b.sh", ["--dry-run"],
        env=_job_env(INIT_HF=hf, DATA=data, RUN_DIR=run_dir), timeout=180,
        # one CPU node without GPUs runs the dry run; the plan is still the script's 64 × 8
        sbatch_args=["-N", "1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"])
    out = result.output
    assert result.returncode == 0, out
    assert "PLANNED 64 nodes × 8 GPUs = 512 ranks" in out and "(1 node allocated)" in out, out
    assert "FITS: yes" in out and "dry run OK" in out, out
    assert f"ok        init policy (--init-hf): {hf} (" in out and "tensors: names, shapes, file sizes)" in out, out
    # 61 layers run as uneven stages, the config's split is the plan's: no layer-split warning
    assert "61 over 16 stages: [4 (×15), 1] (explicit)" in out, out
    assert "warning: runtime: the config splits" not in out and "cannot be split" not in out, out
    assert "dry run only: nothing launched" in out, out

    plan_file = next((run_dir / "logs").glob("plan-*.json"))
    got = json.loads(plan_file.read_text())
    assert got["ok"] and got["world"] == {"nodes": 64, "gpus_per_node": 8, "ranks": 512,
                                          "source": "--nodes, --gpus-per-node"}
    plan = got["plan"]
    assert plan["gpus"] == 512 and plan["model"] == "r1_zero_671b.yaml"
    assert {k: plan["layout"][k] for k in ("tp", "cp", "ep", "pp", "dp")} == {"tp": 1, "cp": 8, "ep": 32, "pp": 16, "dp": 4}
    assert plan["layers_per_stage"] == [4] * 15 + [1] and sum(plan["layers_per_stage"]) == 61
    assert plan["parameters"]["total"] > 670e9
    # the plan is the configured recompute (train.recompute: full), which the runtime runs: no warning
    assert plan["recompute"] == "full" and "has no activation recompute" not in out, out
    assert plan["fits"] and 0 < plan["memory_gb"]["total"] <= plan["gpu_mem_gb"] == 80.0
    # the worst stage is what the report prints
    assert f"total {plan['memory_gb']['total']:>15.2f}  of 80 GB  FITS: yes".split() == \
        next(line for line in out.splitlines() if "FITS:" in line).split()


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from megatron_r1.ckpt.hf import hf_tensors, model_state, save_hf
    from megatron_r1.config import load_config
    from megatron_r1.model import CausalLM
    from megatron_r1.recipes.tiny_r1_zero import prepare
    from megatron_r1.training import copy_tokenizer
    root = tmp_path_factory.mktemp("slurm_grpo")
    info = prepare(str(root / "data"), docs=300, difficulty=1)
    cfg = load_config("examples/r1_zero_tiny.yaml", TINY)
    torch.manual_seed(0)
    hf = root / "policy"
    save_hf(hf_tensors(model_state(CausalLM(cfg.model)), cfg.model), cfg.model, str(hf), dtype=torch.float32)
    copy_tokenizer(info["tokenizer"], str(hf))
    return hf, Path(info["train"])


TINY = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
        "model.moe_intermediate_size=32"]

GRPO_JOB = """#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --time=10
# a tiny stage script on the same shared body as the 671B ones
STAGE=tiny_grpo_srun
CMD=grpo
CFG=examples/r1_zero_tiny.yaml
DEFAULT_NODES=1
GPUS_PER_NODE=2
RECOMPUTE=none
DISPATCH_DTYPE=bf16
CMD_ARGS=(--init-hf "$INIT_HF")
OVERRIDES=(data.train_path="$DATA" {overrides})
source "$MR1_REPO/examples/cluster_common.sh"
mr1_main "$@"
"""


def test_grpo_two_steps_across_two_srun_tasks(slurm_cluster, tiny_policy, tmp_path):
    hf, train = tiny_policy
    overrides = TINY + ["train.train_steps=2", "train.micro_batch_size=4", "rl.prompts_per_step=4",
                        "rl.group_size=4", "rl.max_response_len=24", "rollout.max_model_len=256"]
    script = tmp_path / "grpo.sbatch"
    script.write_text(GRPO_JOB.format(overrides=" ".join(overrides)))
    run_dir = tmp_path / "run"
    result = slurm_cluster.sbatch_wait(script, [], env=_job_env(INIT_HF=hf, DATA=train, RUN_DIR=run_dir),
                                       timeout=420)
    out = result.output
    assert result.returncode == 0, out
    assert "dry run OK" in out and "srun exit 0" in out, out
    assert "PLANNED 1 nodes × 2 GPUs = 2 ranks" in out, out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 2, rows
    for row in rows:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
        assert not bad, bad
        assert "reward/total" in row and "mismatch/max_abs_logprob" in row, row
    assert os.path.isfile(run_dir / "hf" / "config.json")  # exported at the end


PRETRAIN_JOB = """#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=10
#SBATCH --requeue
#SBATCH --open-mode=append
STAGE=tiny_pretrain_requeue
CMD=pretrain
CFG=examples/r1_zero_tiny.yaml
DEFAULT_NODES=1
GPUS_PER_NODE=1
RECOMPUTE=none
DISPATCH_DTYPE=bf16
CMD_ARGS=(--data "$DATA")
OVERRIDES=({overrides})
source "$MR1_REPO/examples/cluster_common.sh"
mr1_main "$@"
"""


def test_sigterm_to_the_job_step_requeues_and_the_job_finishes(slurm_cluster, tmp_path):
    """Preemption as Slurm delivers it (SIGTERM to the job step): the trainer saves and exits 75, the
    script requeues the job, the requeued job resumes and finishes: export, DONE, each step logged once.
    A second submission of the finished stage exits 0 at once."""
    import subprocess
    import time

    from megatron_r1.data.indexed import build_indexed_dataset

    class Bytes:
        vocab_size, bos_id, eos_id, pad_id = 259, 256, 257, 258

        def encode(self, text, bos=False, eos=False):
            return ([self.bos_id] if bos else []) + list(text.encode()) + ([self.eos_id] if eos else [])

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}. "}) + "\n" for i in range(400)))
    corpus = build_indexed_dataset(str(src), str(tmp_path / "corpus"), Bytes(), progress=False)
    steps = 40
    overrides = TINY + ["train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
                        "train.save_interval=0", f"train.train_steps={steps}"]
    script = tmp_path / "pretrain.sbatch"
    script.write_text(PRETRAIN_JOB.format(overrides=" ".join(overrides)))
    run_dir = tmp_path / "run"
    env = {**slurm_cluster.env, **_job_env(DATA=corpus, RUN_DIR=run_dir)}
    out_file = tmp_path / "job.out"
    r = subprocess.run(["sbatch", "--parsable", f"--output={out_file}", f"--chdir={REPO}", str(script)],
                       capture_output=True, text=True, env=env, timeout=30)
    job = r.stdout.strip().split(";")[0]
    assert r.returncode == 0 and job, r.stderr
    deadline = time.monotonic() + 400
    signalled = False
    while True:
        state, code = slurm_cluster.job_state(job)
        assert time.monotonic() < deadline, f"{state}\n{out_file.read_text(errors='replace') if out_file.exists() else ''}"
        if not signalled and (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text():
            subprocess.run(["scancel", "--signal=TERM", job], env=slurm_cluster.env, check=True)  # the step only
            signalled = True
        if signalled and state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(0.25)
    # a job log is a byte stream: a SIGTERM can cut a tqdm bar's multi-byte character in two
    out = out_file.read_text(errors="replace")
    assert state == "COMPLETED" and code == 0, out
    assert "srun exit 75" in out and f"requeueing job {job}" in out, out
    assert "srun exit 0" in out and "resumed from" in out, out
    assert json.loads((run_dir / "DONE").read_text())["step"] == steps and (run_dir / "hf" / "config.json").exists()
    assert [json.loads(x)["step"] for x in open(run_dir / "metrics.jsonl")] == list(range(1, steps + 1))
    again = slurm_cluster.sbatch_wait(script, [], env=_job_env(DATA=corpus, RUN_DIR=run_dir), timeout=120)
    assert again.returncode == 0 and "already finished" in again.output, again.output
