"""The 5D-parallel training runtime: model chunks, the train step, forward-only passes, full-state helpers.

    mesh = ParallelMesh.build(cfg.parallel, cfg.model)
    chunks = build_parallel_model(cfg, mesh)               # this rank's pipeline chunks (CausalLM each)
    opt = build_optimizer(chunks, cfg, mesh)                # ZeRO-1 AdamW + gradient buffers
    metrics = train_step(chunks, opt, micro_batches, loss_fn, mesh)
    outs = forward_only(chunks, micro_batches, fn, mesh)     # e.g. per-token logprobs for GRPO

Notable choices
- Every rank is given the same micro-batches of *its dp rank* (whole sequences; cp, sp and the MoE
  token split happen inside the model). All pipeline stages get the input ids (positions, MTP targets).
- Chunks are built on `meta` and materialised on `mesh.device` (parallel/placement.py `materialize`):
  only this rank's shards are ever allocated, on the device, in the parameters' dtype.
- Initialisation is layout-independent: every parameter is drawn from a generator seeded by
  (seed, parameter name) at its FULL shape, on the device, then sliced (`chunk.placement[name]`), so any
  layout starts from the same weights as one rank (on the same kind of device: CUDA draws differ from
  CPU draws). One full tensor at a time lives on the device (≤ 3.7 GB fp32, the 671B embedding; real
  runs load a checkpoint instead).
- Pipeline chunks: global chunk j = v·pp + p holds layers [j·L/(pp·vpp), (j+1)·L/(pp·vpp)); chunk 0 has
  the embedding, the last chunk the final norm, head and MTP. With MTP and pp > 1 the last chunk keeps a
  copy of the embedding (not primary in its placement), initialised identically and with its gradient
  summed with stage 0's over the "embed" group.
- A step runs on the device: micro-batches are moved there once, and metrics stay device tensors until
  the end of `train_step`, which reads them to the host in one transfer.
- `loss_fn(stage_output, micro_batch) -> (loss, metrics)` on the last stage: the loss must already be
  divided by the global normaliser (e.g. the global target-token count), because all gradient
  reductions are sums. Scalar metrics are summed over micro-batches and dp×cp ranks and returned on
  every rank (broadcast from the last stage).
- `forward_only` returns fn's per-micro-batch results on the ranks of the LAST pipeline stage and [] on
  the others (pass `broadcast=True` to send them to every stage, pickled). Each cp rank sees only its
  positions (`stage_output.positions`, 2 chunks of S/(2·cp)) and each tp rank its vocab slice of the
  logits: use `vocab_parallel_logprobs` (identical on tp ranks) and gather over cp if whole rows are needed.
- The optimizer (`build_optimizer`, parallel/data.py) owns the fp32 gradient buffers; set `optimizer.lr`
  before `train_step` for a schedule. Its sharded state contract is in `DistributedAdamW`'s docstring.
- `gather_full_state` returns every tensor on EVERY rank (collective; meant for tests, layout checks,
  export of small models); `iter_full_state` streams the same tensors one at a time.
"""
from __future__ import annotations

import zlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from megatron_r1.ckpt.hf import model_state, per_expert
from megatron_r1.config import Config, ConfigError
from megatron_r1.kernels.fp8 import FP8Use
from megatron_r1.model.deepseek_v3 import MoE, update_expert_bias
from megatron_r1.model.gpt import CausalLM
from megatron_r1.parallel.data import DistributedAdamW, GradBuffers
from megatron_r1.parallel.mesh import stage_layer_counts
from megatron_r1.parallel.pipeline import run_pipeline
from megatron_r1.parallel.placement import BUFFER, materialize
from megatron_r1.parallel.recompute import Recompute

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------- building
def chunk_layers(num_layers: int, pp: int, vpp: int, pp_rank: int, first: int | None = None,
                 last: int | None = None) -> list[list[int]]:
    """Global layer ids of each chunk this pipeline rank holds (Megatron's interleaved assignment;
    uneven first/last stages with vpp = 1)."""
    counts = stage_layer_counts(num_layers, pp, vpp, first, last)
    if vpp == 1:
        start = sum(counts[:pp_rank])
        return [list(range(start, start + counts[pp_rank]))]
    per = num_layers // (pp * vpp)
    return [list(range((v * pp + pp_rank) * per, (v * pp + pp_rank + 1) * per)) for v in range(vpp)]


