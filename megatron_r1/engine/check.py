"""Is a parallel layout equal to one rank? Loss, every gradient, and the parameters after one AdamW step.

    megatron-r1 check-parallel --preset tiny-moe --layout tp2,ep2,pp2,vpp2 [--nproc N] [model.x=y ...]
    check_layout("tiny-moe", "tp2,sp,cp2")  # -> Report; .ok, .worst

Notable choices
- The reference is independent of the runtime under test: one process, the plain model (pp=1, tp=1),
  `loss.backward()` per micro-batch, `torch.nn.utils.clip_grad_norm_`, `torch.optim.AdamW`, then the
  router-bias update. Both sides start from the same weights (initialisation is layout-independent,
  see runtime.py) and see the same global batch; the layout splits it over dp ranks.
- Relative difference of a tensor: max|a − b| / max|b| (0 when both are 0); a quantity's figure is the
  worst over its tensors. Quantities: `loss`, `grad` (reduced gradients, gathered to full tensors),
  `grad_norm` (the global norm used for clipping), `param` (after the step), `bias` (the router's
  e_score_correction_bias after its update).
- Float32 throughout; default tolerance 1e-5. The reference runs single-threaded like the ranks, with the
  reference kernels (per-expert loop, attention with an explicit mask) whatever MEGATRON_R1_KERNELS
  selects for the layout (e.g. `MEGATRON_R1_KERNELS=experts:grouped megatron-r1 check-parallel ...`).
- adam_eps=1e-3 in the check: on a first step Adam's update is lr·g/(|g|+eps), which for |g| ~ eps
  amplifies float32 summation-order noise in g by ~1/eps (no layout is bit-exact); a larger eps keeps
  the update proportional to g for small gradients, so a wrong gradient or clip factor still shows.
- `--fp8 blockwise`: both sides train in block-scaled FP8 (and FP8 dispatch unless --dispatch-dtype says
  otherwise), and the tolerance is per quantity (FP8_TOL): loss and router bias at 1e-5, because forward
  and Dgrad quantise per row with tp shards on whole 128-blocks (config.validate_fp8_shards) — measured
  exact at pp2, ep2 and tp2; gradients at 0.125 = 2·2^-4 of max|g| (two E4M3 roundings), because Wgrad's
  1×128 tiles run along tokens and a layout moves where a rank's tokens end (measured 6.5e-2 at ep2, 0 at
  pp2, 8.0e-2 at tp2), grad norm 1e-2, params after the step 3e-2 (measured 1.6e-2 at tp2: float32 noise
  that flips one E4M3 rounding moves that element by 2^-4, and AdamW's first step passes it on).
- Several layouts with the same world size can share one spawn (`run_layouts`): new groups per layout.
- `replay_routes=True` gives every micro-batch random MoE routes (`routes`, [B, S, L, K], some tokens -1:
  route themselves) that both sides take instead of their own top-k: rollout routing replay, checked to
  slice correctly over cp/tp/sp/pp and to dispatch over ep.
- `--strict-device` runs every rank's training step under `engine/strict.py`'s guard: a tensor created
  without an explicit device, or a host transfer off its short allow-list, fails the check with its
  file:line (what would break or stall on a GPU, found on a CPU).
"""
from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_r1.config import Config, ConfigError, ParallelConfig, load_config

TOL = 1e-5
# --fp8 blockwise: per quantity (see the module doc). Forward and Dgrad quantise per row (1×128 tiles along
# the reduction dim, weight blocks that tp shards keep whole), so loss and routing stay at float32 noise;
# Wgrad's 1×128 tiles run along tokens and end where a rank's tokens end (ep gathers rows of several
# micro-batches on an expert, tp and cp split them), so a layout changes which tokens share a scale.
FP8_TOL = {"loss": 1e-5, "grad": 0.125, "grad_norm": 1e-2, "param": 3e-2, "bias": 1e-5}
QUANTITIES = ("loss", "grad", "grad_norm", "param", "bias")


