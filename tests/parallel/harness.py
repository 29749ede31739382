"""Multi-rank test harness: `run_ranks(fn, world_size, *args, timeout=...)`.

The implementation lives in `megatron_r1.parallel.spawn` because `megatron-r1 check-parallel` uses it
too: forked ranks (torch imported once, in the parent), gloo over a file:// rendezvous in a temporary
directory, `torch.set_num_threads(1)` per rank, exceptions re-raised in the parent as `RankError` with
the failing rank and its traceback, a wall-clock timeout that kills every rank and prints where each
one was stuck.
"""
from megatron_r1.parallel.spawn import RankError, run_ranks

__all__ = ["run_ranks", "RankError"]
