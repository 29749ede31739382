"""DeepSeek-V3: Multi-head Latent Attention and DeepSeekMoE, in the paper's order.

Notable features
- MLA: queries through a low-rank bottleneck (q_a → norm → q_b); keys and values from one compressed
  latent c_kv (kv_a → norm → kv_b) plus a decoupled RoPE key shared by all heads. Softmax scale
  1/√(d_nope + d_rope) times YaRN's mscale². Heads are split over tp; the low-rank projections are
  replicated (their gradients are partial and summed over tp). Under cp the latent is gathered.
- DeepSeekMoE: 1 shared expert + top-k of n routed experts. Sigmoid affinities; the selection adds a
  per-expert bias (aux-loss-free balancing, `noaux_tc`) and is group-limited (top `topk_group` of
  `n_group` groups, a group scored by the sum of its top-2); gate weights are the *unbiased* scores of
  the chosen experts, normalised and multiplied by `routed_scaling_factor`.
- Balancing: after each optimizer step bias_i += γ·sign(mean load − load_i) (`update_expert_bias`),
  loads summed over every rank of the pipeline stage; optional sequence-wise balance loss α·Σ f_i·P_i,
  attached to the activations so it backpropagates without threading a second loss through the pipeline.
- Routing replay (R3): `MoE.forward(x, routes)` takes given experts per token (the rollout engine's)
  instead of its top-k; the gate weights are still the chosen experts' sigmoid scores (the router keeps
  its gradient), and the bias is untouched (it moves only in `update_expert_bias`, counting the loads
  actually routed). Routes arrive in cp layout and are cut to the MoE's tp token shard here.
- Tokens: the MoE runs on a token shard (split over tp when tp > 1), experts folded over ep; a rank's
  experts are stacked weights (model/experts.py), still named one per expert outside it.
Shapes: B batch, S sequence, H hidden, N local heads, E experts, K experts per token.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_r1.config import ModelConfig
from megatron_r1.kernels.fp8 import NO_FP8, FP8Use
from megatron_r1.model.common import MLP, RMSNorm, Rotary, attention, yarn_get_mscale
from megatron_r1.model.experts import GroupedExperts
from megatron_r1.parallel.context import gather_kv, query_chunks
from megatron_r1.parallel.expert import moe_dispatch_combine
from megatron_r1.parallel.recompute import NONE as NO_RECOMPUTE, Recompute, checkpoint_region, recomputing
from megatron_r1.parallel.tensor import (ColumnParallelLinear, Linear, RowParallelLinear, _all_reduce,
                                         copy_to_region, gather_from_region, reduce_from_region, scatter_to_region,
                                         tp_enter, tp_exit)


# -------------------------------------------------------------------------------------------- MLA
class MLA(nn.Module):
    # replicated over tp; each tp rank back-propagates only its heads' share into them (partial gradients)
    TP_PARTIAL = ("q_a_proj", "q_a_layernorm", "kv_a_proj_with_mqa", "kv_a_layernorm")

    def __init__(self, cfg: ModelConfig, mesh, out_std: float, recompute: Recompute = NO_RECOMPUTE,
                 fp8: FP8Use = NO_FP8):
        super().__init__()
        self.mesh, self.cfg, self.rc = mesh, cfg, recompute
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        self.n_local = nh // mesh.tp
        f8 = fp8.linears  # every projection; the attention core and the norms stay in the params dtype
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, bias=cfg.attention_bias, fp8=f8)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, nh * cfg.qk_head_dim, mesh, fp8=f8)
        else:
            self.q_proj = ColumnParallelLinear(h, nh * cfg.qk_head_dim, mesh, fp8=f8)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias, fp8=f8)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), mesh,
                                              fp8=f8)
        self.o_proj = RowParallelLinear(nh * cfg.v_head_dim, h, mesh, std=out_std, fp8=f8)
        for lin in (getattr(self, "q_a_proj", None), self.kv_a_proj_with_mqa):
            if lin is not None:
                nn.init.normal_(lin.weight, std=cfg.initializer_range)
        self.rotary = Rotary(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings,
                             interleaved=cfg.rope_interleave)
        self.scale = cfg.qk_head_dim ** -0.5
        rs = cfg.rope_scaling or {}
        if rs.get("mscale_all_dim"):
            m = yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
            self.scale *= m * m

    def forward(self, x, pos):  # x: [B, S_l, H] residual layout; pos: [B, S] global positions of this cp rank
        cfg = self.cfg
        x = tp_enter(x, self.mesh)  # [B, S, H]
        q_lat = self.q_a_proj(x) if cfg.q_lora_rank else self.q_proj(x)  # [B, S, Cq] (or q itself)
        kv_nope, k_rot = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        if self.rc.selects("mla_up_proj"):  # keep the latents only: q, k, v are rebuilt, the attention re-run
            o = checkpoint_region(self._up_and_attend, q_lat, kv_nope, k_rot, pos, False)
        else:
            o = self._up_and_attend(q_lat, kv_nope, k_rot, pos, self.rc.selects("core_attn"))
        return tp_exit(self.o_proj(o), self.mesh)

    def _up_and_attend(self, q_lat, kv_nope, k_rot, pos, recompute_core: bool):
        """Latents -> norms, up-projections, RoPE, cp gather -> attention output [B, S, N·Dv]."""
        cfg = self.cfg
        b, s, _ = q_lat.shape
        q = self.q_b_proj(self.q_a_layernorm(q_lat)) if cfg.q_lora_rank else q_lat
        q = q.view(b, s, self.n_local, cfg.qk_head_dim).transpose(1, 2)  # [B, N, S, Dqk]
        q_nope, q_rot = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(kv_nope)  # [B, S, C] the compressed latent
        cos, sin = self.rotary.cos_sin(pos)
        q_rot = self.rotary.apply(q_rot, cos, sin)
        k_rot = self.rotary.apply(k_rot.unsqueeze(1), cos, sin)  # [B, 1, S, Dr]
        # context parallel: every rank needs the latents of the whole sequence (small: C + Dr per token)
        c_kv, k_rot = gather_kv(c_kv, self.mesh, 1), gather_kv(k_rot, self.mesh, 2)
        sk = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(b, sk, self.n_local, cfg.qk_nope_head_dim + cfg.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(-1, self.n_local, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        chunks = query_chunks(s, self.mesh)
        if recompute_core:
            o = checkpoint_region(attention, q, k, v, self.scale, chunks)
        else:
            o = attention(q, k, v, self.scale, chunks)  # [B, N, S, Dv]
        return o.transpose(1, 2).reshape(b, s, self.n_local * cfg.v_head_dim)


# -------------------------------------------------------------------------------------- router / MoE
class Router(nn.Module):
    """Sigmoid affinities, biased group-limited top-k selection, unbiased normalised weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size).normal_(std=cfg.initializer_range))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        # tokens routed to each expert since the last bias update (this rank only; summed at update time)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        # tokens given routes, and of those the ones whose own top-k differs (routing replay; since the last reset)
        self.register_buffer("route_flips", torch.zeros(2), persistent=False)

    def reset_buffers(self):
        """After materialising from `meta` (parallel/placement.py): no bias, no counts yet."""
        self.e_score_correction_bias.zero_()
        self.tokens_per_expert.zero_()
        self.route_flips.zero_()

    def forward(self, x, given=None, replay: bool = True):  # x: [T, H] -> weights [T, K], indices [T, K], scores [T, E]
        """given: None, or [T, K] expert ids to use instead of the top-k (routing replay); a token with any
        id < 0 keeps its own selection. The weights are the chosen experts' scores either way, so the router
        still learns through them; the bias only ever moves in `update_expert_bias`. `replay=False` only
        counts the tokens whose own top-k differs from the given routes (`route_flips`)."""
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores.detach() + self.e_score_correction_bias
        e, g = cfg.n_routed_experts, cfg.n_group
        group_scores = choice.view(-1, g, e // g).topk(2, dim=-1).values.sum(-1)  # [T, G]
        groups = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, groups, 1.0).bool()
        expert_mask = group_mask.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e)
        idx = choice.masked_fill(~expert_mask, float("-inf")).topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
        if given is not None:
            given = given.to(idx.dtype)
            has = (given >= 0).all(-1, keepdim=True)  # [T, 1]
            if not recomputing():  # as sets: vLLM's order of the k experts is its own
                differs = (given.sort(-1).values != idx.sort(-1).values).any(-1, keepdim=True) & has
                self.route_flips += torch.stack([has.sum(), differs.sum()]).to(self.route_flips.dtype)
            if replay:
                idx = torch.where(has, given, idx)
        w = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        if self.training and torch.is_grad_enabled() and not recomputing():
            self.tokens_per_expert += torch.bincount(idx.reshape(-1), minlength=e).to(self.tokens_per_expert.dtype)
        return w * cfg.routed_scaling_factor, idx, scores


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on x; the backward also seeds d(total loss)/d(aux) = 1 (Megatron's MoEAuxLossAutoScaler)."""
    @staticmethod
    def forward(ctx, x, aux):
        ctx.save_for_backward(aux)
        return x

    @staticmethod
    def backward(ctx, g):
        (aux,) = ctx.saved_tensors
        return g, torch.ones_like(aux)


class MoE(nn.Module):
    TP_PARTIAL = ("gate", "shared_experts")  # replicated over tp, each tp rank routes a different token shard
    EXPERTS = ("experts",)  # whole on their ep rank, reduced over the expert-data-parallel group

    def __init__(self, cfg: ModelConfig, mesh, out_std: float, recompute: Recompute = NO_RECOMPUTE,
                 fp8: FP8Use = NO_FP8):
        super().__init__()
        self.cfg, self.mesh, self.rc, self.fp8 = cfg, mesh, recompute, fp8
        self.gate = Router(cfg)  # the router stays in float32 (DeepSeek-V3 keeps the MoE gate out of FP8)
        per = cfg.n_routed_experts // mesh.ep
        first = mesh.ep_rank * per
        self.local_ids = list(range(first, first + per))
        self.experts = GroupedExperts(cfg.hidden_size, cfg.moe_intermediate_size, self.local_ids, out_std,
                                      recompute.selects("moe_act"), fp8=fp8.linears)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, mesh,
                                   parallel=False, out_std=out_std, recompute_act=recompute.selects("moe_act"),
                                   fp8=fp8.linears)
                               if cfg.n_shared_experts else None)
        self.aux_normalizer = 1.0  # global number of sequences (a device tensor); set by the runtime each step
        self.last_aux_loss = None  # the last forward's sequence-balance loss (detached), when it is on

    def forward(self, x, routes=None, replay: bool = True):  # x: [B, S_l, H] residual layout; routes: [B, S/cp, K]
        split = self.mesh.tp > 1 and not self.mesh.sp  # replicated tokens: each tp rank takes a shard
        if split:
            x = scatter_to_region(x, self.mesh.tp_group, dim=1)
        if routes is not None and self.mesh.tp > 1:  # the same token shard as x (SP's or the split's)
            routes = routes.chunk(self.mesh.tp, dim=1)[self.mesh.tp_rank]
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        w, idx, scores = self.gate(flat, None if routes is None else routes.reshape(b * s, -1), replay)
        out = moe_dispatch_combine(flat, idx, w, self.experts, self.cfg.n_routed_experts, self.mesh,
                                   fp8_dispatch=self.fp8.dispatch)
        if self.shared_experts is not None:
            out = out + self.rc.run("shared_experts", self.shared_experts, flat)
        out = out.view(b, s, h)
        if self.cfg.aux_loss_alpha > 0 and self.training and torch.is_grad_enabled():
            out = _AttachAuxLoss.apply(out, self._sequence_balance_loss(idx.view(b, s, -1), scores.view(b, s, -1)))
        if split:
            out = gather_from_region(out, self.mesh.tp_group, dim=1)
        return out.to(x.dtype)

    def _sequence_balance_loss(self, idx, scores):
        """α Σ_i f_i P_i per sequence, summed over sequences / global sequence count.

        A sequence is spread over the tp (token shards) and cp ranks: the partial counts and
        probabilities are summed over that group; each rank adds 1/|group| of the result."""
        cfg, mesh = self.cfg, self.mesh
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        group = mesh.group("tp_cp")
        dev = scores.device
        counts = torch.zeros(idx.shape[0], e, device=dev).scatter_add_(
            1, idx.reshape(idx.shape[0], -1), torch.ones(idx.shape[0], idx.shape[1] * k, device=dev))
        probs = (scores / scores.sum(-1, keepdim=True)).sum(1)  # [B, E] partial sums over local tokens
        tokens = torch.full((), float(idx.shape[1]), device=dev)
        counts, tokens = _all_reduce(counts, group), _all_reduce(tokens, group)
        probs = copy_to_region(reduce_from_region(probs, group), group)
        f = counts * e / (k * tokens)
        p = probs / tokens
        n = 1 if group is None else dist.get_world_size(group)
        loss = cfg.aux_loss_alpha * (f * p).sum() / self.aux_normalizer / n
        self.last_aux_loss = loss.detach()
        return loss


@torch.no_grad()
def update_expert_bias(model: nn.Module, mesh, speed: float) -> dict:
    """Aux-loss-free balancing step: bias_i += γ·sign(mean load − load_i), loads over the whole stage.

    Returns the max-violation of the loads before the update (max load / mean load − 1), for logging, as a
    0-d device tensor: no host sync here (a router that saw no token is left alone, on the device too)."""
    worst = None
    for m in model.modules():
        if isinstance(m, Router):
            load = _all_reduce(m.tokens_per_expert.clone(), mesh.stage_group)
            seen = load.sum() > 0
            viol = torch.where(seen, load.max() / load.mean() - 1, 0.0)
            worst = viol if worst is None else torch.maximum(worst, viol)
            if speed > 0:
                m.e_score_correction_bias += torch.where(seen, speed * torch.sign(load.mean() - load), 0.0)
            m.tokens_per_expert.zero_()
    return {"moe_max_violation": worst if worst is not None else 0.0}
