"""The causal language model: embedding → decoder blocks → norm → output head (+ MTP modules).

Notable features
- Parameter names ARE the Hugging Face names (`model.layers.3.self_attn.q_b_proj.weight`,
  `model.layers.5.mlp.experts.17.up_proj.weight`, `lm_head.weight`); a tensor-parallel parameter holds
  a contiguous slice, an expert-parallel rank holds only its experts (stored stacked, named per expert:
  model/experts.py). So `ckpt/hf.py` maps names once
  for loading, conversion and vLLM weight sync alike. Each model (chunk) carries its placement table
  (`model.placement`, parallel/placement.py: shard dim, reduction group, init, primary copy of each
  parameter), built once at construction from the layers' declarations.
- One class serves a whole model (pp=1) or one pipeline chunk: `layers` names the global layer
  indices it owns, `pre_process` adds the embedding, `post_process` the final norm, head and MTP.
- Multi-token prediction (DeepSeek-V3 §2.2), depth D, at `model.layers.{L+k-1}` like the release
  checkpoint: h'ᵏ = eh_proj([enorm(Emb(t_{i+k})); hnorm(hᵏ⁻¹_i)]), hᵏ = Block(h'ᵏ), logits from the
  shared head after `shared_head.norm`. Loss λ/D Σ_k CEᵏ. Embedding and head are shared with the main model.
- Residual layout: [B, S_l, H], S_l = this rank's tokens (S/cp, and /tp under sequence parallelism).
- Dense students (Qwen2 / Llama) use GQA attention with the same blocks.
- FP8 (`fp8`, from train.fp8 / moe.dispatch_dtype): the projections of every block, its MLP or experts run
  block-scaled FP8 GEMMs; the embedding, the head, MTP's eh_proj, norms and the router do not (DeepSeek-V3 §3.3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from megatron_r1.config import ModelConfig
from megatron_r1.kernels.fp8 import NO_FP8, FP8Use
from megatron_r1.model.common import MLP, RMSNorm, Rotary, attention
from megatron_r1.model.deepseek_v3 import MLA, MoE
from megatron_r1.parallel.context import cp_positions, gather_kv, query_chunks
from megatron_r1.parallel.mesh import ParallelMesh
from megatron_r1.parallel.placement import build_placement
from megatron_r1.parallel.recompute import NONE as NO_RECOMPUTE, Recompute, checkpoint_region
from megatron_r1.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                         init_std_scaled, tp_enter, tp_exit)


class GQA(nn.Module):
    """Grouped-query attention (Qwen2: q/k/v bias; Llama: none), heads and kv-heads split over tp."""

    def __init__(self, cfg: ModelConfig, mesh, out_std: float, recompute: Recompute = NO_RECOMPUTE,
                 fp8: FP8Use = NO_FP8):
        super().__init__()
        self.mesh, d, self.rc = mesh, cfg.dense_head_dim, recompute
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d, self.nh, self.nkv = d, nh // mesh.tp, nkv // mesh.tp
        f8, bias = fp8.linears, cfg.attention_bias
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, nh * d, mesh, bias=bias, fp8=f8)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, nkv * d, mesh, bias=bias, fp8=f8)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, nkv * d, mesh, bias=bias, fp8=f8)
        self.o_proj = RowParallelLinear(nh * d, cfg.hidden_size, mesh, std=out_std, fp8=f8)
        self.rotary = Rotary(d, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, interleaved=False)
        self.scale = d ** -0.5

    def forward(self, x, pos):
        x = tp_enter(x, self.mesh)
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.nh, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.nkv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.nkv, self.d).transpose(1, 2)
        cos, sin = self.rotary.cos_sin(pos)
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        k, v = gather_kv(k, self.mesh, 2), gather_kv(v, self.mesh, 2)
        rep = self.nh // self.nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = self.rc.run("core_attn", attention, q, k, v, self.scale, query_chunks(s, self.mesh))
        o = o.transpose(1, 2).reshape(b, s, self.nh * self.d)
        return tp_exit(self.o_proj(o), self.mesh)


def _residual_norm(dim: int, cfg: ModelConfig, mesh) -> RMSNorm:
    """A norm applied in the residual layout: under SP it sees a token shard, so its grad is partial
    (its owner lists it in `SP_PARTIAL`)."""
    return RMSNorm(dim, cfg.rms_norm_eps)


class Block(nn.Module):
    SP_PARTIAL = ("input_layernorm", "post_attention_layernorm")  # residual layout: a token shard under SP

    def __init__(self, cfg: ModelConfig, mesh, layer: int, recompute: Recompute = NO_RECOMPUTE,
                 fp8: FP8Use = NO_FP8):
        super().__init__()
        out_std = init_std_scaled(cfg.initializer_range, cfg.num_hidden_layers)
        self.rc = recompute
        self.input_layernorm = _residual_norm(cfg.hidden_size, cfg, mesh)
        self.self_attn = (MLA if cfg.is_mla else GQA)(cfg, mesh, out_std, recompute, fp8)
        self.post_attention_layernorm = _residual_norm(cfg.hidden_size, cfg, mesh)
        self.mlp = (MoE(cfg, mesh, out_std, recompute, fp8) if cfg.is_moe_layer(layer)
                    else MLP(cfg.hidden_size, cfg.intermediate_size, mesh, out_std=out_std, fp8=fp8.linears))
        self.mlp_kind = "moe" if cfg.is_moe_layer(layer) else "mlp"  # its recompute module name

    def forward(self, x, pos, routes=None, replay: bool = True):  # routes: [B, S_cp, K] given experts, or None
        rc = self.rc
        x = x + self.self_attn(rc.run("layernorm", self.input_layernorm, x), pos)
        h = rc.run("layernorm", self.post_attention_layernorm, x)
        if routes is not None and self.mlp_kind == "moe":
            return x + rc.run("moe", self.mlp, h, routes, replay)
        return x + rc.run(self.mlp_kind, self.mlp, h)


class SharedHead(nn.Module):
    SP_PARTIAL = ("norm",)

    def __init__(self, cfg, mesh):
        super().__init__()
        self.norm = _residual_norm(cfg.hidden_size, cfg, mesh)


class MTPLayer(Block):
    """One MTP module: the projection of [embedding of the token k ahead; previous depth's hidden] + a block."""
    SP_PARTIAL = Block.SP_PARTIAL + ("enorm", "hnorm", "eh_proj")

    def __init__(self, cfg: ModelConfig, mesh, layer: int, recompute: Recompute = NO_RECOMPUTE,
                 fp8: FP8Use = NO_FP8):
        super().__init__(cfg, mesh, layer, recompute, fp8)
        self.enorm = _residual_norm(cfg.hidden_size, cfg, mesh)
        self.hnorm = _residual_norm(cfg.hidden_size, cfg, mesh)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        nn.init.normal_(self.eh_proj.weight, std=cfg.initializer_range)
        self.shared_head = SharedHead(cfg, mesh)

    def forward(self, h_prev, emb, pos):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return super().forward(x, pos)


@dataclass
class StageOutput:
    """What the last pipeline stage returns: vocab-sharded logits for this rank's positions."""
    logits: torch.Tensor  # [B, S/cp, V/tp] main head
    mtp_logits: list  # D × [B, S/cp, V/tp]; position p of depth k predicts token p+k+1
    positions: torch.Tensor  # [S/cp] global positions of the rows


class CausalLM(nn.Module):
    SP_PARTIAL = ("model.norm",)

    def __init__(self, cfg: ModelConfig, mesh: ParallelMesh | None = None, layers: list[int] | None = None,
                 pre_process: bool = True, post_process: bool = True, recompute: Recompute = NO_RECOMPUTE,
                 fp8: FP8Use = NO_FP8):
        super().__init__()
        mesh = mesh or ParallelMesh.single()
        self.cfg, self.mesh, self.rc = cfg, mesh, recompute
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_ids = list(range(cfg.num_hidden_layers)) if layers is None else list(layers)
        self.mtp_depth = cfg.num_nextn_predict_layers if post_process else 0
        self.use_mtp = True  # RL turns it off: its losses use only the main head
        self.model = nn.Module()
        needs_embed = pre_process or self.mtp_depth > 0
        if needs_embed:
            self.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, mesh, cfg.initializer_range)
        blocks = {str(i): Block(cfg, mesh, i, recompute, fp8) for i in self.layer_ids}
        for k in range(self.mtp_depth):
            blocks[str(cfg.num_hidden_layers + k)] = MTPLayer(cfg, mesh, cfg.num_hidden_layers + k, recompute, fp8)
        self.model.layers = nn.ModuleDict(blocks)
        if post_process:
            self.model.norm = _residual_norm(cfg.hidden_size, cfg, mesh)
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, mesh, std=cfg.initializer_range)
            if cfg.tie_word_embeddings:
                if not pre_process:
                    raise ValueError("tie_word_embeddings with pipeline parallelism is not supported")
                self.lm_head.weight = self.model.embed_tokens.weight
        # with MTP and pp > 1 the last stage keeps a copy of the embedding: initialised identically, its
        # gradient summed with stage 0's over the "embed" group; stage 0's is the primary
        shared = ("model.embed_tokens.weight",) if needs_embed and mesh.pp > 1 and cfg.num_nextn_predict_layers else ()
        self.placement = build_placement(self, mesh, cfg.initializer_range, shared=shared,
                                         copies=shared if not pre_process else ())

    # ------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor | None = None, with_mtp: bool = True,
                routes: torch.Tensor | None = None, replay_routes: bool = True):
        """input_ids: [B, S] the whole sequence (every stage and cp rank gets it).
        routes: None, or [B, S, L, K] expert ids per token and global layer for the MoE layers to take
        instead of their own top-k (rollout routing replay; -1 = route that token itself). Like the ids,
        every stage and cp rank gets the whole tensor and slices its positions and layers. `replay_routes=False`
        only counts where the model's own top-k differs (`Router.route_flips`).

        Returns hidden [B, S_l, H] on a non-last stage, else a StageOutput."""
        mesh = self.mesh
        pos = cp_positions(input_ids.shape[1], mesh, device=input_ids.device)  # [S/cp]
        pos_b = pos.unsqueeze(0).expand(input_ids.shape[0], -1)
        if self.pre_process:
            h = self.model.embed_tokens(input_ids[:, pos])
        else:
            h = hidden
        if routes is not None:
            routes = routes[:, pos]  # [B, S/cp, L, K] this cp rank's positions
        for j, i in enumerate(self.layer_ids):  # full recompute: a block keeps only its input
            layer = self.model.layers[str(i)]
            r = None if routes is None else routes[:, :, i]
            if self.rc.full_layer(j):
                h = checkpoint_region(layer, h, pos_b, r, replay_routes)
            else:
                h = layer(h, pos_b, r, replay_routes)
        if not self.post_process:
            return h
        logits = self.lm_head(tp_enter(self.model.norm(h), mesh))
        mtp_logits = []
        if with_mtp and self.use_mtp and self.mtp_depth:
            s = input_ids.shape[1]
            for k in range(1, self.mtp_depth + 1):
                ahead = (pos + k).clamp(max=s - 1)  # the last k positions have no token k ahead (masked in the loss)
                emb = self.model.embed_tokens(input_ids[:, ahead])
                layer = self.model.layers[str(self.cfg.num_hidden_layers + k - 1)]
                full = self.rc.full_layer(len(self.layer_ids) + k - 1)  # MTP blocks count after the chunk's own
                h = checkpoint_region(layer, h, emb, pos_b) if full else layer(h, emb, pos_b)
                mtp_logits.append(self.lm_head(tp_enter(layer.shared_head.norm(h), mesh)))
        return StageOutput(logits, mtp_logits, pos)

    @torch.no_grad()
    def full_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S, V] logits of a whole (pp=1, cp=1) model: for inference and tests."""
        from megatron_r1.parallel.tensor import gather_vocab
        return gather_vocab(self.forward(input_ids, with_mtp=False).logits, self.mesh)


def lm_loss(out: StageOutput, input_ids: torch.Tensor, loss_mask: torch.Tensor | None, cfg: ModelConfig, mesh,
            normalizer: float) -> tuple[torch.Tensor, dict]:
    """Next-token CE summed over this rank's targets / `normalizer` (the global target count), + λ·MTP.

    loss_mask: [B, S] 1 where token t counts as a prediction target (None: all). Because every rank
    divides by the same global count, gradients simply add up over micro-batches, dp and cp ranks."""
    from megatron_r1.parallel.tensor import vocab_parallel_cross_entropy
    s = input_ids.shape[1]
    mask = torch.ones_like(input_ids, dtype=torch.float32) if loss_mask is None else loss_mask.float()

    def ce_sum(logits, shift):
        tgt_pos = out.positions + shift
        valid = (tgt_pos < s).float()
        tgt_pos = tgt_pos.clamp(max=s - 1)
        target = input_ids[:, tgt_pos]
        w = mask[:, tgt_pos] * valid
        return (vocab_parallel_cross_entropy(logits, target, mesh) * w).sum(), w.sum()

    main, count = ce_sum(out.logits, 1)
    loss = main / normalizer
    metrics = {"lm_loss_sum": main.detach(), "tokens": count.detach()}
    if out.mtp_logits:
        d = len(out.mtp_logits)
        for k, lg in enumerate(out.mtp_logits, start=1):
            mk, _ = ce_sum(lg, k + 1)
            # the depth-k targets are the main targets minus the last k positions; normalise by the same count
            loss = loss + cfg.mtp_loss_weight / d * mk / normalizer
            metrics[f"mtp{k}_loss_sum"] = mk.detach()
    return loss, metrics
