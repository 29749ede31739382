"""Run a function on N local ranks (gloo, file rendezvous): the engine of the layout checks and tests.

Notable choices
- Processes are *forked* by default: the parent has imported torch and the model once, so an 8-rank
  run starts in well under a second instead of 8 × ~4 s of imports on a 2-core machine. `spawn`
  is available (`start_method="spawn"`) for callers whose parent holds threads that fork would copy.
- Rendezvous through a `file://` store in a fresh temporary directory: no port to pick, nothing to
  race for, nothing left behind.
- Each rank sets `torch.set_num_threads(1)` (8 ranks share 2 cores; intra-op threads only fight).
- A rank's return value is pickled to a file; an exception comes back as `RankError` naming the
  rank with its traceback. The whole run has a wall-clock timeout, after which every rank is killed.
"""
from __future__ import annotations

import faulthandler
import os
import pickle
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank raised; the message holds its rank and traceback."""


def _entry(rank: int, fn: Callable, world_size: int, tmp: str, timeout: float, args: tuple) -> None:
    torch.set_num_threads(1)
    out = os.path.join(tmp, f"rank{rank}.pkl")
    # where each rank is stuck, should the parent's timeout hit: written shortly before it
    stack_file = open(os.path.join(tmp, f"rank{rank}.stack"), "w")
    faulthandler.dump_traceback_later(max(1.0, timeout - 3.0), file=stack_file)
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        result = ("ok", fn(*args), time.time())
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", time.time())
    finally:
        faulthandler.cancel_dump_traceback_later()
        with open(out + ".tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(out + ".tmp", out)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer may already be gone
                pass


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0,
              start_method: str = "fork") -> list:
    """fn(*args) on `world_size` ranks with torch.distributed (gloo) initialised; returns [result per rank].

    `fn` must be picklable for start_method="spawn" (a module-level function)."""
    with tempfile.TemporaryDirectory(prefix="megatron_r1_ranks_") as tmp:
        ctx = mp.start_processes(_entry, args=(fn, world_size, tmp, timeout, args), nprocs=world_size,
                                 join=False, start_method=start_method)
        deadline = time.monotonic() + timeout
        failed_at = None
        try:
            while not ctx.join(timeout=max(0.0, min(0.5, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    stacks = "".join(_read(os.path.join(tmp, f"rank{r}.stack"), f"rank {r} stack")
                                     for r in range(world_size))
                    raise TimeoutError(f"{world_size} ranks did not finish within {timeout:.0f} s\n{stacks}")
                # a rank that raised leaves the others waiting in a collective: stop them soon after
                if failed_at is None and any(_status(tmp, r) == "error" for r in range(world_size)):
                    failed_at = time.monotonic()
                if failed_at is not None and time.monotonic() - failed_at > 3.0:
                    break
        except mp.ProcessExitedException as e:
            raise RankError(f"rank {e.error_index} exited with code {e.exit_code} (killed?)") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results, errors, missing = [], [], []
        for r in range(world_size):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if not os.path.exists(path):
                missing.append(r)
                continue
            with open(path, "rb") as f:
                status, value, when = pickle.load(f)
            if status == "error":
                errors.append((when, f"rank {r}: {value}"))
            results.append(value)
        if errors:
            # the earliest failure is the cause; later ones typically fail waiting for it
            errors.sort()
            more = f"\n({len(errors) - 1} more ranks failed after it, {len(missing)} stopped)" \
                if len(errors) > 1 or missing else ""
            raise RankError(errors[0][1] + more)
        if missing:
            raise RankError(f"ranks {missing} returned no result (killed?)")
        return results


def _status(tmp: str, rank: int) -> str | None:
    path = os.path.join(tmp, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            return pickle.load(f)[0]
    except Exception:  # noqa: BLE001 - being written
        return None


def _read(path: str, title: str) -> str:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    return f"--- {title}\n{text}" if text else ""
