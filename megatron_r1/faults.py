"""Test-only fault injection, so the reliability battery can break a real run where real faults strike.

    MEGATRON_R1_TEST_FAULTS="kill@3:1,nan_grad@2"   # SIGKILL rank 1 mid-step 3; NaN gradients on step 2 (all ranks)

Notable choices
- An environment variable, never a config field: a fault can not end up in a saved `config.yaml` and be
  replayed by a resume, and nothing in a user's YAML can switch one on. Unset (always, outside the tests),
  every hook is a dict lookup that finds nothing.
- `KIND@STEP[:RANK]`, comma separated; STEP is the 1-based step being computed (the one logged as `step`),
  RANK the global rank (all ranks when left out). Kinds and where they strike:
    kill            SIGKILL this process inside the loss function of the step's first micro-batch (mid-step:
                    the other ranks are inside that step's collectives)
    nan_loss, inf_loss   the loss of that micro-batch times NaN / inf
    nan_grad        the gradient flowing back from that loss times NaN (the loss value stays finite)
    rollout_error   the rollout engine raises inside `generate` (GRPO: a prompt with token id -1, which vLLM's
                    input validation refuses)
- The loop says which step it computes (`begin(step)`); a fault fires once, at the first hook of its kind in
  that step (a loss hook: the step's first micro-batch). `kill` before the process dies writes `<run_dir>/fault.kill.<rank>` with the
  time, so a test can measure how long the rest of the job takes to go down.
"""
from __future__ import annotations

import os
import signal
import time

ENV = "MEGATRON_R1_TEST_FAULTS"
KINDS = ("kill", "nan_loss", "inf_loss", "nan_grad", "rollout_error")


def parse(spec: str) -> dict[str, list[tuple[int, int | None]]]:
    """"kill@3:1,nan_grad@2" -> {"kill": [(3, 1)], "nan_grad": [(2, None)]}."""
    out: dict[str, list[tuple[int, int | None]]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        if kind not in KINDS or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"{ENV}={spec!r}: {item!r} is not KIND@STEP[:RANK] with KIND in {', '.join(KINDS)}")
        out.setdefault(kind, []).append((int(step), int(rank) if rank else None))
    return out


class Faults:
    """The faults armed for this rank (none unless the test variable is set)."""

    def __init__(self, rank: int, run_dir: str = ".", spec: str | None = None):
        self.rank, self.run_dir = rank, run_dir
        self.armed = parse(os.environ.get(ENV, "") if spec is None else spec)
        self.step = 0

    def begin(self, step: int) -> None:
        """The loop starts computing `step` (1-based, as logged)."""
        self.step = step

    def __bool__(self) -> bool:
        return bool(self.armed)

    def hits(self, kind: str) -> bool:
        """True once for (kind, current step) on the ranks it names."""
        for i, (s, r) in enumerate(self.armed.get(kind, ())):
            if s == self.step and r in (None, self.rank):
                self.armed[kind].pop(i)
                return True
        return False

    def on_loss(self, loss):
        """Inside a loss function: may kill the process, poison the loss or its gradient; returns the loss."""
        if not self.armed:
            return loss
        if self.hits("kill"):
            with open(os.path.join(self.run_dir, f"fault.kill.{self.rank}"), "w") as f:
                f.write(f"{time.time()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hits("nan_loss"):
            loss = loss * float("nan")
        if self.hits("inf_loss"):
            loss = loss * float("inf")
        if self.hits("nan_grad") and loss.requires_grad:
            loss.register_hook(lambda g: g * float("nan"))
        return loss

    def on_rollout(self, prompts: list[list[int]]) -> list[list[int]]:
        """The prompts about to go into the rollout engine: `rollout_error` hands it a token id of -1, which vLLM
        refuses inside its own input validation, so the exception comes from the engine itself."""
        if self.hits("rollout_error"):
            return [[-1] + list(prompts[0])] + list(prompts[1:])
        return prompts
