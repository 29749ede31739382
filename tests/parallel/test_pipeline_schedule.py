import pytest

from megatron_r1.config import ConfigError
from megatron_r1.parallel.pipeline import make_schedule, schedule_1f1b, simulate


@pytest.mark.parametrize("pp,vpp", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2), (3, 3)])
def test_schedules_complete_without_deadlock(pp, vpp):
    for m in range(1, 13):
        if vpp > 1 and m % pp:
            continue
        simulate(pp, vpp, m)
        simulate(pp, vpp, m, forward_only=True)
        for r in range(pp):
            ops = make_schedule(pp, vpp, r, m)
            assert sorted(ops) == sorted((k, v, i) for k in "FB" for v in range(vpp) for i in range(m))


def test_1f1b_warmup():
    ops = schedule_1f1b(4, 0, 6)
    assert [o[0] for o in ops[:4]] == ["F", "F", "F", "F"] and ops[4] == ("B", 0, 0)


def test_interleaved_needs_multiple_of_pp():
    with pytest.raises(ConfigError, match="multiple"):
        make_schedule(2, 2, 0, 3)
