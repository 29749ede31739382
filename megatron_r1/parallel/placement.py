"""Where every parameter lives: one placement table per model chunk, built once from the layers' declarations.

Notable choices
- Layers declare, in their own definition, what only they know; `build_placement` reads it once:
    `specs`        (a layer's attribute) {param name: Spec(shard_dim, init)}: the dimension along which
                   tp ranks hold contiguous slices (column-parallel rows, row-parallel columns, vocab rows)
                   and the initialisation (std of a normal draw at full shape, "ones" or "zeros").
    `TP_PARTIAL`   (a class attribute) children replicated over tp whose gradients are partial sums
                   because each tp rank feeds them different work (MLA's low-rank projections before a
                   column-parallel up-projection, the router and shared experts on a token shard).
    `SP_PARTIAL`   children that see a token shard only under sequence parallelism (residual-layout norms).
    `EXPERTS`      the routed experts: whole on the ranks that own them, reduced over the edp group.
    `Spec(stacked=True)` a stack of the local routed experts' weights, [L, ...]: dim 0 indexes experts and
                   ep ranks hold contiguous blocks of it (rows [ep_rank·L, (ep_rank+1)·L) of the global
                   [E, ...] tensor). The module lists its per-expert views (`expert_views()`, HF names):
                   they get whole, non-stacked entries too, so checkpoints, HF loading/export and weight
                   sync address one tensor per expert while the optimizer works on the stack.
  Nothing is hung on `nn.Parameter`; the table is keyed by the parameter's name in its chunk (= HF name).
- A `Placement` derives the rest: full shape, this rank's shard of a full tensor (`narrow`, or a slice of
  a safetensors file), the shard's offsets in the full tensor (checkpoint boxes), the canonical element
  order of ZeRO-1 (shard dim first, so a tp slice is one range of the full tensor's order) and the
  gradient reduction group, which is also the ZeRO bucket kind and the group the state is sharded over:
    "edp"    routed experts (the other holders of the same experts)
    "stage"  replicated over tp with partial gradients (= tp × cp × dp: the dp·cp and the tp sums at once)
    "embed"  the embedding when the last stage keeps a copy for MTP (summed over the "embed" group first)
    "dp_cp"  everything else
  `primary` is False for a copy of a parameter held elsewhere (the MTP's embedding on the last stage):
  it is not counted in the gradient norm and not saved twice.
- Persistent buffers (the router's expert bias) are in the table too, whole, with group "".
- `materialize` turns a model built on `meta` into one on its device: storage for this rank's shards
  only (no full copy anywhere), then each module's `reset_buffers()` recomputes what the constructor
  computed (rope frequencies, zeroed counters). Parameters are filled afterwards (init or a checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn as nn

GROUPS = ("dp_cp", "stage", "edp", "embed")


@dataclass(frozen=True)
class Spec:
    """A layer's declaration for one of its parameters."""
    shard_dim: int | None = None  # dim split over tp into contiguous slices; None: whole on every tp rank
    init: float | str | None = None  # std of N(0, std) drawn at full shape, "ones", "zeros"; None: the default
    stacked: bool = False  # dim 0 indexes this rank's routed experts, sharded over ep (module doc)


@dataclass(frozen=True)
class Placement:
    shard_dim: int | None  # see Spec; None also for everything replicated over tp (experts, partial-grad modules)
    group: str  # gradient reduction group / ZeRO bucket kind (module doc); "" for buffers
    init: float | str | None  # std, "ones", "zeros"; None for buffers
    primary: bool = True  # False: a copy of a parameter held elsewhere (not in the grad norm, not saved twice)
    stacked: bool = False  # [L, ...] stack of local experts: dim 0 sharded over ep (see Spec)
    views: tuple[str, ...] = ()  # a stack's per-expert view names, in local expert order (ZeRO's piece names)

    @property
    def expert(self) -> bool:
        return self.group == "edp"

    def ep_sharded(self, mesh) -> bool:
        return self.stacked and mesh.ep > 1

    @property
    def canonical_dim(self) -> int:
        """ZeRO-1's element order: this dim first (layout-independent: set at tp = 1 too)."""
        return self.shard_dim or 0

    def tp_sharded(self, mesh) -> bool:
        return self.shard_dim is not None and mesh.tp > 1

    def full_shape(self, local_shape, mesh) -> tuple:
        shape = list(local_shape)
        if self.tp_sharded(mesh):
            shape[self.shard_dim] *= mesh.tp
        if self.ep_sharded(mesh):
            shape[0] *= mesh.ep
        return tuple(shape)

    def offsets(self, local_shape, mesh) -> tuple:
        """Where this rank's shard starts in the full tensor."""
        off = [0] * len(local_shape)
        if self.tp_sharded(mesh):
            off[self.shard_dim] = mesh.tp_rank * local_shape[self.shard_dim]
        if self.ep_sharded(mesh):
            off[0] = mesh.ep_rank * local_shape[0]
        return tuple(off)

    def flat_offset(self, local_shape, mesh) -> int:
        """Where this rank's shard starts in the full tensor's canonical element order (ZeRO-1): the
        sharded dim comes first there, so the shard is the range [flat_offset, flat_offset + numel)."""
        numel = 1
        for s in local_shape:
            numel *= s
        if self.tp_sharded(mesh):
            return mesh.tp_rank * numel
        if self.ep_sharded(mesh):
            return mesh.ep_rank * numel
        return 0

    def shard(self, full, mesh):
        """This rank's slice of a full tensor (a view) or of a safetensors slice (read from disk)."""
        if self.tp_sharded(mesh):
            dim, parts, rank = self.shard_dim, mesh.tp, mesh.tp_rank
        elif self.ep_sharded(mesh):
            dim, parts, rank = 0, mesh.ep, mesh.ep_rank
        else:
            return full if isinstance(full, torch.Tensor) else full[...]
        size = _dim_size(full, dim) // parts
        start = rank * size
        if isinstance(full, torch.Tensor):
            return full.narrow(dim, start, size)
        index = [slice(None)] * len(full.get_shape())
        index[dim] = slice(start, start + size)
        return full[tuple(index)]


