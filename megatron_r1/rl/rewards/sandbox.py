"""Run untrusted programs (model-written code) with hard bounds, and leave nothing behind.

Notable choices:
- Every run is ``unshare --net --pid --fork --kill-child --mount-proc`` + ``_sandbox_launcher.py``
  where the machine allows it (probed once per process; root, or a kernel that lets users make
  namespaces): a new network namespace has only a down loopback, so no address on this machine
  or elsewhere is reachable; in the new PID namespace the program is PID 1, and when it exits
  the kernel kills every process it left (daemons included); ``/tmp``, ``/var/tmp``, ``/dev/shm``
  and ``/run/lock`` are private size-capped tmpfs mounts, so the working directory and anything
  else the program writes vanish with the namespace; ``/root`` and ``/home`` are covered by an
  empty tmpfs with only the interpreter's own directories bound back read-only.
- When we are root, the program runs as a per-slot uid (``uid_base + slot``) that owns nothing
  on the host: RLIMIT_NPROC then binds (it never binds root) and only the private tmpfs dirs
  are writable. ``PR_SET_NO_NEW_PRIVS`` keeps setuid binaries from raising it back.
- rlimits on CPU seconds, address space, processes, file size and open files; a scrubbed
  environment (PATH, HOME, LANG, one-thread BLAS: nothing of ours); stdin from a file or /dev/null; fds 0-2 plus
  the harness channel only.
- The parent enforces a wall clock on the whole process group (SIGKILL), caps what it reads of
  stdout/stderr (over the cap: killed, ``status="output_limit"``), and removes its staging dir.
- Without namespaces (``isolation="plain"``, or the probe failed; the reason is logged once):
  own session and process group, the launcher as child subreaper kills every descendant, even a
  ``setsid`` daemon, when the program ends or the wall clock fires; rlimits and the scrubbed env
  still apply. NOT enforced there: the network, and writes outside the work dir (a root
  program keeps root's file access, since the interpreter under /root is unreadable to another
  uid; RLIMIT_NPROC does not bind root). ``Sandbox.isolation`` says which mode is in force.
- Concurrency is bounded twice: ``run_many`` uses ``workers`` threads, and a process-wide pool
  of ``MAX_SLOTS`` slots (one uid each) caps all sandboxes of a process together.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("_sandbox_launcher.py")
MAX_SLOTS = 64
WORKDIR_IN_NAMESPACE = "/tmp/work"
UNSHARE = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_HIDDEN = ("/root", "/home")


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0  # whole run, killed with its process group after this
    cpu_seconds: int = 10  # RLIMIT_CPU, per process
    memory_bytes: int = 1 << 30  # RLIMIT_AS, per process
    processes: int = 32  # RLIMIT_NPROC of the sandbox uid (binds only when not root)
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE, per file
    open_files: int = 64  # RLIMIT_NOFILE
    disk_bytes: int = 64 << 20  # size of each private tmpfs (namespaced mode)
    output_bytes: int = 1 << 20  # stdout + stderr read before the run is killed
    channel_bytes: int = 1 << 20  # harness replies


@dataclass
class RunResult:
    status: str  # "exited" | "timeout" | "output_limit" | "error"
    exit_code: int | None
    stdout: bytes
    stderr: bytes  # the last 4 KiB
    channel: bytes  # what the harness wrote on its private fd
    seconds: float
    detail: str = ""


@dataclass
class Program:
    """What to run: ``files`` written into the fresh work dir, ``argv`` run there
    (``{python}`` is replaced by this interpreter, ``{channel}`` by the channel fd)."""

    files: dict[str, str]
    argv: list[str]
    stdin: str | None = None


def _others_can_reach(path: str) -> bool:
    p = Path(path)
    for d in [p, *p.parents]:
        try:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _interpreter_dirs() -> list[str]:
    dirs = {sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))}
    return sorted(os.path.realpath(d) for d in dirs)


def _mount_plan(limits: Limits) -> dict:
    size = max(1, limits.disk_bytes >> 10)
    tmpfs = [[d, f"{size}k"] for d in _WORLD_WRITABLE if os.path.isdir(d)]
    hide = [d for d in _HIDDEN if os.path.isdir(d)]
    binds = [d for d in _interpreter_dirs() if any(d == h or d.startswith(h + "/") for h in hide)]
    return {"tmpfs": tmpfs, "hide": hide, "binds": binds}


class _Slots:
    """Process-wide slot numbers: each running sandbox holds one (and its uid)."""

    def __init__(self, n: int):
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(n):
            self._free.put(i)

    def acquire(self) -> int:
        return self._free.get()

    def release(self, slot: int) -> None:
        self._free.put(slot)


_SLOTS = _Slots(MAX_SLOTS)
_PROBE: dict[str, tuple[str, str]] = {}
_PROBE_LOCK = threading.Lock()


class Sandbox:
    """``Sandbox(limits).run(program)``; ``isolation``: "auto" (namespaced if the probe
    passes, else plain), "namespace" (fail if unavailable) or "plain"."""

    def __init__(self, limits: Limits | None = None, isolation: str = "auto"):
        if isolation not in ("auto", "namespace", "plain"):
            raise ValueError(f"isolation={isolation!r}: choose auto, namespace or plain")
        self.limits = limits or Limits()
        # uids nobody on the host owns; distinct per process so concurrent trainers do not share NPROC
        self.uid_base = 200_000 + (os.getpid() % 20_000) * MAX_SLOTS
        self.is_root = os.geteuid() == 0
        if isolation == "plain":
            self.isolation, self.reason = "plain", "isolation='plain' requested"
        else:
            self.isolation, self.reason = self._probe()
            if isolation == "namespace" and self.isolation != "namespace":
                raise RuntimeError(f"sandbox: namespaces unavailable: {self.reason}")
        # without mounts, a dropped uid must still be able to read the interpreter
        self.drop_uid = self.is_root and (self.isolation == "namespace"
                                          or all(_others_can_reach(d) for d in _interpreter_dirs()))

    # ----------------------------------------------------------------------------- probe
    def _probe(self) -> tuple[str, str]:
        with _PROBE_LOCK:
            if "result" not in _PROBE:
                _PROBE["result"] = self._probe_once()
                mode, reason = _PROBE["result"]
                if mode != "namespace":
                    logger.warning("code sandbox without namespaces (%s): no network isolation, "
                                   "writes outside the work dir not prevented", reason)
            return _PROBE["result"]

    def _probe_once(self) -> tuple[str, str]:
        if shutil.which("unshare") is None:
            return "plain", "util-linux `unshare` not found"
        self.isolation, self.drop_uid = "namespace", self.is_root
        try:
            res = self.run(Program({}, ["{python}", "-I", "-S", "-c", "print(6 * 7)"]))
        except OSError as e:
            return "plain", f"unshare failed: {e}"
        if res.status == "exited" and res.exit_code == 0 and res.stdout.strip() == b"42":
            return "namespace", "unshare --net --pid --mount works"
        return "plain", f"unshare probe failed: {res.stderr.decode(errors='replace').strip()[-200:]}"

    # ------------------------------------------------------------------------------- run
    def run(self, program: Program) -> RunResult:
        slot = _SLOTS.acquire()
        try:
            return self._run(program, slot)
        finally:
            _SLOTS.release(slot)

    def run_many(self, programs: list[Program], workers: int) -> list[RunResult]:
        if not programs:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(programs))),
                                thread_name_prefix="sandbox") as pool:
            return list(pool.map(self.run, programs))

    @staticmethod
    def _env(workdir: str) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
               # threads count against RLIMIT_NPROC: a BLAS sizing its pool to a 128-core node
               # would fail to start its threads, so numeric libraries get one
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def _run(self, program: Program, slot: int) -> RunResult:
        lim = self.limits
        namespaced = self.isolation == "namespace"
        stage = tempfile.mkdtemp(prefix="megatron-r1-sandbox-")
        os.chmod(stage, 0o711)  # plain mode with a dropped uid: the work dir below must be reachable
        chan_r, chan_w = os.pipe()
        proc = None
        t0 = time.monotonic()
        try:
            workdir = WORKDIR_IN_NAMESPACE if namespaced else os.path.join(stage, "work")
            uid = self.uid_base + slot if self.drop_uid else None
            argv = [a.replace("{python}", sys.executable).replace("{channel}", str(chan_w)) for a in program.argv]
            limits = {"cpu": lim.cpu_seconds, "as": lim.memory_bytes, "fsize": lim.file_bytes,
                      "nofile": lim.open_files, "core": 0}
            if uid is not None or not self.is_root:
                limits["nproc"] = lim.processes
            spec = {"workdir": workdir, "files": program.files, "argv": argv, "env": self._env(workdir),
                    "uid": uid, "limits": limits, "mounts": _mount_plan(lim) if namespaced else None,
                    "keep_fds": [chan_w]}
            spec_path = os.path.join(stage, "spec.json")
            with open(spec_path, "w", encoding="utf-8") as f:
                json.dump(spec, f)
            stdin = subprocess.DEVNULL
            if program.stdin is not None:
                stdin_path = os.path.join(stage, "stdin")
                with open(stdin_path, "w", encoding="utf-8") as f:
                    f.write(program.stdin)
                stdin = open(stdin_path, "rb")
            cmd = [sys.executable, "-I", "-S", str(LAUNCHER), spec_path]
            if namespaced:
                cmd = UNSHARE + cmd
            try:
                proc = subprocess.Popen(cmd, cwd="/", env=spec["env"], stdin=stdin, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, pass_fds=(chan_w,), start_new_session=True)
            finally:
                if stdin is not subprocess.DEVNULL:
                    stdin.close()
            os.close(chan_w)
            chan_w = -1
            return self._collect(proc, chan_r, t0, namespaced)
        finally:
            if proc is not None:
                self._kill(proc, namespaced)
            for fd in (chan_r, chan_w):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(stage, ignore_errors=True)

    def _collect(self, proc: subprocess.Popen, chan_r: int, t0: float, namespaced: bool) -> RunResult:
        lim = self.limits
        deadline = t0 + lim.wall_seconds
        out, err, chan = bytearray(), bytearray(), bytearray()
        caps = {proc.stdout.fileno(): (out, lim.output_bytes), proc.stderr.fileno(): (err, lim.output_bytes),
                chan_r: (chan, lim.channel_bytes)}
        status, detail = "exited", ""
        sel = selectors.DefaultSelector()
        for fd in caps:
            sel.register(fd, selectors.EVENT_READ)
        try:
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    status, detail = "timeout", f"wall clock {lim.wall_seconds:g}s"
                    break
                for key, _ in sel.select(timeout=min(deadline - now, 0.5)):
                    fd = key.fd
                    data = os.read(fd, 1 << 16)
                    if not data:
                        sel.unregister(fd)
                        continue
                    buf, cap = caps[fd]
                    buf += data
                    if fd == proc.stderr.fileno() and len(buf) > 4096:
                        del buf[:-4096]
                    if len(out) + len(err) > lim.output_bytes or len(chan) > cap:
                        status, detail = "output_limit", f"output over {lim.output_bytes} bytes"
                        break
                if status != "exited":
                    break
        finally:
            sel.close()
        if status == "exited":
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                status, detail = "timeout", f"wall clock {lim.wall_seconds:g}s"
        exit_code = proc.poll() if status == "exited" else None
        return RunResult(status, exit_code, bytes(out[: lim.output_bytes]), bytes(err[-4096:]), bytes(chan),
                         time.monotonic() - t0, detail)

    @staticmethod
    def _kill(proc: subprocess.Popen, namespaced: bool) -> None:
        if proc.poll() is None:
            if namespaced:
                # SIGKILL the namespace's PID 1, not unshare: the kernel then kills the namespace
                # and PID 1's exit completes only once every process in it is gone, so when
                # unshare has reaped it nothing is left (a group SIGKILL would return at once,
                # with processes still dying on a busy machine)
                for pid in child_pids(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            else:
                # plain mode: the subreaper launcher kills its (possibly setsid) descendants
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30.0)
            except subprocess.TimeoutExpired:
                logger.warning("sandbox pid %d did not end 30 s after the kill", proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (none in the usual case)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def child_pids(pid: int) -> list[int]:
    """Host pids whose parent is ``pid`` (a /proc scan: CONFIG_PROC_CHILDREN is often off)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                out.append(int(name))
    return out


def describe(sandbox: Sandbox) -> dict:
    """What is enforced, for logs and benchmarks/reliability.md."""
    return {"isolation": sandbox.isolation, "reason": sandbox.reason, "uid_dropped": sandbox.drop_uid,
            "limits": asdict(sandbox.limits)}
