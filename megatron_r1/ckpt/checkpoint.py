"""Sharded training checkpoints on torch.distributed.checkpoint (DCP): save, resume, reshard.

Notable choices
- **Layout-independent keys: a tensor piece is named by what it covers, not by who held it.** Every
  piece is a box of a *global* tensor: `model/<hf name>` when it is the whole tensor, else
  `model/<hf name>[r0:r1,c0:c1]` (a tp slice; a ZeRO-1 range decomposes into ≤ 2·ndim-1 boxes).
  Replicated pieces (dp replicas, tp-replicated norms, expert copies over edp, the last stage's
  embedding copy) get the same key on every holder, and DCP's planner writes each key once.
  Loading under any layout intersects the boxes a rank needs with the boxes on disk (DCP's
  metadata lists them) and reads only the overlapping ones. Why not DTensor + DCP's own resharding:
  a ZeRO-1 shard of a flattened tp slice is not one rectangle, which DTensor cannot describe, and a
  4-D DeviceMesh would claim pipeline replication that does not exist; plain tensors also keep
  `dcp.async_save` staging and dedup on their well-trodden path.
- **Atomic commits.** Everything is written to `step_000123.tmp/`; after every rank has finished
  (DCP's coordinator gathers every rank's write results before writing `.metadata`; then a
  barrier), rank 0 writes `COMPLETE`, renames the directory to `step_000123/`, updates the `latest`
  text file with `os.replace` and drops all but the newest `keep_last`. Loaders only consider
  directories with `COMPLETE`; the newest of those wins, so `latest` is a hint for people and tools
  and a crash between the rename and its update costs nothing. A kill -9 mid-save leaves a `.tmp`
  directory that is ignored (and removed by the next save of that step).
- **Async save** (`Checkpointer(async_save=True)`): DCP stages a CPU copy, then writes in a
  background thread over a dedicated gloo group (so its collectives never interleave with the
  training ones on the default group); rank 0 commits when its write future resolves. Works with
  gloo on CPU (tests/parallel/test_checkpoint.py). The next `save`/`wait`/`load` joins the previous
  one and commits it; call `wait()` before the process exits, or the last save stays a `.tmp`.
- Every rank must see the same `save_dir` (a shared filesystem), as DCP itself assumes.
- **Small state is plain files** in the same directory: `trainer_state.pt` (step, scheduler, the
  trainer's opaque `extra`: data-loader position…; rank 0), `rng/rank_00003.pt` (torch, CUDA, python
  `random`, numpy generators of every rank), `config.yaml` (the resolved run config) and `meta.json`
  (step, layout, format). RNG states are restored only when the world size matches: under a new
  layout a rank's old stream has no meaning, and that is logged, not an error.
- Problems are one `CheckpointError` line naming the directory (or file) and the tensor. A directory
  with `COMPLETE` can still be damaged afterwards (a disk filled by another job, a copy cut short):
  `verify_checkpoint` checks what costs no tensor reads (DCP metadata, every shard file as long as
  the metadata says, meta.json, trainer_state.pt), and a failed read names the shard files, so resume
  can skip such a checkpoint for the previous one (training.py).
- **Checksums.** Before `COMPLETE`, every file of the checkpoint is hashed (SHA-256) by the rank that wrote
  it (DCP's `__<rank>_*.distcp` and `rng/rank_<rank>.pt`; rank 0 the rest), gathered, and written by rank 0
  as `SHA256SUMS` in `sha256sum`'s format (`cd step_000123 && sha256sum -c SHA256SUMS` checks a copy by
  hand). `verify_checkpoint` compares sizes always and the hashes when asked; at resume each rank hashes
  its 1/world share of the files, so a corrupted byte anywhere is refused with the file named. Older
  checkpoints without the file are accepted on their sizes.
- **A failed save** (a full disk, a quota, an I/O error on any rank) never leaves a half checkpoint nor
  touches the committed ones: the ranks agree on the failure (one all-gather after each phase, so no rank
  waits in a collective for a peer that gave up), rank 0 removes the `.tmp` directory to give the space
  back, and every rank raises the same `CheckpointSaveError` naming the error and the checkpoint that is
  still the newest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_r1.ckpt.hf import CheckpointError, model_state

log = logging.getLogger(__name__)

FORMAT = "megatron_r1/dcp-boxes/1"
COMPLETE = "COMPLETE"
LATEST = "latest"
CHECKSUMS = "SHA256SUMS"
_RANK_FILE = re.compile(r"^(?:__(\d+)_.*\.distcp|rng/rank_(\d+)\.pt)$")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_BOX_KEY = re.compile(r"^(.*)\[(\d+:\d+(?:,\d+:\d+)*)\]$")


# ------------------------------------------------------------------------------------------ pieces
@dataclass
class Piece:
    """A local tensor that is the box `offsets + tensor.shape` of a global tensor `global_shape`."""
    name: str
    tensor: torch.Tensor
    offsets: tuple
    global_shape: tuple

    @property
    def key(self) -> str:
        return box_key(self.name, self.offsets, tuple(self.tensor.shape), self.global_shape)


def box_key(name: str, offsets, sizes, global_shape) -> str:
    """`name` for a whole tensor, `name[a:b,c:d]` for a box of it (every dim written out)."""
    if tuple(sizes) == tuple(global_shape) and not any(offsets):
        return name
    return f"{name}[{','.join(f'{o}:{o + s}' for o, s in zip(offsets, sizes))}]"


def parse_box_key(key: str, stored_size) -> tuple[str, tuple, tuple]:
    """(name, offsets, sizes) of a saved key; the sizes come from DCP's metadata."""
    m = _BOX_KEY.match(key)
    if not m:
        return key, (0,) * len(stored_size), tuple(stored_size)
    offs = tuple(int(p.split(":")[0]) for p in m.group(2).split(","))
    return m.group(1), offs, tuple(stored_size)


