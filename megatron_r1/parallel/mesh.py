"""The process mesh: every parallel group, built once from the world size and the degrees.

Notable choices
- Rank order is Megatron's: tp fastest, then cp, then dp, then pp (slowest), so a tensor-parallel group
  sits on one node and a pipeline stage is a contiguous block of ranks.
- Experts use MoE parallel folding: within one pipeline stage the tp·cp·dp ranks are re-factored as
  ep × edp (ep fastest). Every rank of a stage holds different tokens (the MoE block splits tokens
  over tp), so an expert-parallel group can span tp, cp and dp ranks alike.
- No globals: one `ParallelMesh` object is passed to whatever needs a group (STYLE.md item 4).
  A group of size 1 is `None`, and every collective in `parallel/` is the identity on `None`.
- Degrees are validated once, here, with the arithmetic in the message.
- The mesh carries the device every tensor of this rank lives on (`mesh.device`): the current CUDA
  device under NCCL, the CPU under gloo, or what the caller asks for (`meta` to build without memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_r1.config import ConfigError, ModelConfig, ParallelConfig


def stage_layer_counts(num_layers: int, pp: int, vpp: int = 1, first: int | None = None,
                       last: int | None = None) -> list[int]:
    """Layers of each pipeline stage: `first`/`last` fixed when given (Megatron's uneven first/last stages,
    e.g. DeepSeek-V3's 61 layers over 16 stages as [4 ×15, 1]), the other stages sharing the rest evenly."""
    if pp == 1:
        if first is not None or last is not None:
            raise ConfigError("parallel.first_stage_layers / last_stage_layers need parallel.pp > 1")
        if num_layers % vpp:
            raise ConfigError(f"num_hidden_layers={num_layers} is not divisible by vpp={vpp}")
        return [num_layers]
    if (first is not None or last is not None) and vpp > 1:
        raise ConfigError("uneven pipeline stages (first/last_stage_layers) need parallel.vpp = 1")
    fixed = [x for x in (first, last) if x is not None]
    middle, rest = pp - len(fixed), num_layers - sum(fixed)
    if middle == 0:
        counts = [first, last] if rest == 0 else None
    elif rest < middle or rest % middle:
        counts = None
    else:
        c = rest // middle
        counts = [c if first is None else first] + [c] * (pp - 2) + [c if last is None else last]
    if counts is None or any(x < 1 or x % vpp for x in counts):
        given = "".join(f", {k}_stage_layers={v}" for k, v in (("first", first), ("last", last)) if v is not None)
        raise ConfigError(f"num_hidden_layers={num_layers} cannot be split over pp={pp}{given}: the other "
                          f"{middle} stage(s) must share {rest} layers evenly, every stage >= 1 layer"
                          + (f" and divisible by vpp={vpp}" if vpp > 1 else "")
                          + ("" if fixed else "; set parallel.first_stage_layers / last_stage_layers"))
    return counts


def validate_layout(world_size: int, par: ParallelConfig, model: ModelConfig | None = None, *,
                    check_split: bool = True) -> int:
    """Check the degrees against the world size and the model; returns dp. `check_split=False` leaves
    out the pipeline layer split (`stage_layer_counts`), for the planner, which chooses its own."""
    for name in ("tp", "cp", "ep", "pp", "vpp"):
        v = getattr(par, name)
        if v < 1:
            raise ConfigError(f"parallel.{name}={v} must be >= 1")
    model_par = par.tp * par.cp * par.pp
    if world_size % model_par:
        raise ConfigError(f"world size {world_size} is not divisible by tp·cp·pp = "
                          f"{par.tp}·{par.cp}·{par.pp} = {model_par}")
    dp = world_size // model_par
    stage = par.tp * par.cp * dp
    if stage % par.ep:
        raise ConfigError(f"parallel.ep={par.ep} does not divide the ranks of a pipeline stage "
                          f"(tp·cp·dp = {par.tp}·{par.cp}·{dp} = {stage})")
    if par.vpp > 1 and par.pp == 1:
        raise ConfigError("parallel.vpp > 1 needs parallel.pp > 1")
    if model is None:
        return dp
    heads = model.num_attention_heads
    if heads % par.tp:
        raise ConfigError(f"parallel.tp={par.tp} does not divide num_attention_heads={heads}")
    if not model.is_mla and model.num_key_value_heads % par.tp:
        raise ConfigError(f"parallel.tp={par.tp} does not divide num_key_value_heads={model.num_key_value_heads}")
    if model.vocab_size % par.tp:
        raise ConfigError(f"parallel.tp={par.tp} does not divide vocab_size={model.vocab_size}")
    if model.is_mla is False and model.intermediate_size % par.tp:
        raise ConfigError(f"parallel.tp={par.tp} does not divide intermediate_size={model.intermediate_size}")
    if model.is_moe:
        if model.n_routed_experts % par.ep:
            raise ConfigError(f"parallel.ep={par.ep} does not divide n_routed_experts={model.n_routed_experts}")
        if model.intermediate_size % par.tp:
            raise ConfigError(f"parallel.tp={par.tp} does not divide intermediate_size={model.intermediate_size}")
    elif par.ep > 1:
        raise ConfigError(f"parallel.ep={par.ep} needs a MoE model ({model.model_type} is dense)")
    if check_split:
        stage_layer_counts(model.num_hidden_layers, par.pp, par.vpp, par.first_stage_layers, par.last_stage_layers)
    return dp


def default_device() -> torch.device:
    """The current CUDA device when collectives run on NCCL (or, without a process group, when a GPU is
    visible); else the CPU (gloo's collectives take CPU tensors)."""
    if dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class ParallelMesh:
    """Degrees, this rank's coordinates, and the groups (None where the group has one rank)."""
    tp: int = 1
    cp: int = 1
    dp: int = 1
    pp: int = 1
    ep: int = 1
    vpp: int = 1
    sp: bool = False
    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    pp_rank: int = 0
    ep_rank: int = 0
    edp_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this rank's tensors live
    groups: dict = field(default_factory=dict)  # name -> ProcessGroup | None
    ranks: dict = field(default_factory=dict)  # name -> list[int] (this rank's group members)

    @property
    def edp(self) -> int:
        return self.tp * self.cp * self.dp // self.ep

    def group(self, name: str):
        return self.groups.get(name)

    # convenience accessors used throughout parallel/
    tp_group = property(lambda self: self.groups.get("tp"))
    cp_group = property(lambda self: self.groups.get("cp"))
    dp_group = property(lambda self: self.groups.get("dp"))
    pp_group = property(lambda self: self.groups.get("pp"))
    ep_group = property(lambda self: self.groups.get("ep"))
    edp_group = property(lambda self: self.groups.get("edp"))
    dp_cp_group = property(lambda self: self.groups.get("dp_cp"))
    stage_group = property(lambda self: self.groups.get("stage"))
    embed_group = property(lambda self: self.groups.get("embed"))

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def tokens_split_over_tp(self) -> bool:
        return self.tp > 1

    def coords(self) -> dict:
        return dict(tp=self.tp_rank, cp=self.cp_rank, dp=self.dp_rank, pp=self.pp_rank,
                    ep=self.ep_rank, edp=self.edp_rank)

    def pp_rank_of(self, pp_rank: int) -> int:
        """Global rank of the pipeline peer at stage `pp_rank` (same tp/cp/dp coordinates)."""
        return self.ranks["pp"][pp_rank]

    @classmethod
    def single(cls, sp: bool = False, device=None) -> "ParallelMesh":
        return cls(sp=sp, device=torch.device(device or "cpu"),
                   ranks={k: [0] for k in ("tp", "cp", "dp", "pp", "ep", "edp", "dp_cp", "tp_cp", "stage", "embed")})

    @classmethod
    def build(cls, par: ParallelConfig, model: ModelConfig | None = None, device=None) -> "ParallelMesh":
        """Create every group. Collective: all ranks must call it with the same arguments.
        `device`: default `default_device()`."""
        device = torch.device(device) if device is not None else default_device()
        if not dist.is_initialized():
            if par.tp * par.cp * par.pp * par.ep > 1:
                raise ConfigError("a parallel layout > 1 needs torch.distributed initialised "
                                  "(megatron_r1.parallel.launch.init_distributed)")
            return cls.single(sp=par.sp, device=device)
        world, rank = dist.get_world_size(), dist.get_rank()
        dp = validate_layout(world, par, model)
        tp, cp, pp, ep = par.tp, par.cp, par.pp, par.ep

        def coord(r: int) -> tuple[int, int, int, int]:  # (tp, cp, dp, pp)
            return r % tp, (r // tp) % cp, (r // (tp * cp)) % dp, r // (tp * cp * dp)

        def rank_of(t: int, c: int, d: int, p: int) -> int:
            return t + tp * (c + cp * (d + dp * p))

        stage_size = tp * cp * dp
        families: dict[str, list[list[int]]] = {
            "tp": [], "cp": [], "dp": [], "pp": [], "dp_cp": [], "tp_cp": [], "stage": [], "ep": [], "edp": [], "embed": []}
        for p in range(pp):
            for d in range(dp):
                for c in range(cp):
                    families["tp"].append([rank_of(t, c, d, p) for t in range(tp)])
            for d in range(dp):
                for t in range(tp):
                    families["cp"].append([rank_of(t, c, d, p) for c in range(cp)])
            for d in range(dp):
                families["tp_cp"].append([rank_of(t, c, d, p) for c in range(cp) for t in range(tp)])
            for c in range(cp):
                for t in range(tp):
                    families["dp"].append([rank_of(t, c, d, p) for d in range(dp)])
            for t in range(tp):
                families["dp_cp"].append([rank_of(t, c, d, p) for d in range(dp) for c in range(cp)])
            base = p * stage_size
            families["stage"].append(list(range(base, base + stage_size)))
            for e0 in range(0, stage_size, ep):
                families["ep"].append(list(range(base + e0, base + e0 + ep)))
            for e in range(ep):
                families["edp"].append(list(range(base + e, base + stage_size, ep)))
        for r in range(stage_size):
            families["pp"].append([r + p * stage_size for p in range(pp)])
            # the MTP module on the last stage keeps a copy of the embedding (grads summed with stage 0)
            families["embed"].append(sorted({r, r + (pp - 1) * stage_size}))

        mesh = cls(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep, vpp=par.vpp, sp=par.sp and tp > 1, rank=rank, world_size=world,
                   device=device)
        mesh.tp_rank, mesh.cp_rank, mesh.dp_rank, mesh.pp_rank = coord(rank)
        local = rank % stage_size
        mesh.ep_rank, mesh.edp_rank = local % ep, local // ep
        # new_group is collective over the world: every rank creates every group in the same order
        for name, members_list in families.items():
            for members in members_list:
                g = dist.new_group(members) if len(members) > 1 else None
                if rank in members:
                    mesh.groups[name] = g
                    mesh.ranks[name] = members
        return mesh
