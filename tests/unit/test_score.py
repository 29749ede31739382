"""`megatron-r1 score`: every registered reward through the trainer's RewardCombiner, a summary
with timings, one error line for a malformed row."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1.config import load_config
from megatron_r1.rl.rewards import RewardCombiner
from megatron_r1.rl.score import Scorer

REPO = Path(__file__).resolve().parents[2]
CODE = "<think>easy</think>\n```python\ndef square(x):\n    return x * x\n```"
ROWS = [
    {"id": 0, "response": "<think>2+2</think> <answer>4</answer>", "answer": "4"},
    {"id": 1, "response": "<think>hm</think> <answer>\\frac{1}{2}</answer>", "answer": 0.5},
    {"id": 2, "response": "no tags, \\boxed{7}", "answer": "8"},
    {"id": 3, "response": CODE, "tests": "assert square(3) == 9\nassert square(2) == 5"},
    {"id": 4, "response": "```python\nprint(int(input()) + 1)\n```", "tests": [{"stdin": "1", "stdout": "2"}]},
]


def run_score(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "megatron_r1.cli", "score", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_score_matches_the_combiner_and_prints_a_summary(tmp_path):
    src, out = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    write_rows(src, ROWS)
    r = run_score("--reward", "accuracy,format,code,language", "--input", str(src), "--output", str(out),
                  "--batch-size", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["id"] for s in scored] == [0, 1, 2, 3, 4]
    # the very object the trainer builds from rl.rewards, called on the same batch
    combiner = RewardCombiner({"accuracy": 1.0, "format": 1.0, "code": 1.0, "language": 1.0})
    refs = [row.get("answer", row.get("tests")) for row in ROWS]
    refs = [str(x) if isinstance(x, (int, float)) else x for x in refs]
    expect = combiner([row["response"] for row in ROWS], refs)
    for i, s in enumerate(scored):
        assert s["rewards"] == {k: v[i] for k, v in expect.components.items()}
        assert s["reward"] == pytest.approx(expect.total[i])
    assert [s["rewards"]["accuracy"] for s in scored] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert [s["rewards"]["code"] for s in scored][3:] == [0.5, 1.0]
    assert "scored 5 rows" in r.stdout and "p99" in r.stdout
    summary = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:]}
    assert set(summary) == {"accuracy", "format", "code", "language", "total"}
    assert float(summary["accuracy"][2]) == pytest.approx(0.4)
    assert not (tmp_path / "scored.jsonl.tmp").exists()


def test_score_uses_config_weights(tmp_path):
    src, out = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    write_rows(src, ROWS[:3])
    cfg = REPO / "examples/r1_zero_tiny.yaml"
    r = run_score("--config", str(cfg), "--input", str(src), "--output", str(out), "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    weights = load_config(str(cfg)).rl.rewards
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(scored[0]["rewards"]) == set(weights)
    expect = Scorer.from_config(weights)([row["response"] for row in ROWS[:3]], [str(row["answer"]) for row in ROWS[:3]])
    assert [s["reward"] for s in scored] == pytest.approx(expect.total)


def test_response_key_reads_eval_dump_rows(tmp_path):
    """`eval --dump` writes each sample as `completion` (and, of several models, its `model`): --response-key
    completion scores those rows as they are, --group-by model gives each model's means; a row without that
    field is the usual one-line error naming it."""
    src, out = tmp_path / "dump.jsonl", tmp_path / "scored.jsonl"
    write_rows(src, [{"completion": row["response"], "answer": row["answer"], "model": m}
                     for row, m in zip(ROWS[:3], ["before", "after", "after"])])
    r = run_score("--reward", "accuracy,format", "--response-key", "completion", "--input", str(src),
                  "--output", str(out), "--no-progress", "--group-by", "model")
    assert r.returncode == 0, r.stdout + r.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["rewards"]["accuracy"] for row in scored] == [1.0, 1.0, 0.0]
    table = r.stdout[r.stdout.index("mean per model:"):].splitlines()[1:]
    assert table[0].split() == ["model", "rows", "accuracy", "format", "total"]
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in table[1:]}
    assert set(rows) == {"before", "after"} and rows["before"][:2] == [1, 1.0] and rows["after"][:2] == [2, 0.5]
    after = [row for row in scored if row["model"] == "after"]
    assert rows["after"][2:] == pytest.approx([sum(row["rewards"]["format"] for row in after) / 2,
                                               sum(row["reward"] for row in after) / 2], abs=1e-4)
    r = run_score("--reward", "accuracy", "--input", str(src), "--output", str(out), "--no-progress")
    assert r.returncode == 2 and "dump.jsonl:1: field 'response' must be a string, got nothing" in r.stderr


@pytest.mark.parametrize("bad, message", [
    ('{"response": "x", "answer": "1"}\n\n{"response": "y", "answer": \n', "rows.jsonl:3: not valid JSON"),
    ('{"response": "x", "answer": "1"}\n[1, 2]\n', "rows.jsonl:2: expected a JSON object, got list"),
    ('{"answer": "1"}\n', "rows.jsonl:1: field 'response' must be a string, got nothing"),
    ('{"response": 5, "answer": "1"}\n', "rows.jsonl:1: field 'response' must be a string, got int"),
    ("\n\n", "rows.jsonl: no rows"),
])
def test_malformed_row_is_one_error_line(tmp_path, bad, message):
    src, out = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    src.write_text(bad)
    r = run_score("--reward", "accuracy", "--input", str(src), "--output", str(out), "--no-progress")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {src.parent}/{message}"), r.stderr
    assert not out.exists() and not (tmp_path / "scored.jsonl.tmp").exists()


def test_bad_arguments_are_one_error_line(tmp_path):
    src = tmp_path / "rows.jsonl"
    write_rows(src, ROWS[:1])
    for args, message in ((["--reward", "acuracy"], "unknown reward 'acuracy'"),
                          ([], "score needs --reward"),
                          (["--reward", "accuracy", "--batch-size", "0"], "--batch-size must be >= 1")):
        r = run_score(*args, "--input", str(src), "--output", str(tmp_path / "o.jsonl"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("error: ") and message in r.stderr
    r = run_score("--reward", "accuracy", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "no such file" in r.stderr