def param_box(place, p: torch.Tensor, mesh) -> tuple[tuple, tuple]:
    """(offsets, global shape) of this rank's piece of parameter `p` (a tp slice or the whole tensor)."""
    return place.offsets(p.shape, mesh), place.full_shape(p.shape, mesh)


def model_pieces(chunks, mesh) -> list[Piece]:
    """Every parameter and persistent buffer of this rank's model chunks, as pieces of global tensors."""
    out = []
    for chunk in _as_list(chunks):
        for name, t in model_state(chunk).items():
            off, shape = param_box(chunk.placement[name], t, mesh)
            out.append(Piece(name, t.detach(), off, shape))
    return out


def flat_range_boxes(shape: tuple, start: int, end: int) -> list[tuple[tuple, tuple, int, int]]:
    """Split the flat range [start, end) of a row-major tensor of `shape` into boxes.

    Returns [(offsets, sizes, flat_start, flat_end)]; each box is contiguous in flat order, so
    `flat[flat_start:flat_end].view(sizes)` is its data. A ZeRO-1 shard of a parameter's flattened
    (tp-local) state is such a range; its boxes are then shifted by the tp offset (`shift_box`)."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,), start, end)] if shape else [((), (), start, end)]
    inner = 1
    for s in shape[1:]:
        inner *= s
    out = []
    r0, r1 = start // inner, (end - 1) // inner
    if start % inner or r0 == r1:  # partial leading row: recurse into it
        stop = min(end, (r0 + 1) * inner)
        for off, sz, a, b in flat_range_boxes(shape[1:], start - r0 * inner, stop - r0 * inner):
            out.append(((r0,) + off, (1,) + sz, a + r0 * inner, b + r0 * inner))
        if stop == end:
            return out
        r0, start = r0 + 1, stop
    full_end = (end // inner) * inner
    if full_end > start:  # whole rows
        rows = (full_end - start) // inner
        out.append(((r0,) + (0,) * (len(shape) - 1), (rows,) + tuple(shape[1:]), start, full_end))
    if end > full_end:  # partial trailing row
        r = end // inner
        for off, sz, a, b in flat_range_boxes(shape[1:], 0, end - full_end):
            out.append(((r,) + off, (1,) + sz, a + full_end, b + full_end))
    return out


def flat_pieces(name: str, flat: torch.Tensor, start: int, param: torch.Tensor, place, mesh) -> list[Piece]:
    """Pieces for `flat` = elements [start, start+len) of the flattened tp-local `param` (ZeRO-1 state)."""
    poff, gshape = param_box(place, param, mesh)
    out = []
    for off, sz, a, b in flat_range_boxes(tuple(param.shape), start, start + flat.numel()):
        view = flat[a - start:b - start].view(sz)
        out.append(Piece(name, view, tuple(o + p for o, p in zip(off, poff)), gshape))
    return out


# ------------------------------------------------------------------------------------ directories
def step_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"step_{step:06d}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_checkpoints(save_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `save_dir`, oldest first. `.tmp` and unmarked directories are ignored."""
    if not os.path.isdir(save_dir):
        return []
    out = []
    for d in os.listdir(save_dir):
        m = _STEP_DIR.match(d)
        if m and is_complete(os.path.join(save_dir, d)):
            out.append((int(m.group(1)), os.path.join(save_dir, d)))
    return sorted(out)


