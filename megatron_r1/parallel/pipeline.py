"""Pipeline parallelism: 1F1B and interleaved 1F1B schedules over model chunks, with p2p of activations.

Notable choices
- A schedule is a plain list of ("F" | "B", local chunk v, micro-batch m) per rank, made by
  `schedule_1f1b` / `schedule_interleaved` (Megatron's orders, warm-up counts included), and one
  executor runs any such list. Keeping the order separate from the execution makes it testable on its
  own (`simulate` replays all ranks' lists and proves there is no deadlock) and easy to swap.
- Virtual stages: with vpp chunks per rank, rank p holds global chunks p, p+pp, p+2pp, ... Chunk j's
  output goes to chunk j+1: on rank p+1, or from the last rank back to rank 0 (the next virtual stage).
- Receives block, sends are asynchronous (`isend`, waited at the end of the step): with a causally
  valid order this cannot deadlock. Activations and their gradients use different tags, so a rank pair
  that exchanges both directions (pp=2, or the wrap-around of interleaving) never mismatches messages.
- Shapes are known in advance: [B, S/cp (/tp under SP), H] in the parameters' dtype, from the micro-batch.
- The loss function runs on the last chunk only; its loss tensor is that chunk's backward seed.
- The gradient buffers are told when a chunk starts its last micro-batch's backward, so its buckets can
  start reducing while the other chunks are still in backward.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from megatron_r1.config import ConfigError

TAG_ACT, TAG_GRAD = 0, 1


def schedule_1f1b(pp: int, rank: int, m: int) -> list[tuple[str, int, int]]:
    warmup = min(pp - rank - 1, m)
    ops = [("F", 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [("F", 0, warmup + i), ("B", 0, i)]
    ops += [("B", 0, i) for i in range(m - warmup, m)]
    return ops


def schedule_interleaved(pp: int, vpp: int, rank: int, m: int) -> list[tuple[str, int, int]]:
    """Megatron's interleaved 1F1B: micro-batches go through the chunks in groups of pp."""
    if m % pp:
        raise ConfigError(f"interleaved pipelining needs the number of micro-batches ({m}) to be a multiple "
                          f"of parallel.pp={pp}")
    total = m * vpp

    def chunk(k: int, forward: bool) -> int:
        v = (k % (pp * vpp)) // pp
        return v if forward else vpp - 1 - v

    def mb(k: int) -> int:
        return (k // (pp * vpp)) * pp + k % pp

    if m == pp:
        warmup = total
    else:
        warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    ops = [("F", chunk(k, True), mb(k)) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [("F", chunk(k + warmup, True), mb(k + warmup)), ("B", chunk(k, False), mb(k))]
    ops += [("B", chunk(k, False), mb(k)) for k in range(total - warmup, total)]
    return ops


def make_schedule(pp: int, vpp: int, rank: int, m: int, forward_only: bool = False) -> list[tuple[str, int, int]]:
    if forward_only:
        # micro-batch by micro-batch through the chunks: every dependency points to an earlier (m, chunk)
        return [("F", v, i) for i in range(m) for v in range(vpp)]
    return schedule_1f1b(pp, rank, m) if vpp == 1 else schedule_interleaved(pp, vpp, rank, m)


def simulate(pp: int, vpp: int, m: int, forward_only: bool = False) -> None:
    """Replay every rank's schedule with blocking receives; raise if some rank can never proceed."""
    scheds = [make_schedule(pp, vpp, r, m, forward_only) for r in range(pp)]
    done: set = set()  # ("F"|"B", global chunk j, m)
    pos = [0] * pp
    last = pp * vpp - 1
    while any(pos[r] < len(scheds[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while pos[r] < len(scheds[r]):
                kind, v, i = scheds[r][pos[r]]
                j = v * pp + r
                need = [("F", j - 1, i)] if kind == "F" and j > 0 else []
                if kind == "B":
                    need = [("F", j, i)] + ([("B", j + 1, i)] if j < last else [])
                if not all(n in done for n in need):
                    break
                done.add((kind, j, i))
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"pipeline schedule deadlocks (pp={pp}, vpp={vpp}, m={m}) at {pos}")


class _P2P:
    def __init__(self, mesh):
        self.mesh = mesh
        self.next = mesh.pp_rank_of((mesh.pp_rank + 1) % mesh.pp)
        self.prev = mesh.pp_rank_of((mesh.pp_rank - 1) % mesh.pp)
        self.pending: list = []

    def send(self, t: torch.Tensor, dst: int, tag: int):
        t = t.detach().contiguous()
        self.pending.append((dist.isend(t, dst, tag=tag), t))

    def recv(self, shape, dtype, src: int, tag: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.mesh.device)
        dist.recv(t, src, tag=tag)
        return t

    def flush(self):
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def activation_shape(input_ids: torch.Tensor, chunk) -> tuple[int, int, int]:
    mesh, cfg = chunk.mesh, chunk.cfg
    s = input_ids.shape[1] // mesh.cp
    if mesh.sp:
        s //= mesh.tp
    return (input_ids.shape[0], s, cfg.hidden_size)


def run_pipeline(chunks: list, micro_batches: list[dict], mesh, fn: Callable, forward_only: bool = False,
                 grads=None) -> list:
    """Run `micro_batches` through this rank's chunks with the layout's schedule.

    fn(stage_output, micro_batch) runs on the last chunk: it returns (loss, metrics) when training and
    any result when `forward_only`. Returns [(loss.detach(), metrics) or result, per micro-batch] on the
    rank holding the last chunk, [] elsewhere."""
    m, vpp = len(micro_batches), len(chunks)
    p2p = _P2P(mesh) if mesh.pp > 1 else None
    dtype = next(chunks[0].parameters()).dtype
    ops = make_schedule(mesh.pp, vpp, mesh.pp_rank, m, forward_only)
    saved: dict = {}  # (v, m) -> (input hidden or None, output tensor or loss)
    results: dict[int, object] = {}
    for kind, v, i in ops:
        chunk, mb = chunks[v], micro_batches[i]
        first = chunk.pre_process
        last = chunk.post_process
        if kind == "F":
            h = None
            if not first:
                h = p2p.recv(activation_shape(mb["input_ids"], chunk), dtype, p2p.prev, TAG_ACT)
                if not forward_only:
                    h.requires_grad_()
            with torch.set_grad_enabled(not forward_only):
                out = chunk(mb["input_ids"], hidden=h)
                if last:
                    res = fn(out, mb)
                    if forward_only:
                        results[i] = res
                    else:
                        loss, metrics = res
                        results[i] = (loss.detach(), metrics)
                        out = loss
                else:
                    p2p.send(out, p2p.next, TAG_ACT)
            if not forward_only:
                saved[(v, i)] = (h, out)
        else:
            h, out = saved.pop((v, i))
            if grads is not None and i == m - 1:
                grads.ready_chunks.add(v)
            if last:
                torch.autograd.backward(out)
            else:
                g = p2p.recv(out.shape, out.dtype, p2p.next, TAG_GRAD)
                torch.autograd.backward(out, g)
            if not first:
                p2p.send(h.grad, p2p.prev, TAG_GRAD)
    if p2p is not None:
        p2p.flush()
    return [results[i] for i in range(m)] if results else []
