"""A real single-node Slurm cluster for tests: munged + slurmctld + slurmd on this host.

Usage: `from tests.slurm import slurm_cluster` in a test module, then take `slurm_cluster` as a
fixture and call `slurm_cluster.sbatch_wait(script, args, env, timeout)` -> JobResult(job_id,
returncode, output). Outside pytest: `cluster = start_cluster(); ...; cluster.stop()`.

Notable choices:
- Everything is private to one temp dir: munge key and socket, slurm.conf, state/spool/log dirs,
  pid files. Ports are picked free at start. A host-wide Slurm or munge (systemd units, /etc/slurm)
  is neither used nor disturbed, and two test sessions on one host do not collide.
- The daemons run in the foreground (-D / -F) as our own children, so teardown stops exactly the
  processes it started, by pid, also when startup fails half-way.
- Clients (sbatch, sinfo, srun inside jobs) find the cluster through SLURM_CONF, which sbatch
  exports into the job; the munge socket path is in slurm.conf (AuthInfo=socket=...).
- The node is described by `slurmd -C` (what slurmd will detect anyway) and
  SlurmdParameters=config_overrides keeps the node usable if detection and conf ever disagree.
- SelectType=select/cons_tres with CR_CPU and OverSubscribe=FORCE: tasks are placed on CPUs, not
  cores, and more tasks than CPUs still fit (tiny CPU tests oversubscribe a 2-core machine).
- ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no accounting and no cgroup.conf:
  containers rarely give a writable cgroup tree, and tests need none of it.
- If Slurm cannot start, the fixture FAILS with the daemons' log tails; it never skips.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SETUP_SCRIPT = Path(__file__).with_name("setup_system.sh")
REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol", "scancel", "srun")


class SlurmError(RuntimeError):
    pass


@dataclass
class JobResult:
    job_id: str
    returncode: int
    output: str  # the job's stdout+stderr file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line(hostname: str) -> str:
    """The NodeName= line slurmd would detect, with memory trimmed to leave room for the OS."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
    mem = int(fields.get("RealMemory", "1024"))
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    desc = " ".join(f"{k}={fields[k]}" for k in keep if k in fields)
    return f"NodeName={hostname} NodeAddr=127.0.0.1 {desc} RealMemory={max(mem * 9 // 10, 1)} State=UNKNOWN"


@dataclass
class SlurmCluster:
    root: Path
    hostname: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """os.environ for clients: points at our conf, drops any outer job's SLURM_* variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    # ------------------------------------------------------------ start / stop

    def start(self, timeout_s: float = 30.0) -> None:
        for d in ("etc", "munge", "state", "spool", "log", "run", "jobs"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # munged refuses a key readable by others; the socket dir must stay traversable
        os.chmod(self.root / "munge", 0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._spawn(
            "munged",
            ["munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--log-file={self.root / 'log' / 'munged.log'}", f"--pid-file={self.root / 'run' / 'munged.pid'}",
             f"--seed-file={self.root / 'munge' / 'munged.seed'}"],
        )
        self._wait(lambda: self.munge_socket.exists(), timeout_s, "munged did not create its socket")

        self.conf.write_text(self._slurm_conf())
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, timeout_s, f"node {self.hostname} did not become idle")

    def _slurm_conf(self) -> str:
        r = self.root
        return "\n".join([
            f"ClusterName=mr1test{os.getpid()}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=15",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "MailProg=/bin/true",  # Debian's default /usr/bin/mail is not installed
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            # fast turnaround for short test jobs
            "SchedulerType=sched/builtin",
            # a requeued job becomes eligible cred_expire s later, but only the periodic pass starts it: every 2 s
            # here, not every 60 (measured: 52 s from requeue to restart with the default)
            "SchedulerParameters=sched_interval=2",
            "MinJobAge=300",
            "KillWait=5",
            "InactiveLimit=0",
            _node_line(self.hostname),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
            "",
        ])

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmError(f"{', '.join(dead)} exited during startup\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise SlurmError(f"{what} within {timeout_s:.0f}s\n{self.logs()}")

    def _node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env)
        return r.returncode == 0 and r.stdout.strip().rstrip("*") == "idle"

    def stop(self) -> None:
        """Cancel jobs, then stop our daemons in reverse start order (slurmd last-started first)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # Job steps run under slurmstepd, which slurmd detaches: cancel them and let them
            # drain while slurmd is still there to reap them, or they would outlive the cluster.
            subprocess.run(["scancel", "--quiet", "--user", "root"], env=self.env, capture_output=True, timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                q = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.3)
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

    def logs(self, tail: int = 40) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------ jobs

    def sbatch_wait(
        self,
        script_path: str | os.PathLike,
        args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        timeout: float = 120.0,
        sbatch_args: list[str] | tuple[str, ...] = (),
    ) -> JobResult:
        """Submit a batch script, block until it ends, return its exit code and output file.

        `env` is added on top of the client environment and travels into the job (sbatch's
        default --export=ALL). On timeout the job is cancelled and SlurmError raised.
        Polls scontrol every 0.25 s instead of `sbatch --wait`, whose back-off polling rounds a
        5 s job up to 10 s and a 35 s job up to 42 s.
        """
        out_file = self.root / "jobs" / f"job-{time.time_ns()}.out"
        argv = ["sbatch", "--parsable", f"--output={out_file}", f"--chdir={os.getcwd()}",
                *sbatch_args, str(script_path), *map(str, args)]
        r = subprocess.run(argv, capture_output=True, text=True, env={**self.env, **(env or {})}, timeout=30)
        job_id = r.stdout.strip().split(";")[0]
        if r.returncode != 0 or not job_id:
            raise SlurmError(f"sbatch failed (rc={r.returncode}): {r.stderr.strip()}\n{self.logs()}")

        deadline = time.monotonic() + timeout
        while (state := self.job_state(job_id))[0] not in _TERMINAL_STATES:
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=self.env, capture_output=True)
                output = out_file.read_text(errors="replace") if out_file.exists() else ""
                raise SlurmError(f"job {job_id} still {state[0]} after {timeout}s; cancelled\n{output}\n{self.logs()}")
            time.sleep(0.25)
        output = out_file.read_text(errors="replace") if out_file.exists() else ""
        return JobResult(job_id, state[1], output)

    def job_state(self, job_id: str) -> tuple[str, int]:
        """(JobState, exit code) from scontrol; a signal death reads as 128 + signal, like a shell."""
        r = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=self.env)
        if r.returncode != 0:
            raise SlurmError(f"scontrol show job {job_id} failed: {r.stderr.strip()}")
        fields = dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)
        code, _, sig = fields.get("ExitCode", "0:0").partition(":")
        return fields["JobState"], 128 + int(sig) if int(sig or 0) else int(code)


_TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE",
}


def ensure_slurm_installed() -> None:
    if all(shutil.which(b) for b in REQUIRED_BINARIES):
        return
    r = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True)
    missing = [b for b in REQUIRED_BINARIES if not shutil.which(b)]
    if r.returncode != 0 or missing:
        raise SlurmError(f"{SETUP_SCRIPT.name} failed (rc={r.returncode}), missing {missing}:\n{r.stdout}{r.stderr}")


def start_cluster() -> SlurmCluster:
    ensure_slurm_installed()
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="mr1-slurm-")))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    try:
        cluster = start_cluster()
    except (SlurmError, OSError, subprocess.SubprocessError) as e:
        pytest.fail(f"could not bring up a single-node Slurm on this machine: {e}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