BUFFER = Placement(None, "", None)


def _dim_size(full, dim: int) -> int:
    return full.shape[dim] if isinstance(full, torch.Tensor) else full.get_shape()[dim]


class PlacementTable:
    """{name: Placement} for every parameter and persistent buffer of one model chunk."""

    def __init__(self, entries: dict[str, Placement]):
        self._entries = entries

    def __getitem__(self, name: str) -> Placement:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no placement for '{name}' (not a parameter or persistent buffer of this chunk)") from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def items(self) -> Iterator[tuple[str, Placement]]:
        return iter(self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def build_placement(root: nn.Module, mesh, default_std: float, shared: tuple[str, ...] = (),
                    copies: tuple[str, ...] = ()) -> PlacementTable:
    """The table of `root` under `mesh`. `shared`: parameters reduced over the "embed" group first;
    `copies`: those of them that are a copy (not primary). 2-D parameters without a declared init draw
    N(0, default_std); biases start at zero; any other parameter must declare its init."""
    partial, whole, experts = [], [], []
    for path, mod in root.named_modules():
        pre = f"{path}." if path else ""
        tp_partial = [pre + c for c in getattr(mod, "TP_PARTIAL", ())]
        sp_partial = [pre + c for c in getattr(mod, "SP_PARTIAL", ())]
        whole += tp_partial + sp_partial
        partial += (tp_partial if mesh.tp > 1 else []) + (sp_partial if mesh.sp else [])
        experts += [pre + c for c in getattr(mod, "EXPERTS", ())]
    entries: dict[str, Placement] = {}
    seen: set[int] = set()
    for path, mod in root.named_modules():
        specs = getattr(mod, "specs", {})
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:  # tied (lm_head = embedding): one entry, under the first name
                continue
            seen.add(id(p))
            name = f"{path}.{pname}" if path else pname
            spec = specs.get(pname, Spec())
            expert = _under(name, experts)
            init = spec.init
            if init is None:
                if p.dim() >= 2:
                    init = default_std
                elif pname == "bias":
                    init = "zeros"
                else:
                    raise ValueError(f"parameter '{name}' of {type(mod).__name__} declares no init (Spec in `specs`)")
            group = ("embed" if name in shared else "edp" if expert else
                     "stage" if _under(name, partial) else "dp_cp")
            shard = None if expert or _under(name, whole) else spec.shard_dim
            entries[name] = Placement(shard, group, init, primary=name not in copies, stacked=spec.stacked)
        if hasattr(mod, "expert_views"):  # one whole entry per expert view of the stacks (see the module doc)
            pre = f"{path}." if path else ""
            for vname in mod.expert_views():
                stack = pre + vname.split(".")[1]
                entries[pre + vname] = Placement(None, entries[stack].group, entries[stack].init)
                entries[stack] = replace(entries[stack], views=entries[stack].views + (pre + vname,))
    for name, t in root.state_dict(keep_vars=True).items():
        if name not in entries and id(t) not in seen:
            entries[name] = BUFFER
    return PlacementTable(entries)


def materialize(module: nn.Module, device) -> nn.Module:
    """A module built on `meta` -> storage on `device` (this rank's shards only), buffers recomputed.

    Parameter values are undefined afterwards: initialise them or load a checkpoint."""
    module.to_empty(device=device)
    for m in module.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    return module
