"""Code-execution reward (DeepSeek-R1 §2.2.2: "compiler feedback ... predefined test cases"):
the share of a task's tests that the response's program passes, run in sandbox.py.

Notable choices:
- The program is the last fenced block (```` ```python ```` or an untagged ```` ``` ````) of the
  task's language, after the last ``</think>`` when there is one (drafts in the chain of thought
  do not count). No block: 0.
- The reference is the task's tests, given as
  * a list of ``{"stdin": ..., "stdout": ...}`` pairs (``input``/``output`` also read): each pair
    is one run of the program; it passes when it exits 0 and its stdout equals the expected one
    up to trailing whitespace on each line and trailing blank lines. The expected output never
    enters the sandbox.
  * a string of Python ``assert`` statements run after the program's definitions: each
    top-level assert is one test, in a fresh sandbox, after the non-assert statements above it
    (imports, helpers). Without top-level asserts (HumanEval's ``def check(candidate): ...``
    then ``check(f)``) the whole string is one test.
  * JSON text of either, or ``{"tests": ..., "language": ...}``; the data loader keeps answers
    as strings, so JSON text is how a training row carries pairs.
- Verdicts never come from the program's stdout or from a process that ran model code: for
  stdin/stdout tests the parent compares; for asserts, the harness's judge process runs the
  test and calls the program, which runs in a separate runner process, through plain-data
  proxies, and writes its verdict on a fd only it holds (_code_harness.py). Printing "all
  tests passed", ``sys.exit(0)`` before the asserts, an ``__eq__`` that always says yes, or
  writing fake verdicts to every fd earns nothing.
- ``all_or_nothing=True`` scores 1 only when every test passes; else the fraction passed.
- All tests of a batch run concurrently, ``workers`` at a time (default: the CPU count).
"""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from megatron_r1.rl.rewards.registry import register_reward
from megatron_r1.rl.rewards.sandbox import Limits, Program, RunResult, Sandbox

HARNESS = Path(__file__).with_name("_code_harness.py")
LANGUAGES = {"python": ("python", "py", "python3", "py3")}  # language -> fence tags accepted
_FENCE_RE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)


# ---------------------------------------------------------------------------------- extraction
def extract_program(response: str, language: str = "python") -> str | None:
    if language not in LANGUAGES:
        raise ValueError(f"unsupported code language {language!r}; supported: {sorted(LANGUAGES)}")
    cut = response.rfind("</think>")
    if cut >= 0:
        response = response[cut + len("</think>"):]
    blocks = [body for tag, body in _FENCE_RE.findall(response) if tag.lower() in LANGUAGES[language] or not tag]
    return blocks[-1] if blocks else None


# ------------------------------------------------------------------------------------- tests
@dataclass(frozen=True)
class StdioTest:
    stdin: str
    stdout: str


@dataclass(frozen=True)
class AssertTest:
    setup: str  # the statements above it (imports, helpers, constants)
    source: str  # the assert (or, without top-level asserts, the whole test string)


def parse_reference(reference: Any, language: str = "python") -> tuple[list, str]:
    """``(tests, language)`` from a row's reference (formats in the module docstring)."""
    if isinstance(reference, str):
        text = reference.strip()
        if text[:1] in "[{":
            try:
                reference = json.loads(text)
            except json.JSONDecodeError:
                pass
    if isinstance(reference, dict):
        if "tests" not in reference:
            raise ValueError(f"code reference object needs a 'tests' key, got {sorted(reference)}")
        language = reference.get("language") or language
        reference = reference["tests"]
    if isinstance(reference, str):
        return parse_asserts(reference), language
    if isinstance(reference, list) and reference:
        tests = []
        for i, t in enumerate(reference):
            if not isinstance(t, dict):
                raise ValueError(f"test {i} is a {type(t).__name__}, expected {{'stdin', 'stdout'}}")
            stdin, stdout = t.get("stdin", t.get("input")), t.get("stdout", t.get("output"))
            if not isinstance(stdin, str) or not isinstance(stdout, str):
                raise ValueError(f"test {i} needs string 'stdin' and 'stdout' fields, got {sorted(t)}")
            tests.append(StdioTest(stdin, stdout))
        return tests, language
    raise ValueError(f"code tests must be a non-empty list of stdin/stdout pairs or a string of asserts, "
                     f"got {type(reference).__name__}")