def latest_checkpoint(save_dir: str) -> str | None:
    """The newest complete checkpoint (scanning; the `latest` file is only a hint, see the docstring)."""
    found = list_checkpoints(save_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a save dir whose newest complete checkpoint is wanted."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if is_complete(path):
        return path
    if os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE} marker: the save was interrupted)")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (step_*/ with a {COMPLETE} marker) in it")
    return found


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp_dir: str, final_dir: str, keep_last: int | None = None) -> None:
    """Rank 0, after every rank has written: mark, rename, point `latest`, rotate."""
    marker = os.path.join(tmp_dir, COMPLETE)
    with open(marker, "w") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp_dir)
    if os.path.exists(final_dir):  # re-saving a step (after a resume): the old copy goes last
        old = final_dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final_dir, old)
        os.rename(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp_dir, final_dir)
    save_dir = os.path.dirname(os.path.abspath(final_dir))
    _fsync_dir(save_dir)
    _write_text_atomic(os.path.join(save_dir, LATEST), os.path.basename(final_dir) + "\n")
    if keep_last:
        for _, old in list_checkpoints(save_dir)[:-keep_last]:
            if os.path.abspath(old) != os.path.abspath(final_dir):
                shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    out = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ state dicts
def _as_list(chunks) -> list:
    return list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]


def _optimizer_pieces(optimizer) -> list[Piece]:
    """The optimizer's saved tensors as pieces (parallel/data.py `DistributedAdamW` contract).

    Each tensor is elements [offset, offset + n) of its parameter flattened in the layout-independent
    *canonical* order, i.e. a 1-D box of a vector of `global_numel` elements; 0-d tensors (the step)
    are whole. Only primary pieces: every element is saved by exactly one rank."""
    meta = optimizer.piece_meta()
    out = []
    for k, v in optimizer.sharded_state_dict().items():
        off, numel = meta.get(k, (0, v.numel()))
        out.append(Piece(k, v.detach(), (off,) if v.dim() else (), (numel,) if v.dim() else ()))
    return out


def _optimizer_targets(optimizer) -> list[Piece]:
    """Every piece this rank's optimizer holds, replicas included (they load from the same keys)."""
    if hasattr(optimizer, "load_piece_meta"):
        meta = optimizer.load_piece_meta()  # {key: (global_offset, n, global_numel)}
        out = [Piece(k, torch.empty(n, dtype=torch.float32), (off,), (g,)) for k, (off, n, g) in meta.items()]
    else:  # DistributedAdamW today: its pieces, replicas included
        out = [Piece(f"optim.{k}.{pc.name}", torch.empty(pc.hi - pc.lo, dtype=torch.float32),
                     (pc.global_offset,), (pc.global_numel,))
               for pc, _ in optimizer._pieces(primary_only=False) for k in optimizer.STATES]
    step = optimizer.sharded_state_dict().get("optim.step")
    if step is not None:
        out.append(Piece("optim.step", torch.empty_like(step), (), ()))
    return out


def _save_dict(pieces: Iterable[Piece], prefix: str, out: dict) -> None:
    for p in pieces:
        key = f"{prefix}/{p.key}"
        if key in out and out[key] is not p.tensor:
            # the same box twice on one rank (e.g. a tied weight listed twice): keep one
            continue
        out[key] = p.tensor


