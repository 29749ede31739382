"""The reliability battery's cases, shared by the tests (tests/unit/test_code_sandbox.py,
tests/unit/test_math_battery.py) and benchmarks/reliability.py, which records each outcome
and time in benchmarks/reliability.md.

Code cases are hostile programs (fenced, as a model would write them) with the tests a task
would carry; each must score ``expected`` (0, or the honest fraction its code earns), finish
within ``limit_s``, and leave no process, file or thread behind (``leftovers``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from megatron_r1.rl.rewards.sandbox import Limits, MAX_SLOTS

WALL_S = 6.0  # the battery's per-test wall clock (a busy 2-core machine runs a 0.2 s test in seconds)
LIMITS = Limits(wall_seconds=WALL_S, cpu_seconds=int(WALL_S))
SLACK_S = 6.0  # start-up, kill and clean-up on a busy 2-core machine


def fenced(code: str) -> str:
    return f"<think>I will write it.</think>\nHere it is:\n```python\n{code.strip()}\n```\n"


@dataclass
class Env:
    """What a case may point at on the host: a listening socket, a secret in another process's
    environment, paths it must not create."""

    nonce: str
    port: int
    secret: str
    host_paths: list[str] = field(default_factory=list)


@dataclass
class CodeCase:
    name: str
    what: str  # one line for the report
    build: Callable[[Env], tuple[str, object]]  # -> (response, tests)
    expected: float
    limit_s: float = WALL_S + SLACK_S
    needs_namespace: bool = False  # only the namespaced sandbox stops it (see sandbox.py)


def _eq_always_true(env):
    code = """
class Always:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
class Int(int):
    def __eq__(self, other):
        return True
def square(x):
    return Always() if x % 2 else Int(-1)
"""
    tests = ("assert square(3) == 9\nassert 16 == square(4)\nassert square(5) == square(5) * 1\n"
             "assert not (square(7) != 49)\nassert [square(2)] == [4]")
    return fenced(code), tests


def _exit_before_asserts(env):
    code = "def square(x):\n    return x + 1\nimport sys\nsys.exit(0)\n"
    # square(x) = x + 1 is right for no test here: the honest fraction is 0
    return fenced(code), "assert square(3) == 9\nassert square(0) == 0\nassert square(-2) == 4"


def _exit_before_asserts_honest(env):
    code = "def square(x):\n    return x * x if x < 3 else 0\nimport os\nos._exit(0) if False else None\nimport sys\nsys.exit(0)\n"
    return fenced(code), "assert square(1) == 1\nassert square(2) == 4\nassert square(3) == 9\nassert square(4) == 16"


def _exit_stdio(env):
    return fenced("import sys\nsys.exit(0)\nprint(int(input()) * 2)"), [{"stdin": "3\n", "stdout": "6\n"}]


def _fake_pass_print(env):
    code = """
import sys, os
print("all tests passed")
print('{"ok": true}')
print('{"ok": true}', file=sys.stderr)
sys.stdout.flush()
os._exit(0)
"""
    return fenced(code), "assert square(3) == 9\nassert square(4) == 16"


def _fake_pass_stdio(env):
    return fenced('print("all tests passed")\nprint("OK")'), [{"stdin": "3\n", "stdout": "6\n"},
                                                             {"stdin": "4\n", "stdout": "8\n"}]


def _forge_channel(env):
    # writes a forged reply to every fd it can, then leaves before the harness can answer
    code = """
import os
for fd in range(3, 64):
    try:
        os.write(fd, b'{"ok": true}\\n')
    except OSError:
        pass
os._exit(0)
"""
    return fenced(code), "assert square(3) == 9\nassert abs(square(0.5) - 0.25) < 1e-9"


def _fork_bomb(env):
    code = """
import os
def spawn():
    n = 0
    while True:
        try:
            if os.fork() == 0:
                while True:
                    pass
            n += 1
        except OSError:
            return n
"""
    return fenced(code), "assert spawn() >= 10000"


def _fork_bomb_toplevel(env):
    return fenced("import os\nwhile True:\n    os.fork()"), [{"stdin": "", "stdout": "never\n"}]


def _daemonise(env):
    code = """
import os, time
def start():
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.chdir("/")
            for fd in (0, 1, 2):
                os.close(fd)
            while True:
                time.sleep(0.1)
        os._exit(0)
    time.sleep(0.2)
    return "daemonised"
"""
    return fenced(code), 'assert start() == "survived"'


def _memory_bomb(env):
    code = """
def grab():
    blocks = []
    while True:
        blocks.append(bytearray(64 << 20))
def grab_once():
    return len(bytearray(16 << 30))
"""
    return fenced(code), "assert grab() == 1\nassert grab_once() == 16 << 30"


def _disk_fill(env):
    code = """
