"""Sandbox launcher: the last trusted code before model-written code runs (run as a script by
sandbox.py; stdlib only, never imports megatron_r1).

    python -I -S _sandbox_launcher.py SPEC.json

SPEC (written by sandbox.py): ``workdir``, ``files`` (name -> text, written into workdir),
``argv``, ``env``, ``uid`` (int or null), ``limits`` (rlimit name -> value), ``mounts`` (null, or
``{"tmpfs": [[dir, size]], "hide": [dir], "binds": [dir]}``), ``keep_fds``.

Two modes:
- **namespaced** (``mounts`` given): we are PID 1 of a fresh PID + network + mount namespace made by
  ``unshare``, still root inside it. World-writable directories get private size-capped tmpfs
  mounts (so nothing written there reaches the host, and it all vanishes with the namespace);
  directories that hide secrets or block the interpreter's path for another uid (``/root``) are
  covered by an empty tmpfs, and only the interpreter's own directories are bound back read-only.
  Then we drop to the sandbox uid and ``exec`` the target, which becomes PID 1: when it exits, the
  kernel kills everything else in the namespace.
- **plain** (``mounts`` null; no namespaces on this machine): we fork the target into its own
  process group and stay as a child subreaper, so daemons that ``setsid`` and double-fork are
  re-parented to us; when the target exits or we get SIGTERM (the parent's wall clock), we kill
  every descendant before exiting.

In both, the target gets ``PR_SET_NO_NEW_PRIVS`` (setuid binaries cannot raise it back to root),
rlimits, the scrubbed env, and only fds 0-2 plus ``keep_fds``.
"""

import ctypes
import json
import os
import resource
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 38, 36
RLIMITS = {"cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS, "nproc": resource.RLIMIT_NPROC,
           "fsize": resource.RLIMIT_FSIZE, "nofile": resource.RLIMIT_NOFILE, "core": resource.RLIMIT_CORE}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def setup_mounts(mounts: dict, uid) -> None:
    # fds on the directories to bind back, opened before their parents are covered
    binds = [(d, os.open(d, os.O_PATH | os.O_DIRECTORY)) for d in mounts["binds"]]
    for d, size in mounts["tmpfs"]:
        _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")
    for d in mounts["hide"]:
        _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for d, fd in binds:
        os.makedirs(d, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", d, None, MS_BIND | MS_REC)
        _mount(None, d, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
        os.close(fd)


def prepare_workdir(spec: dict) -> None:
    work, uid = spec["workdir"], spec["uid"]
    os.makedirs(work, mode=0o700, exist_ok=True)
    for name, text in spec["files"].items():
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            f.write(text)
    if uid is not None:
        for name in [*spec["files"], ""]:
            os.chown(os.path.join(work, name), uid, uid)


def become_target(spec: dict) -> None:
    """In the process that will exec the target: limits, identity, then exec (never returns)."""
    os.chdir(spec["workdir"])
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    for name, value in spec["limits"].items():
        resource.setrlimit(RLIMITS[name], (value, value))
    uid = spec["uid"]
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    keep = {0, 1, 2, *spec["keep_fds"]}
    lo = 3
    for fd in sorted(k for k in keep if k > 2):
        os.set_inheritable(fd, True)
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 16)
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
            if ppid == pid:
                out.append(int(name))
    return out


def kill_descendants() -> None:
    """SIGKILL and reap everything re-parented to us (we are a subreaper) until nothing is left."""
    me = os.getpid()
    for _ in range(1000):
        kids = _children(me)
        if not kids:
            return
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for k in kids:
            try:
                os.waitpid(k, 0)
            except ChildProcessError:
                pass


def run_plain(spec: dict) -> int:
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(CHILD_SUBREAPER)")
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            become_target(spec)
        finally:
            os._exit(127)
    stop = []

    def on_term(signum, frame):
        stop.append(signum)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, on_term)
    status = 0
    while True:
        try:
            done, st = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        if done == pid:
            status = st
            break
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    kill_descendants()
    return os.waitstatus_to_exitcode(status)


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    if spec["mounts"] is not None:
        setup_mounts(spec["mounts"], spec["uid"])
        prepare_workdir(spec)
        become_target(spec)  # exec: the target is PID 1 of the namespace from here on
    prepare_workdir(spec)
    code = run_plain(spec)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