def build_parallel_model(cfg: Config, mesh, seed: int | None = None, init: bool = True) -> list[CausalLM]:
    """This rank's model chunks on `mesh.device`, initialised layout-independently from `seed` (default
    cfg.train.seed). `init=False` leaves the values undefined (a checkpoint or HF weights fill them)."""
    m, pp, vpp = cfg.model, mesh.pp, mesh.vpp
    par = cfg.parallel
    dtype = DTYPES[cfg.train.params_dtype]
    chunks = []
    for v, layers in enumerate(chunk_layers(m.num_hidden_layers, pp, vpp, mesh.pp_rank, par.first_stage_layers,
                                            par.last_stage_layers)):
        j = v * pp + mesh.pp_rank
        with torch.device("meta"):
            chunk = CausalLM(m, mesh, layers=layers, pre_process=j == 0, post_process=j == pp * vpp - 1,
                             recompute=Recompute.from_train(cfg.train), fp8=FP8Use.from_config(cfg))
        for p in chunk.parameters():  # parameters only: rope frequencies and the expert bias stay float32
            p.data = p.data.to(dtype)
        chunks.append(materialize(chunk, mesh.device))
    if init:
        init_parameters(chunks, mesh, cfg.train.seed if seed is None else seed)
    return chunks


@torch.no_grad()
def init_parameters(chunks: list[nn.Module], mesh, seed: int) -> None:
    """Each parameter as its placement says: N(0, std) drawn at full shape from a (seed, name) generator
    on the parameter's device, then this rank's shard; or ones / zeros."""
    for chunk in chunks:
        # model_state: the parameters, with expert stacks as one view per expert (HF names), so an expert's
        # draw depends neither on how experts are stacked nor on how they are split over ep
        for name, p in model_state(chunk).items():
            place = chunk.placement[name]
            if p.device.type == "meta" or place is BUFFER:  # nothing to fill (a model to inspect or plan)
                continue
            if isinstance(place.init, str):
                p.fill_({"ones": 1.0, "zeros": 0.0}[place.init])
                continue
            g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.randn(place.full_shape(p.shape, mesh), generator=g, dtype=torch.float32, device=p.device)
            p.copy_(place.shard(full * place.init, mesh))


def build_optimizer(chunks: list[nn.Module], cfg: Config, mesh) -> DistributedAdamW:
    t = cfg.train
    grads = GradBuffers(chunks, mesh, cfg.parallel.grad_bucket_mb, cfg.parallel.zero1)
    return DistributedAdamW(grads, mesh, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                            weight_decay=t.weight_decay, clip_grad=t.clip_grad)


# ----------------------------------------------------------------------------------- full states
def _local_state(chunks) -> dict[str, tuple[torch.Tensor, object]]:
    """{name: (tensor, placement)} of this rank's chunks; the MTP's embedding copy is left out."""
    out = {}
    for c in chunks:
        for k, t in model_state(c).items():
            if c.placement[k].primary:
                out[k] = (t, c.placement[k])
    return out


@torch.no_grad()
def shard_from_full(chunks: list[nn.Module], full_state: dict[str, torch.Tensor], mesh) -> None:
    """Fill every parameter and persistent buffer of this rank's chunks from full tensors (by our name)."""
    for c in chunks:
        for k, t in model_state(c).items():
            if k not in full_state:
                raise KeyError(f"shard_from_full: '{k}' missing from the full state")
            t.copy_(c.placement[k].shard(full_state[k], mesh).to(t.device, t.dtype))