class Checkpointer:
    """Saves and loads sharded checkpoints under `save_dir` for one process mesh.

    Collective: every rank calls `save` and `load` with its own chunks/optimizer."""

    def __init__(self, save_dir: str, mesh, keep_last: int | None = 3, async_save: bool = False):
        self.save_dir, self.mesh, self.keep_last, self.async_save = save_dir, mesh, keep_last, async_save
        self._pending = None  # (future, tmp, final) of an async save in flight
        self._group = None
        if async_save and dist.is_initialized():
            # background collectives on their own group, never interleaved with the training ones
            self._group = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------------------- save
    def save(self, step: int, chunks, optimizer=None, scheduler=None, extra: dict | None = None,
             config=None) -> str:
        """Write checkpoint `step`; returns its final directory (committed later when async).

        Raises CheckpointSaveError on every rank when any rank fails to write (see the module doc)."""
        self.wait()
        rank = dist.get_rank() if dist.is_initialized() else 0
        final = step_dir(self.save_dir, step)
        tmp = final + ".tmp"
        err = None
        try:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt at this step that died
                os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        except OSError as e:
            err = e
        self._agree(err, tmp)
        state: dict[str, Any] = {}
        _save_dict(model_pieces(chunks, self.mesh), "model", state)
        if optimizer is not None:
            _save_dict(_optimizer_pieces(optimizer), "optim", state)
        try:
            torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
            if rank == 0:
                torch.save({"step": step, "scheduler": scheduler.state_dict() if scheduler is not None else None,
                            "extra": extra or {}}, os.path.join(tmp, "trainer_state.pt"))
                if config is not None:
                    config.save(os.path.join(tmp, "config.yaml"))
                with open(os.path.join(tmp, "meta.json"), "w") as f:
                    json.dump({"format": FORMAT, "step": step, "layout": _layout(self.mesh),
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=2)
        except OSError as e:
            err = e
        self._agree(err, tmp)
        writer = dcp.FileSystemWriter(tmp)
        if self.async_save and dist.is_initialized():
            fut = dcp.async_save(state, storage_writer=writer, process_group=self._group)
            self._pending = (fut, tmp, final)
        else:
            try:
                with warnings.catch_warnings():  # one process without torch.distributed: intended
                    warnings.filterwarnings("ignore", message=".*single process.*")
                    dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps each rank's OSError
                err = e
            self._agree(err, tmp)
            self._commit(tmp, final)
        return final

    def _agree(self, err: BaseException | None, tmp: str, group=None) -> None:
        """Collective: when any rank failed, rank 0 removes `tmp` and every rank raises the same error."""
        errors = [None if err is None else _root_cause(err) + _full_disk(tmp)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, errors[0], group=group)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if not bad:
            return
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the committed checkpoints are untouched
        _barrier(group)
        prev = latest_checkpoint(self.save_dir)
        where = f" on rank {bad[0][0]}" if len(errors) > 1 else ""
        raise CheckpointSaveError(f"{tmp}: checkpoint save failed{where}: {bad[0][1]}; removed the partial save, "
                                  + (f"the newest complete checkpoint is still {prev}" if prev
                                     else "no complete checkpoint exists yet"))

    def _commit(self, tmp: str, final: str) -> None:
        """Collective: hash (each rank its own files), then rank 0 writes SHA256SUMS and commits."""
        _barrier(self._group)
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        sums, err = {}, None
        try:
            sums = hash_files(tmp, rank, world)
        except OSError as e:
            err = e
        gathered = [sums]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, sums, group=self._group)
        self._agree(err, tmp, self._group)
        if rank == 0:
            try:
                all_sums = {k: v for part in gathered for k, v in part.items()}
                _write_text_atomic(os.path.join(tmp, CHECKSUMS),
                                   "".join(f"{h}  {rel}\n" for rel, h in sorted(all_sums.items())))
                commit(tmp, final, self.keep_last)
            except OSError as e:
                err = e
        self._agree(err, tmp, self._group)

    def wait(self) -> None:
        """Join an async save in flight and commit it (collective)."""
        if self._pending is None:
            return
        fut, tmp, final = self._pending
        self._pending = None
        err = None
        try:
            fut.result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - as in save
            err = e
        self._agree(err, tmp, self._group)
        self._commit(tmp, final)

    # ------------------------------------------------------------------------------- load
    def load(self, chunks, optimizer=None, scheduler=None, path: str | None = None, strict: bool = True) -> dict:
        """Fill `chunks` (and the optimizer, scheduler, RNG) from `path` or the newest checkpoint of
        `save_dir`, under this mesh's layout whatever the saved one was. Returns the trainer state
        {"step", "extra", "path", "layout"}."""
        self.wait()
        return load_checkpoint(path or self.save_dir, chunks, self.mesh, optimizer, scheduler, strict=strict)