# ----------------------------------------------------------------------------------------- layouts
def parse_layout(layout: str) -> tuple[ParallelConfig, int]:
    """"tp2,ep2,pp2,vpp2,cp1,sp,dp2,nozero" (or "pp2,first3,last1") -> (ParallelConfig, dp).

    dp defaults to the smallest degree that lets ep fold into tp·cp·dp (so "ep2" alone means dp2)."""
    par, dp = ParallelConfig(), None
    for item in filter(None, (s.strip() for s in layout.replace("·", ",").split(","))):
        if item == "sp":
            par.sp = True
        elif item == "nozero":
            par.zero1 = False
        else:
            m = re.fullmatch(r"(tp|cp|ep|pp|vpp|dp|first|last)(\d+)", item)
            if not m:
                raise ConfigError(f"layout item {item!r}: expected tpN, cpN, epN, ppN, vppN, dpN, firstN, lastN "
                                  f"(uneven first/last pipeline stages), sp or nozero")
            if m.group(1) == "dp":
                dp = int(m.group(2))
            elif m.group(1) in ("first", "last"):
                setattr(par, f"{m.group(1)}_stage_layers", int(m.group(2)))
            else:
                setattr(par, m.group(1), int(m.group(2)))
    if dp is None:
        dp = par.ep // math.gcd(par.ep, par.tp * par.cp)
    return par, dp


def world_size_of(layout: str) -> int:
    par, dp = parse_layout(layout)
    return par.tp * par.cp * par.pp * dp


# ------------------------------------------------------------------------------------------ data
def make_config(preset: str, overrides: list[str] = ()) -> Config:
    base = ["train.params_dtype=float32", "train.lr=1e-3", "train.adam_eps=1e-3", "train.weight_decay=0.1",
            "train.clip_grad=1.0", "model.bias_update_speed=0.01"]
    return load_config(preset, base + list(overrides))


def make_batch(cfg: Config, n_micro: int, micro_bs: int, seq: int, seed: int = 0,
               replay_routes: bool = False) -> list[dict]:
    """Global batch: n_micro micro-batches of [micro_bs, seq] random tokens with a random loss mask, and with
    `replay_routes` random given routes [micro_bs, seq, L, K] (K distinct experts; ~1/8 of tokens -1)."""
    # host tensors, as a data loader yields them (one CPU generator: the same batch for every layout); the
    # step moves each micro-batch to the mesh device
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    m = cfg.model
    for _ in range(n_micro):
        ids = torch.randint(0, m.vocab_size, (micro_bs, seq), generator=g, device="cpu")
        mask = (torch.rand(micro_bs, seq, generator=g, device="cpu") > 0.2).float()
        mb = {"input_ids": ids, "loss_mask": mask}
        if replay_routes:
            shape = (micro_bs, seq, m.num_hidden_layers)
            routes = torch.rand(*shape, m.n_routed_experts, generator=g, device="cpu").argsort(-1)
            routes = routes[..., :m.num_experts_per_tok]
            own = torch.rand(*shape, 1, generator=g, device="cpu") < 0.125
            mb["routes"] = routes.masked_fill(own, -1).to(torch.int16)
        out.append(mb)
    return out


def target_count(batch: list[dict]) -> float:
    """Global normaliser of lm_loss: masked next-token targets (position 0 is never a target)."""
    return float(sum(mb["loss_mask"][:, 1:].sum() for mb in batch))


# ------------------------------------------------------------------------------------- reference
def reference(cfg: Config, batch: list[dict]) -> dict:
    """One rank, plain PyTorch training step. Returns full tensors by name."""
    from megatron_r1 import kernels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same summation orders inside matmuls
    try:
        with kernels.using(experts="loop", attention="dense_mask"):  # the reference kernels, whatever is tested
            return _reference(cfg, batch)
    finally:
        torch.set_num_threads(threads)


