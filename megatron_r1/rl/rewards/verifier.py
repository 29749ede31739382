"""Symbolic answer equivalence with a hard time bound.

Notable choices:
- sympy can hang inside C-level big-integer arithmetic (``9^{9^{9^9}}``, ``(10^{10})!``) where
  neither signals nor threads can interrupt it, so every symbolic check runs in a worker
  *process* that we SIGKILL when its deadline passes, then replace.
- Workers are ``python _symbolic_worker.py`` subprocesses speaking JSON lines over pipes
  (stdlib + math-verify only; they never import this package or torch), not
  ``multiprocessing`` children: a plain fork of the trainer would copy vLLM/torch threads and
  their held locks, and spawn/forkserver re-import the user's main script in every child.
  A fresh interpreter costs ~0.6 s (sympy + math-verify imports), paid at construction in
  the background and again only after a kill.
- Each worker caps its address space (RLIMIT_AS), so bombs that allocate die with MemoryError.
- A batch is bounded twice: each check gets ``timeout`` seconds of a worker, and the whole
  batch gets ``batch_timeout``; whatever is unfinished then scores "unknown" (None).
- Results are ``True`` / ``False`` / ``None`` (timed out or worker died); callers score None
  as wrong and the counts are kept in ``stats`` for the metrics log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque

from megatron_r1.rl.rewards import _symbolic_worker
from megatron_r1.rl.rewards._symbolic_worker import MEMORY_LIMIT_ENV, SOFT_TIMEOUT_ENV

logger = logging.getLogger(__name__)


class _Worker:
    """One verifier subprocess with a line buffer on its stdout."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, _symbolic_worker.__file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._buf = b""
        self.ready = False  # True once the worker reported its imports done
        self.task: int | None = None  # index of the pair it is working on
        self.deadline = math.inf

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, task: int, pred: str, gold: str, timeout: float) -> None:
        self.proc.stdin.write((json.dumps([task, pred, gold]) + "\n").encode())
        self.proc.stdin.flush()
        self.task = task
        self.deadline = time.monotonic() + timeout

    def read_replies(self) -> list[list] | None:
        """Drain what is readable; None means the worker died."""
        data = os.read(self.fileno(), 1 << 16)
        if not data:
            return None
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [json.loads(line) for line in lines if line]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class SymbolicVerifier:
    """A small pool of killable workers deciding whether two answer strings are equal.

    ``timeout``: seconds one check may take before its worker is killed (the hard bound).
    ``memory_limit_bytes``: address-space cap per worker (0 disables).
    """

    def __init__(
        self,
        num_workers: int = 1,
        timeout: float = 5.0,
        memory_limit_bytes: int = 4 << 30,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 1")
        self.num_workers = num_workers
        self.timeout = timeout
        self.stats = {"calls": 0, "timeouts": 0, "worker_deaths": 0, "errors": 0}
        self._env = dict(os.environ)
        self._env[MEMORY_LIMIT_ENV] = str(memory_limit_bytes)
        self._env[SOFT_TIMEOUT_ENV] = str(max(1, int(timeout)))
        self._lock = threading.Lock()  # one batch at a time; the trainer may score from a thread
        self._owner_pid = os.getpid()
        self._workers: list[_Worker] = [_Worker(self._env) for _ in range(num_workers)]

    def equivalent(self, pred: str, gold: str) -> bool | None:
        return self.equivalent_many([(pred, gold)])[0]

    def equivalent_many(
        self, pairs: list[tuple[str, str]], batch_timeout: float | None = None
    ) -> list[bool | None]:
        """Check ``(pred, gold)`` pairs across the pool. Never takes longer than
        ``batch_timeout`` (default ``ceil(len/num_workers) * timeout`` plus worker start-up)
        once it holds the pool; concurrent callers queue for it."""
        if os.getpid() != self._owner_pid:
            raise RuntimeError("SymbolicVerifier was created in another process; make one per process")
        results: list[bool | None] = [None] * len(pairs)
        if not pairs:
            return results
        if batch_timeout is None:
            rounds = math.ceil(len(pairs) / self.num_workers)
            batch_timeout = rounds * self.timeout + 10.0  # 10 s: a worker may still be importing
        with self._lock:
            # the clock starts once we hold the workers: time spent waiting behind another
            # thread's batch must not turn this batch's right answers into timeouts
            batch_deadline = time.monotonic() + batch_timeout
            self.stats["calls"] += len(pairs)
            todo = deque(range(len(pairs)))
            sel = selectors.DefaultSelector()
            for w in self._workers:
                sel.register(w, selectors.EVENT_READ)
            try:
                while True:
                    for w in list(self._workers):
                        if w.ready and w.task is None and todo:
                            i = todo.popleft()
                            try:
                                w.send(i, *pairs[i], self.timeout)
                            except OSError:  # died while idle (e.g. OOM-killed): retry elsewhere
                                todo.appendleft(i)
                                self._replace(sel, w, "worker_deaths", None)
                    busy = [w for w in self._workers if w.task is not None]
                    if not busy and not todo:
                        break
                    now = time.monotonic()
                    if now >= batch_deadline:
                        for w in busy:
                            self._replace(sel, w, "timeouts", pairs[w.task])
                        if todo:
                            self.stats["timeouts"] += len(todo)
                            logger.warning("%d symbolic checks not started before the batch deadline, scored 0", len(todo))
                        break
                    wake = min([w.deadline for w in busy] + [batch_deadline])
                    for key, _ in sel.select(timeout=max(0.0, wake - now)):
                        w = key.fileobj
                        replies = w.read_replies()
                        if replies is None:
                            self._replace(sel, w, "worker_deaths", pairs[w.task] if w.task is not None else None)
                            continue
                        for task, equal, error in replies:
                            if task == "ready":
                                w.ready = True
                                continue
                            if error:
                                self.stats["errors"] += 1
                            results[task] = bool(equal)
                            w.task, w.deadline = None, math.inf
                    now = time.monotonic()
                    for w in list(self._workers):
                        if w.task is not None and now >= w.deadline:
                            self._replace(sel, w, "timeouts", pairs[w.task])
            finally:
                sel.close()
        return results

    def _replace(self, sel: selectors.BaseSelector, w: _Worker, reason: str, pair) -> None:
        if not w.ready:
            w.kill()
            raise RuntimeError(
                "symbolic verifier worker died during start-up; "
                f"run `python {_symbolic_worker.__file__}` to see why"
            )
        self.stats[reason] += 1
        if pair is not None:
            logger.warning("symbolic check %s, scored 0: pred=%.80r gold=%.80r", reason[:-1], *pair)
        sel.unregister(w)
        w.kill()
        fresh = _Worker(self._env)
        self._workers[self._workers.index(w)] = fresh
        sel.register(fresh, selectors.EVENT_READ)

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def __enter__(self) -> SymbolicVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_workers", None) and os.getpid() == self._owner_pid:
            self.close()
