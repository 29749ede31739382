"""Pipeline parallelism: 1F1B and interleaved 1F1B schedules over model chunks, with p2p of activations.

Notable choices
- A schedule is a plain list of ("F" | "B", local chunk v, micro-batch m) per rank, made by
  `schedule_1f1b` / `schedule_interleaved` (Megatron's orders, warm-up counts included). `plan_p2p`
  inserts the communication between its computations, and one executor runs any such plan. Keeping the
  order separate from the execution makes it testable on its own (`simulate`) and easy to swap.
- Virtual stages: with vpp chunks per rank, rank p holds global chunks p, p+pp, p+2pp, ... Chunk j's
  output goes to chunk j+1: on rank p+1, or from the last rank back to rank 0 (the next virtual stage).
- Point-to-point is NCCL-safe, as Megatron does it: between two units of computation a rank issues ONE
  `batch_isend_irecv` group — the sends of what the last unit computed and the receives the next unit
  needs — and waits for all of it, sends included, before computing on. A unit is a warm-up forward, a
  cool-down backward, or a steady-state (forward, backward) pair, whose group then sends forward and
  backward and receives forward and backward at once (Megatron's send_forward_backward_recv_forward_backward;
  a group per op instead deadlocks in the steady phase when two neighbours both send first). Messages
  between a pair of ranks are matched by ORDER only (NCCL ignores tags): `plan_p2p` makes every
  receiver post its receives in the order its sender sends on that channel, taking early any message
  that comes before the one it needs (kept until used), so where activations and gradients of the same
  shape share a channel (pp=2 with interleaving) they cannot be swapped silently.
- `simulate` replays every rank's plan under NCCL's rules — a group completes only when each of its
  sends meets its receive (rendezvous: no buffering assumed) and each receive its send; the k-th send
  on a channel meets the k-th receive, which must be the same message — and raises on a deadlock, a
  mismatched pair, a message used before it arrived or one never consumed. The executor runs the very
  same plans.
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

def warmup_count(pp: int, vpp: int, rank: int, m: int) -> int:
    """Forwards before the steady one-forward-one-backward phase (Megatron's counts)."""
    if vpp == 1:
        return min(pp - rank - 1, m)
    total = m * vpp
    return total if m == pp else min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)


def schedule_1f1b(pp: int, rank: int, m: int) -> list[tuple[str, int, int]]:
    warmup = warmup_count(pp, 1, rank, m)
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

    warmup = warmup_count(pp, vpp, rank, m)
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


# ------------------------------------------------------------------------------------ p2p plans
# A message is ("act", j, i): the output of global chunk j for micro-batch i, sent to the rank of chunk
# j+1; or ("grad", j, i): the gradient w.r.t. the input of chunk j, sent to the rank of chunk j-1.
Msg = tuple  # (kind, global chunk, micro-batch)


def _io(pp: int, vpp: int, rank: int, op) -> tuple:
    """(message needed before `op`, peer it comes from), (message `op` produces, peer it goes to)."""
    kind, v, i = op
    j, last = v * pp + rank, pp * vpp - 1
    prev, nxt = (rank - 1) % pp, (rank + 1) % pp
    if kind == "F":
        return (("act", j - 1, i), prev) if j > 0 else None, (("act", j, i), nxt) if j < last else None
    return (("grad", j + 1, i), nxt) if j < last else None, (("grad", j, i), prev) if j > 0 else None


def _units(ops: list, warmup: int) -> list[list]:
    """A steady-state pair (forward of one micro-batch, backward of an earlier one) is one unit: no
    communication between the two, so the group before it receives both inputs and the group after it
    sends both outputs at once (Megatron's send_forward_backward_recv_forward_backward). Warm-up forwards
    and cool-down backwards are units of their own."""
    n_pairs = max(0, len(ops) - 2 * warmup) // 2  # ops = warmup F, n_pairs (F, B), warmup B
    pairs = [ops[warmup + 2 * k:warmup + 2 * k + 2] for k in range(n_pairs)]
    return [[op] for op in ops[:warmup]] + pairs + [[op] for op in ops[warmup + 2 * n_pairs:]]


