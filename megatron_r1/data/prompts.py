"""RL prompt datasets: JSONL or Parquet rows with a prompt and a reference answer, served as
deterministic shuffled batches whose position survives a checkpoint.

Notable choices:
- Field names are configurable and may be dotted paths into nested objects
  (``answer_key="reward_model.ground_truth"`` reads verl-style Parquet as is).
- A malformed row (bad JSON, bytes that are not UTF-8, not an object, missing field, wrong type)
  is reported as ``path:LINE: …`` (Parquet: ``path:row N: …``, 1-based) and, per ``on_error``,
  either skipped and counted (``report`` turns the counts into log lines), or raised as ``DataError``. A missing or unreadable file, a missing
  Parquet column or a dataset left empty is always fatal: one ``DataError`` naming the file.
  Blank JSONL lines are not errors.
- Prompts too long for the rollout engine (``drop_overlong``, applied by the RL trainers once the
  tokenizer is known) are dropped at load, counted and reported with their ``path:LINE``, instead of
  failing in vLLM whenever such a row is drawn, hours into a run.
- Prompts are strings (for ``r1_zero``) or chat message lists; numeric answers (GSM8K) become
  strings; other top-level fields ride along in ``extra``.
- The order is a pure function of ``(seed, epoch)``, independent of the data-parallel layout:
  the loader yields *global* batches and the trainer slices them per rank, so a run can resume
  on a different number of ranks. The last partial batch of an epoch is dropped so every RL
  step sees ``batch_size`` prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class PromptExample:
    prompt: str | list[dict[str, str]]
    answer: str
    origin: str  # "path:LINE" of the row, for tracing a reward back to the data
    extra: dict[str, Any] = field(default_factory=dict)


class _RowError(Exception):
    pass


def _lookup(row: dict, key: str) -> Any:
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value or value[part] is None:
            raise _RowError(f"missing field {key!r}")
        value = value[part]
    return value


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)
    )


def _example(row: Any, prompt_key: str, answer_key: str, origin: str) -> PromptExample:
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {type(row).__name__}")
    prompt, answer = _lookup(row, prompt_key), _lookup(row, answer_key)
    if not (isinstance(prompt, str) or _is_messages(prompt)):
        raise _RowError(f"field {prompt_key!r} must be a string or a list of {{role, content}} messages, "
                        f"got {type(prompt).__name__}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise _RowError(f"field {answer_key!r} must be a string or a number, got {type(answer).__name__}")
    used = {prompt_key.split(".")[0], answer_key.split(".")[0]}
    extra = {k: v for k, v in row.items() if k not in used}
    return PromptExample(prompt, str(answer), origin, extra)


def _open_binary(path: Path):
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:  # a directory, no permission, ...
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # bytes, decoded line by line: one stray non-UTF-8 byte is that row's problem, not the file's
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{lineno}", _RowError(f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", _RowError(f"invalid JSON ({e.msg} at column {e.colno})")


def _parquet_rows(path: Path, keys: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    _open_binary(path).close()
    try:
        pf = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    columns = pf.schema_arrow.names
    for key in keys:
        if key.split(".")[0] not in columns:
            raise DataError(f"{path}: no column {key.split('.')[0]!r} (columns: {columns})")
    row = 0
    batches = pf.iter_batches()
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pyarrow.ArrowException, OSError) as e:  # a damaged row group: the rows before it were read
            raise DataError(f"{path}: unreadable Parquet data after row {row} ({e})") from None
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


@dataclass
class PromptDataset(Sequence):
    examples: list[PromptExample]
    skipped: int = 0  # malformed rows dropped under on_error="skip"
    errors: list[str] = field(default_factory=list)  # their "path:LINE: reason" messages (first 100)
    too_long: int = 0  # prompts dropped by `drop_overlong`
    too_long_origins: list[str] = field(default_factory=list)  # their "path:LINE (N tokens)" (first 100)

    def __getitem__(self, i):
        return self.examples[i]

    def __len__(self) -> int:
        return len(self.examples)


def load_prompts(
    paths: str | Path | Sequence[str | Path],
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    on_error: Literal["skip", "raise"] = "skip",
) -> PromptDataset:
    """Read ``.jsonl``/``.json`` (one object per line) or ``.parquet`` files, in order."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r}: expected 'skip' or 'raise'")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    dataset = PromptDataset([])
    for path in map(Path, paths):
        if path.suffix == ".parquet":
            rows = _parquet_rows(path, (prompt_key, answer_key))
        elif path.suffix in (".jsonl", ".json"):
            rows = _jsonl_rows(path)
        else:
            raise DataError(f"{path}: unsupported extension {path.suffix!r} (use .jsonl or .parquet)")
        for origin, row in rows:
            try:
                if isinstance(row, _RowError):
                    raise row
                dataset.examples.append(_example(row, prompt_key, answer_key, origin))
            except _RowError as e:
                message = f"{origin}: {e}"
                if on_error == "raise":
                    raise DataError(message) from None
                dataset.skipped += 1
                if len(dataset.errors) < 100:
                    dataset.errors.append(message)
    if not dataset.examples:
        raise DataError(f"no usable rows in {[str(p) for p in paths]} ({dataset.skipped} malformed)")
    return dataset


