"""Parallel layout planner: per-GPU memory, pipeline bubble and all-to-all volume of a layout, on paper.

`tools/plan_parallel.py` is the command line; `make_plan(model, PlanOptions(...))` is the library. Nothing
here touches a device or a process group: a 2048-GPU layout is planned on a laptop.

Notable choices (the report states each formula it uses)
- Layout: dp = gpus / (tp·cp·pp); experts use MoE parallel folding (mesh.py), edp = tp·cp·dp / ep.
  Degrees go through `mesh.validate_layout` — except its even-split rule (num_hidden_layers divisible by
  pp·vpp), which the planner replaces by Megatron's uneven first/last stages
  (`--decoder-first-pipeline-num-layers` / `--decoder-last-pipeline-num-layers`): the middle stages
  split the rest evenly, every stage's count divisible by vpp. NB the runtime still needs even splits.
- Auto split: the even split when num_hidden_layers divides by pp·vpp (best compute balance, and all the
  runtime supports today); otherwise middle stages get c = ⌈layers/pp⌉ each and first, last <= c share
  the rest; of those, the split with the smallest worst-stage memory (ties: smaller spread of counts).
  The first stage holds the embedding and the most in-flight micro-batches; the last the final norm,
  the output head, the MTP module(s) and their logits.
- Parameters per GPU follow how model/ builds them: TP-split matrices / tp (MLA q_b, kv_b, o; GQA q, k, v,
  o; dense FFN; vocab rows of embedding and head); MLA low-rank a-projections, norms, the router, the
  shared experts and MTP's eh_proj replicated over tp; routed experts / ep (whole experts, no TP).
  With MTP and pp > 1 the last stage keeps a copy of the embedding (grads summed with stage 0), so that
  copy is memory but not a unique parameter.
- Memory, decimal GB (1e9 bytes), of each stage's GPU; the report is the worst stage:
    weights      P · bytes(param_dtype)
    grads        P · bytes(grad_dtype)          full buffer on every rank (ZeRO-1 shards optimizer states only;
                                                Megatron's default: fp32 main grads)
    master       P_opt · bytes(master_dtype)    none when master_dtype == param_dtype
    adam m, v    P_opt · 2 · bytes(optimizer_dtype)
    P_opt = P_dense / (dp·cp) + P_expert / edp under ZeRO-1 (Megatron shards over dp×cp), else P.
    activations  n_inflight · A_stage (+ one layer's full activations under full recompute)
    reserved     a fixed allowance (CUDA context, NCCL buffers, allocator fragmentation), --reserved-gb
- In-flight micro-batches of pipeline stage s (0-based), m micro-batches per step:
    1F1B         min(pp − s, m)
    interleaved  min(2·(pp − s − 1) + (vpp − 1)·pp + 1, m·vpp) model chunks, each ≈ A_stage / vpp
                 (Megatron's warm-up count + 1, all m·vpp when m == pp; chunks assumed equal in size)
  Both match the peak of outstanding forwards in pipeline.py's schedules (tested).
- Activations per layer per micro-batch (Korthikanti et al. 2022, "Reducing Activation Recomputation",
  Megatron's accounting: every tensor an op keeps for backward, bf16 = 2 bytes, no dropout in these
  models, flash attention so no s² term), adapted to MLA and MoE. t = b·s/cp tokens of this rank,
  r = tp under sequence parallelism else 1 (the residual layout), T = tp (heads, vocab and the MoE's
  token shard):
    MLA   2h·t/r (norm in) + 2h·t/r (norm out) + 2·(2·q_lora + 2·kv_lora + d_rope)·t (latents before and
          after their norms) + 2·nh·(2·d_qk + 2·d_v)·t/T (q, k, v, attention output) + 4·nh·t/T (fp32 lse)
    GQA   4h·t/r + 2·(nh + 2·n_kv)·d·t/T (q, k, v) + 2·nh·d·t/T (output) + 4·nh·t/T
    FFN   4h·t/r (norm in, out) + 4·f·t/T (gate, up outputs) + 2·f·t/T (SwiGLU product), f = FFN width
    MoE   2h·t/r (norm in) + 2h·t/T (norm out) + 4·E·t/T (fp32 router scores)
          + k·t/T · (h·bytes(dispatch) + 4·f_e + 2·f_e + 2h)   routed copies: the dispatched inputs, gate/up
                                                               outputs, SwiGLU product, expert outputs
          + 6·f_s·t/T                                          shared expert (f_s = n_shared · f_e)
          With EP the routed copies land on other ranks, but balanced routing gives every rank k·t/T copies.
          Expert outputs are kept because expert.py applies the router weights after the combine.
    head  2h·t/r + 2h·t/r + 6·V·t/T (bf16 logits + the fp32 log-softmax of the cross-entropy), last stage
    MTP   per depth: 2·2h·t/r (enorm, hnorm in) + 4h·t (eh_proj in) + one MoE layer + a head's logits
  Recompute uses the runtime's setting and module list (train.recompute*, parallel/recompute.py).
  recompute=selective drops the terms of each listed module: layernorm the norm outputs, mla_up_proj the
  normed latents and q, k, v, core_attn the fp32 lse, moe_act the SwiGLU products of routed and shared
  experts, mlp a dense FFN's, shared_experts the shared expert's, moe everything of the MoE but its input.
  The default list (layernorm, mla_up_proj, moe_act) is DeepSeek-V3's recipe (tech report: memory saving,
  low-precision storage); with dispatch_dtype=fp8 the dispatched copies are kept in FP8 as DeepSeek does.
  recompute=full keeps only the input (2h·t/r) of the first recompute_num_layers blocks of each chunk (all
  when unset; MTP blocks count after the chunk's own) and adds one layer's full activations as the
  backward working set; the head and MTP's projections are not recomputed. The planner assumes fused
  kernels (a norm keeps its input, flash attention no s² term): the torch reference norms hold float32
  internals that `layernorm` recompute drops instead.
  Not modelled: activation gradients in flight, all-to-all and p2p buffers (covered by the reserve).
- Pipeline bubble (idle fraction of a step): 1F1B (pp−1)/(m + pp − 1); interleaved with v = vpp
  ((pp−1)/v) / (m + (pp−1)/v) (Narayanan et al. 2021: the bubble time shrinks by v).
- All-to-all, bytes a GPU sends per token per MoE layer, uniform routing over ep ranks:
    dispatch k·b_d·(ep−1)/ep, combine k·h·2·(ep−1)/ep (combine stays bf16); b_d = 2h for bf16, and for fp8
    h code bytes + 4·⌈h/128⌉ bytes of float32 scales (kernels/fp8.py dispatch_bytes_per_token, what
    parallel/expert.py sends with moe.dispatch_dtype=fp8).
  Per step per GPU: tokens (b·s/(cp·tp) per micro-batch, × m) × MoE layers of the stage × passes:
  forward (dispatch + combine), backward (the same volume in bf16), and with full recompute a second
  forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_r1.kernels.fp8 import dispatch_bytes_per_token
from megatron_r1.config import DEFAULT_RECOMPUTE_MODULES, RECOMPUTE_MODULES, ConfigError, ModelConfig, ParallelConfig
from megatron_r1.parallel.mesh import stage_layer_counts, validate_layout

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
GB = 1e9


@dataclass
class PlanOptions:
    gpus: int
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int | None = None  # None: 4·pp micro-batches per data-parallel rank
    schedule: str | None = None  # 1f1b | interleaved; None: interleaved when vpp > 1
    recompute: str = "none"  # none | selective | full (train.recompute)
    recompute_modules: tuple | None = None  # selective: train.recompute_modules (None: the default list)
    recompute_num_layers: int | None = None  # full: blocks recomputed per chunk (None: all)
    param_dtype: str = "bf16"
    grad_dtype: str = "fp32"  # Megatron's default main grads
    master_dtype: str = "fp32"
    optimizer_dtype: str = "fp32"  # Adam m and v
    dispatch_dtype: str = "bf16"  # token dispatch of the MoE all-to-all: moe.dispatch_dtype (DeepSeek-V3: fp8)
    first_stage_layers: int | None = None  # None with last None: auto split
    last_stage_layers: int | None = None
    gpu_mem_gb: float = 80.0
    reserved_gb: float = 4.0


@dataclass
class Params:
    """Parameter counts of one GPU's shard, by how they are sharded."""
    tp_split: float = 0  # per GPU (already / tp)
    replicated: float = 0  # replicated over tp
    expert: float = 0  # per GPU (already / ep)

    @property
    def dense(self) -> float:
        return self.tp_split + self.replicated

    @property
    def total(self) -> float:
        return self.dense + self.expert

    def __add__(self, o: "Params") -> "Params":
        return Params(self.tp_split + o.tp_split, self.replicated + o.replicated, self.expert + o.expert)