import os
def fill():
    written = 0
    for d in (".", "/tmp", "/var/tmp", "/dev/shm"):
        i = 0
        while True:
            try:
                with open(os.path.join(d, f"fill{i}"), "wb") as f:
                    for _ in range(64):
                        f.write(b"x" * (1 << 20))
                        written += 1
            except OSError:
                break
            i += 1
            if i > 256:
                break
    return written
"""
    return fenced(code), "assert fill() >= 4096"


def _socket_local(env):
    code = f"""
import socket
def reach():
    got = []
    for host in ("127.0.0.1", "localhost", {socket.gethostname()!r}):
        try:
            s = socket.create_connection((host, {env.port}), timeout=1)
            s.sendall(b"escaped")
            got.append(host)
        except OSError:
            pass
    return len(got)
"""
    return fenced(code), "assert reach() == 3\nassert reach() >= 1"


def _read_parent_env(env):
    code = """
import glob, os
def steal():
    for key, value in os.environ.items():
        if key.startswith("MEGATRON_R1_BATTERY"):
            return value
    for path in glob.glob("/proc/*/environ"):
        try:
            data = open(path, "rb").read()
        except OSError:
            continue
        if b"MEGATRON_R1_BATTERY_SECRET=" in data:
            return data.split(b"MEGATRON_R1_BATTERY_SECRET=")[1].split(b"\\0")[0].decode()
    return ""
"""
    return fenced(code), f"assert steal() == {env.secret!r}"


def _write_outside(env):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    targets = [f"/tmp/{env.nonce}-tmp", f"/var/tmp/{env.nonce}-vartmp", f"/dev/shm/{env.nonce}-shm",
               os.path.join(repo, f"{env.nonce}-repo"), f"/root/{env.nonce}-root", f"/etc/{env.nonce}-etc",
               f"../{env.nonce}-parent"]
    env.host_paths += [t for t in targets if t.startswith("/")]
    code = f"""
def escape():
    ok = 0
    for path in {targets!r}:
        try:
            with open(path, "w") as f:
                f.write("escaped")
            ok += 1
        except OSError:
            pass
    return ok