def plan_p2p(pp: int, vpp: int, rank: int, m: int, forward_only: bool = False) -> list:
    """This rank's program: ("comm", sends, recvs) groups between units of computations ("F" | "B", v, i).

    sends/recvs: [(peer, message)]. The group before a unit sends the previous unit's outputs and receives
    what this unit needs, preceded on each channel by any message the sender sends before it."""
    scheds = [make_schedule(pp, vpp, r, m, forward_only) for r in range(pp)]
    # each channel's order: the order in which its sender produces messages
    channel: dict[tuple[int, int], list] = {}
    for r, ops in enumerate(scheds):
        for op in ops:
            out = _io(pp, vpp, r, op)[1]
            if out is not None:
                channel.setdefault((r, out[1]), []).append(out[0])
    taken = {src: 0 for (src, dst) in channel if dst == rank}  # messages received so far, per source
    have: set = set()
    plan, sends = [], []
    warmup = len(scheds[rank]) if forward_only else warmup_count(pp, vpp, rank, m)
    for unit in _units(scheds[rank], warmup):
        recvs = []
        for op in unit:
            need = _io(pp, vpp, rank, op)[0]
            if need is not None and need[0] not in have:
                msg, src = need
                order = channel[(src, rank)]
                stop = order.index(msg, taken[src]) + 1
                recvs += [(src, x) for x in order[taken[src]:stop]]
                have.update(order[taken[src]:stop])
                taken[src] = stop
        if sends or recvs:
            plan.append(("comm", sends, recvs))
        sends = []
        for op in unit:
            need, out = _io(pp, vpp, rank, op)
            if need is not None:
                have.discard(need[0])
            plan.append(op)
            if out is not None:
                sends.append((out[1], out[0]))
    if sends:
        plan.append(("comm", sends, []))
    return plan


