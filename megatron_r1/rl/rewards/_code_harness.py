"""Assert-test harness, run inside the sandbox as ``python -I harness.py CHANNEL_FD CHECK.json``
(stdlib only; copied into the sandbox's working directory by code.py).

The verdict must not come from a process that ran model code, so the harness splits in two:

- **Judge** (this process): marks itself non-dumpable (another process of the same uid can
  then neither ptrace it nor open its ``/proc/PID/fd`` or ``mem``), forks the runner, and runs
  the test's statements. Every name the program defined is, on the judge's side, a proxy: a
  call sends its (plain-data) arguments to the runner and returns the (plain-data) result, so
  the judge never executes model code and an object whose ``__eq__`` always says yes cannot
  even cross over. The verdict, ``{"ok": true}`` or ``{"error": ...}``, goes to CHANNEL_FD,
  which only the judge holds (the runner closes it before any model code runs).
- **Runner** (the child): runs the program's definitions (a ``SystemExit`` or any exception at
  its top level does not stop the tests; they judge what got defined), reports its global
  names, then serves calls. Whatever it answers counts as what the function returned: forging
  a reply is the same as hard-coding a return value, which tests catch or not on their merits.

Limits, stated: values crossing the boundary are plain built-in data (None, bool, int, float,
str, bytes, list, tuple, dict, set, frozenset, exact types); a test that needs the program's
own objects (a class instance) fails, and a function that mutates its arguments is not seen
by the test. Stdin/stdout tests have no such limits.
"""

import builtins
import ctypes
import importlib
import json
import os
import sys

PR_SET_DUMPABLE = 4
_MAX_DEPTH = 64
_SCALARS = {type(None): "N", bool: "b", int: "i", float: "f", str: "s", bytes: "y"}
_CONTAINERS = {list: "l", tuple: "t", set: "S", frozenset: "F"}


def encode(v, depth=0):
    t = type(v)
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if t in _SCALARS:
        tag = _SCALARS[t]
        payload = None if t is type(None) else v.hex() if t is bytes else repr(v) if t is float else \
            str(v) if t is int else v  # str(int) refuses > 4300 digits: an error, not a hang
        return [tag, payload]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(x, depth + 1)] for k, x in v.items()]]
    if t in _CONTAINERS:
        return [_CONTAINERS[t], [encode(x, depth + 1) for x in v]]
    raise TypeError(f"a {t.__name__} is not plain data")


_DECODE_SCALAR = {"N": lambda p: None, "b": bool, "i": int, "f": float, "s": str, "y": bytes.fromhex}
_DECODE_CONTAINER = {"l": list, "t": tuple, "S": set, "F": frozenset}


def decode(v):
    tag, payload = v
    if tag in _DECODE_SCALAR:
        if tag == "b" and type(payload) is not bool or tag == "s" and type(payload) is not str:
            raise ValueError("malformed value")
        return _DECODE_SCALAR[tag](payload)
    if tag == "d":
        return {decode(k): decode(x) for k, x in payload}
    return _DECODE_CONTAINER[tag](decode(x) for x in payload)


class _Pipe:
    """JSON lines over a pair of pipe fds."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd, self.buf = rfd, wfd, b""

    def send(self, obj) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(self.wfd, data):]

    def recv(self):
        while b"\n" not in self.buf:
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                raise EOFError("the program's process ended")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


# ------------------------------------------------------------------------------- runner
def serve(program: str, pipe: _Pipe) -> None:
    g = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(program, "solution.py", "exec"), g)
    except BaseException:  # noqa: BLE001 - the tests judge what got defined
        pass
    manifest = {}
    for name, value in list(g.items()):
        if name.startswith("__"):
            continue
        if type(value) is type(sys):
            manifest[name] = ["module", value.__name__]
        elif callable(value):
            manifest[name] = ["callable"]
        else:
            try:
                manifest[name] = ["value", encode(value)]
            except (TypeError, ValueError, RecursionError):
                pass
    pipe.send(manifest)
    while True:
        name, args, kwargs = pipe.recv()
        try:
            result = g[name](*decode(args), **decode(kwargs))
            reply = ["ok", encode(result)]
        except BaseException as e:  # noqa: BLE001 - reported to the judge as the call's exception
            reply = ["raise", type(e).__name__, str(e)[:200]]
        pipe.send(reply)


# -------------------------------------------------------------------------------- judge
def _proxy(pipe: _Pipe, name: str):
    def call(*args, **kwargs):
        pipe.send([name, encode(args), encode(kwargs)])
        reply = pipe.recv()
        if reply[0] == "ok":
            return decode(reply[1])
        exc = getattr(builtins, str(reply[1]), None)
        if not (isinstance(exc, type) and issubclass(exc, Exception)):
            exc = RuntimeError
        raise exc(f"{name}: {reply[2]}")

    call.__name__ = name
    return call


def judge(check: dict, pipe: _Pipe) -> dict:
    try:
        manifest = pipe.recv()
        ns = {"__name__": "tests", "__builtins__": builtins}
        for name, entry in manifest.items():
            if entry[0] == "module":
                try:
                    ns[name] = importlib.import_module(entry[1])
                except ImportError:
                    pass
            elif entry[0] == "callable":
                ns[name] = _proxy(pipe, name)
            else:
                ns[name] = decode(entry[1])
        exec(compile(check["setup"], "tests.py", "exec"), ns)
        exec(compile(check["source"], "tests.py", "exec"), ns)
        return {"ok": True}
    except BaseException as e:  # noqa: BLE001 - any failure is a failed test
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def main() -> None:
    channel = int(sys.argv[1])
    with open(sys.argv[2], encoding="utf-8") as f:
        check = json.load(f)
    with open(check["program"], encoding="utf-8") as f:
        program = f.read()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")
    to_runner_r, to_runner_w = os.pipe()
    to_judge_r, to_judge_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (channel, to_runner_w, to_judge_r):
                os.close(fd)
            serve(program, _Pipe(to_runner_r, to_judge_w))
        finally:
            os._exit(0)
    for fd in (to_runner_r, to_judge_w):
        os.close(fd)
    reply = judge(check, _Pipe(to_judge_r, to_runner_w))
    data = (json.dumps(reply) + "\n").encode("utf-8", "replace")
    while data:
        data = data[os.write(channel, data):]
    os._exit(0)


if __name__ == "__main__":
    main()