@dataclass
class StagePlan:
    stage: int
    layers: list  # global decoder layer ids
    extras: list  # "embedding", "embedding copy", "final norm", "head", "mtp"
    params: Params
    unique_params: float  # params of this stage summed over its tp·ep ranks, embedding copy excluded
    inflight: float  # micro-batches' worth of A_stage held at the peak
    act_per_microbatch: float  # bytes, A_stage
    memory: dict  # name -> bytes per GPU
    moe_layers: int

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values())


@dataclass
class Plan:
    model_name: str
    model: ModelConfig
    opts: PlanOptions
    schedule: str
    dp: int
    edp: int
    microbatches: int
    global_batch_size: int
    split: list  # layers per stage
    split_mode: str  # explicit | auto | even
    stages: list  # StagePlan
    bubble: float
    bubble_formula: str
    a2a_per_token_layer: dict  # bytes a GPU sends per token per MoE layer (forward)
    a2a_per_step: dict  # bytes a GPU sends per step (worst stage)
    notes: list = field(default_factory=list)

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total_bytes)

    @property
    def fits(self) -> bool:
        return self.worst.total_bytes <= self.opts.gpu_mem_gb * GB


# ------------------------------------------------------------------------------------- parameters
def _attn_params(m: ModelConfig) -> Params:
    h, nh = m.hidden_size, m.num_attention_heads
    if m.is_mla:
        rep = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank  # kv_a_proj_with_mqa + kv_a_layernorm
        split = m.kv_lora_rank * nh * (m.qk_nope_head_dim + m.v_head_dim) + nh * m.v_head_dim * h  # kv_b, o
        if m.q_lora_rank:
            rep += h * m.q_lora_rank + m.q_lora_rank  # q_a_proj + q_a_layernorm
            split += m.q_lora_rank * nh * m.qk_head_dim  # q_b_proj
        else:
            split += h * nh * m.qk_head_dim
        return Params(tp_split=split, replicated=rep)
    d, nkv = m.dense_head_dim, m.num_key_value_heads
    bias = (nh + 2 * nkv) * d if m.attention_bias else 0
    return Params(tp_split=h * nh * d + 2 * h * nkv * d + bias + nh * d * h)


def _layer_params(m: ModelConfig, layer: int) -> Params:
    """Unsharded counts of one decoder layer (an MTP block is layer >= num_hidden_layers)."""
    h = m.hidden_size
    p = _attn_params(m) + Params(replicated=2 * h)  # input and post-attention norms
    if not m.is_moe_layer(layer):
        return p + Params(tp_split=3 * h * m.intermediate_size)
    e, f = m.n_routed_experts, m.moe_intermediate_size
    return p + Params(replicated=e * h + 3 * h * f * m.n_shared_experts, expert=e * 3 * h * f)


def _shard(p: Params, tp: int, ep: int) -> Params:
    return Params(p.tp_split / tp, p.replicated, p.expert / ep)


def _unique(p: Params, tp: int, ep: int) -> float:
    """Unique parameters of a per-GPU shard, counted once over the tp·ep ranks that hold the pieces."""
    return p.tp_split * tp + p.replicated + p.expert * ep


# ------------------------------------------------------------------------------------- activations
def _layer_activation(m: ModelConfig, layer: int, t: float, tp: int, r: int, recompute: str,
                      dispatch_bytes: int, modules=None) -> float:
    """Bytes one layer keeps for backward per micro-batch (formulas in the module docstring).

    recompute=selective drops the tensors of the listed modules (config.RECOMPUTE_MODULES; None: the
    runtime's default, config.DEFAULT_RECOMPUTE_MODULES); "full" is handled by the caller."""
    h, nh, T = m.hidden_size, m.num_attention_heads, tp
    drop = set()
    if recompute == "selective":
        drop = set(DEFAULT_RECOMPUTE_MODULES if modules is None else modules)
    kept = lambda module, x: 0 if module in drop else x  # noqa: E731  (x bytes unless `module` recomputes)
    a = 2 * h * t / r + kept("layernorm", 2 * h * t / r)  # input norm: input (+ output)
    if m.is_mla:
        ql = m.q_lora_rank or 0
        a += 2 * (ql + m.kv_lora_rank + m.qk_rope_head_dim) * t  # latents before their norms
        a += kept("mla_up_proj", 2 * (ql + m.kv_lora_rank) * t)  # normed latents (up-projection inputs)
        a += kept("mla_up_proj", 2 * nh * (2 * m.qk_head_dim + m.v_head_dim) * t / T)  # q, k, v
        a += 2 * nh * m.v_head_dim * t / T + kept("core_attn", 4 * nh * t / T)  # attention output, fp32 lse
    else:
        d, nkv = m.dense_head_dim, m.num_key_value_heads
        a += 2 * (nh + 2 * nkv) * d * t / T + 2 * nh * d * t / T + kept("core_attn", 4 * nh * t / T)
    a += 2 * h * t / r  # post-attention norm input
    norm_out = kept("layernorm", 2 * h * t / r)
    if not m.is_moe_layer(layer):
        f = m.intermediate_size / T
        return a + norm_out + kept("mlp", 4 * f * t + 2 * f * t)
    k, fe, fs, tm = m.num_experts_per_tok, m.moe_intermediate_size, m.n_shared_experts * m.moe_intermediate_size, t / T
    moe = kept("layernorm", 2 * h * tm) + 4 * m.n_routed_experts * tm
    moe += k * tm * (h * dispatch_bytes + 4 * fe + kept("moe_act", 2 * fe) + 2 * h)
    moe += kept("shared_experts", 4 * fs * tm + kept("moe_act", 2 * fs * tm))
    return a + kept("moe", moe)


def _head_activation(m: ModelConfig, t: float, tp: int, r: int) -> float:
    return 4 * m.hidden_size * t / r + 6 * m.vocab_size * t / tp