def _reference(cfg: Config, batch: list[dict]) -> dict:
    from megatron_r1.ckpt.hf import model_state, per_expert
    from megatron_r1.model.deepseek_v3 import MoE, update_expert_bias
    from megatron_r1.model.gpt import CausalLM, lm_loss
    from megatron_r1.parallel.mesh import ParallelMesh
    from megatron_r1.engine.runtime import init_parameters

    mesh = ParallelMesh.single()
    from megatron_r1.kernels.fp8 import FP8Use
    model = CausalLM(cfg.model, mesh, fp8=FP8Use.from_config(cfg))
    init_parameters([model], mesh, cfg.train.seed)
    before = {k: v.detach().clone() for k, v in model_state(model).items()}
    n = target_count(batch)
    for mod in model.modules():
        if isinstance(mod, MoE):
            mod.aux_normalizer = float(sum(mb["input_ids"].shape[0] for mb in batch))
    loss_total = 0.0
    for mb in batch:
        loss, _ = lm_loss(model(mb["input_ids"], routes=mb.get("routes")), mb["input_ids"], mb["loss_mask"], cfg.model, mesh, n)
        loss.backward()
        loss_total += loss.item()
    params = dict(model.named_parameters())
    for p in params.values():  # an expert that got no token has no grad: Megatron (and we) treat it as 0
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = {k: g.clone() for k, g in per_expert(model, {k: p.grad for k, p in params.items()}).items()}
    t = cfg.train
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), t.clip_grad if t.clip_grad > 0 else float("inf"))
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    opt.step()
    update_expert_bias(model, mesh, cfg.model.bias_update_speed)
    after = {k: v.detach().clone() for k, v in model_state(model).items()}
    from megatron_r1.parallel.data import canonical_flat
    states = {f"optim.{s}.{k}": canonical_flat(t, model.placement[k].canonical_dim)  # per expert, as ZeRO saves it
              for s in ("exp_avg", "exp_avg_sq")
              for k, t in per_expert(model, {k: opt.state[p][s] for k, p in params.items()}).items()}
    return {"loss": loss_total, "grads": grads, "before": before, "after": after, "optim": states,
            "grad_norm": norm.item()}


# ------------------------------------------------------------------------------------ comparison
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return 0.0 if diff == 0 else diff / (scale if scale > 0 else 1e-30)


@dataclass
class Report:
    preset: str
    layout: str
    worst: dict = field(default_factory=dict)  # quantity -> (rel diff, tensor name)
    tol: float | dict = TOL  # one figure, or one per quantity (FP8_TOL)
    mesh: str = ""  # the degrees the ranks actually ran with

    def tol_of(self, q: str) -> float:
        return self.tol.get(q, TOL) if isinstance(self.tol, dict) else self.tol

    @property
    def ok(self) -> bool:
        return all(v[0] <= self.tol_of(q) for q, v in self.worst.items()) and set(self.worst) >= set(QUANTITIES)

    def __str__(self) -> str:
        tol = (", ".join(f"{q} {t:g}" for q, t in self.tol.items()) if isinstance(self.tol, dict) else f"{self.tol:g}")
        lines = [f"{self.preset} [{self.layout}] {self.mesh}: {'OK' if self.ok else 'FAILED'} (tolerance "
                 f"{tol}, rel = max|a-b| / max|b| per tensor)"]
        for q in QUANTITIES:
            if q in self.worst:
                v, name = self.worst[q]
                lines.append(f"  {q:<9} {v:9.2e}  {name}{'  <-- above tolerance' if v > self.tol_of(q) else ''}")
            else:
                lines.append(f"  {q:<9} missing")
        return "\n".join(lines)


def compare(ref: dict, loss: float, grad_norm: float, grads: dict, before: dict, after: dict, preset: str,
            layout: str, tol: float = TOL) -> Report:
    rep = Report(preset, layout, tol=tol)

    def worst(q, pairs):
        rep.worst[q] = max(((rel(a, b), name) for name, a, b in pairs), default=(0.0, "-"))

    rep.worst["loss"] = (rel(torch.tensor(loss), torch.tensor(ref["loss"])), "loss")
    # the global norm that clipping used: each unique element once (tp replicas, the MTP embedding copy)
    rep.worst["grad_norm"] = (rel(torch.tensor(grad_norm), torch.tensor(ref["grad_norm"])), "global grad norm")
    missing = sorted(set(ref["grads"]) ^ set(grads))
    if missing:
        raise AssertionError(f"{layout}: parameter sets differ: {missing[:5]}")
    worst("grad", [(k, grads[k], ref["grads"][k]) for k in ref["grads"]])
    params = [k for k in ref["grads"]]
    worst("param", [(k, after[k], ref["after"][k]) for k in params])
    biases = [k for k in ref["after"] if k.endswith("e_score_correction_bias")]
    worst("bias", [(k, after[k], ref["after"][k]) for k in biases] or [("(none)", torch.zeros(1), torch.zeros(1))])
    init = max((rel(before[k], ref["before"][k]) for k in ref["before"]), default=0.0)
    if init > 0:
        rep.worst["init"] = (init, "initial weights differ")
    return rep


