"""`megatron-r1 score`: score response rows offline with any registered reward, through the
trainer's own RewardCombiner.

    megatron-r1 score --reward accuracy,format --input rows.jsonl --output scored.jsonl
    megatron-r1 score --config cfg.yaml --input rows.jsonl --output scored.jsonl   # rl.rewards as in training

Notable choices
- One code path: `Scorer` wraps `rl.rewards.RewardCombiner` built from the same `rl.rewards`
  mapping the GRPO trainer and `rejection-sample` use (`--config`), so a score here is the score
  training would give. Rejection sampling scores through `Scorer` too.
- Rows are JSONL objects with `response` (`--response-key`) and a reference: `answer` (`--answer-key`), or `tests`
  for code rows without an `answer`. Numbers become strings, as in the prompt loader; lists and
  objects (code tests) pass as they are. Other fields ride along into the output, which adds
  `rewards` (each component, unweighted) and `reward` (the weighted total), the same fields
  `rejection-sample` writes.
- Every row is checked before any is scored: the first malformed one (bad JSON, not an object,
  no string `response`) stops the command with one line, `error: FILE:LINE: ...`, exit 2.
- Rows are scored in batches (`--batch-size`, as a rollout batch would be: the accuracy and code
  rewards fan out over worker pools per batch). Timing percentiles are per batch; with
  `--batch-size 1` they are per-row latencies.
- The output is written to `OUT.tmp` and renamed when complete.
- Reward models score too: `--reward rm_helpful:DIR,rm_harmless:DIR` (a `train-rm` export); they read
  each row's `prompt` field (a string or chat messages) with its response, as in the GRPO loop.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

from megatron_r1.config import ConfigError
from megatron_r1.rl.rewards import RewardCombiner, RewardOutput
from megatron_r1.rl.rewards.registry import list_rewards


def _percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


class Scorer:
    """A RewardCombiner that also keeps per-reward statistics and timings of what it scored."""

    def __init__(self, combiner: RewardCombiner):
        self.combiner = combiner
        names = list(combiner.weights)
        self.rows = 0
        self.sums = {k: 0.0 for k in names + ["total"]}
        self.mins = {k: math.inf for k in names + ["total"]}
        self.maxs = {k: -math.inf for k in names + ["total"]}
        self.full = {k: 0 for k in names}  # samples scoring >= 1
        self.errors = {k: 0 for k in names}
        self.seconds: dict[str, list[float]] = {k: [] for k in names + ["total"]}

    @classmethod
    def from_config(cls, rewards: Mapping[str, Any], names: Sequence[str] | None = None) -> Scorer:
        """``rewards``: an ``rl.rewards`` mapping; ``names``: the subset to use (a name missing
        from the mapping gets weight 1 and default options)."""
        if names is None:
            return cls(RewardCombiner(rewards))
        unknown = [n for n in names if n.partition(":")[0] not in list_rewards()]
        if unknown:
            raise ConfigError(f"unknown reward {unknown[0]!r}; registered: {', '.join(list_rewards())}")
        try:
            return cls(RewardCombiner({n: rewards.get(n, 1.0) for n in names}))
        except KeyError as e:  # e.g. NAME:ARG for a reward that takes no argument
            raise ConfigError(str(e.args[0])) from None

    def __call__(self, responses: Sequence[str], references: Sequence[Any],
                 prompts: Sequence[Any] | None = None) -> RewardOutput:
        t0 = time.perf_counter()
        out = self.combiner(responses, references, prompts)
        self.seconds["total"].append(time.perf_counter() - t0)
        self.rows += len(responses)
        for k, scores in [*out.components.items(), ("total", out.total)]:
            if scores:
                self.sums[k] += sum(scores)
                self.mins[k] = min(self.mins[k], min(scores))
                self.maxs[k] = max(self.maxs[k], max(scores))
            if k != "total":
                self.full[k] += sum(s >= 1.0 for s in scores)
                self.seconds[k].append(out.seconds.get(k, 0.0))
        for k, c in out.errors.items():
            self.errors[k] += c
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        n = max(self.rows, 1)
        out = {}
        for k in self.sums:
            row = {"mean": self.sums[k] / n, "min": self.mins[k] if self.rows else 0.0,
                   "max": self.maxs[k] if self.rows else 0.0}
            if k != "total":
                row.update(weight=self.combiner.weights[k], full=self.full[k] / n, errors=self.errors[k])
            row.update({f"p{q}_s": _percentile(self.seconds[k], q) for q in (50, 90, 99)})
            row["max_s"] = max(self.seconds[k], default=0.0)
            out[k] = row
        return out

    def format_summary(self) -> str:
        lines = [f"{'reward':12s} {'weight':>6s} {'mean':>7s} {'min':>6s} {'max':>6s} {'=1':>6s} {'errors':>6s}"
                 f" | seconds per batch: {'p50':>7s} {'p90':>7s} {'p99':>7s} {'max':>7s}"]
        for k, r in self.summary().items():
            w = f"{r['weight']:6.2f}" if "weight" in r else " " * 6
            full = f"{r['full']:6.1%}" if "full" in r else " " * 6
            err = f"{r['errors']:6d}" if "errors" in r else " " * 6
            lines.append(f"{k:12s} {w} {r['mean']:7.4f} {r['min']:6.2f} {r['max']:6.2f} {full} {err} | "
                         f"{'':19s}{r['p50_s']:7.3f} {r['p90_s']:7.3f} {r['p99_s']:7.3f} {r['max_s']:7.3f}")
        return "\n".join(lines)


def read_rows(path: str, answer_key: str = "answer", response_key: str = "response") -> list[tuple[dict, str, Any]]:
    """``(row, response, reference)`` per non-blank line; DataError ``path:LINE: ...`` on the first bad one."""
    from megatron_r1.data.prompts import DataError
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at character {e.pos + 1})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            response = row.get(response_key)
            if not isinstance(response, str):
                raise DataError(f"{where}: field '{response_key}' must be a string, got "
                                f"{'nothing' if response is None else type(response).__name__}")
            ref = row[answer_key] if answer_key in row else row.get("tests")
            if isinstance(ref, (int, float)) and not isinstance(ref, bool):
                ref = str(ref)
            rows.append((row, response, ref))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def score_file(scorer: Scorer, input_path: str, output_path: str, batch_size: int = 64,
               answer_key: str = "answer", progress: bool | None = None, response_key: str = "response",
               group_by: str | None = None) -> dict:
    """Score every row of ``input_path`` into ``output_path`` (whole or absent). With ``group_by``, the result
    also has ``groups``: {value of that field: {"rows": n, reward: mean, ..., "total": mean}}."""
    from tqdm import tqdm
    rows = read_rows(input_path, answer_key, response_key)
    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = output_path + ".tmp"
    t0 = time.perf_counter()
    groups: dict[str, dict[str, float]] = {}
    try:
        with open(tmp, "w", encoding="utf-8") as f, \
                tqdm(total=len(rows), unit="row", desc="score", disable=True if progress is False else None,
                     file=sys.stderr) as bar:
            for start in range(0, len(rows), batch_size):
                part = rows[start:start + batch_size]
                out = scorer([r[1] for r in part], [r[2] for r in part], [r[0].get("prompt", "") for r in part])
                for i, (row, _, _) in enumerate(part):
                    row = dict(row, rewards={k: v[i] for k, v in out.components.items()}, reward=out.total[i])
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    if group_by is not None:
                        g = groups.setdefault(str(row.get(group_by)), {"rows": 0})
                        g["rows"] += 1
                        for k, v in [*row["rewards"].items(), ("total", row["reward"])]:
                            g[k] = g.get(k, 0.0) + v
                bar.update(len(part))
        os.replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    res = {"rows": len(rows), "seconds": time.perf_counter() - t0}
    if group_by is not None:
        res["groups"] = {name: {k: v if k == "rows" else v / g["rows"] for k, v in g.items()}
                         for name, g in groups.items()}
    return res


def format_groups(field: str, groups: Mapping[str, Mapping[str, float]]) -> str:
    """The per-group means as a table whose first column is headed by the field's name."""
    names = [k for k in next(iter(groups.values())) if k != "rows"] if groups else []
    width = max([len(field), *map(len, groups)])
    lines = [f"{field:{width}s} {'rows':>6s} " + " ".join(f"{k:>12s}" for k in names)]
    lines += [f"{g:{width}s} {r['rows']:6d} " + " ".join(f"{r[k]:12.4f}" for k in names) for g, r in groups.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 score", description=__doc__.split("\n")[0])
    ap.add_argument("--reward", default=None, help="NAME[,NAME...] of registered rewards "
                    "(default: every reward of --config's rl.rewards)")
    ap.add_argument("--config", default=None, help="YAML config or preset whose rl.rewards gives weights and options")
    ap.add_argument("--input", required=True, help="JSONL rows with 'response' and 'answer' (or 'tests')")
    ap.add_argument("--output", required=True, help="JSONL: the input rows plus 'rewards' and 'reward'")
    ap.add_argument("--answer-key", default="answer", help="field holding the reference (default: answer)")
    ap.add_argument("--response-key", default="response",
                    help="field holding the response (default: response; `eval --dump` rows: completion)")
    ap.add_argument("--batch-size", type=int, default=64, help="rows scored together (default 64)")
    ap.add_argument("--group-by", default=None, metavar="FIELD",
                    help="also print each reward's mean per value of this field (e.g. `model` of an `eval --dump` "
                         "of several models)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    if a.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    rewards: Mapping[str, Any] = {}
    if a.config:
        from megatron_r1.config import load_config
        rewards = load_config(a.config).rl.rewards
    names = [n.strip() for n in a.reward.split(",") if n.strip()] if a.reward else None
    if names is None and not a.config:
        raise ConfigError(f"score needs --reward NAME[,NAME...] or --config; registered: {', '.join(list_rewards())}")
    if names is not None and not names:
        raise ConfigError("--reward is empty")
    scorer = Scorer.from_config(rewards, names)
    res = score_file(scorer, a.input, a.output, a.batch_size, a.answer_key,
                     progress=False if a.no_progress else None, response_key=a.response_key, group_by=a.group_by)
    print(f"scored {res['rows']} rows of {a.input} -> {a.output} in {res['seconds']:.2f} s "
          f"({res['rows'] / max(res['seconds'], 1e-9):.1f} rows/s, batches of {a.batch_size})")
    print(scorer.format_summary())
    if a.group_by is not None:
        print(f"\nmean per {a.group_by}:")
        print(format_groups(a.group_by, res["groups"]))
    return 0
