"""Weight sync, trainer -> co-located vLLM: each rollout rank receives exactly the slices it serves.

    plan = build_plan(engine, chunks, mesh, cfg.model)     # once per run: collective, plain data, cached
    print(plan.describe())
    stats = push(plan, engine, chunks, mesh, bucket_bytes)  # after every optimizer step: collective

Notable choices
- **The engine says what it holds.** `probe_engine_slices` runs vLLM's own `model.load_weights` on
  its checkpoint-layout parameters restored on the `meta` device (the ones vLLM's in-place reload
  restores), fed meta tensors of the full HF shapes, under a dispatch mode that records every
  `copy_` instead of doing it. A `copy_` from a view of HF tensor X into a view of parameter P says
  exactly which box of X this rank holds and where it lands in P: vLLM's TP narrowing, its fusions
  (`fused_qkv_a_proj` = q_a ‖ kv_a, `gate_up_proj`, the experts' `w13` = gate ‖ up and `w2`, only the
  local experts under EP) and the `kv_b_proj` column split all come out of vLLM's code, not ours.
  Costs no memory (meta) and no communication.
- **Owners from the placement table.** Every training rank lists the box of each HF tensor it holds
  (`training_boxes`: placement full shape and tp offsets, via ckpt/hf.py names) and one
  all_gather_object per run shares the lists. A slice is cut into pieces by the training shards it
  overlaps; each piece goes to one holder: the receiving rank itself when it holds it (a local copy,
  no message), else a rank on the same node, else the least-loaded holder, so the dp replicas of the
  training layout share the sends that identical rollout replicas need.
- **Plain data.** `SyncPlan` is tuples of ints and strings: printable (`describe`), comparable in
  tests, cached (built once, reused for every step; the layouts do not change during a run). Every
  rank computes the whole plan from everyone's lists: fine to hundreds of ranks; at thousands each
  rank should keep only its own pieces (not done).
- **The push.** For each (owner, receiver) pair the pieces, in the receiver's layer order, are cut
  into flat byte buckets of at most `bucket_bytes` (a piece larger than a bucket is cut along its
  first dim). Round k exchanges every pair's k-th bucket with ONE `batch_isend_irecv` per rank on a
  process group made for the sync, the ops of a pair issued in the same order on both peers (no
  tags: NCCL semantics). The next round is packed while the current one is in flight.
- **Receivers write into vLLM's parameter views.** vLLM's layerwise reload machinery restores
  checkpoint layout; a layer is materialised at its first piece, each piece is copied into its box
  of the parameter, and when the layer's last piece is in, only vLLM's per-layer
  `process_weights_after_loading` runs (CPU repacking, MoE prepacking) and the result is copied into
  the original kernel storage. Attention layers (MLA's W_UK/W_UV absorption) finish at the end, as
  in vLLM's reload. No rank ever builds a full tensor it does not serve.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

Box = tuple[tuple[int, int], ...]  # (start, length) per dim of a full HF tensor


# ----------------------------------------------------------------------------- plan data
@dataclass(frozen=True)
class EngineSlice:
    """One box of a full HF tensor and where vLLM keeps it on one rollout rank."""
    hf: str  # Hugging Face tensor name
    box: Box  # the box of the full HF tensor
    module: str  # vLLM module path
    param: str  # parameter (checkpoint layout, as vLLM's reload restores it) of that module
    offset: int  # storage offset of the box's view in the parameter
    strides: tuple[int, ...]  # the view's stride per HF dim (a permutation, e.g. a transposed load, is fine)

    @property
    def numel(self) -> int:
        return _numel(self.box)


@dataclass(frozen=True)
class Piece:
    """Part of one EngineSlice sent by one training rank to one rollout rank."""
    src: int  # training rank (global)
    dst: int  # rollout rank (global)
    slice: int  # index into the receiver's slices
    box: Box  # sub-box of the full HF tensor (inside the slice's box and the owner's shard)
    nbytes: int


@dataclass
class SyncPlan:
    slices: dict[int, list[EngineSlice]]  # rollout rank -> what it holds
    pieces: list[Piece]  # every transfer, in receiver layer order
    dtypes: dict[str, str]  # hf name -> training dtype (the wire dtype)
    layer_numel: dict[int, dict[str, int]] = field(default_factory=dict)  # rank -> module -> elements to expect

    def received_bytes(self, rank: int, remote_only: bool = True) -> int:
        return sum(p.nbytes for p in self.pieces if p.dst == rank and (p.src != rank or not remote_only))

    def sent_bytes(self, rank: int, remote_only: bool = True) -> int:
        return sum(p.nbytes for p in self.pieces if p.src == rank and (p.dst != rank or not remote_only))

    def describe(self, rank: int | None = None) -> str:
        ranks = sorted(self.slices) if rank is None else [rank]
        lines = []
        for r in ranks:
            sl = self.slices[r]
            local = sum(p.nbytes for p in self.pieces if p.dst == r and p.src == r)
            lines.append(f"rollout rank {r}: {len(sl)} slices, {self.received_bytes(r, False) / 2**20:.2f} MiB "
                         f"({local / 2**20:.2f} MiB local copies), sends {self.sent_bytes(r) / 2**20:.2f} MiB")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- engine probe
def _box_of_view(view: torch.Tensor, full_shape: tuple[int, ...]) -> tuple[Box, list[int]] | None:
    """The box of a contiguous tensor of `full_shape` that `view` (a strided view of it) covers, and for
    each HF dim the view dim it maps to (-1: a dim of length 1). None when the view is not a box."""
    rstride = [1] * len(full_shape)
    for d in range(len(full_shape) - 2, -1, -1):
        rstride[d] = rstride[d + 1] * full_shape[d + 1]
    dim_of = [-1] * len(full_shape)
    for i, (n, s) in enumerate(zip(view.shape, view.stride())):
        if n == 1:
            continue
        js = [j for j in range(len(full_shape)) if rstride[j] == s and full_shape[j] > 1 and dim_of[j] < 0]
        if not js:
            return None
        dim_of[js[0]] = i
    off = view.storage_offset()
    starts = []
    for j in range(len(full_shape)):
        starts.append(off // rstride[j])
        off %= rstride[j]
    lengths = [view.shape[dim_of[j]] if dim_of[j] >= 0 else 1 for j in range(len(full_shape))]
    if any(s + n > f for s, n, f in zip(starts, lengths, full_shape)):
        return None
    return tuple(zip(starts, lengths)), dim_of


class _CopyRecorder(TorchDispatchMode):
    """Records `copy_(param view, HF view)` calls of vLLM's weight loaders and skips them."""

    def __init__(self, current: dict):
        super().__init__()
        self.current = current
        self.records: list[EngineSlice] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.aten.copy_.default:
            return func(*args, **(kwargs or {}))
        dst, src = args[0], args[1]
        cur = self.current
        root, param = cur.get("root"), cur.get("param")
        if root is None or src.untyped_storage()._cdata != root.untyped_storage()._cdata:
            return dst  # not a copy of the HF tensor being loaded (a fill, a scale): nothing to record
        if param is None or dst.untyped_storage()._cdata != param[2].untyped_storage()._cdata:
            raise RuntimeError(f"sync plan: vLLM copied '{cur['hf']}' into a tensor that is not the parameter "
                               f"its loader was called with; cannot place it")
        found = _box_of_view(src, tuple(root.shape))
        if found is None or tuple(dst.shape) != tuple(src.shape):
            raise RuntimeError(f"sync plan: vLLM loads '{cur['hf']}' through a view that is not a box "
                               f"(shape {tuple(src.shape)}, stride {src.stride()}); cannot plan it")
        box, dim_of = found
        strides = tuple(dst.stride()[i] if i >= 0 else 0 for i in dim_of)
        self.records.append(EngineSlice(cur["hf"], box, param[0], param[1], dst.storage_offset(), strides))
        return dst


