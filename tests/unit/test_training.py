"""Shared training pieces: LR schedule, packed corpora in Megatron's format, metrics files and plots."""
import json
import math

import pytest
import torch

from megatron_r1.config import ConfigError, load_config
from megatron_r1.data.indexed import PackedDataset, build_indexed_dataset
from megatron_r1.metrics import MetricsLogger, plot_metrics, read_metrics
from megatron_r1.training import lr_at


def test_lr_schedule():
    cfg = load_config("tiny-moe", ["train.lr=1.0", "train.min_lr=0.1", "train.lr_warmup_steps=10",
                                   "train.train_steps=110", "train.lr_decay_style=cosine"])
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    cfg.train.lr_decay_style = "linear"
    assert lr_at(60, cfg) == pytest.approx(0.55)
    cfg.train.lr_decay_style = "nope"
    with pytest.raises(ConfigError, match="lr_decay_style"):
        lr_at(50, cfg)


class _ByteTokenizer:
    vocab_size, bos_id, eos_id, pad_id = 259, 256, 257, 258

    def encode(self, text, bos=False, eos=False):
        return ([self.bos_id] if bos else []) + list(text.encode()) + ([self.eos_id] if eos else [])


def test_megatron_corpus_packing_and_resume(tmp_path):
    docs = [f"document {i} " * (i % 5 + 1) for i in range(40)]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prefix = build_indexed_dataset(str(src), str(tmp_path / "corpus"), _ByteTokenizer(), progress=False)
    # the files are Megatron's own format: megatron-core reads them back document by document
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix)
    assert len(ds) == 40 and bytes(ds[3][1:-1].tolist()).decode() == docs[3]
    total = sum(len(d.encode()) + 2 for d in docs)
    packed = PackedDataset(prefix, 32, seed=1)
    assert packed.rows.shape == (total // 32, 32)
    first = [packed.next_batch(3) for _ in range(5)]
    state = packed.state_dict()
    more = [packed.next_batch(3) for _ in range(4)]  # crosses an epoch boundary
    again = PackedDataset(prefix, 32, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(more, [again.next_batch(3) for _ in range(4)]))
    assert not torch.equal(first[0], PackedDataset(prefix, 32, seed=2).next_batch(3))


def test_bad_corpus_row_names_file_and_line(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "ok"}\n{"txt": "bad"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: expected a JSON object with a 'text' string"):
        build_indexed_dataset(str(src), str(tmp_path / "corpus"), _ByteTokenizer(), progress=False)


def test_metrics_jsonl_tensorboard_and_plot(tmp_path):
    log = MetricsLogger(str(tmp_path), total_steps=3)
    for step in range(1, 4):
        log.log(step, {"reward/total": step / 3, "accuracy": 0.1 * step, "response_length/mean": 40 + step,
                       "nan_metric": float("nan")})
    log.close()
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["accuracy"] == pytest.approx(0.3)
    assert math.isnan(rows[0]["nan_metric"])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    png = plot_metrics(str(tmp_path / "metrics.jsonl"), str(tmp_path / "p.png"),
                       [("reward", ["reward/total"]), ("acc", ["accuracy"]), ("len", ["response_length/mean"])])
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_metrics_resume_drops_rows_past_the_resumed_step(tmp_path):
    """A run killed after logging steps 4-5 but saving only step 3 resumes at 3 and logs 4-5 again:
    each step stays once, in the JSONL and in TensorBoard's view (purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = MetricsLogger(str(tmp_path), total_steps=6)
    log.log(0, {"eval/pass@1": 0.1}, advance=False)
    for step in range(1, 6):
        log.log(step, {"loss": 10.0 - step})
    log._f.write('{"step": 6, "lo')  # the row being written when the kill came
    log._f.flush()
    log.close()
    again = MetricsLogger(str(tmp_path), total_steps=6)
    assert again.resume_at(3) == 3  # rows 4, 5 and the torn one
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [0, 1, 2, 3]
    for step in range(4, 7):
        again.log(step, {"loss": 100.0 + step})
    again.close()
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows[1:]] == [9.0, 8.0, 7.0, 104.0, 105.0, 106.0]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [(e.step, e.value) for e in events] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0), (6, 106.0)]
    # a fresh start (no checkpoint) drops every row, the step-0 evaluation included
    fresh = MetricsLogger(str(tmp_path))
    assert fresh.resume_at(None) == 7
    fresh.close()
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == []
