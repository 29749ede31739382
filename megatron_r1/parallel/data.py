"""Data parallelism: bucketed gradient reduction and a ZeRO-1 distributed AdamW.

Notable choices
- Every gradient reduction is a SUM: each rank's loss is already divided by the *global* token count
  (model/gpt.py `lm_loss`), so micro-batches, dp and cp ranks just add up.
- A parameter's reduction group is its placement's (`chunk.placement[name].group`, parallel/placement.py):
    routed experts                              -> "edp"   (the other holders of the same experts)
    replicated over tp, partial grads           -> "stage" (= tp × cp × dp: the dp·cp sum and the tp sum at once)
      (norms under SP, MLA low-rank projections, router, shared experts)
    everything else                             -> "dp_cp"
  The same group is the one the parameter is replicated over, so ZeRO-1 shards its optimizer state
  over exactly that group: reduce-scatter the grads, update the owned slice, all-gather the params.
- The MTP module's copy of the embedding on the last pipeline stage (not primary) and stage 0's
  embedding ("embed" group) are first summed over the "embed" group; their bucket is reduced after
  backward ends.
- Gradients accumulate in float32 buffers (one flat buffer per bucket; `GradBuffers.main_grad(p)` is a
  parameter's view) via
  post-accumulate-grad hooks, so bf16 parameters train without loss scaling and without bf16
  accumulation error. On the last micro-batch a bucket's reduction is launched asynchronously as soon
  as all its parameters have their gradient, in bucket order (every rank of a group launches the same
  collectives in the same order, even when an expert got no tokens and never fires its hook).
- Canonical element order: a parameter with shard dim d is stored in the buffers with dim d moved
  first, so its slice is a contiguous range of the *full* tensor's canonical order. An optimizer piece is
  then one range [offset, offset + n) of the flattened canonical full tensor, whatever the layout
  (see `DistributedAdamW.sharded_state_dict`).
- AdamW is written out elementwise, operation for operation as torch.optim.AdamW's single-tensor path
  (bit-identical on the same inputs), so sharding it is exact. No weight decay on 1-D parameters
  (norms, biases, the expert-bias buffer is not a parameter), as in Megatron.
- Gradient clipping by the true global norm: each element of each unique parameter counted once
  (`primary` pieces only: a replica over tp or the MTP embedding copy is not primary).
- Everything is allocated on the parameters' device, and a step never waits on the host: the norm and
  the clip factor stay 0-d device tensors (the caller reads them once, with the step's other metrics).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from megatron_r1.parallel.placement import GROUPS


def _gsize(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _grank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def canonical_view(flat: torch.Tensor, p: torch.Tensor, dim: int) -> torch.Tensor:
    """View of a flat [numel] tensor with p's shape, laid out with dim `dim` (the canonical dim) first."""
    if not p.dim():
        return flat.view(p.shape)
    shape = list(p.shape)
    shape.insert(0, shape.pop(dim))
    return flat.view(shape).movedim(0, dim)


