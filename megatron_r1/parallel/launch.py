"""Bring up torch.distributed from whatever launched us: torchrun, Slurm's srun, or nothing.

Notable choices:
- torchrun's variables win over Slurm's. `srun torchrun ...` sets both, and there SLURM_PROCID
  counts torchrun agents (one per node), not training ranks.
- A half-set environment is an error naming what is missing, never a silent fall-back to a
  single process (which would train 1/N of the job and look healthy).
- Inside an sbatch script but outside `srun` Slurm still sets SLURM_PROCID=0 and SLURM_NTASKS=N;
  starting N-rank rendezvous from that lone process would hang, so it is refused with the fix.
- The Slurm hostlist is expanded by a small parser here (no `scontrol` subprocess per rank, and
  `scontrol` needs a readable slurm.conf on the compute node); tests check it against scontrol.
- The Slurm port is derived from the job id (20000 + id % 20000) so every rank agrees on it
  without talking; MASTER_ADDR / MASTER_PORT in the environment override both halves.
- Under Slurm the resolved RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
  MASTER_PORT are exported to os.environ after init, because vLLM's `external_launcher` and
  other torchrun-minded code read them from there (a later re-init in the same process then
  reports launcher="torchrun", with the same layout).
- A single process with no launcher still gets a real gloo group of size 1 (TCPStore on a
  kernel-chosen localhost port: no race for a free port, nothing to clean up), so code calls
  collectives unconditionally instead of branching on `dist.is_initialized()`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

LAUNCHERS = ("torchrun", "slurm", "single")
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


class LaunchError(RuntimeError):
    """The launcher's environment is inconsistent; the message says what to set."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int  # 0 until init picks one for launcher="single"
    backend: str  # "nccl" | "gloo"
    launcher: str  # one of LAUNCHERS

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------- Slurm string formats


def expand_hostlist(expr: str) -> list[str]:
    """Slurm hostlist -> host names, in order: "node[001-003,7],gpu12" -> node001..node003, node7, gpu12.

    Zero padding of a range's lower bound is kept (as Slurm does); several bracket groups in one
    name expand as a product ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2).
    """
    hosts: list[str] = []
    for item in _split_top_level(expr.strip()):
        hosts.extend(_expand_one(item, expr))
    return hosts


