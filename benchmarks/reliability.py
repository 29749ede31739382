"""Run the reliability battery and write benchmarks/reliability.md: every case, its outcome and time.

    python benchmarks/reliability.py                  # writes benchmarks/reliability.md
    python benchmarks/reliability.py --out /tmp/r.md --skip-threads

The cases are the ones the tests run (tests/reliability_cases.py), so the table and the suite
cannot drift apart:
- code sandbox: hostile programs through the `code` reward (namespaced sandbox, and the plain
  fallback for the cases it covers); each must score its expected value, finish within its
  limit, and leave no process, staging dir, fd or thread; listener connections and host paths
  the program aimed at are checked too;
- math verifier: bombs, injection, 1 MB answers, unicode digits, hedges; then 1,000 scorings
  from 16 threads through the default verifier, with process/fd/thread counts before and after.
- data and checkpoint files: malformed / non-UTF-8 / wrong-type rows, empty and truncated files,
  over-long prompts, truncated safetensors and checkpoint shards, through the trainers' readers.
- training faults: the tests of tests/e2e/test_training_faults.py and tests/parallel/test_skip_nonfinite.py
  (long ones included), run through pytest; each test is a row with its docstring, outcome and time.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_r1.rl.rewards import SymbolicVerifier, accuracy_reward  # noqa: E402
from megatron_r1.rl.rewards.accuracy import default_verifier  # noqa: E402
from megatron_r1.rl.rewards.code import code_reward_batch, get_sandbox  # noqa: E402
from megatron_r1.rl.rewards.sandbox import describe  # noqa: E402
from tests.reliability_cases import (  # noqa: E402
    CODE_CASES, LIMITS, MATH_TIMEOUT_S, PLAIN_CASES, accepted, case_env, leftovers, math_cases, own_fds, own_threads,
)

TRAINING_TESTS = ["tests/parallel/test_skip_nonfinite.py", "tests/e2e/test_training_faults.py"]


def run_training() -> list[tuple[str, str, str, float]]:
    """The training-fault tests, long ones included, through pytest: (test, what it checks, outcome, seconds)."""
    import ast
    import subprocess
    import tempfile
    import xml.etree.ElementTree as ET
    root = Path(__file__).resolve().parents[1]
    docs = {}
    for f in TRAINING_TESTS:
        for node in ast.parse((root / f).read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                docs[node.name] = " ".join((ast.get_docstring(node) or "").split())
    with tempfile.TemporaryDirectory(prefix="mr1-faults-") as d:
        xml = os.path.join(d, "junit.xml")
        subprocess.run([sys.executable, "-m", "pytest", *TRAINING_TESTS, "-m", "long or not long", "-q",
                        f"--junitxml={xml}"], cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
        rows = []
        for tc in ET.parse(xml).iter("testcase"):
            bad = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
            skip = tc.find("skipped")
            outcome = ("**FAILED**: " + (bad.get("message") or "").splitlines()[0][:200] if bad is not None
                       else "skipped: " + (skip.get("message") or "") if skip is not None else "ok")
            rows.append((tc.get("name"), docs.get(tc.get("name"), ""), outcome, float(tc.get("time") or 0)))
    return rows


def run_code(isolation: str) -> list[tuple]:
    sandbox = get_sandbox(LIMITS, isolation)
    rows = []
    for case in CODE_CASES:
        if isolation == "plain" and case.name not in PLAIN_CASES:
            continue
        if case.needs_namespace and sandbox.isolation != "namespace":
            rows.append((case, None, None, "skipped: " + sandbox.reason))
            continue
        with case_env() as (env, listener):
            response, tests = case.build(env)
            fds, threads = own_fds(), own_threads()
            details = []
            t0 = time.monotonic()
            score = code_reward_batch([response], [tests], limits=LIMITS, isolation=isolation, details=details)[0]
            elapsed = time.monotonic() - t0
            problems = []
            if abs(score - case.expected) > 1e-9:
                problems.append(f"score {score:.3f} != {case.expected:.3f}")
            if elapsed >= case.limit_s:
                problems.append(f"took {elapsed:.1f} s >= {case.limit_s:.1f} s")
            if accepted(listener):
                problems.append("reached the listener")
            problems += [f"created {p}" for p in env.host_paths if os.path.exists(p)]
            problems += leftovers(sandbox.uid_base)
            if own_fds() != fds:
                problems.append("fds leaked")
            if own_threads() != threads:
                problems.append("threads leaked")
            statuses = ",".join(sorted(set(details[0]["statuses"]))) if details else ""
            rows.append((case, score, elapsed, ("; ".join(problems) + f" ({statuses})") if problems
                         else f"ok ({statuses})"))
    return rows


def run_math() -> list[tuple]:
    marker = f"/tmp/mr1-injected-{os.getpid()}"
    rows = []
    with SymbolicVerifier(num_workers=2, timeout=MATH_TIMEOUT_S) as v:
        v.equivalent_many([("x", "x"), ("y", "y")])
        for case in math_cases(marker):
            t0 = time.monotonic()
            score = accuracy_reward(case.response, case.reference, verifier=v)
            elapsed = time.monotonic() - t0
            problems = []
            if score != case.expected:
                problems.append(f"score {score} != {case.expected}")
            if elapsed >= case.limit_s:
                problems.append(f"took {elapsed:.1f} s >= {case.limit_s:.1f} s")
            if os.path.exists(marker):
                problems.append("INJECTED CODE RAN")
            rows.append((case, score, elapsed, "; ".join(problems) or "ok"))
        stats = dict(v.stats)
    return rows, stats


def _children() -> int:
    from megatron_r1.rl.rewards.sandbox import child_pids
    return len(child_pids(os.getpid()))


def run_threads() -> dict:
    """Same workload as tests/unit/test_math_battery.py::test_thousand_scorings_from_sixteen_threads_leak_nothing."""
    default_verifier()
    time.sleep(1.0)
    before = (_children(), len(own_fds()), len(own_threads()))
    pool = [("<answer>4</answer>", "4", 1.0), ("<answer>5</answer>", "4", 0.0),
            (r"<answer>\frac{1}{2}</answer>", "0.5", 1.0), (r"\boxed{٣}", "3", 1.0),
            (r"<answer>\frac{\sqrt{8}}{2}</answer>", r"\sqrt{2}", 1.0), (r"<answer>(x+1)^2</answer>", "x^2+2x+1", 1.0),
            (r"<answer>\boxed{3 \lor 4}</answer>", "4", 0.0), ("<answer>" + "1" * 100_000 + "</answer>", "1", 0.0)]
    rng = random.Random(0)
    jobs = [rng.choice(pool) for _ in range(998)] + [(r"<answer>9^{9^{9^{9}}}</answer>", "1", 0.0)] * 2
    rng.shuffle(jobs)
    wrong = []

    def work(part):
        for response, reference, expected in part:
            if accuracy_reward(response, reference) != expected:
                wrong.append(response[:40])

    t0 = time.monotonic()
    threads = [threading.Thread(target=work, args=(jobs[i::16],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = (_children(), len(own_fds()), len(own_threads()))
    return {"seconds": time.monotonic() - t0, "wrong": len(wrong), "before": before, "after": after,
            "stats": dict(default_verifier().stats)}


def run_data() -> list[tuple]:
    """Bad data and checkpoint files through the readers the trainers use: (case, outcome, seconds, ok)."""
    import json
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from megatron_r1.ckpt.checkpoint import save_checkpoint, verify_checkpoint
    from megatron_r1.ckpt.hf import CheckpointError, check_hf_weights, hf_tensors, model_state, save_hf
    from megatron_r1.config import load_config
    from megatron_r1.data.prompts import DataError, drop_overlong, load_prompts, report
    from megatron_r1.model import CausalLM

    d = Path(tempfile.mkdtemp(prefix="mr1-data-"))
    good = json.dumps({"prompt": "1 + 1", "answer": "2"}) + "\n"

    def jsonl(name, text):
        p = d / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    def skipped(p):  # data.on_error=skip (the default): dropped, counted, named
        ds = load_prompts(p)
        return "; ".join(report(ds, p.name)).replace(str(d) + "/", ""), ds.skipped == 1 and len(ds) == 2

    def error(fn, exc, want):
        try:
            fn()
        except exc as e:
            return f"`error: {str(e).replace(str(d) + '/', '')}` (exit 2)", want in str(e)
        return "no error", False

    cfg = load_config("tiny-moe").model
    model = CausalLM(cfg)
    hf = d / "hf"
    save_hf(hf_tensors(model_state(model), cfg), cfg, str(hf), dtype=torch.float32)
    st = hf / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    ckpt = Path(save_checkpoint(str(d / "ckpt"), 1, model, model.mesh))
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    tbl = pa.table({"prompt": ["1 + 1", None, "3 + 3"], "answer": ["2", "4", "6"]})
    pq.write_table(tbl, d / "rows.parquet")
    pq.write_table(pa.table({"prompt": ["a"] * 1000, "answer": ["b"] * 1000}), d / "cut.parquet")
    cut = (d / "cut.parquet").read_bytes()
    (d / "cut.parquet").write_bytes(cut[: len(cut) // 2])
    cases = [
        ("malformed JSONL row (bad JSON)", lambda: skipped(jsonl("a.jsonl", good + '{"prompt": "2 + 2",}\n' + good))),
        ("malformed JSONL row (non-UTF-8 byte)",
         lambda: skipped(jsonl("b.jsonl", good.encode() + b'{"prompt": "caf\xe9", "answer": "1"}\n' + good.encode()))),
        ("malformed Parquet row (null prompt)", lambda: skipped(d / "rows.parquet")),
        ("wrong field type (answer a list)",
         lambda: skipped(jsonl("c.jsonl", good + json.dumps({"prompt": "x", "answer": [1]}) + "\n" + good))),
        ("wrong field type, data.on_error=raise",
         lambda: error(lambda: load_prompts(jsonl("d.jsonl", good + '{"prompt": 3, "answer": "1"}\n'), on_error="raise"),
                       DataError, "d.jsonl:2: field 'prompt' must be")),
        ("empty file", lambda: error(lambda: load_prompts(jsonl("e.jsonl", "")), DataError, "no usable rows")),
        ("truncated Parquet file", lambda: error(lambda: load_prompts(d / "cut.parquet"), DataError,
                                                 "cut.parquet: not a readable Parquet file")),
        ("prompt longer than the context (rl.max_prompt_len=8 tokens here)",
         lambda: (lambda ds: ("; ".join(report(ds, "p.jsonl", " (limit 8 tokens)")).replace(str(d) + "/", ""),
                              ds.too_long == 1 and len(ds) == 2))(
             drop_overlong(load_prompts(jsonl("p.jsonl", good + json.dumps({"prompt": "1 + " * 20, "answer": "1"})
                                              + "\n" + good)), lambda e: len(e.prompt.split()), 8))),
        ("truncated safetensors file", lambda: error(lambda: check_hf_weights(str(hf), cfg), CheckpointError,
                                                     "model.safetensors: truncated safetensors file")),
        ("truncated checkpoint shard (resume skips it for the previous one)",
         lambda: error(lambda: verify_checkpoint(str(ckpt)), CheckpointError, "truncated checkpoint shard")),
    ]
    rows = []
    try:
        for name, fn in cases:
            t0 = time.monotonic()
            outcome, ok = fn()
            rows.append((name, outcome.replace("|", "\\|"), time.monotonic() - t0, ok))
    finally:
        import shutil
        shutil.rmtree(d, ignore_errors=True)
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def table(rows, header: str) -> list[str]:
    out = [f"| case | what | expected | score | time (s) | limit (s) | outcome |", "|---|---|---|---|---|---|---|"]
    for case, score, elapsed, outcome in rows:
        s = "—" if score is None else f"{score:.3g}"
        t = "—" if elapsed is None else f"{elapsed:.2f}"
        what = case.what.replace("|", "\\|")
        out.append(f"| {case.name} | {what} | {case.expected:.3g} | {s} | {t} | {case.limit_s:.0f} | {outcome} |")
    return [header, ""] + out + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("reliability.md")))
    ap.add_argument("--skip-threads", action="store_true", help="skip the 1,000-scoring thread run")
    ap.add_argument("--skip-training", action="store_true", help="skip the training-fault tests (minutes)")
    a = ap.parse_args()
    t_start = time.monotonic()
    sandbox = get_sandbox(LIMITS)
    info = describe(sandbox)
    code_ns = run_code("auto")
    code_plain = run_code("plain")
    math_rows, math_stats = run_math()
    threads = None if a.skip_threads else run_threads()
    data_rows = run_data()
    training_rows = [] if a.skip_training else run_training()
    failures = sum(not r[3].startswith(("ok", "skipped")) for r in code_ns + code_plain + math_rows)
    failures += sum(not r[3] for r in data_rows)
    failures += sum(r[2].startswith("**FAILED") for r in training_rows)
    if threads and (threads["wrong"] or threads["before"] != threads["after"]):
        failures += 1

    lim = info["limits"]
    md = [
        "# Reliability battery",
        "",
        f"Written by `python benchmarks/reliability.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()}-core {cpu_name()} shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the end), running as {'root' if os.geteuid() == 0 else 'a user'}; "
        f"total {time.monotonic() - t_start:.0f} s. The cases are tests/reliability_cases.py, the same ones "
        "tests/unit/test_code_sandbox.py and tests/unit/test_math_battery.py assert on. "
        f"**{failures} case(s) failed.**",
        "",
        "## Code sandbox",
        "",
        f"Isolation in force: **{info['isolation']}** ({info['reason']}); program uid dropped: "
        f"{info['uid_dropped']}. Limits per test: wall {lim['wall_seconds']:g} s, CPU {lim['cpu_seconds']} s, "
        f"address space {lim['memory_bytes'] >> 20} MB, {lim['processes']} processes, files "
        f"{lim['file_bytes'] >> 20} MB each, {lim['open_files']} open files, private tmpfs "
        f"{lim['disk_bytes'] >> 20} MB each, stdout+stderr {lim['output_bytes'] >> 20} MB.",
        "",
        "What is enforced where (megatron_r1/rl/rewards/sandbox.py):",
        "",
        "| property | namespaced (unshare) | plain fallback |",
        "|---|---|---|",
        "| no network | new net namespace, loopback down | **not enforced** |",
        "| nothing survives the run | PID namespace: PID 1's exit kills all | subreaper launcher kills every "
        "descendant, even after `setsid` |",
        "| writes outside the work dir | private tmpfs on /tmp, /var/tmp, /dev/shm, /run/lock; other dirs "
        "read-only to the dropped uid; /root, /home hidden | **not enforced** when root (the interpreter "
        "under /root is unreadable to another uid, so the uid is not dropped) |",
        "| RLIMIT_NPROC | binds (per-slot uid) | does not bind root |",
        "| parent's environment | scrubbed env; host /proc invisible | scrubbed env; **/proc/PID/environ "
        "readable by a root program** |",
        "| CPU, memory, file size, open files | rlimits | rlimits |",
        "| wall clock, output cap | parent kills the namespace | parent signals the launcher, then the group |",
        "| verdict channel | judge process (non-dumpable) holds the fd; program runs in a separate runner "
        "behind plain-data proxies | same, but a root program could ptrace the judge |",
        "",
    ]
    md += table(code_ns, f"### Namespaced ({info['isolation']})")
    md += table(code_plain, "### Plain fallback (isolation='plain'), the cases it covers")
    md += ["## Math verifier", "",
           f"Symbolic checks in killable worker processes (2 workers), {MATH_TIMEOUT_S:g} s timeout per check. "
           f"Worker stats after the cases: {math_stats}.", ""]
    md += table(math_rows, "### Cases")
    if threads:
        b, f = threads["before"], threads["after"]
        md += ["### 1,000 scorings from 16 threads", "",
               f"Default verifier (1 worker, 5 s timeout), 998 mixed answers (fast path, symbolic, hedges, "
               f"100 KB answers) and 2 exponent bombs: {threads['seconds']:.1f} s, {threads['wrong']} wrong "
               f"scores. Child processes / fds / threads before: {b[0]} / {b[1]} / {b[2]}, after: "
               f"{f[0]} / {f[1]} / {f[2]}. Worker stats: {threads['stats']}.", ""]
    md += ["## Training faults", "",
           "Real `megatron-r1 pretrain` / `grpo` runs (torchrun for several ranks) and the real training loop on 4 "
           "gloo ranks, broken by the test-only hooks of megatron_r1/faults.py (`MEGATRON_R1_TEST_FAULTS`); every "
           "command runs in its own session with a private TMPDIR, and the test fails if a process of it survives or "
           "a file is left there. Time is the whole test (setup included). "
           + ("**Not run this time (--skip-training).**" if a.skip_training else ""), "",
           "| test | what it checks | outcome | time (s) |", "|---|---|---|---|"]
    md += [f"| `{n}` | {w.replace('|', chr(92) + '|')} | {o.replace('|', chr(92) + '|')} | {t:.1f} |"
           for n, w, o, t in training_rows]
    md += ["", "## Data and checkpoint files", "",
           "Through the readers the trainers, `eval`, `convert` and the dry run use (megatron_r1/data/prompts.py, "
           "ckpt/hf.py, ckpt/checkpoint.py); end to end in tests/e2e/test_bad_inputs.py and "
           "test_pretrain_resume.py. A skipped row is counted and named in the run's log; an error is one line.", "",
           "| case | outcome | time (s) | ok |", "|---|---|---|---|"]
    md += [f"| {c} | {o} | {t:.2f} | {'ok' if ok else '**FAILED**'} |" for c, o, t, ok in data_rows]
    md += [""]
    Path(a.out).write_text("\n".join(md))
    print("\n".join(md))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
