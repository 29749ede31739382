"""Code reward and its sandbox: extraction, test formats, scoring modes, bounded concurrency,
and the hostile-program battery (tests/reliability_cases.py), each case checked for its score,
its time, and for processes, files, fds and threads left behind."""

import os
import time

import pytest

from megatron_r1.rl.rewards import RewardCombiner, code_reward
from megatron_r1.rl.rewards.code import (
    AssertTest,
    StdioTest,
    code_reward_batch,
    extract_program,
    get_sandbox,
    parse_reference,
)
from megatron_r1.rl.rewards.sandbox import Program, Sandbox
from tests.reliability_cases import (
    CODE_CASES,
    LIMITS,
    PLAIN_CASES,
    accepted,
    case_env,
    fenced,
    leftovers,
    own_fds,
    own_threads,
)

SQUARE = fenced("def square(x):\n    return x * x")


@pytest.fixture(scope="module")
def sandbox():
    return get_sandbox(LIMITS)


@pytest.fixture
def clean(sandbox):
    """Fails the test if it leaves a sandbox process, staging dir, fd or thread behind."""
    fds, threads = own_fds(), own_threads()
    yield
    assert leftovers(sandbox.uid_base) == []
    assert own_fds() == fds
    assert own_threads() == threads


# ---------------------------------------------------------------- extraction and formats


def test_extract_program_takes_last_block_of_the_language_after_think():
    r = ("<think>```python\ndraft()\n```</think>\n```bash\nls\n```\n```python\nfirst()\n```\n"
         "text\n```py\nfinal()\n```\n```text\nnot code\n```")
    assert extract_program(r) == "final()\n"
    assert extract_program("```\nuntagged()\n```") == "untagged()\n"
    assert extract_program("<think>```python\nonly_draft()\n```</think> no code") is None
    assert extract_program("no fence at all") is None
    with pytest.raises(ValueError, match="unsupported code language"):
        extract_program("```rust\nfn main(){}\n```", "rust")


def test_parse_reference_formats():
    pairs = [{"stdin": "1", "stdout": "2"}, {"input": "3", "output": "4"}]
    assert parse_reference(pairs)[0] == [StdioTest("1", "2"), StdioTest("3", "4")]
    import json
    assert parse_reference(json.dumps(pairs))[0] == parse_reference(pairs)[0]
    tests, lang = parse_reference({"tests": "assert f(1) == 2", "language": "python"})
    assert lang == "python" and tests == [AssertTest("", "assert f(1) == 2")]
    tests, _ = parse_reference("import math\nassert f(2) == math.pi\nx = 3\nassert f(x) == [1, (2, 3)]")
    assert tests == [AssertTest("import math", "assert f(2) == math.pi"),
                     AssertTest("import math\nx = 3", "assert f(x) == [1, (2, 3)]")]
    humaneval = "def check(candidate):\n    assert candidate(2) == 4\ncheck(square)"
    assert parse_reference(humaneval)[0] == [AssertTest("", humaneval)]
    for bad in ([], [{"stdin": 1, "stdout": "x"}], ["x"], {"cases": []}, "assert (", 5, "4", "f(1)"):
        with pytest.raises(ValueError):
            parse_reference(bad)


# ---------------------------------------------------------------- scoring


def test_fraction_and_all_or_nothing(clean):
    half = fenced("def square(x):\n    return x * x if x > 0 else -1")
    tests = "assert square(2) == 4\nassert square(3) == 9\nassert square(0) == 0\nassert square(-1) == 1"
    assert code_reward_batch([SQUARE, half], [tests, tests], limits=LIMITS) == [1.0, 0.5]
    assert code_reward_batch([SQUARE, half], [tests, tests], limits=LIMITS, all_or_nothing=True) == [1.0, 0.0]
    assert code_reward_batch(["no code here"], [tests], limits=LIMITS) == [0.0]


def test_stdio_tests_compare_outside_the_sandbox(clean):
    prog = fenced("import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)  \nprint()")
    pairs = [{"stdin": "1 2\n", "stdout": "3"}, {"stdin": "5 5", "stdout": "10\n\n"}, {"stdin": "1 1", "stdout": "3"}]
    assert code_reward(prog, pairs, limits=LIMITS) == pytest.approx(2 / 3)
    crash_after = fenced("print(3)\nraise SystemExit(1)")
    assert code_reward(crash_after, [{"stdin": "", "stdout": "3"}], limits=LIMITS) == 0.0


def test_truth_tests_and_humaneval_style(clean):
    tests = ("assert abs(square(0.5) - 0.25) < 1e-9\nassert square(2) in (4, 5)\n"
             "assert sorted([square(2), square(1)]) == [1, 4]\nassert not square(0)")
    assert code_reward(SQUARE, tests, limits=LIMITS) == 1.0
    humaneval = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\ncheck(square)"
    assert code_reward(SQUARE, humaneval, limits=LIMITS) == 1.0
    wrong = fenced("def square(x):\n    return 9")
    assert code_reward(wrong, humaneval, limits=LIMITS) == 0.0


def test_program_cannot_swap_the_tests_builtins(clean):
    cheat = fenced("import builtins\nbuiltins.sorted = lambda x: [1, 4]\ndef square(x):\n    return 0")
    assert code_reward(cheat, "assert sorted([square(2), square(1)]) == [1, 4]", limits=LIMITS) == 0.0