def _split_top_level(expr: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {expr!r}")
        elif ch == "," and depth == 0:
            items.append(expr[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in hostlist {expr!r}")
    items.append(expr[start:])
    if any(not it for it in items):
        raise ValueError(f"empty host name in hostlist {expr!r}")
    return items


def _expand_one(item: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    prefix, suffix = item[: m.start()], item[m.end() :]
    out = []
    for part in m.group(1).split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in hostlist {whole!r}")
        width = len(lo)
        lo_i, hi_i = int(lo), int(hi) if sep else int(lo)
        if hi_i < lo_i:
            raise ValueError(f"descending range {part!r} in hostlist {whole!r}")
        for n in range(lo_i, hi_i + 1):
            # the suffix may hold further bracket groups: expand recursively
            out.extend(_expand_one(f"{prefix}{n:0{width}d}{suffix}", whole))
    return out


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE -> tasks on each node of the step: "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.strip().split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ValueError(f"bad tasks-per-node spec {spec!r} (expected e.g. '2(x3),1')")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def slurm_port(job_id: str) -> int:
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


# ---------------------------------------------------------------- environment -> DistEnv

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def resolve_env(environ: Mapping[str, str], backend: str) -> DistEnv:
    """Pure: read a launcher's variables from `environ` (no process-group side effects)."""
    if any(k in environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return _from_torchrun(environ, backend)
    if "SLURM_PROCID" in environ:
        return _from_slurm(environ, backend)
    return DistEnv(0, 1, 0, 1, environ.get("MASTER_ADDR", "127.0.0.1"), 0, backend, "single")


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise LaunchError(f"{key}={environ[key]!r} is not an integer") from None


def _check_rank(rank: int, world: int, local_rank: int, local_world: int, src: str) -> None:
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"{src}: rank {rank} is outside [0, world_size={world})")
    if not 0 <= local_rank < local_world:
        raise LaunchError(f"{src}: local rank {local_rank} is outside [0, local_world_size={local_world})")


def _from_torchrun(environ: Mapping[str, str], backend: str) -> DistEnv:
    missing = [k for k in _TORCHRUN_VARS if k not in environ]
    if missing:
        present = ", ".join(f"{k}={environ[k]}" for k in _TORCHRUN_VARS if k in environ)
        raise LaunchError(
            f"half-set torchrun environment: {', '.join(missing)} not set (have {present}); "
            f"launch with torchrun, or set all of {', '.join(_TORCHRUN_VARS)}"
        )
    rank, world, local_rank = (_int(environ, k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    # torchrun always sets LOCAL_WORLD_SIZE; a hand-written environment without it is taken as
    # one node.
    local_world = _int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
    _check_rank(rank, world, local_rank, local_world, "torchrun env")
    port = _int(environ, "MASTER_PORT")
    return DistEnv(rank, world, local_rank, local_world, environ["MASTER_ADDR"], port, backend, "torchrun")


def _from_slurm(environ: Mapping[str, str], backend: str) -> DistEnv:
    missing = [k for k in ("SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_ID") if k not in environ]
    if missing:
        raise LaunchError(f"SLURM_PROCID is set but {', '.join(missing)} not: is this an srun task?")
    rank, world = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_NTASKS")
    local_rank, node_id = _int(environ, "SLURM_LOCALID"), _int(environ, "SLURM_NODEID")
    if world > 1 and "SLURM_STEP_ID" not in environ:
        raise LaunchError(
            f"SLURM_NTASKS={world} but this process is the batch script, not an srun task; "
            f"start it with `srun python ...` (or request --ntasks=1)"
        )
    # The step's layout first: an srun inside an allocation may use fewer tasks than the job.
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if key in environ:
            per_node = parse_tasks_per_node(environ[key])
            if node_id >= len(per_node):
                raise LaunchError(f"SLURM_NODEID={node_id} but {key}={environ[key]!r} lists {len(per_node)} nodes")
            local_world = per_node[node_id]
            break
    else:
        if "SLURM_NTASKS_PER_NODE" not in environ:
            raise LaunchError("Slurm task without SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE or SLURM_NTASKS_PER_NODE")
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE")
    _check_rank(rank, world, local_rank, local_world, "Slurm env")

    if "MASTER_ADDR" in environ:
        addr = environ["MASTER_ADDR"]
    else:
        nodelist = next((environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if k in environ), None)
        if nodelist is None:
            raise LaunchError("Slurm task without SLURM_JOB_NODELIST; set MASTER_ADDR")
        addr = expand_hostlist(nodelist)[0]
    port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else slurm_port(environ["SLURM_JOB_ID"])
    return DistEnv(rank, world, local_rank, local_world, addr, port, backend, "slurm")


# ---------------------------------------------------------------- process group


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Initialise the default process group from the launcher's environment and return it.

    timeout_s bounds every collective; 30 min covers a rank-0-only checkpoint write or a slow
    rollout on one rank while the others wait in a collective.
    """
    if dist.is_initialized():
        raise LaunchError("torch.distributed is already initialised; call destroy_distributed() first")
    env = resolve_env(os.environ, backend or default_backend())
    timeout = timedelta(seconds=timeout_s)

    device_id = None
    if env.backend == "nccl":
        if env.local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"local rank {env.local_rank} but only {torch.cuda.device_count()} visible GPUs; "
                f"use at most one task per GPU per node"
            )
        torch.cuda.set_device(env.local_rank)
        device_id = torch.device("cuda", env.local_rank)

    if env.launcher == "single":
        store = dist.TCPStore(env.master_addr, 0, world_size=1, is_master=True, timeout=timeout)
        env = DistEnv(**{**env.__dict__, "master_port": store.port})
        dist.init_process_group(env.backend, store=store, rank=0, world_size=1, timeout=timeout, device_id=device_id)
    else:
        dist.init_process_group(
            env.backend,
            init_method=f"tcp://{_bracket_ipv6(env.master_addr)}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            device_id=device_id,
        )

    if env.launcher == "slurm":
        os.environ.update(
            RANK=str(env.rank),
            WORLD_SIZE=str(env.world_size),
            LOCAL_RANK=str(env.local_rank),
            LOCAL_WORLD_SIZE=str(env.local_world_size),
            MASTER_ADDR=env.master_addr,
            MASTER_PORT=str(env.master_port),
        )
    return env


def _bracket_ipv6(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
