"""The test-only fault hooks and the sample ledger (the training-fault battery's tools)."""
import json

import pytest
import torch

from megatron_r1.faults import Faults, parse
from megatron_r1.training import Ledger


def test_parse_and_fire_once_on_the_named_rank():
    assert parse("kill@3:1, nan_grad@2") == {"kill": [(3, 1)], "nan_grad": [(2, None)]}
    with pytest.raises(ValueError, match="'explode@2' is not KIND@STEP"):
        parse("explode@2")
    f = Faults(rank=1, spec="nan_loss@2:1,inf_loss@2:0,rollout_error@3")
    f.begin(1)
    assert f.on_loss(torch.tensor(2.0)).item() == 2.0
    f.begin(2)
    assert torch.isnan(f.on_loss(torch.tensor(2.0)))  # rank 1's fault; rank 0's inf does not fire here
    assert f.on_loss(torch.tensor(2.0)).item() == 2.0  # once per step: the next micro-batch is clean
    f.begin(3)
    assert f.on_rollout([[5, 6], [7]]) == [[-1, 5, 6], [7]]
    assert f.on_rollout([[5, 6], [7]]) == [[5, 6], [7]]
    assert not Faults(rank=0, spec="")


def test_nan_grad_keeps_the_loss_and_poisons_the_gradient():
    w = torch.ones(3, requires_grad=True)
    f = Faults(rank=0, spec="nan_grad@1")
    f.begin(1)
    loss = f.on_loss((w * 2).sum())
    assert loss.item() == 6.0
    loss.backward()
    assert torch.isnan(w.grad).all()


def test_ledger_is_cut_back_on_resume(tmp_path):
    led = Ledger(str(tmp_path), enabled=True)
    for step in (1, 2, 3):
        led.record(step, [[0, step]], skipped=step == 2)
    led.close()
    with open(tmp_path / "ledger.jsonl", "a") as f:
        f.write('{"step": 4, "ro')  # a line cut short by a kill
    Ledger(str(tmp_path), enabled=True).resume_at(2)
    rows = [json.loads(x) for x in open(tmp_path / "ledger.jsonl")]
    assert rows == [{"step": 1, "rows": [[0, 1]]}, {"step": 2, "rows": [[0, 2]], "skipped": True}]
