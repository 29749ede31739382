"""NaN/inf in one rank's loss or gradient, on 4 ranks (tp=2 x dp=2), through the real training loop
(sft/trainer.py `run_lm_training`, TrainSession, the ZeRO-1 optimizer): every rank skips the same optimizer
steps, the weights stay put and the dp replicas never diverge; too many in a row stop every rank with the
same error. Part of the training-fault battery (tests/e2e/test_training_faults.py has the CLI side)."""
import hashlib
import json
import os

from megatron_r1.faults import ENV
from tests.e2e.test_pretrain_resume import OVERRIDES
from tests.parallel.harness import run_ranks


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in open(path) if x.endswith("\n")]


def _nan_body(run_dir: str):
    import torch

    from megatron_r1.config import load_config
    from megatron_r1.sft.trainer import run_lm_training
    from megatron_r1.training import TrainingError, TrainSession
    # step 2: NaN gradients on rank 3 only; 3 normal; 4: inf loss on rank 1; 5: NaN loss everywhere;
    # 6: NaN gradients on rank 2: the third skip in a row, more than max_skipped_steps=2
    os.environ[ENV] = "nan_grad@2:3,inf_loss@4:1,nan_loss@5,nan_grad@6:2"
    cfg = load_config("tiny-moe", [*OVERRIDES, "parallel.tp=2", "train.max_skipped_steps=2", "train.train_steps=8",
                                   "train.save_interval=0", f"run_dir={run_dir}"])
    s = TrainSession(cfg, desc="nan")
    gen = torch.Generator().manual_seed(0)
    at_start = []  # digest of this rank's parameters when each step draws its batch

    def batch():
        at_start.append(hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for c in s.chunks
                                                 for p in c.parameters())).hexdigest())
        ids = torch.randint(0, 256, (4, 32), generator=gen)
        return ids, torch.ones_like(ids)

    err = None
    try:
        run_lm_training(s, batch, cfg.train.train_steps, batch_rows=lambda: [len(at_start)])
    except TrainingError as e:
        err = str(e)
    s.logger.close()
    s.ledger.close()
    at_start.append(hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for c in s.chunks
                                            for p in c.parameters())).hexdigest())
    return {"err": err, "skipped": s.skipped_steps, "step": s.step, "tp_rank": s.mesh.tp_rank, "at_start": at_start}


def test_nan_or_inf_skips_the_step_on_every_rank_and_stops_after_too_many(tmp_path):
    """4 ranks (tp=2 x dp=2): a NaN/inf in one rank's gradient or loss skips the optimizer step on every rank
    (parameters unchanged, logged with its reason, `skipped_steps` counted); more than train.max_skipped_steps
    in a row stop every rank with the same TrainingError; the dp replicas never diverge."""
    res = run_ranks(_nan_body, 4, str(tmp_path / "run"), timeout=300)
    assert all(r["err"] == res[0]["err"] for r in res)
    assert res[0]["err"].startswith("step 6: 3 optimizer steps in a row skipped for NaN/inf gradients (last: "
                                    "non-finite gradient norm (nan)), more than train.max_skipped_steps=2"), res[0]["err"]
    for r in res:
        assert r["skipped"] == 4 and r["step"] == 5
        h = r["at_start"]  # start of steps 1..6, then the end
        assert h[0] != h[1] and h[2] != h[3]  # steps 1 and 3 updated
        assert h[1] == h[2] and h[3] == h[4] == h[5] == h[6]  # steps 2, 4, 5, 6 skipped: untouched
    for tp in (0, 1):  # dp replicas (same tp rank) hold the same weights at every step
        assert len({tuple(r["at_start"]) for r in res if r["tp_rank"] == tp}) == 1
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["skipped"] for r in rows] == [0, 1, 0, 1, 1]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 2, 3]
    assert [r.get("skipped", False) for r in _rows(tmp_path / "run" / "ledger.jsonl")] == [False, True, False, True, True]