def _tp_full(t: torch.Tensor, place, mesh) -> torch.Tensor:
    if not place.tp_sharded(mesh):
        return t.detach().clone(memory_format=torch.contiguous_format)
    parts = [torch.empty_like(t) for _ in range(mesh.tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=mesh.tp_group)
    return torch.cat(parts, dim=place.shard_dim)


@torch.no_grad()
def iter_full_state(chunks: list[nn.Module], mesh, grads: GradBuffers | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter and persistent buffer of the model, on every rank.

    Collective over the world: all ranks must iterate to the end. With `grads` (the optimizer's
    GradBuffers) it yields the parameters' reduced float32 gradients instead (call
    `grads.gather_reduced_grads()` first under ZeRO-1)."""
    local = _local_state(chunks)
    if grads is not None:  # the parameters' (and expert views') reduced gradients, by the same names
        local = {k: (g, c.placement[k]) for c in chunks
                 for k, g in per_expert(c, {n: grads.main_grad(p) for n, p in c.named_parameters()}).items()
                 if k in local}
    meta = [(k, pl.full_shape(t.shape, mesh), t.dtype) for k, (t, pl) in local.items()]
    world = dist.get_world_size() if dist.is_initialized() else 1
    tables = [meta]
    if world > 1:
        tables = [None] * world
        dist.all_gather_object(tables, meta)
    owner: dict[str, tuple] = {}
    for r, tab in enumerate(tables):
        for k, shape, dtype in tab:
            owner.setdefault(k, (r, shape, dtype))
    rank = dist.get_rank() if world > 1 else 0
    for k in sorted(owner):
        src_rank, shape, dtype = owner[k]
        full = None
        if k in local:
            t, pl = local[k]
            full = _tp_full(t, pl, mesh)
        if world > 1:
            if rank != src_rank:  # receive buffers live where the model does (NCCL broadcasts need device tensors)
                full = torch.empty(shape, dtype=dtype, device=mesh.device)
            dist.broadcast(full, src=src_rank)
        yield k, full


def gather_full_state(chunks: list[nn.Module], mesh, grads: GradBuffers | None = None) -> dict[str, torch.Tensor]:
    """Every full tensor of the model (tp shards, experts of every ep rank, every stage) on every rank."""
    return dict(iter_full_state(chunks, mesh, grads))


# ------------------------------------------------------------------------------------------ steps
def to_device(micro_batches: list[dict], device) -> list[dict]:
    """The micro-batches' tensors on `device` (the host-to-device copy of the step's inputs)."""
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
            for mb in micro_batches]


def _set_aux_normalizer(chunks, micro_batches, mesh) -> None:
    """MoE's sequence-balance loss is normalised by the global number of sequences in the step."""
    n = torch.tensor(float(sum(mb["input_ids"].shape[0] for mb in micro_batches)), device=mesh.device)
    if mesh.dp_group is not None:
        dist.all_reduce(n, group=mesh.dp_group)
    for c in chunks:
        for mod in c.modules():
            if isinstance(mod, MoE):
                mod.aux_normalizer = n  # a device tensor: the loss divides by it without a host sync


def _reduce_metrics(results: list, mesh) -> tuple[list[str], torch.Tensor]:
    """Sum loss and scalar metrics over micro-batches and dp×cp; broadcast from the last stage.
    Returns the names and a float64 device tensor of the values (no host sync of the values)."""
    keys: list[str] = []
    agg: dict[str, torch.Tensor] = {}
    for loss, metrics in results:
        for k, v in [("loss", loss)] + list(metrics.items()):
            if torch.is_tensor(v) and v.numel() == 1 or isinstance(v, (int, float)):
                v = v.detach().reshape(()).to(mesh.device, torch.float64) if torch.is_tensor(v) else float(v)
                agg[k] = agg.get(k, torch.zeros((), dtype=torch.float64, device=mesh.device)) + v
    keys = sorted(agg)
    if mesh.pp > 1:  # metric names exist on the last stage only: a pickled list, once per step
        box = [keys]
        dist.broadcast_object_list(box, src=mesh.pp_rank_of(mesh.pp - 1), group=mesh.pp_group)
        keys = box[0]
    t = (torch.stack([agg[k] for k in keys]) if results and keys else
         torch.zeros(len(keys), dtype=torch.float64, device=mesh.device))
    if mesh.dp_cp_group is not None:
        dist.all_reduce(t, group=mesh.dp_cp_group)
    if mesh.pp > 1:
        dist.broadcast(t, src=mesh.pp_rank_of(mesh.pp - 1), group=mesh.pp_group)
    return keys, t


def _to_host(keys: list[str], values: torch.Tensor) -> dict:
    # the step's one device-to-host transfer: its scalar metrics, after everything else was queued
    return dict(zip(keys, values.tolist()))


