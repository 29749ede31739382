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
    top-level assert is one test, in a fresh process, after the non-assert statements above it
    (imports, helpers). ``assert EXPR == <literal>`` is a *value test*: only EXPR runs in the
    sandbox and its value comes back as plain data (an object whose ``__eq__`` always says yes
    cannot be encoded), the literal stays here. Other asserts are *truth tests*: comparisons
    inside them accept plain built-in data only (see _code_harness.py). Without top-level
    asserts (HumanEval's ``def check(candidate): ...; check(f)``) the whole string is one truth
    test.
  * JSON text of either, or ``{"tests": ..., "language": ...}``; the data loader keeps answers
    as strings, so JSON text is how a training row carries pairs.
- Results come from the harness's private channel fd or from the parent's own comparison,
  never from the program's stdout: printing "all tests passed" or ``sys.exit(0)`` before the
  asserts earns nothing. A truth test's reply is written by code in the program's own process,
  so a program that deliberately writes a forged reply to that fd is not prevented (value and
  stdin/stdout tests do not have this hole); this is stated in benchmarks/reliability.md.
- ``all_or_nothing=True`` scores 1 only when every test passes; else the fraction passed.
- All tests of a batch run concurrently, ``workers`` at a time (default: the CPU count).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from megatron_r1.rl.rewards.registry import register_reward
from megatron_r1.rl.rewards.sandbox import Limits, Program, RunResult, Sandbox

logger = logging.getLogger(__name__)

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
    kind: str  # "value" | "truth"
    setup: str  # statements that precede it (imports, helpers)
    source: str  # value: the expression run in the sandbox; truth: the rewritten assert
    expected: Any = None  # value tests: the literal, never sent to the sandbox
    op: str = "Eq"  # value tests: "Eq" or "Is"


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


class _StrictAsserts(ast.NodeTransformer):
    """Inside asserts: comparisons, ``not``, ``and``/``or`` and the truth value go through the
    harness's plain-data-only helpers."""

    def __init__(self):
        self.depth = 0

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        self.depth += 1
        test = self.visit(node.test)
        self.depth -= 1
        return ast.copy_location(ast.Assert(test=_call("_mr1_truth", [test]), msg=node.msg), node)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        node = self.generic_visit(node)
        if not self.depth:
            return node
        ops = ast.List([ast.Constant(type(op).__name__) for op in node.ops], ast.Load())
        operands = ast.List([node.left, *node.comparators], ast.Load())
        return ast.copy_location(_call("_mr1_cmp", [ops, operands]), node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        node = self.generic_visit(node)
        if self.depth and isinstance(node.op, ast.Not):
            node.operand = _call("_mr1_truth", [node.operand])
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        node = self.generic_visit(node)
        if self.depth:
            node.values = [_call("_mr1_truth", [v]) for v in node.values]
        return node


def _call(name: str, args: list) -> ast.Call:
    return ast.Call(ast.Name(name, ast.Load()), args, [])


def _strict(node: ast.AST) -> str:
    tree = ast.Module([_StrictAsserts().visit(node)], type_ignores=[])
    return ast.unparse(ast.fix_missing_locations(tree))


def _literal(node: ast.AST) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _value_test(node: ast.Assert, setup: str) -> AssertTest | None:
    t = node.test
    if not (isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], (ast.Eq, ast.Is))):
        return None
    left, right = t.left, t.comparators[0]
    (lok, lval), (rok, rval) = _literal(left), _literal(right)
    if lok == rok:
        return None
    expr, expected = (right, lval) if lok else (left, rval)
    op = type(t.ops[0]).__name__
    if op == "Is" and expected not in (None, True, False):
        return None
    return AssertTest("value", setup, ast.unparse(expr), expected, op)


def parse_asserts(source: str) -> list[AssertTest]:
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"code tests do not parse: {e}") from None
    tests, setup = [], []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assert):
            prefix = "\n".join(setup)
            tests.append(_value_test(stmt, prefix) or AssertTest("truth", prefix, _strict(stmt)))
        else:
            setup.append(_strict(stmt))
    if not tests:
        tests.append(AssertTest("truth", "", "\n".join(setup)))
    return tests


# ------------------------------------------------------------------------------------ judging
_TAGS = {"N": lambda v: None, "b": bool, "i": int, "f": float, "s": str, "y": bytes.fromhex}


def decode(v: Any) -> Any:
    """Inverse of the harness's ``encode``; plain built-in data only."""
    tag = v[0]
    if tag in _TAGS:
        return _TAGS[tag](v[1]) if tag != "N" else None
    if tag == "d":
        return {decode(k): decode(x) for k, x in v[1]}
    items = [decode(x) for x in v[1]]
    return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)


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
    lines = result.channel.split(b"\n")
    if len(lines) != 2 or lines[1]:  # exactly one reply line: anything else was tampered with
        return False
    try:
        reply = json.loads(lines[0])
        if test.kind == "truth":
            return reply == {"ok": True}
        if set(reply) != {"value"}:
            return False
        got = decode(reply["value"])
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError):
        return False
    if test.op == "Is":
        return got is test.expected
    try:
        return bool(got == test.expected)
    except RecursionError:
        return False


def make_program(program: str, test) -> Program:
    if isinstance(test, StdioTest):
        return Program({"solution.py": program}, ["{python}", "-I", "solution.py"], stdin=test.stdin)
    check = {"program": "solution.py", "kind": test.kind, "setup": test.setup, "source": test.source}
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
    """Scores in [0, 1]; ``details``, when given, receives one dict per sample
    (tests, passed, statuses) for the score command and the battery."""
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