class CheckpointSaveError(CheckpointError):
    """A save failed (no space, quota, I/O error); the partial save is removed, the committed ones untouched."""


def _full_disk(path: str) -> str:
    """' (no space left ...)' when the filesystem holding `path` is (nearly) full: torch's writer reports a
    full disk as 'unexpected pos' rather than ENOSPC, so the cause is stated from the filesystem itself."""
    try:
        st = os.statvfs(path if os.path.exists(path) else os.path.dirname(path))
    except OSError:
        return ""
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if free < max(1 << 20, total // 1000):
        return f" (no space left on the device: {free} bytes free of {total})"
    return ""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(path: str) -> list[str]:
    """Every file of a checkpoint directory, relative, but the marker and the sums themselves."""
    out = []
    for root, _, names in os.walk(path):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), path)
            if rel not in (COMPLETE, CHECKSUMS):
                out.append(rel)
    return sorted(out)


def hash_files(path: str, rank: int = 0, world: int = 1) -> dict[str, str]:
    """{relative path: sha256} of the files rank `rank` wrote (rank 0 also the ones no rank's name claims)."""
    out = {}
    for rel in _files(path):
        m = _RANK_FILE.match(rel)
        owner = int(m.group(1) or m.group(2)) if m else 0
        if owner % world == rank:
            out[rel] = _sha256(os.path.join(path, rel))
    return out


def read_checksums(path: str) -> dict[str, str] | None:
    """{relative path: sha256} from a checkpoint's SHA256SUMS, or None when it has none (older checkpoints)."""
    f = os.path.join(path, CHECKSUMS)
    if not os.path.exists(f):
        return None
    out = {}
    try:
        with open(f) as fh:
            for n, line in enumerate(fh, 1):
                h, sep, rel = line.rstrip("\n").partition("  ")
                if not sep or len(h) != 64:
                    raise ValueError(f"line {n} is not '<sha256>  <file>'")
                out[rel] = h
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    return out


def _layout(mesh) -> dict:
    return {k: getattr(mesh, k) for k in ("tp", "cp", "dp", "pp", "ep", "vpp", "world_size")}


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def save_checkpoint(save_dir: str, step: int, chunks, mesh, optimizer=None, scheduler=None,
                    extra: dict | None = None, config=None, keep_last: int | None = 3) -> str:
    """Synchronous save of `step` under `save_dir` (collective); returns the committed directory."""
    return Checkpointer(save_dir, mesh, keep_last).save(step, chunks, optimizer, scheduler, extra, config)


# -------------------------------------------------------------------------------------- loading
class SavedIndex:
    """What a checkpoint directory holds: {prefix/name: [(key, offsets, sizes, dtype)]}."""

    def __init__(self, path: str):
        self.path = path
        try:
            md = dcp.FileSystemReader(path).read_metadata()
        except Exception as e:  # noqa: BLE001 - any unreadable metadata is the same user problem
            raise CheckpointError(f"{os.path.join(path, '.metadata')}: unreadable checkpoint metadata "
                                  f"({type(e).__name__}: {e})") from None
        self.metadata = md
        self.boxes: dict[str, list[tuple[str, tuple, tuple, torch.dtype]]] = {}
        for key, m in md.state_dict_metadata.items():
            if not isinstance(m, TensorStorageMetadata):
                continue
            name, off, size = parse_box_key(key, m.size)
            self.boxes.setdefault(name, []).append((key, off, size, m.properties.dtype))

    def names(self, prefix: str) -> list[str]:
        p = prefix + "/"
        return [n[len(p):] for n in self.boxes if n.startswith(p)]

    def global_shape(self, name: str) -> tuple:
        boxes = self.boxes[name]
        return tuple(max(o[d] + s[d] for _, o, s, _ in boxes) for d in range(len(boxes[0][1])))