def test_exceptions_and_constants_cross_the_boundary(clean):
    prog = fenced("LIMIT = 10\ndef root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x ** 0.5")
    tests = ("assert LIMIT == 10\nassert root(9) == 3.0\n"
             "try:\n    root(-1)\n    raised = False\nexcept ValueError:\n    raised = True\nassert raised")
    assert code_reward(prog, tests, limits=LIMITS) == 1.0


def test_registered_and_combined_with_weights(clean):
    combiner = RewardCombiner({"code": {"weight": 2.0, "timeout": 3}, "format": 0.5})
    out = combiner([SQUARE, "```python\nsquare = None\n```"], ["assert square(3) == 9"] * 2)
    assert out.components["code"] == [1.0, 0.0]
    assert out.total == [2.0, 0.0]
    assert set(out.seconds) == {"code", "format"}


def test_pool_is_bounded(clean):
    sb = Sandbox(LIMITS)
    progs = [Program({"s.py": "import time\ntime.sleep(1)"}, ["{python}", "-I", "-S", "s.py"]) for _ in range(4)]
    t0 = time.monotonic()
    assert all(r.status == "exited" and r.exit_code == 0 for r in sb.run_many(progs, workers=1))
    serial = time.monotonic() - t0
    t0 = time.monotonic()
    sb.run_many(progs, workers=4)
    parallel = time.monotonic() - t0
    assert serial >= 4.0 and parallel < serial - 1.5, (serial, parallel)


def test_isolation_modes():
    with pytest.raises(ValueError, match="choose auto, namespace or plain"):
        Sandbox(LIMITS, isolation="none")
    auto = Sandbox(LIMITS)
    if auto.isolation == "namespace":
        assert Sandbox(LIMITS, isolation="namespace").isolation == "namespace"
    else:
        with pytest.raises(RuntimeError, match="namespaces unavailable"):
            Sandbox(LIMITS, isolation="namespace")


def test_scrubbed_env_and_isolation(sandbox, clean):
    os.environ["MEGATRON_R1_TEST_TOKEN"] = "secret"
    try:
        res = sandbox.run(Program({"e.py": "import os\nprint(sorted(os.environ))\nprint(os.getuid())"},
                                  ["{python}", "-I", "e.py"]))
    finally:
        del os.environ["MEGATRON_R1_TEST_TOKEN"]
    env_keys = eval(res.stdout.decode().splitlines()[0])
    assert "MEGATRON_R1_TEST_TOKEN" not in env_keys and set(env_keys) <= {
        "PATH", "HOME", "TMPDIR", "LANG", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING",
        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}
    if sandbox.drop_uid:
        assert int(res.stdout.decode().splitlines()[1]) >= sandbox.uid_base


# ---------------------------------------------------------------- the battery


@pytest.mark.parametrize("case", CODE_CASES, ids=lambda c: c.name)
def test_battery(case, sandbox):
    if case.needs_namespace and sandbox.isolation != "namespace":
        pytest.skip(f"needs the namespaced sandbox: {sandbox.reason}")
    with case_env() as (env, listener):
        response, tests = case.build(env)
        fds, threads = own_fds(), own_threads()
        details = []
        t0 = time.monotonic()
        score = code_reward_batch([response], [tests], limits=LIMITS, details=details)[0]
        elapsed = time.monotonic() - t0
        assert score == pytest.approx(case.expected), details
        assert elapsed < case.limit_s, elapsed
        assert accepted(listener) == 0
        assert [p for p in env.host_paths if os.path.exists(p)] == []
        assert leftovers(sandbox.uid_base) == []
        assert own_fds() == fds
        assert own_threads() == threads


@pytest.mark.parametrize("case", [c for c in CODE_CASES if c.name in PLAIN_CASES], ids=lambda c: c.name)
def test_battery_without_namespaces(case):
    """The fallback (own session + subreaper launcher) still scores 0 and kills a setsid daemon."""
    sb = get_sandbox(LIMITS, isolation="plain")
    assert sb.isolation == "plain"
    with case_env() as (env, _):
        response, tests = case.build(env)
        t0 = time.monotonic()
        assert code_reward_batch([response], [tests], limits=LIMITS, isolation="plain")[0] == case.expected
        assert time.monotonic() - t0 < case.limit_s
    assert leftovers(sb.uid_base) == []


@pytest.mark.long
def test_many_programs_concurrently_leave_nothing(sandbox, clean):
    """64 programs x 3 tests through a pool of 8, a third of them hostile."""
    hostile = {c.name: c for c in CODE_CASES}
    with case_env() as (env, _):
        rows = []
        for i in range(64):
            case = [hostile["infinite loop"], hostile["daemonising process"], None][i % 3]
            rows.append(case.build(env) if case else (SQUARE, "assert square(2) == 4\nassert square(3) == 9"))
        t0 = time.monotonic()
        scores = code_reward_batch([r for r, _ in rows], [t for _, t in rows], limits=LIMITS, workers=8)
    assert scores == [0.0 if i % 3 < 2 else 1.0 for i in range(64)]
    assert time.monotonic() - t0 < 120