def simulate(pp: int, vpp: int, m: int, forward_only: bool = False, plans: list | None = None) -> None:
    """Run every rank's p2p plan under NCCL semantics; raise if it deadlocks or mismatches (module doc).

    `plans` (one per rank) replaces `plan_p2p`'s, e.g. to show that a naive plan fails."""
    plans = plans if plans is not None else [plan_p2p(pp, vpp, r, m, forward_only) for r in range(pp)]
    last = pp * vpp - 1
    posted_sends: dict = {}  # (src, dst) -> messages in the order the sender posted them
    posted_recvs: dict = {}  # (src, dst) -> messages in the order the receiver posted them
    pos, mine = [0] * pp, [None] * pp  # mine[r]: the indices of r's posted group in each channel
    inbox: list[set] = [set() for _ in range(pp)]
    done: set = set()  # ("F" | "B", global chunk, micro-batch)

    def where():
        return f"(pp={pp}, vpp={vpp}, m={m}) at steps {pos}"

    while any(pos[r] < len(plans[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while pos[r] < len(plans[r]) and plans[r][pos[r]][0] != "comm":  # computing never blocks
                kind, v, i = plans[r][pos[r]]
                j = v * pp + r
                need = _io(pp, vpp, r, (kind, v, i))[0]
                if need is not None and need[0] not in inbox[r]:
                    raise RuntimeError(f"rank {r} runs {kind}{(v, i)} before receiving {need[0]} {where()}")
                if kind == "B" and (("F", j, i) not in done or (j < last and ("B", j + 1, i) not in done)):
                    raise RuntimeError(f"rank {r} runs B{(v, i)} before its dependencies {where()}")
                inbox[r].discard(need[0] if need else None)
                done.add((kind, j, i))
                pos[r] += 1
                progressed = True
            if pos[r] == len(plans[r]):
                continue
            _, sends, recvs = plans[r][pos[r]]
            if mine[r] is None:  # post the group
                mine[r] = ([(dst, len(posted_sends.setdefault((r, dst), [])), msg) for dst, msg in sends],
                           [(src, len(posted_recvs.setdefault((src, r), [])), msg) for src, msg in recvs])
                for dst, _, msg in mine[r][0]:
                    posted_sends[(r, dst)].append(msg)
                for src, _, msg in mine[r][1]:
                    posted_recvs[(src, r)].append(msg)
                progressed = True
            ok = True
            for a, b, k in [(r, d, k) for d, k, _ in mine[r][0]] + [(s, r, k) for s, k, _ in mine[r][1]]:
                sent, recv = posted_sends.get((a, b), []), posted_recvs.get((a, b), [])
                if len(sent) <= k or len(recv) <= k:
                    ok = False  # the peer has not posted its side yet
                elif sent[k] != recv[k]:  # NCCL would deliver it anyway: a silent swap
                    raise RuntimeError(f"message {k} from rank {a} to rank {b}: {sent[k]} sent, received as {recv[k]} "
                                       f"{where()}")
            if ok:
                inbox[r].update(msg for _, msg in recvs)
                mine[r] = None
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"pipeline p2p deadlocks {where()}")
    for ch, msgs in posted_sends.items():
        if msgs != posted_recvs.get(ch, []):
            raise RuntimeError(f"channel {ch}: sent {len(msgs)} messages, received {len(posted_recvs.get(ch, []))}")
    if any(inbox):
        raise RuntimeError(f"received but never used: {[sorted(b) for b in inbox]}")


class _P2P:
    """Runs a plan's communication groups: one batch_isend_irecv per group, waited at once."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.inbox: dict = {}  # message -> received tensor, until its computation takes it

    def exchange(self, sends: list, recvs: list, outbox: dict, shape_of: Callable, dtype) -> None:
        ops, got = [], []
        for peer, msg in sends:
            ops.append(dist.P2POp(dist.isend, outbox.pop(msg), self.mesh.pp_rank_of(peer), group=self.mesh.pp_group))
        for peer, msg in recvs:
            t = torch.empty(shape_of(msg[2]), dtype=dtype, device=self.mesh.device)
            ops.append(dist.P2POp(dist.irecv, t, self.mesh.pp_rank_of(peer), group=self.mesh.pp_group))
            got.append((msg, t))
        for work in dist.batch_isend_irecv(ops):
            work.wait()  # sends too: a send's buffer is free, and nothing is in flight, once the group is done
        self.inbox.update(got)


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
    plan = (plan_p2p(mesh.pp, vpp, mesh.pp_rank, m, forward_only) if p2p is not None
            else make_schedule(1, vpp, 0, m, forward_only))
    saved: dict = {}  # (v, m) -> (input hidden or None, output tensor or loss)
    outbox: dict = {}  # message -> tensor to send in the next group
    results: dict[int, object] = {}

    def shape_of(i: int):
        return activation_shape(micro_batches[i]["input_ids"], chunks[0])

    for step in plan:
        if step[0] == "comm":
            p2p.exchange(step[1], step[2], outbox, shape_of, dtype)
            continue
        kind, v, i = step
        chunk, mb = chunks[v], micro_batches[i]
        j = v * mesh.pp + mesh.pp_rank
        first = chunk.pre_process
        last = chunk.post_process
        if kind == "F":
            h = None
            if not first:
                h = p2p.inbox.pop(("act", j - 1, i))
                if not forward_only:
                    h.requires_grad_()
            with torch.set_grad_enabled(not forward_only):
                # routes: given MoE routes (routing replay), [B, S, L, K] with -1 = recompute; else None
                out = chunk(mb["input_ids"], hidden=h, routes=mb.get("routes"),
                            replay_routes=mb.get("replay_routes", True))
                if last:
                    res = fn(out, mb)
                    if forward_only:
                        results[i] = res
                    else:
                        loss, metrics = res
                        results[i] = (loss.detach(), metrics)
                        out = loss
                else:
                    outbox[("act", j, i)] = out.detach().contiguous()
            if not forward_only:
                saved[(v, i)] = (h, out)
        else:
            h, out = saved.pop((v, i))
            if grads is not None and i == m - 1:
                grads.ready_chunks.add(v)
            if last:
                torch.autograd.backward(out)
            else:
                torch.autograd.backward(out, p2p.inbox.pop(("grad", j + 1, i)))
            if not first:
                outbox[("grad", j, i)] = h.grad.contiguous()
    assert not outbox and (p2p is None or not p2p.inbox), "pipeline plan left messages behind"
    return [results[i] for i in range(m)] if results else []
