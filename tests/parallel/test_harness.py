import pytest
import torch
import torch.distributed as dist

from tests.parallel.harness import RankError, run_ranks


def _sum_ranks():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item(), torch.get_num_threads()


def _fail_on_one():
    if dist.get_rank() == 1:
        raise ValueError("boom")
    dist.barrier()  # rank 0 waits for rank 1, which never comes: the harness must stop it


def _hang():
    import time
    if dist.get_rank() == 1:
        time.sleep(60)  # a rank stuck in a long computation
    dist.barrier()


def test_results_in_rank_order():
    assert run_ranks(_sum_ranks, 3) == [(0, 6.0, 1), (1, 6.0, 1), (2, 6.0, 1)]


def test_exception_names_rank():
    with pytest.raises(RankError, match=r"rank 1: ValueError: boom"):
        run_ranks(_fail_on_one, 2, timeout=60)


def test_timeout_kills_and_shows_stacks():
    with pytest.raises(TimeoutError, match=r"(?s)did not finish.*rank 1 stack.*_hang"):
        run_ranks(_hang, 2, timeout=5)
