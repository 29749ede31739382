"""Pipeline schedules and their point-to-point plans, replayed under NCCL's rules by `simulate`: messages
between a pair of ranks are matched by order only (never by tag), and a batch_isend_irecv group completes
only when each of its sends meets its receive (no buffering assumed). The plans depend on (pp, vpp,
micro-batches) only, not on how many layers a stage holds, so uneven first/last stages (DeepSeek-V3's
61 layers as [4 ×15, 1] over pp=16) run the 1F1B plans proved here for pp=16."""
import pytest

from megatron_r1.config import ConfigError
from megatron_r1.parallel.pipeline import _io, make_schedule, plan_p2p, schedule_1f1b, simulate


@pytest.mark.parametrize("pp,vpp", [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1), (16, 1), (2, 2), (4, 2), (3, 3), (2, 4)])
def test_plans_are_deadlock_free_and_order_matched(pp, vpp):
    for m in range(1, 33 if pp >= 8 else 13):
        if vpp > 1 and m % pp:
            continue
        simulate(pp, vpp, m)
        simulate(pp, vpp, m, forward_only=True)
        for r in range(pp):
            ops = make_schedule(pp, vpp, r, m)
            assert sorted(ops) == sorted((k, v, i) for k in "FB" for v in range(vpp) for i in range(m))
            plan = plan_p2p(pp, vpp, r, m)
            assert [s for s in plan if s[0] != "comm"] == ops  # the plan runs the schedule, in its order
            assert all(len(s[1]) <= 2 for s in plan if s[0] == "comm")  # ≤ one send per direction


def _old_plan(pp, vpp, r, m):
    """The old executor: a blocking receive before each op, its own send group after it."""
    plan = []
    for op in make_schedule(pp, vpp, r, m):
        need, out = _io(pp, vpp, r, op)
        if need is not None:
            plan.append(("comm", [], [(need[1], need[0])]))
        plan.append(op)
        if out is not None:
            plan.append(("comm", [(out[1], out[0])], []))
    return plan


def _prev_first(plan):
    """Our groups with each list ordered "previous stage first" (send/recv to prev, then to next), as a
    batch written per direction would be: with pp=2 prev == next, so a rank sends [grad, act] while its
    peer receives [act, grad]."""
    kind = {"act": 1, "grad": 0}
    return [s if s[0] != "comm" else ("comm", sorted(s[1], key=lambda x: kind[x[1][0]]),
                                      sorted(s[2], key=lambda x: -kind[x[1][0]])) for s in plan]


def test_simulator_catches_the_steady_state_deadlock():
    """Separate send and receive groups: in 1F1B's steady phase two neighbours both send first."""
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(4, 1, 8, plans=[_old_plan(4, 1, r, 8) for r in range(4)])


def test_simulator_catches_a_swap_on_a_shared_channel():
    """pp=2 interleaved: activations and gradients share each direction; a group whose sends and receives are not in
    the same order on both sides hands a gradient to an activation's buffer (same shape: NCCL accepts it)."""
    with pytest.raises(RuntimeError, match="received as"):
        simulate(2, 2, 4, plans=[_prev_first(plan_p2p(2, 2, r, 4)) for r in range(2)])


def test_1f1b_warmup():
    ops = schedule_1f1b(4, 0, 6)
    assert [o[0] for o in ops[:4]] == ["F", "F", "F", "F"] and ops[4] == ("B", 0, 0)


def test_interleaved_needs_multiple_of_pp():
    with pytest.raises(ConfigError, match="multiple"):
        make_schedule(2, 2, 0, 3)
