"""The math verifier's battery (tests/reliability_cases.py): bombs, code injection, 1 MB answers,
unicode digits, hedges, each scored within its bound; then 1,000 scorings from 16 threads with
no process, fd or thread left over."""

import os
import random
import threading
import time

import pytest

from megatron_r1.rl.rewards import SymbolicVerifier, accuracy_reward
from megatron_r1.rl.rewards._symbolic_worker import _sympy_equal
from megatron_r1.rl.rewards.accuracy import default_verifier
from megatron_r1.rl.rewards.sandbox import child_pids
from tests.reliability_cases import MATH_TIMEOUT_S, math_cases, own_fds, own_threads

MARKER = f"/tmp/mr1-injected-{os.getpid()}"
CASES = math_cases(MARKER)


@pytest.fixture(scope="module")
def verifier():
    with SymbolicVerifier(num_workers=2, timeout=MATH_TIMEOUT_S) as v:
        v.equivalent_many([("x", "x"), ("y", "y")])  # both workers imported: cases time checks, not start-up
        yield v


def _children() -> set[int]:
    return set(child_pids(os.getpid()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_math_case(case, verifier):
    t0 = time.monotonic()
    score = accuracy_reward(case.response, case.reference, verifier=verifier)
    elapsed = time.monotonic() - t0
    assert score == case.expected
    assert elapsed < case.limit_s, elapsed
    assert not os.path.exists(MARKER)


@pytest.mark.parametrize("text", [c.response[len("<think>reasoning</think> <answer>"):-len("</answer>")]
                                  for c in CASES if c.name.startswith("code injection")] + [
    f"open(chr(47)+chr(116)+chr(109)+chr(112)+chr(47)+chr(120), chr(119))", "exec(chr(95))", "eval(x)",
    "x.__class__", "getattr(x, 0)"])
def test_sympy_fallback_refuses_injection(text):
    """Without math-verify, plain answers go to sympy's parse_expr, which is eval()."""
    try:
        assert not _sympy_equal(text, "x+1")
    except Exception:  # noqa: BLE001 - refusing to parse is the worker's "not equal"
        pass
    assert not os.path.exists(MARKER) and not os.path.exists("/tmp/x")


def test_hedge_rule_keeps_honest_answers(verifier):
    assert accuracy_reward(r"First \boxed{1}, then finally \boxed{2}.", "2", verifier=verifier) == 1.0
    assert accuracy_reward(r"<think>try \boxed{1}</think> so \boxed{2}", "2", verifier=verifier) == 1.0
    assert accuracy_reward(r"<answer>x \in (-\infty, 1) \cup (2, \infty)</answer>",
                           r"(-\infty, 1) \cup (2, \infty)", verifier=verifier) == 1.0
    assert accuracy_reward(r"<answer>\boxed{3 \text{ or } 4}</answer>", r"3 \text{ or } 4", verifier=verifier) == 1.0


@pytest.mark.long
def test_thousand_scorings_from_sixteen_threads_leak_nothing():
    default_verifier()  # the one long-lived worker every scoring thread shares
    time.sleep(1.0)
    children, fds, threads = _children(), own_fds(), own_threads()
    pool = [("<answer>4</answer>", "4", 1.0), ("<answer>5</answer>", "4", 0.0),
            (r"<answer>\frac{1}{2}</answer>", "0.5", 1.0), (r"\boxed{٣}", "3", 1.0),
            (r"<answer>\frac{\sqrt{8}}{2}</answer>", r"\sqrt{2}", 1.0),  # symbolic
            (r"<answer>(x+1)^2</answer>", "x^2+2x+1", 1.0),  # symbolic
            (r"<answer>\boxed{3 \lor 4}</answer>", "4", 0.0),
            ("<answer>" + "1" * 100_000 + "</answer>", "1", 0.0)]
    rng = random.Random(0)
    jobs = [rng.choice(pool) for _ in range(998)] + [(r"<answer>9^{9^{9^{9}}}</answer>", "1", 0.0)] * 2
    rng.shuffle(jobs)
    wrong, errors = [], []

    def work(part):
        try:
            for response, reference, expected in part:
                if accuracy_reward(response, reference) != expected:
                    wrong.append((response[:40], reference))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t0 = time.monotonic()
    workers = [threading.Thread(target=work, args=(jobs[i::16],)) for i in range(16)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not any(w.is_alive() for w in workers)
    assert errors == [] and wrong == []
    assert time.monotonic() - t0 < 240
    assert len(_children()) == len(children)  # the shared worker (maybe respawned after a bomb), no more
    assert len(own_fds()) == len(fds)  # a respawned worker's pipes may take other numbers, not more
    assert own_threads() == threads