def parse_asserts(source: str) -> list[AssertTest]:
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"code tests do not parse: {e}") from None
    if not any(isinstance(node, ast.Assert) for node in ast.walk(tree)):
        raise ValueError("code tests contain no assert statement")
    tests, setup = [], []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assert):
            tests.append(AssertTest("\n".join(setup), ast.unparse(stmt)))
        else:
            setup.append(ast.unparse(stmt))
    return tests or [AssertTest("", source)]


# ------------------------------------------------------------------------------------ judging
def _normalize_stdout(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def judge(test, result: RunResult) -> bool:
    if result.status != "exited":
        return False
    if isinstance(test, StdioTest):
        if result.exit_code != 0:
            return False
        return _normalize_stdout(result.stdout.decode("utf-8", "replace")) == _normalize_stdout(test.stdout)
    # exactly one verdict line, written by the judge process that never ran model code
    return result.channel == b'{"ok": true}\n'


def make_program(program: str, test) -> Program:
    if isinstance(test, StdioTest):
        return Program({"solution.py": program}, ["{python}", "-I", "solution.py"], stdin=test.stdin)
    check = {"program": "solution.py", "setup": test.setup, "source": test.source}
    files = {"solution.py": program, "harness.py": HARNESS.read_text(), "check.json": json.dumps(check)}
    return Program(files, ["{python}", "-I", "harness.py", "{channel}", "check.json"])


# ------------------------------------------------------------------------------------- reward
_sandboxes: dict[tuple, Sandbox] = {}


def get_sandbox(limits: Limits, isolation: str = "auto") -> Sandbox:
    key = (limits, isolation, os.getpid())
    if key not in _sandboxes:
        _sandboxes[key] = Sandbox(limits, isolation)
    return _sandboxes[key]


def code_reward_batch(
    responses: Sequence[str],
    references: Sequence[Any],
    language: str = "python",
    all_or_nothing: bool = False,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    isolation: str = "auto",
    limits: Limits | None = None,
    details: list | None = None,
) -> list[float]:
    """Scores in [0, 1]. ``timeout`` / ``memory_mb`` set the per-test wall clock and address
    space (``limits`` replaces all limits); ``details``, when given, receives one dict per
    sample (tests, passed, per-test statuses) for the reliability battery."""
    limits = limits or replace(Limits(), wall_seconds=float(timeout), cpu_seconds=max(1, int(timeout)),
                               memory_bytes=int(memory_mb) << 20)
    sandbox = get_sandbox(limits, isolation)
    jobs: list[tuple[int, Any]] = []
    programs: list[Program] = []
    n_tests = [0] * len(responses)
    for i, (response, reference) in enumerate(zip(responses, references, strict=True)):
        tests, lang = parse_reference(reference, language)
        program = extract_program(response, lang)
        n_tests[i] = len(tests)
        if program is None:
            continue
        for t in tests:
            jobs.append((i, t))
            programs.append(make_program(program, t))
    results = sandbox.run_many(programs, workers or os.cpu_count() or 1)
    passed = [0] * len(responses)
    statuses: list[list[str]] = [[] for _ in responses]
    for (i, test), res in zip(jobs, results):
        ok = judge(test, res)
        passed[i] += ok
        statuses[i].append("pass" if ok else res.status if res.status != "exited" else "fail")
    scores = []
    for i, n in enumerate(n_tests):
        frac = passed[i] / n if n else 0.0
        scores.append(float(passed[i] == n) if all_or_nothing else frac)
        if details is not None:
            details.append({"tests": n, "passed": passed[i], "statuses": statuses[i],
                            "isolation": sandbox.isolation})
    return scores


@register_reward("code", batch_fn=code_reward_batch)
def code_reward(response: str, reference: Any, **kwargs) -> float:
    return code_reward_batch([response], [reference], **kwargs)[0]