def probe_on_worker(worker, hf_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> list[EngineSlice]:
    """Inside vLLM's worker: which box of each HF tensor this rank's engine holds, and where (module doc)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import _get_original_loader, get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import restore_layer_on_meta
    from vllm.model_executor.model_loader.reload.utils import get_layer_params_buffers, get_layer_tensors
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    model = worker.model_runner.model
    current: dict = {}
    kernel, loaders = {}, []
    try:
        for path, layer in model.named_modules():
            kernel[layer] = (get_layer_params_buffers(layer), set(layer._non_persistent_buffers_set))
            restore_layer_on_meta(layer, get_layerwise_info(layer))
            for name, t in get_layer_tensors(layer).items():
                original = getattr(t, "weight_loader", None)
                loaders.append((t, original))
                # a previous reload leaves vLLM's deferring wrapper on the restored tensors: call beneath it
                inner = _get_original_loader(t) if original is not None else default_weight_loader

                def loader(param, *a, _orig=inner, _where=(path, name), **k):
                    current["param"] = (*_where, param)
                    try:
                        return _orig(param, *a, **k)
                    finally:
                        current["param"] = None
                t.weight_loader = loader

        def weights():
            for name, (shape, dtype) in hf_shapes.items():
                t = torch.empty(shape, dtype=dtype, device="meta")
                current.update(hf=name, root=t)
                yield name, t

        recorder = _CopyRecorder(current)
        with set_current_vllm_config(worker.vllm_config), torch.no_grad(), recorder:
            model.load_weights(weights())
    finally:
        for t, original in loaders:
            if original is None:
                del t.weight_loader
            else:
                t.weight_loader = original
        for layer, ((params, buffers), non_persistent) in kernel.items():
            for name in get_layer_tensors(layer):
                delattr(layer, name)
            for name, p in params.items():
                layer.register_parameter(name, p)
            for name, b in buffers.items():
                layer.register_buffer(name, b, persistent=name not in non_persistent)
    return recorder.records


# ----------------------------------------------------------------------------- receiving (worker side)
def apply_on_worker(worker, pieces, expected: dict[str, int], stats: dict) -> None:
    """Inside vLLM's worker: copy each received piece into its box of the parameter vLLM's reload
    restored, and post-process a layer as soon as its last element (`expected[module]`) is in.

    `pieces` yields (EngineSlice, piece box, tensor of the box's shape in HF dim order)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
    from vllm.model_executor.model_loader.reload import layerwise as lw
    from vllm.model_executor.model_loader.reload.meta import materialize_layer
    from vllm.model_executor.model_loader.reload.utils import get_layer_tensors

    from megatron_r1.rollout.engine import _moe_kernels_needing_prepack

    model = worker.model_runner.model
    remaining = dict(expected)
    started: set[str] = set()
    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        stashed = _moe_kernels_needing_prepack(model)
        for qm in stashed:  # the CPU MoE prepack fix (engine.py): first-load path on reload
            qm.moe_kernel = None
        try:
            lw.initialize_layerwise_reload(model)
            for s, box, data in pieces:
                t0 = time.perf_counter()
                layer = model.get_submodule(s.module)
                info = lw.get_layerwise_info(layer)
                if s.module not in started:
                    started.add(s.module)
                    materialize_layer(layer, info)
                    for t in get_layer_tensors(layer).values():
                        t.weight_loader = lw._get_original_loader(t)
                param = getattr(layer, s.param)
                offset = s.offset + sum((b[0] - a[0]) * st for b, a, st in zip(box, s.box, s.strides))
                param.data.as_strided([n for _, n in box], s.strides, offset).copy_(data)
                remaining[s.module] -= data.numel()
                t1 = time.perf_counter()
                stats["copy"] += t1 - t0
                if remaining[s.module] == 0:  # the layer is complete: vLLM's own post-processing only
                    qm = getattr(layer, "quant_method", None)
                    if isinstance(qm, QuantizeMethodBase):
                        qm.process_weights_after_loading(layer)
                        if hasattr(layer, "update_param_tp_status"):
                            layer.update_param_tp_status()
                    lw._copy_and_restore_kernel_tensors(layer, info)
                    info.reset()
                    stats["post"] += time.perf_counter() - t1
            missing = sorted(m for m, n in remaining.items() if n)
            if missing:
                raise RuntimeError(f"weight sync: {len(missing)} layers incomplete, first {missing[0]}")
            t1 = time.perf_counter()
            lw.finalize_layerwise_reload(model, worker.vllm_config.model_config)  # attention (MLA absorption)
            stats["post"] += time.perf_counter() - t1
        finally:
            for qm, kernel in stashed.items():
                if qm.moe_kernel is None:
                    qm.moe_kernel = kernel


# ----------------------------------------------------------------------------- training side
def training_boxes(chunks, mesh, model_cfg) -> dict[str, tuple[torch.Tensor, Box]]:
    """{hf name: (this rank's tensor, its box in the full HF tensor)} from the placement table.

    Only primary copies (the MTP's copy of the embedding is a replica of stage 0's)."""
    from megatron_r1.ckpt.hf import hf_names, model_state

    out = {}
    for c in chunks:
        for name, t in model_state(c).items():
            place = c.placement[name]
            if not place.primary:
                continue
            box = tuple(zip(place.offsets(t.shape, mesh), t.shape))
            for hf in hf_names(name, model_cfg):
                out[hf] = (t, box)
    return out


def fp8_push_tensors(tensors: dict[str, tuple[torch.Tensor, Box]],
                     full_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[torch.Tensor, Box]]:
    """`training_boxes`' output as a `rollout.weight_dtype=fp8_block` push would send it: each FP8-eligible
    linear weight (ckpt/hf.py's rule: 2-D, not embedding/head/norm/router) quantised by THE quantiser into
    DeepSeek's release format, `{hf}` e4m3 codes of the same box plus `{hf}_scale_inv` float32 with the box
    of its 128×128 blocks; everything else unchanged. Each rank quantises only its own shard, so a shard
    boundary must fall on a block boundary (or the tensor's end): then the shards' codes and scales are
    exactly the slices of the whole tensor's. Raises ValueError naming the tensor otherwise.
    Not yet wired into `push` (config refuses fp8_block: config.FP8_ROLLOUT_REFUSED)."""
    from megatron_r1.ckpt.hf import FP8_BLOCK, _fp8_eligible
    from megatron_r1.kernels.fp8 import quantize_blocks

    out = {}
    for hf, (t, box) in tensors.items():
        if not _fp8_eligible(hf, t):
            out[hf] = (t, box)
            continue
        for (a, n), full in zip(box, full_shapes[hf]):
            if a % FP8_BLOCK or ((a + n) % FP8_BLOCK and a + n != full):
                raise ValueError(f"{hf}: shard box {box} of shape {tuple(full_shapes[hf])} splits a "
                                 f"{FP8_BLOCK}×{FP8_BLOCK} FP8 block")
        codes, scale_inv = quantize_blocks(t, (FP8_BLOCK, FP8_BLOCK))
        out[hf] = (codes, box)
        out[hf + "_scale_inv"] = (scale_inv, tuple((a // FP8_BLOCK, -(-n // FP8_BLOCK)) for a, n in box))
    return out


def hf_shapes(model_cfg, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every HF tensor of the model with its full shape (what the probe offers vLLM's loader)."""
    from megatron_r1.ckpt.hf import expected_shapes, hf_names

    return {hf: (shape, dtype) for name, shape in expected_shapes(model_cfg).items()
            for hf in hf_names(name, model_cfg)}


def _intersect(a: Box, b: Box) -> Box | None:
    out = []
    for (s0, n0), (s1, n1) in zip(a, b):
        lo, hi = max(s0, s1), min(s0 + n0, s1 + n1)
        if hi <= lo:
            return None
        out.append((lo, hi - lo))
    return tuple(out)


def _numel(box: Box) -> int:
    n = 1
    for _, ln in box:
        n *= ln
    return n


_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "float8_e4m3fn": 1}


def make_plan(slices: dict[int, list[EngineSlice]], holders: dict[str, list[tuple[int, Box]]],
              dtypes: dict[str, str], node_of=lambda r: 0) -> SyncPlan:
    """Cut every rollout rank's slices into pieces, one holder each (module doc: self, node, load).

    Pure: the same inputs give the same plan on every rank."""
    load: dict[int, int] = defaultdict(int)
    pieces: list[Piece] = []
    layer_numel: dict[int, dict[str, int]] = {}
    for r in sorted(slices):
        per_module: dict[str, int] = defaultdict(int)
        for i, s in enumerate(slices[r]):
            if s.hf not in holders:
                raise RuntimeError(f"weight sync: no training rank holds '{s.hf}', which rollout rank {r} serves")
            by_box: dict[Box, list[int]] = defaultdict(list)
            for rank, box in holders[s.hf]:
                by_box[box].append(rank)
            covered = 0
            for box in sorted(by_box):
                part = _intersect(box, s.box)
                if part is None:
                    continue
                cands = sorted(by_box[box])
                near = [c for c in cands if c == r] or [c for c in cands if node_of(c) == node_of(r)] or cands
                src = min(near, key=lambda c: (load[c], c))
                nbytes = _numel(part) * _SIZES[dtypes[s.hf]]
                if src != r:
                    load[src] += nbytes
                pieces.append(Piece(src, r, i, part, nbytes))
                per_module[s.module] += _numel(part)
                covered += _numel(part)
            if covered != s.numel:
                raise RuntimeError(f"weight sync: training shards of '{s.hf}' cover {covered} of the "
                                   f"{s.numel} elements rollout rank {r} serves")
        layer_numel[r] = dict(per_module)
    return SyncPlan(slices, pieces, dtypes, layer_numel)


def split_piece(p: Piece, max_bytes: int) -> list[Piece]:
    """A piece larger than a bucket, cut along its first dim longer than 1 (rows of a matrix)."""
    if p.nbytes <= max_bytes:
        return [p]
    d = next(j for j, (_, n) in enumerate(p.box) if n > 1)
    start, n = p.box[d]
    row = p.nbytes // n
    if row > max_bytes and len(p.box) > d + 1:  # one row does not fit: cut inside the row instead
        out = []
        for k in range(n):
            box = p.box[:d] + ((start + k, 1),) + p.box[d + 1:]
            out += split_piece(Piece(p.src, p.dst, p.slice, box, row), max_bytes)
        return out
    per = max(1, max_bytes // row)
    return [Piece(p.src, p.dst, p.slice, p.box[:d] + ((start + k, min(per, n - k)),) + p.box[d + 1:],
                  row * min(per, n - k)) for k in range(0, n, per)]


_ALIGN = 16


def _buckets(pieces: list[Piece], max_bytes: int) -> list[list[Piece]]:
    out: list[list[Piece]] = []
    size = 0
    for p in (q for p in pieces for q in split_piece(p, max_bytes)):
        pad = -p.nbytes % _ALIGN
        if out and size + p.nbytes + pad <= max_bytes:
            out[-1].append(p)
        else:
            out.append([p])
            size = 0
        size += p.nbytes + pad
    return out


def schedule(plan: SyncPlan, rank: int, bucket_bytes: int):
    """This rank's part of the push: local pieces, and per peer the buckets it sends and receives."""
    send: dict[int, list[list[Piece]]] = {}
    recv: dict[int, list[list[Piece]]] = {}
    local = [p for p in plan.pieces if p.src == rank and p.dst == rank]
    pairs: dict[tuple[int, int], list[Piece]] = defaultdict(list)
    for p in plan.pieces:
        if p.src != p.dst and rank in (p.src, p.dst):
            pairs[(p.src, p.dst)].append(p)
    for (s, d), ps in pairs.items():
        (send if s == rank else recv)[d if s == rank else s] = _buckets(ps, bucket_bytes)
    return local, send, recv


def _bucket_bytes(bucket: list[Piece]) -> int:
    return sum(p.nbytes + (-p.nbytes % _ALIGN) for p in bucket)


def _local_view(tensors, plan: SyncPlan, p: Piece) -> torch.Tensor:
    s = plan.slices[p.dst][p.slice]
    t, own = tensors[s.hf]
    for d, ((a, n), (o, _)) in enumerate(zip(p.box, own)):
        t = t.narrow(d, a - o, n)
    return t


@dataclass
class PushStats:
    received: int = 0  # bytes received from other ranks
    sent: int = 0  # bytes sent to other ranks
    local: int = 0  # bytes copied from this rank's own shards
    messages: int = 0  # sends + receives
    buckets: int = 0  # buckets this rank received
    pieces: int = 0  # pieces written into vLLM's parameters (local and received)
    modules: int = 0  # vLLM modules post-processed
    seconds: dict = field(default_factory=lambda: dict(plan=0.0, pack=0.0, send=0.0, copy=0.0, post=0.0, total=0.0))

    # the trainer's sync/* metrics
    @property
    def bytes(self) -> int:
        return self.received + self.local

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds["total"] if self.seconds["total"] > 0 else 0.0

    @property
    def num_buckets(self) -> int:
        return self.buckets


@torch.no_grad()
def push(plan: SyncPlan, engine, tensors: dict[str, tuple[torch.Tensor, Box]], group, device,
         bucket_bytes: int) -> PushStats:
    """The sync itself (collective over `group`, every rank): module doc."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    st = PushStats()
    sec = st.seconds
    t0 = time.perf_counter()
    local, send, recv = schedule(plan, rank, bucket_bytes)
    slices = plan.slices.get(rank, [])
    dtype_of = {hf: getattr(torch, d) for hf, d in plan.dtypes.items()}
    rounds = max([len(b) for b in send.values()] + [len(b) for b in recv.values()] + [0])
    sec["plan"] += time.perf_counter() - t0

    def pack(k: int):
        t = time.perf_counter()
        bufs = {}
        for peer in sorted(send):
            if k >= len(send[peer]):
                continue
            bucket = send[peer][k]
            flat = torch.empty(_bucket_bytes(bucket), dtype=torch.uint8, device=device)
            o = 0
            for p in bucket:
                src = _local_view(tensors, plan, p)
                flat[o:o + p.nbytes].view(src.dtype).view(src.shape).copy_(src)
                o += p.nbytes + (-p.nbytes % _ALIGN)
            bufs[peer] = flat
        sec["pack"] += time.perf_counter() - t
        return bufs

    def received():
        for p in local:  # own shards: no message
            s = slices[p.slice]
            st.local += p.nbytes
            yield s, p.box, _local_view(tensors, plan, p)
        nxt = pack(0) if rounds else {}
        for k in range(rounds):
            t = time.perf_counter()
            out, ins, ops = nxt, {}, []
            for peer in sorted(set(send) | set(recv)):  # the same order on both peers of a pair
                if peer in out:
                    ops.append(dist.P2POp(dist.isend, out[peer], peer, group))
                if peer in recv and k < len(recv[peer]):
                    ins[peer] = torch.empty(_bucket_bytes(recv[peer][k]), dtype=torch.uint8, device=device)
                    ops.append(dist.P2POp(dist.irecv, ins[peer], peer, group))
            reqs = dist.batch_isend_irecv(ops) if ops else []
            sec["send"] += time.perf_counter() - t
            nxt = pack(k + 1) if k + 1 < rounds else {}  # double buffer: pack the next round meanwhile
            t = time.perf_counter()
            for req in reqs:
                req.wait()
            sec["send"] += time.perf_counter() - t
            st.messages += len(ops)
            st.buckets += len(ins)
            st.sent += sum(p.nbytes for peer in out for p in send[peer][k])
            for peer in sorted(ins):
                flat, o = ins[peer], 0
                for p in recv[peer][k]:
                    s = slices[p.slice]
                    shape = [n for _, n in p.box]
                    st.received += p.nbytes
                    yield s, p.box, flat[o:o + p.nbytes].view(dtype_of[s.hf]).view(shape)
                    o += p.nbytes + (-p.nbytes % _ALIGN)

    def counted():
        for item in received():
            st.pieces += 1
            yield item

    if rank in plan.slices:
        st.modules = len(plan.layer_numel.get(rank, {}))
        engine.apply_slices(counted(), plan.layer_numel.get(rank, {}), sec)
    else:  # a training rank without an engine still sends
        for _ in received():
            pass
    sec["total"] = time.perf_counter() - t0
    return st


def build_plan(engine, chunks, mesh, model_cfg, local_world: int | None = None) -> SyncPlan:
    """Collective over the world, once per run: every rollout rank's slices (probed from vLLM) and
    every training rank's boxes, gathered; the same plan on every rank."""
    import os

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local_world = local_world or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    mine = training_boxes(chunks, mesh, model_cfg)
    dtype = next(iter(mine.values()))[0].dtype
    probe = engine.probe_slices(hf_shapes(model_cfg, dtype))
    table = ([(hf, box) for hf, (_, box) in mine.items()], {hf: str(t.dtype).replace("torch.", "")
                                                               for hf, (t, _) in mine.items()}, probe)
    tables = [table]
    if world > 1:
        tables = [None] * world
        dist.all_gather_object(tables, table)
    holders: dict[str, list[tuple[int, Box]]] = defaultdict(list)
    dtypes: dict[str, str] = {}
    slices = {}
    for r, (boxes, dts, sl) in enumerate(tables):
        for hf, box in boxes:
            holders[hf].append((r, box))
        dtypes.update(dts)
        slices[r] = sl
    return make_plan(slices, dict(holders), dtypes, node_of=lambda r: r // local_world)


class WeightSync:
    """The trainer's handle: the plan and the sync group are made once (collective), then each call
    pushes the current weights (collective)."""

    def __init__(self, engine, chunks, mesh, model_cfg, bucket_bytes: int):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.engine, self.chunks, self.mesh, self.model_cfg = engine, chunks, mesh, model_cfg
        self.bucket_bytes = bucket_bytes
        t = time.perf_counter()
        self.plan = build_plan(engine, chunks, mesh, model_cfg)
        self.plan_seconds = time.perf_counter() - t
        # a group of its own: the sync's p2p traffic never interleaves with the training groups'
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="nccl" if torch.device(mesh.device).type == "cuda" else "gloo")
            # NCCL: every rank of a group must take part in its first call, and a push round skips ranks
            # with nothing to exchange, so the communicator is brought up here, by all
            dist.barrier(group=self.group)

    def __call__(self, bucket_bytes: int | None = None) -> PushStats:
        tensors = training_boxes(self.chunks, self.mesh, self.model_cfg)  # views of the live parameters
        return push(self.plan, self.engine, tensors, self.group, self.mesh.device, bucket_bytes or self.bucket_bytes)