def drop_overlong(dataset: PromptDataset, count_tokens: Callable[[PromptExample], int], limit: int) -> PromptDataset:
    """The dataset without prompts of more than `limit` tokens (as the trainer will tokenize them), with
    their count and first origins recorded. Raises DataError when nothing is left."""
    kept, too_long, origins = [], 0, []
    for e in dataset.examples:
        n = count_tokens(e)
        if n > limit:
            too_long += 1
            if len(origins) < 100:
                origins.append(f"{e.origin} ({n} tokens)")
        else:
            kept.append(e)
    if not kept:
        raise DataError(f"every one of the {len(dataset)} prompts is longer than {limit} tokens "
                        f"(first: {origins[0] if origins else '?'})")
    return PromptDataset(kept, dataset.skipped, dataset.errors, dataset.too_long + too_long,
                         dataset.too_long_origins + origins)


def report(dataset: PromptDataset, what: str, limit_desc: str = "", first: int = 3) -> list[str]:
    """One line per kind of dropped row, naming the first few, for the run's log."""
    lines = []
    total = len(dataset) + dataset.skipped + dataset.too_long
    if dataset.skipped:
        lines.append(f"{what}: skipped {dataset.skipped} of {total} rows as malformed: "
                     + "; ".join(dataset.errors[:first]) + (" ..." if dataset.skipped > first else ""))
    if dataset.too_long:
        lines.append(f"{what}: dropped {dataset.too_long} of {total} prompts too long to fit{limit_desc}: "
                     + ", ".join(dataset.too_long_origins[:first]) + (" ..." if dataset.too_long > first else ""))
    return lines


class PromptLoader:
    """Endless stream of global batches in a seeded per-epoch shuffle; resumable.

    ``state_dict()`` records ``(epoch, position)``: the next batch starts at index
    ``position`` of epoch ``epoch``'s permutation, which is recomputed from the seed on load.
    """

    def __init__(self, dataset: Sequence, batch_size: int, seed: int = 0, shuffle: bool = True):
        if not 0 < batch_size <= len(dataset):
            raise DataError(f"batch_size={batch_size} must be in [1, len(dataset)={len(dataset)}]")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            # A string seed goes through SHA-512, so it does not depend on PYTHONHASHSEED.
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> list:
        if self.position + self.batch_size > len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return [self.dataset[i] for i in idx]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_examples": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_examples"] != len(self.dataset) or state["seed"] != self.seed:
            raise DataError(
                f"loader state is for {state['num_examples']} examples with seed {state['seed']}, "
                f"this loader has {len(self.dataset)} with seed {self.seed}"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)