def check_micro_batches(chunks: list[nn.Module], micro_batches: list[dict], mesh) -> None:
    """Sequence lengths the layout can split: 2·cp chunks, each split over tp (under SP, or by the MoE)."""
    if not micro_batches:
        raise ValueError("no micro-batches")
    split_tp = mesh.tp > 1 and (mesh.sp or chunks[0].cfg.is_moe)
    need = (2 * mesh.cp if mesh.cp > 1 else 1) * (mesh.tp if split_tp else 1)
    for i, mb in enumerate(micro_batches):
        s = mb["input_ids"].shape[1]
        if s % need:
            raise ConfigError(f"micro-batch {i}: sequence length {s} is not divisible by "
                              f"{'2·cp' if mesh.cp > 1 else ''}{'·' if mesh.cp > 1 and split_tp else ''}"
                              f"{'tp' if split_tp else ''} = {need}; pad sequences to a multiple of {need}")


def _forward_backward(chunks, optimizer, micro_batches, loss_fn, mesh) -> tuple[list[str], torch.Tensor]:
    check_micro_batches(chunks, micro_batches, mesh)
    micro_batches = to_device(micro_batches, mesh.device)
    optimizer.zero_grad()
    for c in chunks:
        c.train()
    _set_aux_normalizer(chunks, micro_batches, mesh)
    results = run_pipeline(chunks, micro_batches, mesh, loss_fn, grads=optimizer.grads)
    optimizer.grads.finish()
    return _reduce_metrics(results, mesh)


def forward_backward(chunks: list[nn.Module], optimizer: DistributedAdamW, micro_batches: list[dict],
                     loss_fn: Callable, mesh) -> dict:
    """Zero grads, run the schedule, reduce gradients (left in the buffers). Returns summed metrics."""
    return _to_host(*_forward_backward(chunks, optimizer, micro_batches, loss_fn, mesh))


def train_step(chunks: list[nn.Module], optimizer: DistributedAdamW, micro_batches: list[dict],
               loss_fn: Callable, mesh, skip_nonfinite: bool = False) -> dict:
    """One optimizer step on `micro_batches` (this dp rank's share of the global batch; moved to
    `mesh.device` here, and loss_fn sees them there).

    Returns metrics on every rank: summed `loss` and loss_fn's scalar metrics, `grad_norm`, `clip_coef`,
    `moe_max_violation`, `skipped` (1.0 when `skip_nonfinite` found a NaN/inf global gradient norm and
    the optimizer left everything as it was; the trainers count it, training.TrainSession.check_step).
    The gradient buffers keep this step's reduced gradients until the next step."""
    keys, values = _forward_backward(chunks, optimizer, micro_batches, loss_fn, mesh)
    stats = optimizer.step(skip_nonfinite=skip_nonfinite)
    viol = torch.zeros((), dtype=torch.float64, device=mesh.device)
    for c in chunks:
        v = update_expert_bias(c, mesh, c.cfg.bias_update_speed)["moe_max_violation"]
        viol = torch.maximum(viol, torch.as_tensor(v, dtype=torch.float64, device=mesh.device))
    extra = [stats["grad_norm"], stats["clip_coef"], viol, stats["skipped"]]
    values = torch.cat([values, torch.stack([x.to(torch.float64) for x in extra])])
    return _to_host(keys + ["grad_norm", "clip_coef", "moe_max_violation", "skipped"], values)


@torch.no_grad()
def forward_only(chunks: list[nn.Module], micro_batches: list[dict], fn: Callable, mesh,
                 broadcast: bool = False) -> list:
    """fn(stage_output, micro_batch) per micro-batch, no grad. Results on the last stage (see module doc)."""
    check_micro_batches(chunks, micro_batches, mesh)
    micro_batches = to_device(micro_batches, mesh.device)
    was = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        results = run_pipeline(chunks, micro_batches, mesh, fn, forward_only=True)
    finally:
        for c, w in zip(chunks, was):
            c.train(w)
    if broadcast and mesh.pp > 1:
        box = [results]
        dist.broadcast_object_list(box, src=mesh.pp_rank_of(mesh.pp - 1), group=mesh.pp_group)
        results = box[0]
    return results