# ----------------------------------------------------------------------------------------- ranks
def run_layout_on_rank(cfg: Config, layout: str, batch: list[dict], ref: dict | None,
                       strict_device: bool = False) -> Report | None:
    """Collective: every rank runs one training step of `layout`; rank 0 returns the comparison.
    `strict_device`: the step runs under the device guard (engine/strict.py)."""
    r = layout_step(cfg, layout, batch, strict_device)
    if dist.get_rank() != 0 or ref is None:
        return None
    rep = compare(ref, r["loss"], r["grad_norm"], r["grads"], r["before"], r["after"], "", layout)
    rep.mesh = r["mesh"]
    return rep


def layout_step(cfg: Config, layout: str, batch: list[dict], strict_device: bool = False) -> dict:
    """Collective: one training step of `layout`; loss, grad_norm and full tensors (grads, before, after)
    on every rank."""
    from megatron_r1.kernels import report as kernel_report
    from megatron_r1.model.gpt import lm_loss
    from megatron_r1.parallel.mesh import ParallelMesh
    from megatron_r1.engine.runtime import build_optimizer, build_parallel_model, gather_full_state, train_step

    par, dp = parse_layout(layout)
    par.grad_bucket_mb = cfg.parallel.grad_bucket_mb  # the layout gives the degrees; the rest stays configured
    cfg = copy.deepcopy(cfg)
    cfg.parallel = par
    world = dist.get_world_size()
    if world != par.tp * par.cp * par.pp * dp:
        raise ConfigError(f"layout {layout} needs {par.tp * par.cp * par.pp * dp} ranks, the world has {world}")
    mesh = ParallelMesh.build(par, cfg.model)
    chunks = build_parallel_model(cfg, mesh)
    before = gather_full_state(chunks, mesh)
    opt = build_optimizer(chunks, cfg, mesh)
    m = len(batch) // mesh.dp
    mine = batch[mesh.dp_rank * m:(mesh.dp_rank + 1) * m]
    n = target_count(batch)

    def loss_fn(out, mb):
        return lm_loss(out, mb["input_ids"], mb["loss_mask"], cfg.model, mesh, n)

    kernel_report(reset=True)
    if strict_device:
        from megatron_r1.engine.strict import StrictDevice
        with StrictDevice():
            metrics = train_step(chunks, opt, mine, loss_fn, mesh)
    else:
        metrics = train_step(chunks, opt, mine, loss_fn, mesh)
    opt.grads.gather_reduced_grads()
    grads = gather_full_state(chunks, mesh, grads=opt.grads)
    after = gather_full_state(chunks, mesh)
    rc = cfg.train.recompute
    desc = (f"(tp{mesh.tp} cp{mesh.cp} ep{mesh.ep} pp{mesh.pp} vpp{mesh.vpp} dp{mesh.dp} edp{mesh.edp}"
            f"{' sp' if mesh.sp else ''}{' zero1' if par.zero1 else ''}, {len(mine)} micro-batches/rank"
            f"{', recompute=' + rc if rc != 'none' else ''}; kernels "
            f"{' '.join(f'{k}={v}' for k, v in kernel_report().items())})")
    return {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "grads": grads, "before": before,
            "after": after, "mesh": desc}


def run_layouts(cfg: Config, layouts: list[str], batch: list[dict], ref: dict, strict_device: bool = False) -> list:
    """Rank body for several layouts of the same world size, one after the other."""
    return [run_layout_on_rank(cfg, lay, batch, ref, strict_device) for lay in layouts]