# ------------------------------------------------------------------------------------- layer split
def _splits(m: ModelConfig, pp: int, vpp: int, first: int | None, last: int | None) -> tuple[list, str]:
    """Candidate layers-per-stage lists: one (explicit/even) or all uneven ones (auto)."""
    n = m.num_hidden_layers
    if pp == 1:
        if n % vpp:
            raise ConfigError(f"num_hidden_layers={n} is not divisible by vpp={vpp}")
        return [[n]], "even"

    def build(f: int | None, l: int | None) -> list | None:
        try:  # the runtime's own split rule
            return stage_layer_counts(n, pp, 1, f, l)
        except ConfigError:
            return None

    def ok(split: list | None) -> bool:
        return split is not None and all(x >= 1 and x % vpp == 0 for x in split)

    if first is not None or last is not None:
        split = build(first, last)
        if not ok(split):
            given = ", ".join(f"{k}={v}" for k, v in (("first", first), ("last", last)) if v is not None)
            free = pp - sum(x is not None for x in (first, last))
            raise ConfigError(
                f"cannot split num_hidden_layers={n} over pp={pp} with {given}: the other {free} stage(s) must "
                f"share {n - (first or 0) - (last or 0)} layers evenly, each stage >= 1 layer and divisible by vpp={vpp}")
        return [split], "explicit"
    if n % (pp * vpp) == 0:
        return [[n // pp] * pp], "even"
    c = -(-n // (pp * vpp)) * vpp  # ceil(n / pp), rounded up to whole chunks: the middle stages' count
    cands = [s for f in range(vpp, c + 1, vpp) for l in range(vpp, c + 1, vpp) if ok(s := build(f, l))]
    if not cands:
        raise ConfigError(f"num_hidden_layers={n} cannot be split over pp={pp} stages as [first, {c}, ..., {c}, last] "
                          f"with 1 <= first, last <= {c} (every stage divisible by vpp={vpp}); "
                          f"give --first-stage-layers / --last-stage-layers")
    return cands, "auto"


# ------------------------------------------------------------------------------------------- plan
def _validate(m: ModelConfig, o: PlanOptions) -> tuple[int, str]:
    par = o.parallel
    for name, v in (("dtype", o.param_dtype), ("grad_dtype", o.grad_dtype), ("master_dtype", o.master_dtype),
                    ("optimizer_dtype", o.optimizer_dtype), ("dispatch_dtype", o.dispatch_dtype)):
        if v not in DTYPE_BYTES:
            raise ConfigError(f"{name}={v!r}: expected one of {', '.join(DTYPE_BYTES)}")
    if o.recompute not in ("none", "selective", "full"):
        raise ConfigError(f"recompute={o.recompute!r}: expected none, selective or full")
    bad = [x for x in (o.recompute_modules or ()) if x not in RECOMPUTE_MODULES]
    if bad:
        raise ConfigError(f"recompute modules {', '.join(bad)}: expected some of {', '.join(RECOMPUTE_MODULES)}")
    if o.gpus < 1:
        raise ConfigError(f"gpus={o.gpus} must be >= 1")
    # the layer split is the planner's own (_splits); validate every other rule
    dp = validate_layout(o.gpus, par, m, check_split=False)
    schedule = o.schedule or ("interleaved" if par.vpp > 1 else "1f1b")
    if schedule not in ("1f1b", "interleaved"):
        raise ConfigError(f"schedule={schedule!r}: expected 1f1b or interleaved")
    if schedule == "interleaved" and par.vpp < 2:
        raise ConfigError("schedule=interleaved needs vpp >= 2 model chunks per stage")
    if schedule == "1f1b" and par.vpp > 1:
        raise ConfigError(f"vpp={par.vpp} needs schedule=interleaved")
    if m.tie_word_embeddings and par.pp > 1:
        raise ConfigError("tie_word_embeddings with pp > 1 is not supported by the runtime (model/gpt.py)")
    if o.seq_length % (2 * par.cp):
        raise ConfigError(f"seq_length={o.seq_length} is not divisible by 2·cp = {2 * par.cp} "
                          f"(context parallelism splits a sequence into 2·cp chunks)")
    if par.sp and par.tp > 1 and (o.seq_length // par.cp) % par.tp:
        raise ConfigError(f"seq_length/cp = {o.seq_length // par.cp} is not divisible by tp={par.tp} "
                          f"(sequence parallelism)")
    return dp, schedule


def make_plan(model: ModelConfig, opts: PlanOptions, model_name: str = "model") -> Plan:
    """The plan of one layout; raises ConfigError (with the arithmetic) when the layout is impossible."""
    m, o, par = model, opts, opts.parallel
    m.validate()
    dp, schedule = _validate(m, o)
    tp, cp, ep, pp, vpp = par.tp, par.cp, par.ep, par.pp, par.vpp
    edp = tp * cp * dp // ep
    per_step = o.micro_batch_size * dp
    gbs = o.global_batch_size if o.global_batch_size is not None else per_step * 4 * pp
    if gbs < 1 or gbs % per_step:
        raise ConfigError(f"global_batch_size={gbs} is not divisible by micro_batch_size·dp = "
                          f"{o.micro_batch_size}·{dp} = {per_step}")
    mb = gbs // per_step
    if schedule == "interleaved" and mb % pp:
        raise ConfigError(f"the interleaved schedule needs the micro-batches per step ({mb} = {gbs} / "
                          f"({o.micro_batch_size}·{dp})) to be a multiple of pp={pp}")

    r = tp if (par.sp and tp > 1) else 1
    t = o.micro_batch_size * o.seq_length / cp
    pb, gb_, mb_, ob = (DTYPE_BYTES[x] for x in (o.param_dtype, o.grad_dtype, o.master_dtype, o.optimizer_dtype))
    if o.master_dtype == o.param_dtype:
        mb_ = 0  # the weights are the master copy
    db = DTYPE_BYTES[o.dispatch_dtype]
    depth = m.num_nextn_predict_layers

    def stage_plan(s: int, layers: list) -> StagePlan:
        first, last = s == 0, s == pp - 1
        extras, p = [], Params()
        for i in layers:
            p = p + _layer_params(m, i)
        per_chunk = max(len(layers) // vpp, 1)
        n_full = (0 if o.recompute != "full" else float("inf") if o.recompute_num_layers is None
                  else o.recompute_num_layers)  # recomputed blocks per chunk (the first ones)

        def block_act(i: int, j: int) -> float:  # j: the block's index in its chunk
            if j < n_full:
                return 2 * m.hidden_size * t / r  # full recompute keeps the block's input only
            return _layer_activation(m, i, t, tp, r, o.recompute, db, o.recompute_modules)

        act = sum(block_act(i, j % per_chunk) for j, i in enumerate(layers))
        work = max((_layer_activation(m, i, t, tp, r, "none", db) for i in layers), default=0)
        moe = sum(m.is_moe_layer(i) for i in layers)
        vh = m.vocab_size * m.hidden_size
        if first:
            extras.append("embedding")
            p = p + Params(tp_split=vh)
        if last:
            extras += ["final norm", "head"]
            p = p + Params(replicated=m.hidden_size, tp_split=0 if m.tie_word_embeddings else vh)
            act += _head_activation(m, t, tp, r)
            for d in range(depth):
                i = m.num_hidden_layers + d
                extras.append("mtp")
                h = m.hidden_size
                p = p + _layer_params(m, i) + Params(replicated=2 * h + 2 * h * h + h)
                block = block_act(i, per_chunk + d)  # MTP blocks count after the last chunk's own
                work = max(work, _layer_activation(m, i, t, tp, r, "none", db))
                act += 4 * h * t / r + 4 * h * t + block + _head_activation(m, t, tp, r)
                moe += m.is_moe_layer(i)
        shard = _shard(p, tp, ep)
        unique = _unique(shard, tp, ep)
        if last and depth and not first:
            extras.append("embedding copy")
            shard = shard + Params(tp_split=vh / tp)
        if schedule == "1f1b":
            inflight = min(pp - s, mb)
        else:
            warm = mb * vpp if mb == pp else 2 * (pp - s - 1) + (vpp - 1) * pp + 1  # m == pp: all forwards first
            inflight = min(warm, mb * vpp) / vpp
        opt_p = shard.dense / (dp * cp) + shard.expert / edp if par.zero1 else shard.total
        memory = {
            "weights": shard.total * pb,
            "grads": shard.total * gb_,
            "master": opt_p * mb_,
            "adam_mv": opt_p * 2 * ob,
            "activations": inflight * act + (work if n_full else 0),
            "reserved": o.reserved_gb * GB,
        }
        return StagePlan(s, list(layers), extras, shard, unique, inflight, act, memory, moe)

    candidates, mode = _splits(m, pp, vpp, o.first_stage_layers, o.last_stage_layers)

    def stages_of(split: list) -> list:
        out, start = [], 0
        for s, n in enumerate(split):
            out.append(stage_plan(s, range(start, start + n)))
            start += n
        return out

    def score(stages: list) -> tuple:
        counts = [len(st.layers) for st in stages]
        return max(st.total_bytes for st in stages), max(counts) - min(counts)

    best = min((stages_of(c) for c in candidates), key=score)
    split = [len(st.layers) for st in best]
    if mode == "auto" and len(set(split)) == 1:
        mode = "even"

    if pp == 1:
        bubble, formula = 0.0, "pp = 1, none"
    elif schedule == "1f1b":
        bubble, formula = (pp - 1) / (mb + pp - 1), f"(pp−1)/(m+pp−1) = {pp - 1}/{mb + pp - 1}"
    else:
        b = (pp - 1) / vpp
        bubble, formula = b / (mb + b), f"((pp−1)/vpp)/(m+(pp−1)/vpp) = {b:g}/{mb + b:g}"

    frac = (ep - 1) / ep
    k, h = (m.num_experts_per_tok, m.hidden_size) if m.is_moe else (0, m.hidden_size)
    per_tok = {"dispatch": k * dispatch_bytes_per_token(h, o.dispatch_dtype) * frac, "combine": k * h * 2 * frac}
    moe_stage = max(best, key=lambda st: st.moe_layers)
    tokens = o.micro_batch_size * o.seq_length / (cp * tp) * mb * moe_stage.moe_layers
    fwd = tokens * (per_tok["dispatch"] + per_tok["combine"])
    bwd = tokens * k * h * 2 * frac * 2
    per_step = {"stage": moe_stage.stage, "moe_layers": moe_stage.moe_layers, "tokens": tokens, "forward": fwd,
                "backward": bwd, "recompute": fwd if o.recompute == "full" else 0.0}
    per_step["total"] = fwd + bwd + per_step["recompute"]
    notes = []
    if len(set(split)) > 1:
        first, last = split[0], split[-1]
        notes.append(f"uneven split: run it with parallel.first_stage_layers={first} parallel.last_stage_layers={last}")
    return Plan(model_name, m, o, schedule, dp, edp, mb, gbs, split, mode, best, bubble, formula, per_tok, per_step,
                notes)


# ------------------------------------------------------------------------------------------ output
def _fmt_split(split: list) -> str:
    out, i = [], 0
    while i < len(split):
        j = i
        while j < len(split) and split[j] == split[i]:
            j += 1
        out.append(f"{split[i]} (×{j - i})" if j - i > 1 else str(split[i]))
        i = j
    return "[" + ", ".join(out) + "]"


def _recompute_desc(o: PlanOptions) -> str:
    if o.recompute == "selective":
        return "selective (" + ", ".join(o.recompute_modules or DEFAULT_RECOMPUTE_MODULES) + ")"
    if o.recompute == "full" and o.recompute_num_layers is not None:
        return f"full ({o.recompute_num_layers} blocks per chunk)"
    return o.recompute


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def format_plan(plan: Plan) -> str:
    o, par, m, w = plan.opts, plan.opts.parallel, plan.model, plan.worst
    n = m.num_parameters()
    per_gpu = [s.params.total for s in plan.stages]
    sharding = ("not sharded" if not par.zero1 else f"/dp·cp={plan.dp * par.cp} dense"
                + (f", /edp={plan.edp} experts" if m.is_moe else ""))
    lines = [
        f"plan: {plan.model_name} on {o.gpus} GPUs",
        f"layout       tp={par.tp} cp={par.cp} ep={par.ep} pp={par.pp} vpp={par.vpp} dp={plan.dp} "
        f"edp={plan.edp} (tp·cp·dp/ep)  sp={'on' if par.sp and par.tp > 1 else 'off'}  "
        f"zero1={'on' if par.zero1 else 'off'}",
        f"batch        seq {o.seq_length}, micro-batch {o.micro_batch_size}, global batch {plan.global_batch_size}"
        f" = {o.micro_batch_size}·{plan.dp} dp · {plan.microbatches} micro-batches per step"
        + ("" if o.global_batch_size is not None else " (default: 4·pp micro-batches)"),
        f"layers       {m.num_hidden_layers} over {par.pp} stages: {_fmt_split(plan.split)} ({plan.split_mode}); "
        f"embedding on stage 0; final norm, head"
        + (f", MTP×{m.num_nextn_predict_layers}" if m.num_nextn_predict_layers else "") + f" on stage {par.pp - 1}",
        f"parameters   {n['total'] / 1e9:.1f}B" + (f" + MTP {n['mtp'] / 1e9:.1f}B" if n['mtp'] else "")
        + f"; per GPU {min(per_gpu) / 1e9:.2f}B..{max(per_gpu) / 1e9:.2f}B",
        "",
        f"memory per GPU, GB (1e9 B), worst stage {w.stage} ({len(w.layers)} layer{'' if len(w.layers) == 1 else 's'}"
        + (", " + ", ".join(w.extras) if w.extras else "") + f"), recompute={_recompute_desc(o)}:",
        f"  weights      {_gb(w.memory['weights']):>8}  {w.params.total / 1e9:.2f}B params × {o.param_dtype}",
        f"  grads        {_gb(w.memory['grads']):>8}  × {o.grad_dtype}",
        f"  master       {_gb(w.memory['master']):>8}  {o.master_dtype}, {sharding}"
        + (" (weights are the master)" if o.master_dtype == o.param_dtype else ""),
        f"  adam m, v    {_gb(w.memory['adam_mv']):>8}  2 × {o.optimizer_dtype}, {sharding}",
        f"  activations  {_gb(w.memory['activations']):>8}  {w.inflight:g} in flight × {_gb(w.act_per_microbatch)} "
        f"per micro-batch" + (" + one layer's full activations (recompute working set)" if o.recompute == "full" else ""),
        f"  reserved     {_gb(w.memory['reserved']):>8}  CUDA context, NCCL, fragmentation",
        f"  total        {_gb(w.total_bytes):>8}  of {o.gpu_mem_gb:g} GB  FITS: {'yes' if plan.fits else 'no'}",
        "",
        "stage  layers  params/GPU  weights+grads+optim  activations  total GB",
    ]
    for s in plan.stages:
        static = s.memory["weights"] + s.memory["grads"] + s.memory["master"] + s.memory["adam_mv"]
        lines.append(f"{s.stage:>5}  {len(s.layers):>6}  {s.params.total / 1e9:>9.2f}B  {_gb(static):>19}  "
                     f"{_gb(s.memory['activations']):>11}  {_gb(s.total_bytes):>8}"
                     + ("  " + ", ".join(s.extras) if s.extras else ""))
    a, st = plan.a2a_per_token_layer, plan.a2a_per_step
    lines += [
        "",
        f"bubble       {plan.schedule}: {plan.bubble_formula} = {plan.bubble:.1%} of the step",
    ]
    if m.is_moe:
        lines += [
            f"all-to-all   per token per MoE layer, sent: dispatch {a['dispatch'] / 1e3:.1f} KB ({o.dispatch_dtype}) "
            f"+ combine {a['combine'] / 1e3:.1f} KB (bf16) = k·bytes per token·(ep−1)/ep (fp8: h codes + a float32 "
            f"scale per 128), k={m.num_experts_per_tok}, "
            f"h={m.hidden_size}, ep={par.ep}",
            f"             per step per GPU (stage {st['stage']}, {st['moe_layers']} MoE layers, "
            f"{st['tokens'] / st['moe_layers'] if st['moe_layers'] else 0:.0f} tokens each): "
            f"forward {_gb(st['forward'])} GB + backward {_gb(st['backward'])} GB"
            + (f" + recompute {_gb(st['recompute'])} GB" if st['recompute'] else "")
            + f" = {_gb(st['total'])} GB",
        ]
    lines += [f"note         {x}" for x in plan.notes]
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict:
    """Machine-readable plan (bytes as numbers, GB alongside for reading)."""
    o, par, w = plan.opts, plan.opts.parallel, plan.worst
    n = plan.model.num_parameters()
    return {
        "model": plan.model_name,
        "gpus": o.gpus,
        "layout": {"tp": par.tp, "cp": par.cp, "ep": par.ep, "pp": par.pp, "vpp": par.vpp, "dp": plan.dp,
                   "edp": plan.edp, "sp": bool(par.sp and par.tp > 1), "zero1": par.zero1, "schedule": plan.schedule},
        "batch": {"seq_length": o.seq_length, "micro_batch_size": o.micro_batch_size,
                  "global_batch_size": plan.global_batch_size, "microbatches": plan.microbatches},
        "dtypes": {"param": o.param_dtype, "grad": o.grad_dtype, "master": o.master_dtype,
                   "optimizer": o.optimizer_dtype, "dispatch": o.dispatch_dtype},
        "recompute": o.recompute,
        "recompute_modules": list(o.recompute_modules or DEFAULT_RECOMPUTE_MODULES) if o.recompute == "selective" else [],
        "recompute_num_layers": o.recompute_num_layers,
        "layers_per_stage": plan.split,
        "split": plan.split_mode,
        "parameters": {"total": n["total"], "mtp": n["mtp"],
                       "unique_over_stages": sum(s.unique_params for s in plan.stages)},
        "stages": [{"stage": s.stage, "layers": s.layers, "extras": s.extras, "params_per_gpu": s.params.total,
                    "inflight_microbatches": s.inflight, "activation_bytes_per_microbatch": s.act_per_microbatch,
                    "memory_bytes": s.memory, "total_bytes": s.total_bytes} for s in plan.stages],
        "worst_stage": w.stage,
        "memory_gb": {k: v / GB for k, v in w.memory.items()} | {"total": w.total_bytes / GB},
        "gpu_mem_gb": o.gpu_mem_gb,
        "fits": plan.fits,
        "notes": plan.notes,
        "bubble": {"fraction": plan.bubble, "formula": plan.bubble_formula},
        "all_to_all": {"per_token_per_moe_layer_bytes": plan.a2a_per_token_layer,
                       "per_step_per_gpu_bytes": plan.a2a_per_step},
    }


# ------------------------------------------------------------------------------ co-located rollout
@dataclass
class RolloutMemory:
    """Per GPU, GB, for a vLLM engine co-located with the trainer (rollout.tp/ep/dp)."""
    layout: str
    vllm_weights: float  # vLLM's weights (main model; vLLM skips the MTP layer)
    kv_cache: float  # gpu_memory_utilization · GPU − vLLM's weights
    kv_tokens: int  # tokens the KV cache holds per GPU (MLA: the latent cache, replicated over tp)
    trainer_resident: float  # worst stage: weights + grads + master + Adam (+ the frozen reference when β > 0)
    reference: float  # frozen reference weights (β > 0), part of trainer_resident
    trainer_peak: float  # worst stage of the training phase (activations, reserved) + reference
    rollout_phase: float  # trainer_resident + vLLM weights + KV + reserved
    training_phase: float  # trainer_peak + what vLLM keeps on the GPU while asleep (or awake)
    gpu: float
    advice: list  # settings that make it fit, or why nothing does

    @property
    def fits(self) -> bool:
        return self.rollout_phase <= self.gpu and self.training_phase <= self.gpu


def _routed_params(m: ModelConfig) -> float:
    if not m.is_moe:
        return 0.0
    return sum(m.n_routed_experts * 3 * m.hidden_size * m.moe_intermediate_size
               for i in range(m.num_hidden_layers) if m.is_moe_layer(i))


def _kv_bytes_per_token(m: ModelConfig, tp: int, nbytes: int) -> float:
    if m.is_mla:  # latent c_kv + k_pe per layer, every tp rank holds all of it
        return (m.kv_lora_rank + m.qk_rope_head_dim) * m.num_hidden_layers * nbytes
    heads = max(1, m.num_key_value_heads // tp)
    return 2 * heads * m.dense_head_dim * m.num_hidden_layers * nbytes


def rollout_memory(plan: Plan, m: ModelConfig, *, tp: int, ep: int, dp: int, gpu_memory_utilization: float,
                   sleeps: bool, sleep_level: int, beta: float, max_model_len: int) -> RolloutMemory:
    """What the co-located engine adds to the training plan, per GPU, in both phases, and which settings
    (KV fraction, sleep level) make it fit. vLLM's weights: dense parts / tp, routed experts / (tp·dp) under
    EP else / tp, in bf16. KV: vLLM takes gpu_memory_utilization of the GPU for weights + KV."""
    o = plan.opts
    gpu = o.gpu_mem_gb
    pb = DTYPE_BYTES[o.param_dtype]
    routed = _routed_params(m)
    dense = m.num_parameters()["total"] - routed
    w = (dense / tp + routed / (tp * dp if ep > 1 else tp)) * 2 / GB
    kv = max(0.0, gpu_memory_utilization * gpu - w)
    per_tok = _kv_bytes_per_token(m, tp, 2)
    ref_of = {s.stage: (s.params.total * pb / GB if beta > 0 else 0.0) for s in plan.stages}
    static = {s.stage: (s.memory["weights"] + s.memory["grads"] + s.memory["master"] + s.memory["adam_mv"]) / GB
              for s in plan.stages}
    worst_res = max(plan.stages, key=lambda s: static[s.stage] + ref_of[s.stage])
    resident = static[worst_res.stage] + ref_of[worst_res.stage]
    ref = ref_of[worst_res.stage]
    peak = max(s.total_bytes / GB + ref_of[s.stage] for s in plan.stages)
    reserved = o.reserved_gb
    rollout = resident + w + kv + reserved
    asleep = 0.0 if sleeps else w + kv  # level 1: weights to host; level 2: dropped; the KV cache always dropped
    training = peak + asleep
    advice = []
    one_seq = per_tok * max_model_len / GB
    room = gpu - resident - w - reserved  # what is left for the KV cache in the rollout phase
    if rollout > gpu:
        if room >= one_seq:
            advice.append(f"set rollout.gpu_memory_utilization <= {(w + room) / gpu:.2f} (KV cache {room:.1f} GB, "
                          f"{int(room * GB / per_tok):,} tokens = {room / one_seq:.1f} sequences of "
                          f"max_model_len per GPU)")
        else:
            advice.append(f"no KV fraction fits: {gpu:g} GB − trainer {resident:.1f} − vLLM weights {w:.1f} − reserved "
                          f"{reserved:g} = {room:.1f} GB < one max_model_len sequence ({one_seq:.1f} GB); raise "
                          f"rollout.tp (or rollout.ep) to shrink vLLM's weights")
    if training > gpu:
        advice.append("set rollout.sleep_between_steps=true (level 1 keeps vLLM's weights on the host; level 2 drops "
                      "them, the sync rewrites every weight)" if not sleeps else
                      f"the training phase alone needs {peak:.1f} GB")
    if sleeps and sleep_level == 1:
        advice.append(f"sleep level 1 moves {w:.1f} GB to the host and back every step (PCIe); rollout.sleep_level=2 "
                      f"drops them instead (the sync rewrites every weight)")
    layout = f"tp={tp} dp={dp} ep={ep} (engine of {tp * dp} GPUs, experts {'EP' if ep > 1 else 'TP'}-sharded)"
    return RolloutMemory(layout, w, kv, int(kv * GB / per_tok) if per_tok else 0, resident, ref, peak, rollout,
                         training, gpu, advice)


def format_rollout_memory(r: RolloutMemory) -> list[str]:
    return [f"rollout   vLLM co-located, {r.layout}",
            f"          per GPU: vLLM weights {r.vllm_weights:.1f} GB (bf16) + KV cache {r.kv_cache:.1f} GB "
            f"({r.kv_tokens:,} tokens); trainer resident {r.trainer_resident:.1f} GB"
            + (f" (incl. frozen reference {r.reference:.1f} GB)" if r.reference else ""),
            f"          rollout phase {r.rollout_phase:.1f} GB, training phase {r.training_phase:.1f} GB of "
            f"{r.gpu:g} GB: {'FITS' if r.fits else 'DOES NOT FIT'}"] + [f"          -> {a}" for a in r.advice]
