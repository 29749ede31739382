"""megatron_r1.parallel.launch: Slurm string formats, env precedence, actionable errors, and a
real size-1 process group for the no-launcher case."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_r1.parallel.launch import (
    LaunchError,
    destroy_distributed,
    expand_hostlist,
    init_distributed,
    parse_tasks_per_node,
    resolve_env,
    slurm_port,
)

REPO = Path(__file__).resolve().parents[2]

HOSTLISTS = {
    "vm": ["vm"],
    "node[001-004,007],gpu12": ["node001", "node002", "node003", "node004", "node007", "gpu12"],
    "a[09-11]": ["a09", "a10", "a11"],
    "a[01-3]": ["a01", "a02", "a03"],
    "x[001-002,5]": ["x001", "x002", "x5"],  # each range keeps its own width, as Slurm does
    "r[1-2]n[01-02]": ["r1n01", "r1n02", "r2n01", "r2n02"],
    "gpu[7]": ["gpu7"],
    "h-1,h-2": ["h-1", "h-2"],
}


@pytest.mark.parametrize("expr,hosts", HOSTLISTS.items())
def test_expand_hostlist(expr, hosts):
    assert expand_hostlist(expr) == hosts


def test_expand_hostlist_suffix_after_range():
    # Slurm 22.05's scontrol rejects this form, newer Slurm accepts it; we accept it.
    assert expand_hostlist("n[1-2]-ib") == ["n1-ib", "n2-ib"]


@pytest.mark.parametrize("bad", ["a[1-2", "a]1", "a[3-1]", "a[x]", "a,,b", "a[1-]"])
def test_expand_hostlist_rejects(bad):
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(bad)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="parity check needs scontrol (tests/setup_system.sh)")
def test_expand_hostlist_matches_scontrol(tmp_path):
    # scontrol reads a config before doing anything, even for pure string expansion
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=ALL\n")
    for expr, hosts in HOSTLISTS.items():
        out = subprocess.run(
            ["scontrol", "show", "hostnames", expr], capture_output=True, text=True, check=True,
            env={"SLURM_CONF": str(conf), "PATH": "/usr/bin:/bin"},
        ).stdout.split()
        assert out == hosts == expand_hostlist(expr), expr


@pytest.mark.parametrize(
    "spec,counts",
    [("2", [2]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]), ("4,3(x2)", [4, 3, 3]), (" 8(x1) ", [8])],
)
def test_parse_tasks_per_node(spec, counts):
    assert parse_tasks_per_node(spec) == counts


@pytest.mark.parametrize("bad", ["", "2x3", "2(3)", "a", "2(x3),"])
def test_parse_tasks_per_node_rejects(bad):
    with pytest.raises(ValueError, match="tasks-per-node"):
        parse_tasks_per_node(bad)


# ---------------------------------------------------------------- resolve_env

TORCHRUN = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="n0", MASTER_PORT="29500")


def slurm_env(**over):
    env = dict(
        SLURM_PROCID="5", SLURM_NTASKS="7", SLURM_LOCALID="1", SLURM_NODEID="2", SLURM_JOB_ID="123456",
        SLURM_STEP_ID="0", SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_TASKS_PER_NODE="2(x3),1",
        SLURM_JOB_NODELIST="node[001-004]",
    )
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def test_no_launcher_is_single():
    env = resolve_env({}, "gloo")
    assert (env.launcher, env.rank, env.world_size, env.local_world_size) == ("single", 0, 1, 1)


def test_torchrun():
    env = resolve_env(TORCHRUN, "nccl")
    assert env == env.__class__(3, 8, 1, 2, "n0", 29500, "nccl", "torchrun")
    assert not env.is_main


def test_torchrun_without_local_world_size_is_one_node():
    env = resolve_env({k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"}, "gloo")
    assert env.local_world_size == 8


def test_torchrun_wins_over_slurm():
    # `srun torchrun`: SLURM_PROCID counts agents, RANK counts training ranks
    env = resolve_env({**slurm_env(), **TORCHRUN}, "gloo")
    assert (env.launcher, env.rank, env.world_size, env.master_port) == ("torchrun", 3, 8, 29500)


@pytest.mark.parametrize("drop", ["WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_half_set_torchrun_env_names_what_is_missing(drop):
    environ = {k: v for k, v in TORCHRUN.items() if k != drop}
    with pytest.raises(LaunchError, match=f"half-set torchrun environment: {drop} not set"):
        resolve_env(environ, "gloo")


def test_rank_only_lists_all_missing():
    with pytest.raises(LaunchError) as e:
        resolve_env({"RANK": "0"}, "gloo")
    assert "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set (have RANK=0)" in str(e.value)


@pytest.mark.parametrize(
    "over,msg",
    [
        ({"RANK": "8"}, r"rank 8 is outside \[0, world_size=8\)"),
        ({"LOCAL_RANK": "2"}, r"local rank 2 is outside \[0, local_world_size=2\)"),
        ({"WORLD_SIZE": "eight"}, "WORLD_SIZE='eight' is not an integer"),
    ],
)
def test_torchrun_inconsistent(over, msg):
    with pytest.raises(LaunchError, match=msg):
        resolve_env({**TORCHRUN, **over}, "gloo")


def test_slurm():
    env = resolve_env(slurm_env(), "gloo")
    assert env == env.__class__(5, 7, 1, 2, "node001", slurm_port("123456"), "gloo", "slurm")
    assert env.master_port == 20000 + 123456 % 20000


def test_slurm_last_node_and_step_layout_first():
    # the 4th node has one task; the job-level layout (here deliberately different) is ignored
    env = resolve_env(slurm_env(SLURM_PROCID="6", SLURM_LOCALID="0", SLURM_NODEID="3", SLURM_TASKS_PER_NODE="4(x4)"), "gloo")
    assert (env.rank, env.local_rank, env.local_world_size) == (6, 0, 1)


def test_slurm_falls_back_to_ntasks_per_node():
    env = resolve_env(
        slurm_env(SLURM_STEP_TASKS_PER_NODE=None, SLURM_TASKS_PER_NODE=None, SLURM_NTASKS_PER_NODE="2"), "gloo"
    )
    assert env.local_world_size == 2


def test_slurm_master_env_overrides():
    env = resolve_env(slurm_env(MASTER_ADDR="10.0.0.9", MASTER_PORT="31000"), "gloo")
    assert (env.master_addr, env.master_port) == ("10.0.0.9", 31000)


def test_slurm_step_nodelist_preferred():
    env = resolve_env(slurm_env(SLURM_STEP_NODELIST="node[003-004]"), "gloo")
    assert env.master_addr == "node003"


def test_slurm_batch_script_without_srun_is_refused():
    with pytest.raises(LaunchError, match="not an srun task; start it with `srun python"):
        resolve_env(slurm_env(SLURM_STEP_ID=None, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0"), "gloo")


def test_slurm_batch_script_single_task_is_fine():
    environ = slurm_env(SLURM_STEP_ID=None, SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0",
                        SLURM_NODEID="0", SLURM_STEP_TASKS_PER_NODE=None, SLURM_TASKS_PER_NODE="1")
    env = resolve_env(environ, "gloo")
    assert (env.launcher, env.world_size) == ("slurm", 1)


@pytest.mark.parametrize(
    "over,msg",
    [
        ({"SLURM_NTASKS": None}, "SLURM_PROCID is set but SLURM_NTASKS not"),
        ({"SLURM_NODEID": "4", "SLURM_LOCALID": "0", "SLURM_PROCID": "6"}, "SLURM_NODEID=4 but SLURM_STEP_TASKS_PER_NODE"),
        ({"SLURM_LOCALID": "2"}, r"local rank 2 is outside \[0, local_world_size=2\)"),
        ({"SLURM_JOB_NODELIST": None}, "set MASTER_ADDR"),
    ],
)
def test_slurm_inconsistent(over, msg):
    with pytest.raises(LaunchError, match=msg):
        resolve_env(slurm_env(**over), "gloo")


# ---------------------------------------------------------------- process group


@pytest.fixture
def clean_env(monkeypatch):
    for k in [*TORCHRUN, *slurm_env(), "SLURM_NTASKS_PER_NODE", "SLURM_NODELIST"]:
        monkeypatch.delenv(k, raising=False)
    yield
    destroy_distributed()


def test_single_process_gets_a_working_group(clean_env):
    env = init_distributed(backend="gloo", timeout_s=30)
    assert env.launcher == "single" and env.master_port > 0
    assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    t = torch.arange(3.0)
    dist.all_reduce(t)
    assert t.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(LaunchError, match="already initialised"):
        init_distributed()
    destroy_distributed()
    assert not dist.is_initialized()
    destroy_distributed()  # idempotent


def test_default_backend_is_gloo_without_cuda(clean_env):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: NCCL is the default there")
    assert init_distributed(timeout_s=30).backend == "gloo"


def test_real_torchrun_two_ranks(tmp_path):
    """torchrun's actual environment (not a hand-written one) resolves and rendezvouses."""
    script = tmp_path / "task.py"
    # results go to one file per rank: the workers share torchrun's stdout, where lines can interleave
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from megatron_r1.parallel.launch import init_distributed, destroy_distributed\n"
        "env = init_distributed(timeout_s=60)\n"
        "t = torch.tensor([float(env.rank + 1)]); dist.all_reduce(t)\n"
        "open(f'{sys.argv[1]}/rank{env.rank}', 'w').write(\n"
        "    f'{env.rank} {env.world_size} {env.local_rank} {env.local_world_size} {env.launcher} {t.item():g}')\n"
        "destroy_distributed()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in TORCHRUN}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    results = [(tmp_path / f"rank{i}").read_text() for i in range(2)]
    assert results == ["0 2 0 2 torchrun 3", "1 2 1 2 torchrun 3"], r.stdout + r.stderr