def default_batch(cfg: Config, layouts: list[str], replay_routes: bool = False) -> list[dict]:
    """The global batch every layout is checked on: 8 micro-batches of [2, S], S = 16 (or the next
    multiple of 2·cp·tp). Split over dp ranks that is still ≥ 2·pp micro-batches per rank for dp ≤ 2, so
    gradient accumulation and the steady 1F1B phase are exercised, and a multiple of pp for interleaving."""
    unit = 1
    for lay in layouts:
        par, _ = parse_layout(lay)
        unit = math.lcm(unit, 2 * par.cp * par.tp)
    return make_batch(cfg, 8, 2, -(-16 // unit) * unit, replay_routes=replay_routes)


def check_layouts(preset: str, layouts: list[str], overrides: list[str] = (), tol: float = TOL,
                  timeout: float = 300.0, verbose: bool = True, strict_device: bool = False,
                  replay_routes: bool = False) -> list[Report]:
    """Every layout against one rank; layouts of the same world size share one spawn."""
    from megatron_r1.parallel.spawn import run_ranks
    cfg = make_config(preset, list(overrides))
    batch = default_batch(cfg, layouts, replay_routes)
    from megatron_r1.parallel.mesh import validate_layout
    by_world: dict[int, list[str]] = {}
    from megatron_r1.config import validate_fp8_shards
    for lay in layouts:  # refuse a bad layout here, with the arithmetic, before spawning anything
        par, dp = parse_layout(lay)
        validate_layout(world_size_of(lay), par, cfg.model)
        if cfg.train.fp8 == "blockwise":
            validate_fp8_shards(cfg.model, par.tp)
        if len(batch) % dp:
            raise ConfigError(f"layout {lay}: dp={dp} does not divide the {len(batch)} micro-batches of the check")
        by_world.setdefault(world_size_of(lay), []).append(lay)
    ref = reference(cfg, batch)
    reports = {}
    for world, lays in by_world.items():
        for lay, rep in zip(lays, run_ranks(run_layouts, world, cfg, lays, batch, ref, strict_device, timeout=timeout)[0]):
            rep.preset, rep.tol = preset, tol
            reports[lay] = rep
            if verbose:
                print(rep, flush=True)
    return [reports[lay] for lay in layouts]


def check_layout(preset: str, layout: str, nproc: int | None = None, overrides: list[str] = (),
                 tol: float = TOL, timeout: float = 300.0, verbose: bool = True, strict_device: bool = False) -> Report:
    """Spawn the ranks of `layout` (nproc: extra ranks become dp), compare with one rank, print the report."""
    if nproc is not None and nproc != world_size_of(layout):
        par, _ = parse_layout(layout)
        model_par = par.tp * par.cp * par.pp
        if nproc % model_par or "dp" in layout:
            raise ConfigError(f"--nproc {nproc} does not match layout {layout} (tp·cp·pp = {model_par}, "
                              f"dp = nproc / {model_par})")
        layout = f"{layout},dp{nproc // model_par}"
    return check_layouts(preset, [layout], overrides, tol, timeout, verbose, strict_device)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 check-parallel",
                                 description="Compare a parallel layout with a single-rank run (loss, grads, "
                                             "params after one AdamW step).")
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--layout", required=True, help="e.g. tp2,ep2,pp2,vpp2,cp1,sp,dp2")
    ap.add_argument("--nproc", type=int, default=None, help="ranks (default: tp·cp·pp·dp of the layout)")
    ap.add_argument("--tol", type=float, default=None,
                    help=f"relative tolerance (default {TOL:g}; with --fp8 blockwise per quantity: {FP8_TOL})")
    ap.add_argument("--fp8", choices=["none", "blockwise"], default="none",
                    help="both sides train in block-scaled FP8 (train.fp8); the layout against one rank in FP8")
    ap.add_argument("--dispatch-dtype", choices=["bf16", "fp8"], default=None,
                    help="moe.dispatch_dtype on both sides (default: fp8 with --fp8 blockwise, else bf16)")
    ap.add_argument("--strict-device", action="store_true",
                    help="fail on any tensor made in the step without an explicit device, and on host transfers "
                         "(.item(), .tolist(), .cpu(), ...) off the allow-list in megatron_r1/engine/strict.py")
    ap.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                    help="activation recompute in the layout (the reference never recomputes); selective "
                         "uses train.recompute_modules, full train.recompute_num_layers (overrides)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.num_hidden_layers=8")
    args = ap.parse_args(argv)
    try:
        dispatch = args.dispatch_dtype or ("fp8" if args.fp8 == "blockwise" else "bf16")
        overrides = [f"train.recompute={args.recompute}", f"train.fp8={args.fp8}",
                     f"moe.dispatch_dtype={dispatch}"] + list(args.overrides)
        tol = args.tol if args.tol is not None else (FP8_TOL if args.fp8 == "blockwise" else TOL)
        rep = check_layout(args.preset, args.layout, args.nproc, overrides, tol=tol,
                           strict_device=args.strict_device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