def _overlap(a_off, a_size, b_off, b_size):
    """Intersection of two boxes, or None."""
    lo = [max(x, y) for x, y in zip(a_off, b_off)]
    hi = [min(x + s, y + t) for x, s, y, t in zip(a_off, a_size, b_off, b_size)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return lo, hi


def read_pieces(path: str, prefix: str, targets: list[Piece], index: SavedIndex | None = None,
                budget_bytes: int = 1 << 30, strict: bool = True) -> list[Piece]:
    """Fill each target piece from the saved boxes that overlap it (any layout to any layout).

    Reads in batches of about `budget_bytes` of saved boxes, each rank on its own (no collective).
    Returns the targets that were not found (empty when strict, which raises instead)."""
    index = index or SavedIndex(path)
    plan = []  # (target, [(key, lo, hi, saved_off)])
    missing = []
    for t in targets:
        full = f"{prefix}/{t.name}"
        if full not in index.boxes:
            if strict:
                raise CheckpointError(f"{path}: missing tensor '{full}'")
            missing.append(t)
            continue
        shape = index.global_shape(full)
        if shape != tuple(t.global_shape):
            raise CheckpointError(f"{path}: tensor '{full}' has shape {shape}, expected {tuple(t.global_shape)}")
        parts, covered = [], 0
        for key, off, size, dtype in index.boxes[full]:
            ov = _overlap(t.offsets, t.tensor.shape, off, size)
            if ov is not None:
                parts.append((key, ov[0], ov[1], off, size, dtype))
                covered += int(np.prod([h - l for l, h in zip(*ov)]))
        if covered < t.tensor.numel():
            raise CheckpointError(f"{path}: tensor '{full}' is not fully covered by the saved pieces "
                                  f"(checkpoint written incompletely?)")
        plan.append((t, parts))
    for batch, keys in _batches(plan, budget_bytes):
        bufs = {k: torch.empty(s, dtype=d) for k, (s, d) in keys.items()}
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process.*")
                dcp.load(bufs, storage_reader=dcp.FileSystemReader(path), no_dist=True)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - EOFError, RuntimeError, ... (wrapped)
            files = _shard_files(index, keys)
            first = next(iter(keys))
            raise CheckpointError(f"{os.path.join(path, files[0]) if files else path}: cannot read tensor '{first}'"
                                  + (f" (one of {len(keys)} read together from {', '.join(files)})" if len(keys) > 1 else "")
                                  + f": {_root_cause(e)}") from None
        with torch.no_grad():
            for t, parts in batch:
                for key, lo, hi, off, _, _ in parts:
                    src = bufs[key][tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, off))]
                    t.tensor[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, t.offsets))].copy_(src)
    return missing


def _root_cause(e: BaseException) -> str:
    """`Type: message` of what went wrong, unwrapped from DCP's per-rank CheckpointException."""
    if isinstance(e, CheckpointException) and e.failures:
        inner = next(iter(e.failures.values()))
        e = getattr(inner, "exc", inner)
        if isinstance(e, tuple) and e and isinstance(e[0], BaseException):  # (exception, traceback frames)
            e = e[0]
    return f"{type(e).__name__}: {e}".rstrip(": ")


def _shard_files(index: SavedIndex, keys) -> list[str]:
    """The files (relative to the checkpoint) that hold the given saved keys, from DCP's metadata."""
    storage = getattr(index.metadata, "storage_data", None) or {}
    return sorted({info.relative_path for mi, info in storage.items() if mi.fqn in keys})


