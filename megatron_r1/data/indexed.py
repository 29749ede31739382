"""Tokenised corpora in Megatron's mmap format (.bin/.idx), and packed fixed-length training batches.

Notable choices
- The on-disk format is megatron-core's `IndexedDataset`, so a corpus made with Megatron-LM's
  `tools/preprocess_data.py` is used as is, and ours can be read by Megatron-LM.
- Packing: documents (each bos … eos) are concatenated and cut into rows of `seq_length` tokens;
  attention crosses document boundaries, as in Megatron-LM's GPT pretraining. Rows are drawn by a
  seeded permutation per epoch, so the data position is two integers (epoch, index) in a checkpoint.
- SFT rows (prompt + response) are not packed: each row is one example, right-padded, with a loss
  mask on the response tokens only (cold start, distillation).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch


def build_indexed_dataset(jsonl: str, prefix: str, tokenizer, text_key: str = "text", progress: bool = True) -> str:
    """Tokenise `jsonl` rows ({text_key: str}) into `prefix`.bin/.idx. Returns the prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    with open(jsonl) as f:
        lines = f.readlines()
    it = lines
    if progress:
        from tqdm import tqdm
        it = tqdm(lines, desc=f"tokenising {os.path.basename(jsonl)}", unit="doc")
    for n, line in enumerate(it, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)[text_key]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{jsonl}:{n}: expected a JSON object with a '{text_key}' string ({e})") from None
        ids = tokenizer.encode(text, bos=True, eos=True)
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix


class PackedDataset:
    """Fixed-length rows of `seq_length` tokens cut from the concatenated documents of `prefix`."""

    def __init__(self, prefix: str, seq_length: int, seed: int = 0):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from megatron_r1.data.prompts import DataError
        for suffix in (".idx", ".bin"):
            if not os.path.isfile(prefix + suffix):
                raise DataError(f"{prefix}{suffix}: no such file (a Megatron corpus is PREFIX.bin + PREFIX.idx)")
        try:
            ds = IndexedDataset(prefix, mmap=True)
            tokens = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)
        except Exception as e:  # noqa: BLE001 - megatron-core asserts, numpy/mmap errors on a damaged file
            raise DataError(f"{prefix}.bin/.idx: unreadable Megatron corpus ({type(e).__name__}: {e})") from None
        self.rows = torch.from_numpy(tokens[: len(tokens) // seq_length * seq_length]).view(-1, seq_length)
        if len(self.rows) == 0:
            raise DataError(f"{prefix}: fewer than seq_length={seq_length} tokens")
        self.seed = seed
        self.epoch, self.index = 0, 0
        self._perm = self._permutation()
        self._last: list[list[int]] = []  # [epoch, row] of the last batch (the sample ledger's record)

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(len(self.rows), generator=g)

    def next_batch(self, n: int) -> torch.Tensor:
        """The next `n` rows of the global stream [n, S] (every rank draws the same; dp ranks slice)."""
        out, self._last = [], []
        while len(out) < n:
            if self.index >= len(self.rows):
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation()
            row = int(self._perm[self.index])
            out.append(self.rows[row])
            self._last.append([self.epoch, row])
            self.index += 1
        return torch.stack(out)

    def last_rows(self) -> list[list[int]]:
        """[epoch, row] of each row of the last `next_batch`, in order."""
        return list(self._last)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.index = int(sd["epoch"]), int(sd["index"])
        self._perm = self._permutation()