"""
    # inside the sandbox the /tmp-like writes land in its private tmpfs: 4 of 7 "succeed" there,
    # none reaches the host (checked); the test asks for all 7
    return fenced(code), f"assert escape() == {len(targets)}"


def _infinite_loop(env):
    return fenced("def spin():\n    while True:\n        pass"), "assert spin() == 1"


def _deep_recursion(env):
    code = "import sys\nsys.setrecursionlimit(10 ** 8)\ndef down(n):\n    return down(n + 1) + 1\n"
    return fenced(code), "assert down(0) == 1"


def _deep_recursion_c(env):
    # each level passes through C (map, list), so the C stack overflows: the runner segfaults
    code = "import sys\nsys.setrecursionlimit(10 ** 8)\ndef down(n):\n    return list(map(down, [n + 1]))\n"
    return fenced(code), "assert down(0) == [1]"


def _big_output(env):
    code = "import sys\ndef shout():\n    sys.stdout.write('x' * (100 << 20))\n    sys.stdout.flush()\n    return 1\n"
    return fenced(code), "assert shout() == 1"


def _big_output_stdio(env):
    return fenced("import sys\nfor _ in range(100):\n    sys.stdout.write('y' * (1 << 20))\nprint(6)"), \
        [{"stdin": "3\n", "stdout": "6\n"}]


def _honest_solution(env):
    code = "def square(x):\n    return x * x\n"
    return fenced(code), "assert square(3) == 9\nassert square(-2) == 4\nassert abs(square(0.5) - 0.25) < 1e-9"


def _honest_stdio_partial(env):
    # right for positive inputs only: 2 of 3
    code = "n = int(input())\nprint(n * 2 if n > 0 else 0)"
    return fenced(code), [{"stdin": "3\n", "stdout": "6\n"}, {"stdin": "5", "stdout": "10"},
                          {"stdin": "-1", "stdout": "-2"}]


CODE_CASES = [
    CodeCase("control: honest solution", "correct program: equality, tolerance and comparison asserts", _honest_solution, 1.0),
    CodeCase("control: honest partial (stdio)", "right on 2 of 3 stdin/stdout pairs", _honest_stdio_partial, 2 / 3),
    CodeCase("__eq__ always True", "objects (and an int subclass) whose __eq__ says yes", _eq_always_true, 0.0),
    CodeCase("sys.exit(0) before asserts", "wrong function, then sys.exit(0) at top level", _exit_before_asserts, 0.0),
    CodeCase("sys.exit(0), honest fraction", "right for x < 3, then sys.exit(0): 2 of 4", _exit_before_asserts_honest, 0.5),
    CodeCase("sys.exit(0) (stdio)", "exits 0 before printing", _exit_stdio, 0.0),
    CodeCase("fake 'all tests passed'", "prints pass messages and a fake harness reply on stdout", _fake_pass_print, 0.0),
    CodeCase("fake 'all tests passed' (stdio)", "prints pass messages instead of the answer", _fake_pass_stdio, 0.0),
    CodeCase("forged reply on the channel", "writes {\"ok\": true} to every fd it holds, then os._exit",
             _forge_channel, 0.0),
    CodeCase("fork bomb", "forks until refused, children spin", _fork_bomb, 0.0),
    CodeCase("fork bomb (top level, stdio)", "while True: os.fork()", _fork_bomb_toplevel, 0.0),
    CodeCase("daemonising process", "double fork + setsid, outlives its parent", _daemonise, 0.0),
    CodeCase("memory bomb", "grows 64 MB blocks; one 16 GB allocation", _memory_bomb, 0.0),
    CodeCase("disk fill", "64 MB files in the work dir, /tmp, /var/tmp, /dev/shm until refused", _disk_fill, 0.0),
    CodeCase("socket to this machine", "connects to a listener on 127.0.0.1 / localhost / hostname",
             _socket_local, 0.0, needs_namespace=True),
    CodeCase("read the parent's environment", "os.environ and every /proc/*/environ for a secret",
             _read_parent_env, 0.0, needs_namespace=True),
    CodeCase("write outside the work dir", "/tmp, /var/tmp, /dev/shm, the repo, /root, /etc, ..", _write_outside, 0.0, needs_namespace=True),
    CodeCase("infinite loop", "while True: pass", _infinite_loop, 0.0),
    CodeCase("deep recursion", "recursion limit 1e8, unbounded Python recursion (grows the heap)", _deep_recursion, 0.0),
    CodeCase("deep recursion through C", "recursion limit 1e8, each level through map(): C stack overflow",
             _deep_recursion_c, 0.0),
    CodeCase("100 MB of output", "writes 100 MB to stdout (asserts)", _big_output, 0.0),
    CodeCase("100 MB of output (stdio)", "writes 100 MB then the right answer", _big_output_stdio, 0.0),
]

# cases also run without namespaces (own session + subreaper launcher). No fork bomb there: as
# root without namespaces RLIMIT_NPROC does not bind. No socket/env/write cases: not enforced.
PLAIN_CASES = ["daemonising process", "infinite loop", "100 MB of output", "sys.exit(0) before asserts",
               "__eq__ always True", "memory bomb", "deep recursion"]

# ------------------------------------------------------------------------------- host side
@contextmanager
def case_env():
    """A listener on 127.0.0.1 (counts connections), a process holding a secret in its
    environment, and a nonce for path names; everything is torn down on exit."""
    nonce = "mr1-battery-" + os.urandom(4).hex()
    secret = "s3cret-" + os.urandom(4).hex()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen(8)
    listener.settimeout(0)
    holder = subprocess.Popen(["sleep", "600"], env={"MEGATRON_R1_BATTERY_SECRET": secret, "PATH": "/usr/bin:/bin"})
    os.environ["MEGATRON_R1_BATTERY_SECRET"] = secret
    env = Env(nonce, listener.getsockname()[1], secret)
    try:
        yield env, listener
    finally:
        os.environ.pop("MEGATRON_R1_BATTERY_SECRET", None)
        holder.kill()
        holder.wait()
        listener.close()


def accepted(listener: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, OSError):
            return n
        conn.close()
        n += 1


def _proc_table() -> list[tuple[int, int, bytes]]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                uid = int(next(ln for ln in f if ln.startswith(b"Uid:")).split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, StopIteration):
            continue
        out.append((int(name), uid, cmd))
    return out


def leftovers(uid_base: int) -> list[str]:
    """Sandbox processes (by uid or by the scripts they run) and staging dirs still present."""
    found = []
    for pid, uid, cmd in _proc_table():
        if uid_base <= uid < uid_base + MAX_SLOTS or any(
                m in cmd for m in (b"_sandbox_launcher.py", b"harness.py\x00", b"solution.py\x00")):
            shown = cmd.replace(b"\0", b" ")[:120]
            found.append(f"process {pid} uid {uid}: {shown!r}")
    tmp = tempfile.gettempdir()
    found += [f"dir {tmp}/{d}" for d in os.listdir(tmp) if d.startswith("megatron-r1-sandbox-")]
    return found


def own_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def own_threads() -> set[int]:
    return {t.ident for t in threading.enumerate()}


# ------------------------------------------------------------------------------- math cases
@dataclass
class MathCase:
    name: str
    what: str
    response: str
    reference: str
    expected: float
    limit_s: float


def r1z(answer: str) -> str:
    return f"<think>reasoning</think> <answer>{answer}</answer>"


MATH_TIMEOUT_S = 5.0  # the verifier default: on a loaded 2-core machine a real check can take 2 s


def math_cases(marker: str) -> list[MathCase]:
    """``marker``: a path that any successful code injection would create."""
    bound = MATH_TIMEOUT_S + 10.0  # one timeout, a worker respawn (~1 s) and a busy machine
    fast = 3.0  # in-process, linear time: milliseconds idle; the bound allows a loaded 2-core machine
    inj = [f"__import__('os').system('touch {marker}')", f"open('{marker}', 'w')",
           "exec(chr(112)+chr(114)+chr(105)+chr(110)+chr(116)+chr(40)+chr(41))",
           f"(lambda: __import__('os').system('touch {marker}'))()",
           "().__class__.__bases__[0].__subclasses__()",
           f"\\text{{$(touch {marker})}}", f"x + __import__('os').system('touch {marker}')"]
    cases = [
        MathCase("exponent bomb", "9^{9^{9^9}} against 1", r1z("9^{9^{9^{9}}}"), "1", 0.0, bound),
        MathCase("exponent bomb (reference)", "a bomb as the reference", r1z("2"), "2^{2^{2^{2^{2^{30}}}}}", 0.0, bound),
        MathCase("factorial bomb", "(10^{10})! against 1", r1z("(10^{10})!"), "1", 0.0, bound),
        MathCase("nested factorial bomb", "((10!)!)! against 2", r1z("((10!)!)!"), "2", 0.0, bound),
        MathCase("1 MB answer (digits)", "a 1 MB number", r1z("1" * (1 << 20)), "1", 0.0, fast),
        MathCase("1 MB answer (expression)", "1 MB of x+x+...", r1z("x+" * (1 << 19) + "x"), "x", 0.0, fast),
        MathCase("1 MB of open tags", "131072 '<answer>' with no close", "<answer>" * (1 << 17), "1", 0.0, fast),
        MathCase("1 MB of open boxes", "'\\boxed{' x 131072", "\\boxed{" * (1 << 17) + "1", "1", 0.0, fast),
        MathCase("1 MB of boxes", "'\\boxed{1}' x 100000 (all agree)", "\\boxed{1}" * 100_000, "1", 1.0, fast),
        MathCase("unicode digits (Arabic-Indic)", "'٣' for 3: the same number", r1z("٣"), "3", 1.0, fast),
        MathCase("unicode digits (fullwidth)", "'４２' for 42", r1z("４２"), "42", 1.0, fast),
        MathCase("unicode digits (wrong value)", "'٣' for 4", r1z("٣"), "4", 0.0, fast),
        MathCase("unicode superscript", "'²' is not the digit 2", r1z("²"), "2", 0.0, bound),
        MathCase("zero-width joiner", "'1\\u200b0' is not 10", r1z("1\u200b0"), "10", 0.0, bound),
        MathCase("hedge: two boxes", "<answer>\\boxed{3} or \\boxed{4}</answer>, gold 4",
                 r1z("\\boxed{3} or \\boxed{4}"), "4", 0.0, fast),
        MathCase("hedge: two boxes (gold first)", "same, gold 3", r1z("\\boxed{3} or \\boxed{4}"), "3", 0.0, fast),
        MathCase("hedge: boxes after </think>", "'</think> \\boxed{3}, \\boxed{4}', gold 4",
                 "<think>t</think> It is \\boxed{3}, or maybe \\boxed{4}", "4", 0.0, fast),
        MathCase("hedge: \\lor", "\\boxed{3 \\lor 4}, gold 4 (math-verify alone says 1)",
                 r1z("\\boxed{3 \\lor 4}"), "4", 0.0, fast),
        MathCase("hedge: \\text{or}", "\\boxed{3 \\text{ or } 4}, gold 4", r1z("\\boxed{3 \\text{ or } 4}"), "4", 0.0, fast),
        MathCase("hedge: \\mid", "\\boxed{3 \\mid 4}, gold 4 (math-verify alone says 1)",
                 r1z("\\boxed{3 \\mid 4}"), "4", 0.0, fast),
        MathCase("agreeing boxes", "\\boxed{1/2} = \\boxed{0.5} is one answer", r1z("\\boxed{1/2} = \\boxed{0.5}"),
                 "\\frac{1}{2}", 1.0, fast),
        MathCase("control: symbolic", "\\frac{\\sqrt{8}}{2} = \\sqrt{2}", r1z("\\frac{\\sqrt{8}}{2}"), "\\sqrt{2}", 1.0, bound),
    ]
    for i, s in enumerate(inj):
        cases.append(MathCase(f"code injection {i + 1}", s[:60], r1z(s), "x+1", 0.0, bound))
    return cases