def verify_checkpoint(path: str, checksums: bool = True, part: tuple[int, int] = (0, 1)) -> dict:
    """DCP metadata, every shard file present and as long as the metadata says, meta.json and
    trainer_state.pt readable; with `checksums`, the SHA-256 of the files in share `part` = (i, n) (every
    n-th file from the i-th: ranks split the reading) against SHA256SUMS. Returns {"step", "layout",
    "tensors"}; raises CheckpointError naming the file."""
    index = SavedIndex(path)
    sums = read_checksums(path) if checksums else None
    if sums and ".metadata" in sums:  # before its sizes are trusted: a flipped byte may still unpickle
        _check_sum(path, ".metadata", sums)
    need: dict[str, int] = {}
    for info in (getattr(index.metadata, "storage_data", None) or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, n in sorted(need.items()):
        f = os.path.join(path, rel)
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: missing checkpoint shard")
        size = os.path.getsize(f)
        if size < n:
            raise CheckpointError(f"{f}: truncated checkpoint shard ({size} bytes, the metadata needs {n})")
    if sums:
        i, n = part
        for k, rel in enumerate(sorted(sums)):
            if not os.path.isfile(os.path.join(path, rel)):
                raise CheckpointError(f"{os.path.join(path, rel)}: missing checkpoint file (listed in {CHECKSUMS})")
            if k % n == i and rel != ".metadata":
                _check_sum(path, rel, sums)
    meta = _read_json(os.path.join(path, "meta.json"))
    ts = _torch_load(os.path.join(path, "trainer_state.pt"))
    return {"step": ts.get("step", meta.get("step", 0)), "layout": meta.get("layout"),
            "tensors": len(index.names("model"))}


def _check_sum(path: str, rel: str, sums: dict[str, str]) -> None:
    got = _sha256(os.path.join(path, rel))
    if got != sums[rel]:
        raise CheckpointError(f"{os.path.join(path, rel)}: checksum mismatch, the file is corrupted (sha256 "
                              f"{got[:16]}..., {CHECKSUMS} recorded {sums[rel][:16]}... at save)")


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return out


def _torch_load(path: str) -> dict:
    """A small pickled state file (trainer state, RNG) written by `Checkpointer.save`."""
    if not os.path.exists(path):
        return {}
    try:
        out = torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated / corrupt pickles raise many types
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(out).__name__}")
    return out


def _batches(plan, budget: int):
    """Group the plan so the saved boxes read at once stay near `budget` bytes (one box may exceed it)."""
    def nbytes(parts):
        return sum(int(np.prod(s)) * torch.empty((), dtype=d).element_size() for s, d in parts.values())

    batch, keys, total = [], {}, 0
    for t, parts in plan:
        new = {k: (s, d) for k, _, _, _, s, d in parts if k not in keys}
        if batch and total + nbytes(new) > budget:
            yield batch, keys
            batch, keys, total = [], {}, 0
            new = {k: (s, d) for k, _, _, _, s, d in parts}
        batch.append((t, parts))
        keys.update(new)
        total += nbytes(new)
    if batch:
        yield batch, keys


def load_checkpoint(path: str, chunks, mesh, optimizer=None, scheduler=None, strict: bool = True,
                    load_rng: bool = True) -> dict:
    """Load a checkpoint (a `step_*` dir, or a save dir: its newest complete one) into this rank's
    chunks under `mesh`, resharding as needed; optimizer/scheduler/RNG when given and present.

    Returns {"step", "extra", "path", "layout", "config_path"}."""
    path = resolve_checkpoint(path)
    index = SavedIndex(path)
    read_pieces(path, "model", model_pieces(chunks, mesh), index, strict=strict)
    meta = _read_json(os.path.join(path, "meta.json"))
    ts = _torch_load(os.path.join(path, "trainer_state.pt"))
    if optimizer is not None:
        if not index.names("optim"):
            raise CheckpointError(f"{path}: no optimizer state in this checkpoint (a converted model?)")
        pieces = _optimizer_targets(optimizer)  # the pieces this layout needs, wherever they were saved
        read_pieces(path, "optim", pieces, index, strict=strict)
        optimizer.load_sharded_state_dict({p.name: p.tensor for p in pieces})
    if scheduler is not None and ts.get("scheduler") is not None:
        scheduler.load_state_dict(ts["scheduler"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    if load_rng:
        if meta.get("layout", {}).get("world_size") == world and os.path.exists(rng):
            set_rng_state(_torch_load(rng))
        elif os.path.isdir(os.path.join(path, "rng")):
            log.info("%s: saved with world size %s, running %s: RNG states not restored", path,
                     meta.get("layout", {}).get("world_size"), world)
    cfg_path = os.path.join(path, "config.yaml")
    return {"step": ts.get("step", meta.get("step", 0)), "extra": ts.get("extra", {}), "path": path,
            "layout": meta.get("layout"), "config_path": cfg_path if os.path.exists(cfg_path) else None}