def canonical_flat(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t flattened in canonical order (dim `dim` first)."""
    return t.reshape(-1) if not t.dim() else t.movedim(dim, 0).reshape(-1)


@dataclass
class Piece:
    """The part [lo, hi) of parameter `param`'s canonical local elements that this rank owns."""
    name: str
    param: nn.Parameter
    lo: int  # in the parameter's local canonical order
    hi: int
    shard_at: int  # where the piece starts in the bucket's owned shard
    global_offset: int  # where element `lo` sits in the full tensor's canonical order
    global_numel: int
    primary: bool  # counted in the grad norm and saved (False for replicas)
    dim: int  # the parameter's canonical dim


def _units(name: str, p: torch.Tensor, pl, mesh) -> list[tuple[str, int, int, int, int]]:
    """How a parameter's optimizer state is named and addressed: (name, start, numel in p's local canonical
    order, offset in the full tensor's canonical order, numel of the full tensor). A stack of experts is
    one unit per expert, named by its view (its canonical dim is the expert dim, so an expert is one
    contiguous range): the saved state stays per expert, like the weights."""
    if pl.views:
        n = p.numel() // len(pl.views)
        return [(v, e * n, n, 0, n) for e, v in enumerate(pl.views)]
    return [(name, 0, p.numel(), pl.flat_offset(p.shape, mesh), math.prod(pl.full_shape(p.shape, mesh)))]


class Bucket:
    def __init__(self, params: list[tuple[str, nn.Parameter, object]], group, zero1: bool, mesh, kind: str):
        """params: (name, parameter, Placement) in bucket order."""
        self.params = [(name, p) for name, p, _ in params]
        self.group, self.zero1, self.kind = group, zero1, kind
        self.place = {id(p): pl for _, p, pl in params}
        device = params[0][1].device
        self.size, self.rank = _gsize(group), _grank(group)
        self.offsets = {}
        n = 0
        for name, p in self.params:
            self.offsets[id(p)] = n
            n += p.numel()
        n = -(-n // self.size) * self.size  # pad so every rank owns an equal slice
        self.numel = n
        self.grad = torch.zeros(n, dtype=torch.float32, device=device)
        shard = n // self.size if zero1 else n
        self.lo = self.rank * shard if zero1 else 0
        self.hi = self.lo + shard
        self.grad_shard = (self.grad[self.lo:self.hi] if not zero1 or self.size == 1 else
                           torch.zeros(shard, dtype=torch.float32, device=device))
        self.pending: set[int] = set()
        self.handle = None
        self.launched = False
        self.pieces: list[Piece] = []
        for name, p, pl in params:
            tp_sharded = pl.tp_sharded(mesh)
            replica = (kind == "dp_cp" and mesh.tp > 1 and not tp_sharded and mesh.tp_rank != 0)
            primary = not replica and pl.primary and (zero1 or self.rank == 0)
            for unit, start, n, base, full in _units(name, p, pl, mesh):
                off = self.offsets[id(p)] + start
                lo, hi = max(off, self.lo), min(off + n, self.hi)
                if lo < hi:
                    self.pieces.append(Piece(unit, p, lo - off + start, hi - off + start, lo - self.lo,
                                             base + lo - off, full, primary, pl.canonical_dim))
        # each parameter's float32 gradient: a view of the flat buffer in the parameter's shape
        self.main_grad = {id(p): canonical_view(self.grad[self.offsets[id(p)]:self.offsets[id(p)] + p.numel()], p,
                                                 self.place[id(p)].canonical_dim) for _, p in self.params}

    def reset(self):
        self.grad.zero_()
        self.pending = {id(p) for _, p in self.params}
        self.launched, self.handle = False, None

    def launch(self):
        self.launched = True
        if self.size == 1:
            return
        if self.zero1:
            parts = list(self.grad.chunk(self.size))
            self.handle = dist.reduce_scatter(self.grad_shard, parts, group=self.group, async_op=True)
        else:
            self.handle = dist.all_reduce(self.grad, group=self.group, async_op=True)

    def wait(self):
        if self.handle is not None:
            self.handle.wait()
            self.handle = None


# the hook that feeds a parameter's gradient into its buffers, per parameter: a new GradBuffers over the
# same parameters removes the previous one's (weak keys: the registry never keeps a model alive)
_HOOKS: "weakref.WeakKeyDictionary[torch.Tensor, object]" = weakref.WeakKeyDictionary()


class GradBuffers:
    """fp32 gradient buffers for a rank's model chunks, with bucketed, hook-driven reduction."""

    def __init__(self, chunks: list[nn.Module], mesh, bucket_mb: float = 25.0, zero1: bool = True):
        self.mesh = mesh
        groups = {"edp": mesh.edp_group, "stage": mesh.stage_group, "dp_cp": mesh.dp_cp_group,
                  "embed": mesh.dp_cp_group}
        cap = max(1, int(bucket_mb * 2 ** 20 / 4))
        self.buckets: list[Bucket] = []
        self.chunk_of: dict[int, int] = {}
        # buckets never span chunks: with interleaved pipelining the chunks finish their backward at
        # different times. Later chunks first: their backward ends first.
        for c in reversed(range(len(chunks))):
            by_kind: dict[str, list] = {kind: [] for kind in GROUPS}
            # reverse order of definition ~ the order in which backward produces gradients
            for name, p in reversed(list(chunks[c].named_parameters())):
                if not p.requires_grad:
                    continue
                self.chunk_of[id(p)] = c
                place = chunks[c].placement[name]
                by_kind[place.group].append((name, p, place))
            for kind in ("dp_cp", "stage", "edp", "embed"):
                cur, size = [], 0
                for name, p, place in by_kind[kind]:
                    cur.append((name, p, place))
                    size += p.numel()
                    if size >= cap and kind != "embed":
                        self.buckets.append(Bucket(cur, groups[kind], zero1, mesh, kind))
                        cur, size = [], 0
                if cur:
                    self.buckets.append(Bucket(cur, groups[kind], zero1, mesh, kind))
        self.bucket_of = {id(p): b for b in self.buckets for _, p in b.params}
        self._main_grad = {k: v for b in self.buckets for k, v in b.main_grad.items()}
        self.ready_chunks: set[int] = set()  # chunks running the backward of their last micro-batch
        self._next = 0  # index of the next bucket to launch (launch order is bucket order on every rank)
        self.early_launches = 0  # buckets launched from a hook, during backward (overlap), in this step
        for b in self.buckets:
            for _, p in b.params:
                # a parameter feeds one set of buffers: a new optimizer over the same chunks replaces the old
                old = _HOOKS.pop(p, None)
                if old is not None:
                    old.remove()
                _HOOKS[p] = p.register_post_accumulate_grad_hook(self._hook)
        self.zero_grad()

    def zero_grad(self):
        for b in self.buckets:
            b.reset()
        self._next = 0
        self.early_launches = 0
        self.ready_chunks = set()

    def main_grad(self, p: torch.Tensor) -> torch.Tensor:
        """p's float32 gradient (shaped like p): accumulated over micro-batches, reduced after `finish`
        (under ZeRO-1 only the owned slice is, until `gather_reduced_grads`)."""
        return self._main_grad[id(p)]

    def _hook(self, p: torch.Tensor):
        self._main_grad[id(p)].add_(p.grad)
        p.grad = None
        if self.chunk_of[id(p)] not in self.ready_chunks:
            return
        b = self.bucket_of[id(p)]
        b.pending.discard(id(p))
        # launch every leading bucket that is complete; the embed bucket waits for the end (see finish)
        while self._next < len(self.buckets):
            nb = self.buckets[self._next]
            if nb.pending or nb.kind == "embed":
                break
            nb.launch()
            self._next += 1
            self.early_launches += 1

    def finish(self):
        """After the last backward: launch what is left (in order), sum the embedding copies, wait."""
        for b in self.buckets[self._next:]:
            if b.kind == "embed" and self.mesh.embed_group is not None:
                dist.all_reduce(b.grad, group=self.mesh.embed_group)
            b.launch()
        self._next = len(self.buckets)
        for b in self.buckets:
            b.wait()

    def gather_reduced_grads(self):
        """Make every `main_grad(p)` the full reduced gradient (ZeRO-1 only reduces the owned slice).

        For checks and debugging: it costs an all-gather of all gradients."""
        for b in self.buckets:
            if b.zero1 and b.size > 1:
                parts = list(b.grad.chunk(b.size))
                dist.all_gather(parts, b.grad_shard.clone(), group=b.group)


# -------------------------------------------------------------------------------------------- AdamW
def adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
           lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place, operation for operation torch.optim.AdamW (single-tensor, no amsgrad)."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class DistributedAdamW:
    """AdamW on fp32 master weights; state sharded over each bucket's group when `zero1`.

    Sharded state contract (for torch.distributed.checkpoint on top):
      `sharded_state_dict()` -> {key: 1-D float32 tensor}, keys
          f"optim.{state}.{param_name}"  state in (master, exp_avg, exp_avg_sq)
          "optim.step"                   (0-d tensor)
      `piece_meta()` -> {key: (global_offset, global_numel)}: the tensor is elements
          [global_offset, global_offset + numel) of the FULL parameter flattened in canonical order
          (the full tensor with its shard dim (placement) moved first, then row-major; no moving for tensors
          without a shard dim). This order does not depend on tp/ep/pp/dp/cp, so a piece saved under one
          layout can be assembled into pieces of another. A rank holds at most one piece per key.
          Only primary pieces are returned (each element saved by exactly one rank).
      `load_sharded_state_dict(sd)`: sd[key] is either this rank's piece (same offsets, as returned by
          `sharded_state_dict()` and filled in place by a DCP load) or the full 1-D canonical tensor;
          non-primary replicas are filled from the same keys. Missing master keys fall back to the
          current parameter values. `sharded_state_dict(include_replicas=True)` / `piece_meta(...)` also
          list the replicas' pieces (same keys and offsets as their primary), as destinations for a load.
    """

    STATES = ("master", "exp_avg", "exp_avg_sq")

    def __init__(self, grads: GradBuffers, mesh, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, clip_grad: float = 0.0):
        self.grads, self.mesh = grads, mesh
        self.lr, self.betas, self.eps, self.weight_decay, self.clip_grad = lr, betas, eps, weight_decay, clip_grad
        self.step_count = 0
        self.state = []  # per bucket: dict(master, exp_avg, exp_avg_sq) over the owned shard
        for b in grads.buckets:
            master = torch.zeros(b.hi - b.lo, dtype=torch.float32, device=b.grad.device)
            for pc in b.pieces:
                master[pc.shard_at:pc.shard_at + pc.hi - pc.lo] = canonical_flat(pc.param.detach(), pc.dim)[pc.lo:pc.hi].float()
            self.state.append({"master": master, "exp_avg": torch.zeros_like(master),
                               "exp_avg_sq": torch.zeros_like(master)})

    def zero_grad(self):
        self.grads.zero_grad()

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm, a 0-d float64 tensor on the device."""
        sq = torch.zeros((), dtype=torch.float64, device=self.mesh.device)
        for b in self.grads.buckets:
            for pc in b.pieces:
                if pc.primary:
                    g = b.grad_shard[pc.shard_at:pc.shard_at + pc.hi - pc.lo]
                    sq += g.double().pow(2).sum()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sq)
        return sq.sqrt()

    @torch.no_grad()
    def step(self, skip_nonfinite: bool = False) -> dict:
        """Clip by the global norm, AdamW on owned slices, all-gather the updated parameters.

        Returns {"grad_norm", "clip_coef", "skipped"} as 0-d device tensors (no host sync), except with
        `skip_nonfinite`: then the global norm is read on the host once, and a NaN/inf norm (a NaN or inf
        anywhere in any rank's gradients or loss) leaves parameters, moments and the step count untouched.
        The norm is all-reduced over every rank first, so every rank takes the same decision."""
        norm = self.grad_norm()
        if skip_nonfinite and norm.device.type != "meta" and not bool(torch.isfinite(norm)):
            zero = torch.zeros((), dtype=torch.float32, device=norm.device)
            return {"grad_norm": norm, "clip_coef": zero, "skipped": zero + 1}
        coef = torch.ones((), dtype=torch.float32, device=norm.device)
        if self.clip_grad > 0:
            # as torch.nn.utils.clip_grad_norm_: coef = max / (norm + 1e-6), clamped at 1; a factor of
            # exactly 1 multiplies exactly, so no branch on the host is needed
            coef = (self.clip_grad / (norm + 1e-6)).float().clamp(max=1.0)
        self.step_count += 1
        beta1, beta2 = self.betas
        from megatron_r1.kernels import get_kernel
        adamw = get_kernel("adamw")  # adamw_ below, or apex's fused kernel where it imports
        for b, st in zip(self.grads.buckets, self.state):
            g_all = b.grad_shard * coef
            for pc in b.pieces:
                s = slice(pc.shard_at, pc.shard_at + pc.hi - pc.lo)
                wd = self.weight_decay if pc.param.dim() >= 2 else 0.0
                adamw(st["master"][s], g_all[s], st["exp_avg"][s], st["exp_avg_sq"][s], self.step_count,
                      self.lr, beta1, beta2, self.eps, wd)
            self._publish(b, st["master"])
        return {"grad_norm": norm, "clip_coef": coef, "skipped": torch.zeros((), dtype=torch.float32, device=norm.device)}

    def _publish(self, b: Bucket, master: torch.Tensor):
        """Owned master slices -> every replica's parameters."""
        dtype = b.params[0][1].dtype
        if b.zero1 and b.size > 1:
            full = torch.empty(b.numel, dtype=dtype, device=master.device)
            dist.all_gather(list(full.chunk(b.size)), master.to(dtype), group=b.group)
            for _, p in b.params:
                off = b.offsets[id(p)]
                p.data.copy_(canonical_view(full[off:off + p.numel()], p, b.place[id(p)].canonical_dim))
        else:  # unsharded: the owned shard is the whole bucket
            for _, p in b.params:
                off = b.offsets[id(p)]
                p.data.copy_(canonical_view(master[off:off + p.numel()], p, b.place[id(p)].canonical_dim))

    # ------------------------------------------------------------------------------ checkpointing
    def _pieces(self, primary_only: bool):
        for b, st in zip(self.grads.buckets, self.state):
            for pc in b.pieces:
                if pc.primary or not primary_only:
                    yield pc, st

    def sharded_state_dict(self, include_replicas: bool = False) -> dict[str, torch.Tensor]:
        """Views of the live state (a DCP load can fill them in place). Replicas hold the same offsets."""
        out = {"optim.step": torch.tensor(self.step_count)}
        for pc, st in self._pieces(primary_only=not include_replicas):
            for k in self.STATES:
                out[f"optim.{k}.{pc.name}"] = st[k][pc.shard_at:pc.shard_at + pc.hi - pc.lo]
        return out

    def piece_meta(self, include_replicas: bool = False) -> dict[str, tuple[int, int]]:
        return {f"optim.{k}.{pc.name}": (pc.global_offset, pc.global_numel)
                for pc, _ in self._pieces(primary_only=not include_replicas) for k in self.STATES}

    @torch.no_grad()
    def load_sharded_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if "optim.step" in sd:
            self.step_count = int(sd["optim.step"])
        for pc, st in self._pieces(primary_only=False):
            n = pc.hi - pc.lo
            for k in self.STATES:
                t = sd.get(f"optim.{k}.{pc.name}")
                if t is None:
                    if k == "master":
                        t = canonical_flat(pc.param.detach(), pc.dim)[pc.lo:pc.hi]
                    else:
                        raise KeyError(f"optimizer state 'optim.{k}.{pc.name}' missing from the checkpoint")
                elif t.numel() == pc.global_numel and t.numel() != n:
                    t = t.reshape(-1)[pc.global_offset:pc.global_offset + n]
                elif t.numel() != n:
                    raise ValueError(f"optim.{k}.{pc.name}: got {t.numel()} elements, expected this rank's piece "
                                     f"({n}) or the full tensor ({pc.global_numel})")
                st[k][pc.shard_at:pc.shard_at + n] = t.reshape(-1).float()
        for b, st in zip(self.grads.buckets, self.state):
            self._publish(b, st["master"])
