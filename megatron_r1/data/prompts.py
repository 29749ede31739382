"""RL prompt datasets: JSONL or Parquet rows with a prompt and a reference answer, served as
deterministic shuffled batches whose position survives a checkpoint.

Notable choices:
- Field names are configurable and may be dotted paths into nested objects
  (``answer_key="reward_model.ground_truth"`` reads verl-style Parquet as is).
- A malformed row (bad JSON, not an object, missing field, wrong type) is reported as
  ``path:LINE: …`` (Parquet: ``path:row N: …``, 1-based) and, per ``on_error``, either
  skipped and counted, or raised as ``DataError``. A missing Parquet column or a dataset left
  empty is always fatal. Blank JSONL lines are not errors.
- Prompts are strings (for ``r1_zero``) or chat message lists; numeric answers (GSM8K) become
  strings; other top-level fields ride along in ``extra``.
- The order is a pure function of ``(seed, epoch)``, independent of the data-parallel layout:
  the loader yields *global* batches and the trainer slices them per rank, so a run can resume
  on a different number of ranks. The last partial batch of an epoch is dropped so every RL
  step sees ``batch_size`` prompts.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

logger = logging.getLogger(__name__)


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


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", _RowError(f"invalid JSON ({e.msg} at column {e.colno})")


def _parquet_rows(path: Path, keys: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    for key in keys:
        if key.split(".")[0] not in columns:
            raise DataError(f"{path}: no column {key.split('.')[0]!r} (columns: {columns})")
    row = 0
    for batch in pf.iter_batches():
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


@dataclass
class PromptDataset(Sequence):
    examples: list[PromptExample]
    skipped: int = 0  # malformed rows dropped under on_error="skip"
    errors: list[str] = field(default_factory=list)  # their "path:LINE: reason" messages (first 100)

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
        skipped_before = dataset.skipped
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
        if dataset.skipped > skipped_before:
            first = next((m for m in dataset.errors if m.startswith(f"{path}:")), "")
            logger.warning("%s: skipped %d malformed rows (first: %s)", path, dataset.skipped - skipped_before, first)
    if not dataset.examples:
        raise DataError(f"no usable rows in {[str(p) for p in paths]} ({dataset.skipped} malformed)")
    return dataset


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
