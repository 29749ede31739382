"""The GRPO loop: prompts → co-located vLLM rollout → rewards → old/ref logprobs → policy update → weight sync.

    megatron-r1 grpo --config cfg.yaml --init-hf BASE_HF_DIR [overrides]

Notable choices
- Rollout: every rank holds a vLLM engine (in-process; TP over `rollout.tp` consecutive ranks with
  vLLM's external launcher). The world is `world / rollout.tp` rollout replicas; each generates for a
  contiguous share of the step's prompts, and the samples are all-gathered, so every rank sees the
  whole batch in the same order and takes its dp slice for training.
- Old-policy logprobs come from the trainer (a forward pass before the update), not from vLLM, as in
  the paper's formulation; vLLM's own logprobs of the sampled tokens are compared to them every step
  (`mismatch/*`: mean and max |Δ logprob|, importance-ratio statistics), because a silent mismatch
  between the engines ruins RL. Logprobs are taken at the sampling temperature (logits / T), as vLLM
  reports them, and as verl does.
- The reference policy is a frozen copy of the initial weights, sharded like the policy; β = 0 skips it.
- Loss normalisation uses the global count (tokens or sequences per `rl.loss_agg`) of each mini-batch,
  so micro-batches, dp and cp ranks add up to one big batch (see rl/grpo.py).
- Rewards are scored by each rollout replica for its own samples (the symbolic checker runs in
  killable worker processes, reward models on the replica's device), then gathered with the samples.
  Each prompt's task type (`data.task_key`) picks its rewards (`rl.routes`, else `rl.rewards`): rule
  rewards for reasoning prompts, reward models for general ones; `reward/route/<task>` logs each route.
- `rl.ref_refresh_interval` N > 0: after every N-th step the reference policy is replaced by the current
  policy (DeepSeek-R1 refreshes every 400 steps). A resumed run refreshes it at resume (the checkpoint
  holds the policy, not the reference), so until its next multiple of N its reference is the resumed
  policy, newer than an uninterrupted run's by fewer than N steps.
- After the update each rollout rank receives exactly the slices its vLLM engine holds, from the
  training ranks that own them, in buckets of at most `rollout.bucket_mb` (rollout/sync.py; the plan
  is built once, at the first sync).
- Routing replay (`rl.routing_replay`, R3): the engine returns the experts it routed every token of the
  prompt and the response to (rollout/engine.py); the batch carries them as `routes` [N, S, L, K] (-1: pad,
  dense layers, tokens the engine reported none for, which route themselves). The old-logprob pass ("old")
  or every pass ("all") gives them to the MoE layers instead of their top-k; the reference policy never
  does. Every pass that sees routes counts how many (token, MoE layer) pairs the trainer's own top-k would
  have routed elsewhere (`routing/flip_frac`, from the old-logprob pass; also under "measure", which only
  compares). Prompt tokens are replayed too: their routes shape the response's keys and values.
- Micro-batches are `train.micro_batch_size` rows right-padded to the step's longest, or with
  `rl.pack_tokens` rows grouped by length under a token budget and trimmed to their longest (`pack_rows`):
  each row stays its own sequence, so the loss and gradients are the padded ones; pad tokens no longer
  reach the MoE (its balance loss and expert loads). Logprobs and entropy are computed
  `rl.logprob_chunk_tokens` at a time (parallel/tensor.py `chunked_logprobs`), recomputed in backward.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_r1.config import Config, ConfigError, load_config
from megatron_r1.data.prompts import PromptLoader, load_prompts
from megatron_r1.data.templates import render_prompt
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.engine.runtime import forward_only, train_step
from megatron_r1.parallel.tensor import chunked_entropy, chunked_logprobs
from megatron_r1.rl import grpo
from megatron_r1.rl.rewards import RewardRouter
from megatron_r1.rl.rewards.registry import component_mean
from megatron_r1.training import TrainSession, TrainingError


@dataclass
class Rollout:
    """One step's samples, in global order (prompt-major, G samples each), identical on every rank."""
    prompt_ids: list[list[int]]  # [P·G]
    response_ids: list[list[int]]  # [P·G]
    vllm_logprobs: list[list[float]]  # [P·G], per response token
    truncated: list[bool]  # finish_reason == "length"
    texts: list[str]
    rewards: list[float]
    components: dict[str, list[float | None]]  # None: a routed reward that did not score this sample
    routes: list | None = None  # [P·G] int16 [prompt + response, L, K] routed experts (routing replay)

    def select_groups(self, groups: list[int], group_size: int) -> "Rollout":
        """The samples of the given prompt groups, in that order."""
        idx = [g * group_size + j for g in groups for j in range(group_size)]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return Rollout(pick(self.prompt_ids), pick(self.response_ids), pick(self.vllm_logprobs), pick(self.truncated),
                       pick(self.texts), pick(self.rewards), {k: pick(v) for k, v in self.components.items()},
                       None if self.routes is None else pick(self.routes))

    def __add__(self, other: "Rollout") -> "Rollout":
        return Rollout(self.prompt_ids + other.prompt_ids, self.response_ids + other.response_ids,
                       self.vllm_logprobs + other.vllm_logprobs, self.truncated + other.truncated,
                       self.texts + other.texts, self.rewards + other.rewards,
                       {k: v + other.components[k] for k, v in self.components.items()},
                       None if self.routes is None else self.routes + other.routes)


# per-row tensors a rank keeps of the global batch (old_logp / ref_logp are added by the logprob pass)
ROW_KEYS = ("input_ids", "mask", "advantages", "vllm_logprobs")  # + old_logp, ref_logp, is_weight later
ROUTE_KEY = "routes"  # [N, S, L, K] int16, when rl.routing_replay is on


def update_shares(n: int, updates: int, dp: int, dp_rank: int) -> list[tuple[int, int]]:
    """Global rows [a, b) this dp rank trains on in each update: update u's mini-batch is rows
    [u·n/k, (u+1)·n/k) of the step's batch, and each dp rank takes a contiguous 1/dp of it."""
    if updates < 1 or n % updates or (n // updates) % dp:
        raise ConfigError(f"{n} samples do not split into rl.updates_per_batch={updates} mini-batches "
                          f"of a multiple of dp={dp}")
    mini = n // updates
    per = mini // dp
    return [(u * mini + dp_rank * per, u * mini + (dp_rank + 1) * per) for u in range(updates)]


def pack_rows(lengths: list[int], budget: int, multiple: int, count: int = 0) -> list[list[int]]:
    """Token-budget micro-batches: positions into `lengths`, longest first, grouped while
    rows × round_up(the group's longest, multiple) <= budget (a longer row goes alone). `count` > 0: split the
    groups with the most rows until there are `count` (ranks that must run the same number of micro-batches,
    e.g. an ep group spanning dp ranks, agree on the largest count)."""
    up = lambda n: -(-max(n, 1) // multiple) * multiple  # noqa: E731
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * up(lengths[groups[-1][0]]) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    while len(groups) < count:
        j = max(range(len(groups)), key=lambda g: len(groups[g]))
        if len(groups[j]) < 2:
            raise ValueError(f"{len(lengths)} rows cannot make {count} micro-batches")
        g = groups.pop(j)
        groups[j:j] = [g[:len(g) // 2], g[len(g) // 2:]]
    return groups


@dataclass
class RankBatch:
    """This rank's rows of one step's batch, one structure for all of them: row i of every tensor in `data`
    is global row `rows[i]`. Mini-batches (`minis`, one per update) and micro-batches are index views of it,
    so a row's tokens, mask, advantage and rollout / old / reference logprobs can never come apart."""
    rows: torch.Tensor  # [R] global row indices
    data: dict[str, torch.Tensor]  # [R, S] or [R] per key
    minis: list[torch.Tensor]  # local row indices of each update's share
    normalizers: list[float]  # global loss units (tokens or sequences) of each update's whole mini-batch
    # rl.pack_tokens: each update's micro-batches as (positions in minis[u], trimmed length), host metadata
    packs: list[list[tuple[list[int], int]]] | None = None

    def take(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.data.items()}


def _all_gather_objects(obj, enabled: bool):
    if not enabled:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def pad_multiple(mesh) -> int:
    """Sequences are padded to a multiple of 2·cp·tp (CP chunks and the MoE token split)."""
    return 2 * mesh.cp * mesh.tp if mesh.cp > 1 else mesh.tp


def _route_flips(chunks, device, reset: bool) -> torch.Tensor:
    """This rank's routers' [pairs with given routes, pairs whose own top-k differs] since the last reset."""
    from megatron_r1.model.deepseek_v3 import Router
    routers = [m for c in chunks for m in c.modules() if isinstance(m, Router)]
    total = torch.stack([r.route_flips for r in routers]).sum(0) if routers else None
    if reset:
        for r in routers:
            r.route_flips.zero_()
    return total.double() if total is not None else torch.zeros(2, dtype=torch.float64, device=device)


class GRPOTrainer:
    def __init__(self, cfg: Config, init_hf: str, train_path: str | None = None, eval_set=None):
        self.cfg = cfg
        rl = cfg.rl
        path = train_path or cfg.data.train_path
        if not path:
            raise ConfigError("grpo needs prompts: data.train_path")
        self.session = TrainSession(cfg, init_hf=init_hf, desc="grpo", rl=True)  # validates cfg first
        s, mesh = self.session, self.session.mesh
        for c in s.chunks:  # the GRPO loss reads the main head only: skip the MTP modules' forward
            c.use_mtp = False
        self.mesh = mesh
        self.tok = load_tokenizer(cfg.data.tokenizer or init_hf)
        # the frozen reference policy: a second copy of the initial weights, sharded like the policy
        self.ref_chunks = None
        if rl.beta > 0:
            from megatron_r1.ckpt.hf import load_hf_weights
            from megatron_r1.engine.runtime import DTYPES, build_parallel_model
            self.ref_chunks = build_parallel_model(cfg, mesh, init=False)  # filled from init_hf below
            for c in self.ref_chunks:
                load_hf_weights(c, init_hf, cfg.model, mesh, dtype=DTYPES[cfg.train.params_dtype])
                c.requires_grad_(False)
                c.use_mtp = False
        self.rewards = RewardRouter(rl.rewards, rl.routes)  # reward-model paths checked before the engine starts
        self.dataset = self.read_prompts(path, "data")  # before the engine: a bad file costs no engine start
        from megatron_r1.rollout.engine import RolloutEngine
        engine_dtype = cfg.rollout.dtype
        if engine_dtype == "auto":
            engine_dtype = "float32" if cfg.train.params_dtype == "float32" else "bfloat16"
        self.engine = RolloutEngine(init_hf, dtype=engine_dtype,
                                    max_model_len=cfg.rollout.max_model_len, seed=cfg.train.seed,
                                    tensor_parallel_size=cfg.rollout.tp, expert_parallel=cfg.rollout.ep > 1,
                                    data_parallel_size=cfg.rollout.dp, enforce_eager=cfg.rollout.enforce_eager,
                                    local_rank=s.env.local_rank, sleep_level=cfg.rollout.sleep_level,
                                    gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                                    return_routes=rl.routing_replay != "none")
        self.loader = PromptLoader(self.dataset, rl.prompts_per_step, seed=cfg.train.seed)
        self.eval_set = eval_set
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.replicas = self.world // cfg.rollout.tp
        self.replica = s.env.rank // cfg.rollout.tp
        self._ratio_ext = torch.full((2,), -torch.inf, dtype=torch.float64, device=mesh.device)  # see update()
        self._taken: list[str] = []  # origins (path:LINE) of the prompts the current step drew: the sample ledger
        # vLLM's CPU worker implements sleep as a no-op, so only a GPU engine sleeps between phases
        self.sleeps = cfg.rollout.sleep_between_steps and self.engine.on_gpu
        self._sync = None  # rollout/sync.py WeightSync, made at the first sync

    # ------------------------------------------------------------------------------------- rollout
    def rollout(self, step: int, round: int = 0) -> Rollout:
        """One round of generation and scoring for the step's next `prompts_per_step` prompts."""
        rl = self.cfg.rl
        examples = next(self.loader)
        prompts = [self.tok.encode(render_prompt(rl.template, e.prompt, self.tok), bos=True) for e in examples]
        per = len(prompts) // self.replicas  # validate() made it divide
        lo, hi = self.replica * per, (self.replica + 1) * per
        # a fixed budget from rl.max_prompt_len (not from this batch's longest prompt), never past the engine
        room = self.cfg.rollout.max_model_len - max(rl.max_prompt_len, *map(len, prompts))
        max_new = min(rl.max_response_len, room)
        self._taken += [e.origin for e in examples]  # the sample ledger's record of the step
        to_engine = self.session.faults.on_rollout(prompts[lo:hi])  # unchanged unless a test injects a fault
        groups = self.engine.generate(to_engine, n=rl.group_size, temperature=rl.temperature, top_p=rl.top_p,
                                      max_tokens=max_new, seed=self.cfg.train.seed + 7919 * (step * (1 + rl.dynamic_sampling_max_rounds) + round)
                                      + lo * rl.group_size, with_routes=rl.routing_replay != "none")
        samples = [smp for g in groups for smp in g]
        mine = [e for e in examples[lo:hi] for _ in range(rl.group_size)]
        refs = [e.answer for e in mine]
        t0 = time.time()
        # rewards read our tokenizer's decode of the sampled ids, not vLLM's streamed text: the two differ
        # when a weak policy samples byte tokens that do not form valid UTF-8
        texts = [self.tok.decode(smp.token_ids) for smp in samples]
        scored = self.rewards(texts, refs, tasks=[e.extra.get(self.cfg.data.task_key) for e in mine],
                              prompts=[e.prompt for e in mine])
        local = dict(samples=[(smp.token_ids, smp.logprobs, smp.finish_reason == "length", t, smp.routes)
                              for smp, t in zip(samples, texts)],
                     total=scored.total, components=scored.components, reward_time=time.time() - t0)
        # every rank of a TP group generated the same samples: take one per replica
        parts = _all_gather_objects(local, self.world > 1)[::self.cfg.rollout.tp]
        rows = [x for p in parts for x in p["samples"]]
        self._reward_time = max(p["reward_time"] for p in parts)
        comps = {k: [v for p in parts for v in p["components"][k]] for k in parts[0]["components"]}
        return Rollout(prompt_ids=[p for p in prompts for _ in range(rl.group_size)],
                       response_ids=[r[0] for r in rows], vllm_logprobs=[r[1] for r in rows],
                       truncated=[r[2] for r in rows], texts=[r[3] for r in rows],
                       rewards=[v for p in parts for v in p["total"]], components=comps,
                       routes=[r[4] for r in rows] if rl.routing_replay != "none" else None)

    def filled_rollout(self, step: int) -> tuple[Rollout, int]:
        """DAPO dynamic sampling with refill: groups whose rewards are all equal carry no signal; with
        `rl.dynamic_sampling_max_rounds` > 0 more prompts are sampled (up to that many extra rounds) until
        `prompts_per_step` informative groups are found. Short of that, the batch is completed with dropped
        groups, which `build_batch` masks out. Every rank sees the same gathered rollouts: same decisions.
        Returns (rollout, extra rounds used)."""
        rl = self.cfg.rl
        ro = self.rollout(step)
        if not (rl.dynamic_sampling and rl.dynamic_sampling_max_rounds):
            return ro, 0
        g, want = rl.group_size, rl.prompts_per_step
        informative = lambda r: grpo.dynamic_sampling_mask(torch.tensor(r.rewards, device="cpu"), g).tolist()  # noqa: E731
        keep = informative(ro)
        kept = ro.select_groups([i for i, k in enumerate(keep) if k], g)
        dropped = ro.select_groups([i for i, k in enumerate(keep) if not k], g)
        rounds = 0
        while len(kept.rewards) < want * g and rounds < rl.dynamic_sampling_max_rounds:
            rounds += 1
            more = self.rollout(step, round=rounds)
            keep = informative(more)
            kept = kept + more.select_groups([i for i, k in enumerate(keep) if k], g)
            dropped = dropped + more.select_groups([i for i, k in enumerate(keep) if not k], g)
        full = kept + dropped
        return full.select_groups(list(range(want)), g), rounds

    # --------------------------------------------------------------------------------------- batch
    def build_batch(self, ro: Rollout) -> dict:
        """Global per-row tensors: ids, response mask (targets) [N, S]; advantages, rewards [N]; vLLM logprobs at
        target positions [N, S]. Every rank builds the same global batch; `rank_batch` takes this rank's rows."""
        rl, n = self.cfg.rl, len(ro.response_ids)
        lengths = [len(p) + len(r) for p, r in zip(ro.prompt_ids, ro.response_ids)]
        mult = pad_multiple(self.mesh)
        s = -(-max(lengths) // mult) * mult
        ids = torch.full((n, s), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros((n, s))
        vllm_lp = torch.zeros((n, s))
        for i, (p, r) in enumerate(zip(ro.prompt_ids, ro.response_ids)):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
            mask[i, len(p):len(p) + len(r)] = 1.0  # token t is a target (predicted from position t-1)
            vllm_lp[i, len(p):len(p) + len(r)] = torch.tensor(ro.vllm_logprobs[i][:len(r)])
        rewards = torch.tensor(ro.rewards, dtype=torch.float32)
        resp_len = torch.tensor([len(r) for r in ro.response_ids], dtype=torch.float32)
        if rl.overlong == "penalty":
            rewards = rewards + grpo.overlong_penalty(resp_len, rl.max_response_len, rl.overlong_buffer)
        adv = grpo.group_advantages(rewards, rl.group_size, normalize_std=rl.adv_std_norm)
        keep = torch.ones(n, dtype=torch.bool)
        if rl.dynamic_sampling:
            keep = grpo.dynamic_sampling_mask(rewards, rl.group_size).repeat_interleave(rl.group_size)
        if rl.overlong == "filter":
            mask = grpo.overlong_filter(mask, torch.tensor(ro.truncated))
        mask = mask * keep.unsqueeze(1).float()
        batch = {"input_ids": ids, "mask": mask, "advantages": adv, "vllm_logprobs": vllm_lp, "rewards": rewards,
                 "keep": keep, "resp_len": resp_len, "lengths": torch.tensor(lengths, dtype=torch.long)}
        if ro.routes is not None:
            m = self.cfg.model
            routes = torch.full((n, s, m.num_hidden_layers, m.num_experts_per_tok), -1, dtype=torch.int16)
            for i, r in enumerate(ro.routes):
                if r is not None:
                    routes[i, :len(r)] = torch.from_numpy(r[:s])
            batch[ROUTE_KEY] = routes
        return batch

    def rank_batch(self, batch: dict) -> RankBatch:
        """This rank's rows of the global batch, and the global loss normaliser of each update's mini-batch."""
        n, k = len(batch["input_ids"]), self.cfg.rl.updates_per_batch
        shares = update_shares(n, k, self.mesh.dp, self.mesh.dp_rank)
        rows = torch.cat([torch.arange(a, b, device="cpu") for a, b in shares])  # host index metadata
        # the batch is built on the host from the rollout's token lists; this rank's rows go to its device once
        data = {key: batch[key][rows].to(self.mesh.device) for key in ROW_KEYS + (ROUTE_KEY,) if key in batch}
        minis, at = [], 0
        for a, b in shares:
            minis.append(torch.arange(at, at + b - a, device="cpu"))
            at += b - a
        # units (tokens or sequences, per rl.loss_agg) of each whole mini-batch, over every dp rank's share:
        # every rank holds the global mask, so this needs no collective
        norms = [max(float(grpo.loss_normalizer(batch["mask"][u * n // k:(u + 1) * n // k], self.cfg.rl.loss_agg)),
                     1.0) for u in range(k)]
        rb = RankBatch(rows=rows, data=data, minis=minis, normalizers=norms)
        budget = self.cfg.rl.pack_tokens
        if budget:
            # every rank holds the global batch, so each computes every dp rank's packing and all take the
            # largest count: ranks of an ep group (which spans dp ranks) run their all-to-alls in lockstep
            lengths, mult = batch["lengths"].tolist(), pad_multiple(self.mesh)
            everyone = [update_shares(n, k, self.mesh.dp, d) for d in range(self.mesh.dp)]
            counts = [max(len(pack_rows(lengths[sh[u][0]:sh[u][1]], budget, mult)) for sh in everyone)
                      for u in range(k)]
            rb.packs = []
            for u, (a, b) in enumerate(shares):  # decided here, on the host, before the device part of the step
                groups = pack_rows(lengths[a:b], budget, mult, counts[u])
                rb.packs.append([(g, -(-max(lengths[a + i] for i in g) // mult) * mult) for g in groups])
        return rb

    def micro_batches(self, rb: RankBatch, u: int, replay: bool = False) -> list[tuple[torch.Tensor, dict]]:
        """(local row indices, micro-batch) for update u; the last micro-batch may be smaller. The routes go
        along when there are any; `replay` says whether the MoE layers take them or only compare."""
        idx, size = rb.minis[u], self.cfg.train.micro_batch_size
        out = []
        if rb.packs is not None:  # token-budget packing: each micro-batch trimmed to its longest row
            for group, s in rb.packs[u]:
                view = idx[group]
                mb = {k: v[:, :s] if v.dim() >= 2 else v for k, v in rb.take(view).items()}
                out.append((view, dict(mb, normalizer=rb.normalizers[u], replay_routes=replay)))
            return out
        for i in range(0, len(idx), size):
            view = idx[i:i + size]
            out.append((view, dict(rb.take(view), normalizer=rb.normalizers[u], replay_routes=replay)))
        return out

    # ------------------------------------------------------------------------------------ logprobs
    def _target_logprobs(self, out, mb):
        """Per-target logprob [B, S] (zeros off this rank's positions) at the sampling temperature."""
        s = mb["input_ids"].shape[1]
        tgt = (out.positions + 1).clamp(max=s - 1)
        rl = self.cfg.rl  # in chunks: never a float32 copy of all [tokens, V/tp] logits (rl.logprob_chunk_tokens)
        lp = chunked_logprobs(out.logits, mb["input_ids"][:, tgt], self.mesh, rl.temperature, rl.logprob_chunk_tokens)
        valid = (out.positions + 1 < s).float()
        return lp * valid, tgt, valid

    def logprobs(self, chunks, mbs: list[dict], with_stats: bool) -> list:
        def fn(out, mb):
            lp, tgt, valid = self._target_logprobs(out, mb)
            b, s_ = mb["mask"].shape
            # the last position has no target: its clamped index goes to a spare column, dropped below,
            # so it cannot overwrite a real one (a scatter, not boolean indexing: no host sync)
            index = torch.where(valid > 0, tgt, torch.full_like(tgt, s_)).expand(b, -1)
            full = torch.zeros(b, s_ + 1, dtype=mb["mask"].dtype, device=mb["mask"].device)
            full.scatter_(1, index, lp.to(full.dtype))
            res = {"logp": full[:, :s_]}
            if with_stats:
                m = mb["mask"][:, tgt] * valid
                ent = chunked_entropy(out.logits, self.mesh, self.cfg.rl.temperature, self.cfg.rl.logprob_chunk_tokens)
                res["entropy_sum"] = (ent * m).sum()  # a device scalar; reduced once per step
            return res
        return forward_only(chunks, mbs, fn, self.mesh)

    # -------------------------------------------------------------------------------------- update
    def loss_fn(self, out, mb):
        rl = self.cfg.rl
        lp, tgt, valid = self._target_logprobs(out, mb)
        m = mb["mask"][:, tgt] * valid
        old = mb["old_logp"][:, tgt]
        ref = mb["ref_logp"][:, tgt] if "ref_logp" in mb else None
        isw = mb["is_weight"][:, tgt] if "is_weight" in mb else None
        loss, met = grpo.grpo_loss(lp, old, mb["advantages"], m, ref_logp=ref, eps_low=rl.eps_low, eps_high=rl.eps_high,
                                   beta=rl.beta, loss_agg=rl.loss_agg, normalizer=mb["normalizer"],
                                   max_length=rl.max_response_len, policy=rl.policy_loss, dual_clip_c=rl.dual_clip_c,
                                   is_weights=isw)
        loss = self.session.faults.on_loss(loss)  # test-only faults (megatron_r1/faults.py); none in a real run
        # sums, so the runtime's sum over micro-batches and ranks gives the global value
        metrics = {"tok": m.sum().detach()}
        for k in ("clip_frac", "clip_frac_low", "clip_frac_high", "kl", "ratio_mean"):
            if k in met:
                metrics[k + "_sum"] = met[k].detach() * m.sum().detach()
        # extrema cannot be summed: kept on the device, max-reduced once per step (update())
        self._ratio_ext = torch.maximum(self._ratio_ext, torch.stack([met["ratio_max"], -met["ratio_min"]]).double())
        return loss, metrics

    # ---------------------------------------------------------------------------------------- step
    def old_logprobs(self, rb: RankBatch) -> dict:
        """Old-policy (and reference) logprobs of every row this rank trains on, written into `rb` by row;
        returns the vLLM-vs-trainer mismatch statistics. Micro-batches are those of the updates."""
        replay = self.cfg.rl.routing_replay in ("old", "all")
        views = [vm for u in range(len(rb.minis)) for vm in self.micro_batches(rb, u, replay)]
        mbs = [mb for _, mb in views]
        _route_flips(self.session.chunks, self.mesh.device, reset=True)  # drop the last updates' counts
        old = self.logprobs(self.session.chunks, mbs, with_stats=True)
        route_flips = _route_flips(self.session.chunks, self.mesh.device, reset=True) if ROUTE_KEY in rb.data else None
        ref_mbs = [{k: v for k, v in mb.items() if k != ROUTE_KEY} for mb in mbs]  # the reference routes itself
        ref = self.logprobs(self.ref_chunks, ref_mbs, with_stats=False) if self.ref_chunks is not None else None
        stats: dict = {}
        if old:  # the last pipeline stage holds the results; the other stages never evaluate the loss
            rb.data["old_logp"] = torch.zeros_like(rb.data["mask"])
            for (idx, _), o in zip(views, old):  # a packed micro-batch covers its rows' first columns
                rb.data["old_logp"][idx, :o["logp"].shape[1]] = o["logp"]
            if ref is not None:
                rb.data["ref_logp"] = torch.zeros_like(rb.data["mask"])
                for (idx, _), r in zip(views, ref):
                    rb.data["ref_logp"][idx, :r["logp"].shape[1]] = r["logp"]
            stats = self._mismatch(rb, torch.stack([o["entropy_sum"] for o in old]).sum())
        out = self._reduce_last_stage(stats)
        if route_flips is not None:
            out.update(self._reduce_route_flips(route_flips))
        return out

    def _reduce_route_flips(self, flips: torch.Tensor) -> dict:
        """(token, MoE layer) pairs with given routes, and those the trainer's own top-k routes elsewhere, over
        the world: every rank's routers saw disjoint pairs (tp/sp/cp token shards, dp rows, pp layers)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flips)
        routed, flipped = flips.tolist()
        return {"routing/flip_frac": flipped / max(routed, 1.0), "routing/pairs": routed}

    def update(self, rb: RankBatch, step: int) -> dict:
        """`rl.ppo_epochs` × `rl.updates_per_batch` optimizer steps, one per mini-batch; each micro-batch is a
        view of `rb`, so its tokens, advantages and old / reference logprobs and IS weights are those of the
        same rows."""
        s, k, epochs = self.session, len(rb.minis), self.cfg.rl.ppo_epochs
        out: dict = {}
        self._ratio_ext = torch.full((2,), -torch.inf, dtype=torch.float64, device=self.mesh.device)
        for _ in range(epochs):  # μ passes over the rollout batch (PPO epochs), each of k mini-batch updates
            for u in range(k):
                s.set_lr(step)
                mbs = [mb for _, mb in self.micro_batches(rb, u, self.cfg.rl.routing_replay == "all")]
                if self.cfg.rl.routing_replay in ("none", "measure", "old"):  # the update routes itself
                    mbs = [{k: v for k, v in mb.items() if k != ROUTE_KEY} for mb in mbs]
                r = train_step(s.chunks, s.optimizer, mbs, self.loss_fn, self.mesh, skip_nonfinite=True)
                for key, v in r.items():
                    out[key] = out.get(key, 0.0) + v / (k * epochs)
        out["ratio_max"], out["ratio_min"] = self._ratio_extrema()
        return out

    def _ratio_extrema(self) -> tuple[float, float]:
        """Max and min policy ratio over the step's updates and all ranks: one collective, one host read."""
        ext = self._ratio_ext
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ext, op=dist.ReduceOp.MAX)
        hi, neg_lo = ext.tolist()
        return hi, -neg_lo

    def learn(self, rb: RankBatch, step: int, t: dict) -> tuple[dict, dict]:
        """The device part of the step: old (and reference) logprobs, then the updates. Everything in it runs
        on the mesh device; its host reads are the per-step metrics (tests run it under --strict-device's
        guard)."""
        metrics = self.old_logprobs(rb)
        t["logprob"] = time.time()
        train_metrics = self.update(rb, step)
        t["train"] = time.time()
        return metrics, train_metrics

    @torch.no_grad()
    def refresh_reference(self) -> None:
        """The reference policy becomes the current policy: a local copy, shard by shard (both are sharded
        alike, so no collective)."""
        for ref, pol in zip(self.ref_chunks, self.session.chunks):
            ref_state = dict(ref.named_parameters()) | dict(ref.named_buffers())  # buffers: the MoE router bias
            for name, t in list(pol.named_parameters()) + list(pol.named_buffers()):
                ref_state[name].copy_(t)

    def sync_weights(self):
        """Push the updated weights into vLLM (on GPU, waking the engine first when it slept)."""
        bucket = int(self.cfg.rollout.bucket_mb * (1 << 20))
        if self.sleeps:
            self.engine.wake_up(["weights"])
        if self._sync is None:  # the transfer plan: once per run (collective)
            from megatron_r1.rollout.sync import WeightSync
            self._sync = WeightSync(self.engine, self.session.chunks, self.mesh, self.cfg.model, bucket)
        stats = self._sync()
        if self.sleeps:
            self.engine.wake_up(["kv_cache"])
        return stats

    def train_step(self, step: int) -> dict:
        """rollout -> score -> batch -> old logprobs -> k updates -> sync."""
        t = {"t0": time.time()}
        self.session.faults.begin(step + 1)
        self._taken = []
        try:
            ro, extra_rounds = self.filled_rollout(step)  # generates and scores
        except Exception as e:  # noqa: BLE001 - whatever vLLM or a reward raised: stop before anything is saved
            import traceback
            self.session.logger.write(traceback.format_exc())
            self.session.logger.close()
            raise TrainingError(f"step {step + 1}: the rollout failed on rank {self.session.env.rank}: "
                                f"{type(e).__name__}: {e}; nothing saved for this step (checkpoints in "
                                f"{self.session.ckpt_dir})") from e
        if self.sleeps:  # free the KV cache (and offload vLLM's weights) while the trainer uses the GPU
            self.engine.sleep()
        t["rollout"] = time.time()
        batch = self.build_batch(ro)  # host: the rollout's token lists become tensors
        rb = self.rank_batch(batch)  # this rank's rows, on its device
        metrics, train_metrics = self.learn(rb, step, t)
        sync = self.sync_weights()
        t["sync"] = time.time()
        metrics.update(self._step_metrics(ro, batch, train_metrics, sync, t))
        every = self.cfg.rl.ref_refresh_interval
        if every and (step + 1) % every == 0:
            self.refresh_reference()
            metrics["ref_refreshed"] = 1.0
        if self.cfg.rl.dynamic_sampling:
            metrics["dynamic_sampling/extra_rounds"] = float(extra_rounds)
        self.last_rollout = ro
        return metrics

    def _step_metrics(self, ro: Rollout, batch: dict, train_metrics: dict, sync, t: dict) -> dict:
        n = len(ro.response_ids)
        tok = max(train_metrics.get("tok", 0.0), 1.0)
        resp = batch["resp_len"]
        comps = {f"reward/{k}": component_mean(v) for k, v in ro.components.items()}  # routed: its route's mean
        metrics = dict(comps)
        for short, key in (("accuracy", "reward/accuracy"), ("format_rate", "reward/format")):
            if key in comps:
                metrics[short] = comps[key]
        metrics.update({
            "reward/total": float(batch["rewards"].mean()),
            "response_length/mean": float(resp.mean()), "response_length/max": float(resp.max()),
            "response_length/clip_ratio": sum(ro.truncated) / n,
            "kept_groups": float(batch["keep"].float().mean()),
            "loss": train_metrics.get("loss", 0.0), "grad_norm": train_metrics.get("grad_norm", 0.0),
            "skipped": train_metrics.get("skipped", 0.0),  # share of the step's updates skipped (NaN/inf grads)
            "clip_fraction": train_metrics.get("clip_frac_sum", 0.0) / tok,
            "clip_fraction/low": train_metrics.get("clip_frac_low_sum", 0.0) / tok,
            "clip_fraction/high": train_metrics.get("clip_frac_high_sum", 0.0) / tok,
            "ratio/mean": train_metrics.get("ratio_mean_sum", 0.0) / tok,
            "ratio/max": train_metrics.get("ratio_max", 1.0), "ratio/min": train_metrics.get("ratio_min", 1.0),
            "kl": train_metrics.get("kl_sum", 0.0) / tok,
            "lr": self.session.optimizer.lr,
            "time/rollout": t["rollout"] - t["t0"], "time/reward": self._reward_time,
            "time/logprob": t["logprob"] - t["rollout"], "time/train": t["train"] - t["logprob"],
            "time/sync": t["sync"] - t["train"], "time/step": t["sync"] - t["t0"],
            "sync/GBps": sync.bytes_per_s / 1e9, "sync/buckets": sync.num_buckets,
            "tokens_per_s": float(sum(len(p) + len(r) for p, r in zip(ro.prompt_ids, ro.response_ids))) /
                            max(t["sync"] - t["t0"], 1e-9),
        })
        return metrics

    def _mismatch(self, rb: RankBatch, entropy_sum: torch.Tensor) -> dict:
        """Trainer vs vLLM logprobs of the sampled tokens (the same weights produced both), and the rollout
        importance weights when `rl.rollout_is` asks for them (stored per row in `rb`). Local sums and maxima,
        device scalars (masked reductions, no data-dependent shapes: no host sync)."""
        rl = self.cfg.rl
        mask = rb.data["mask"]
        d = (rb.data["old_logp"] - rb.data["vllm_logprobs"]) * mask
        ratio = torch.exp(d)
        tok = mask.sum()
        sums = {"d": d.abs().sum(), "ratio": (ratio * mask).sum(), "ratio_sq": ((ratio - 1).pow(2) * mask).sum(),
                "tokens": tok, "entropy": entropy_sum}
        maxes = {"d": d.abs().max() if d.numel() else tok * 0}
        if rl.rollout_is != "none":
            w, met = grpo.rollout_is_weights(rb.data["old_logp"], rb.data["vllm_logprobs"], mask, rl.rollout_is,
                                             rl.rollout_is_level, rl.rollout_is_cap)
            rb.data["is_weight"] = w
            sums.update(is_weight=met["is_weight_mean"] * tok, is_clipped=met["is_clipped_frac"] * tok)
            maxes.update(is_ratio_max=met["is_ratio_max"], is_ratio_neg_min=-met["is_ratio_min"])
        return {"sums": sums, "maxes": maxes}

    def _reduce_last_stage(self, m: dict) -> dict:
        """Sum (and max) the mismatch statistics over the last stage's dp ranks (one tp/cp rank each), share
        with all ranks: two collectives on the mesh device, one host transfer."""
        rl, mesh = self.cfg.rl, self.mesh
        sum_keys = ["d", "ratio", "ratio_sq", "tokens", "entropy"] + (["is_weight", "is_clipped"]
                                                                       if rl.rollout_is != "none" else [])
        max_keys = ["d"] + (["is_ratio_max", "is_ratio_neg_min"] if rl.rollout_is != "none" else [])
        counts = bool(m) and mesh.tp_rank == 0 and mesh.cp_rank == 0 and mesh.is_last_stage
        zero = torch.zeros((), dtype=torch.float64, device=mesh.device)
        sums = torch.stack([m["sums"][k].double() if counts else zero for k in sum_keys])
        maxes = torch.stack([m["maxes"][k].double() if m else zero - torch.inf for k in max_keys])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        s = dict(zip(sum_keys, sums.tolist()))
        mx = dict(zip(max_keys, maxes.tolist()))
        tokens = max(s["tokens"], 1.0)
        out = {"mismatch/mean_abs_logprob": s["d"] / tokens, "mismatch/max_abs_logprob": mx["d"],
               "mismatch/ratio_mean": s["ratio"] / tokens, "mismatch/ratio_std": (s["ratio_sq"] / tokens) ** 0.5,
               "entropy": s["entropy"] / tokens}
        if rl.rollout_is != "none":
            out.update({"rollout_is/weight_mean": s["is_weight"] / tokens,
                        "rollout_is/clipped_frac": s["is_clipped"] / tokens,
                        "rollout_is/ratio_max": mx["is_ratio_max"], "rollout_is/ratio_min": -mx["is_ratio_neg_min"]})
        return out

    # ------------------------------------------------------------------------------------ the loop
    def evaluate(self, examples, samples: int = 2) -> dict:
        """Held-out pass@1 at the sampling temperature (`samples` per problem), as the demo reports it."""
        from megatron_r1.eval.runner import evaluate
        return evaluate(self.engine, self.tok, examples, self.cfg.rl.template, samples=samples,
                        temperature=self.cfg.rl.temperature, max_tokens=self.cfg.rl.max_response_len,
                        seed=10_000_019 * (self.session.step + 1))

    def _eval_metrics(self) -> dict:
        return {f"eval/{k}": v for k, v in self.evaluate(self.eval_set).items() if isinstance(v, float)}

    def read_prompts(self, path, what: str = "data"):
        """Prompts that fit: longer than rl.max_prompt_len tokens (rendered with the template) are dropped
        and reported with their file:line, as malformed rows are."""
        from megatron_r1.data.prompts import drop_overlong, report
        data, s = self.cfg.data, self.session
        ds = load_prompts(path, data.prompt_key, data.answer_key, data.on_error)
        limit = min(self.cfg.rl.max_prompt_len, self.cfg.rollout.max_model_len - 1)
        ds = drop_overlong(ds, self.prompt_tokens, limit)
        if s.is_main:
            for line in report(ds, f"{what} {path}", f" (rl.max_prompt_len={limit}; rollout.max_model_len="
                                                   f"{self.cfg.rollout.max_model_len})"):
                s.logger.write(line)
            if self.cfg.rl.routes:  # where each task's prompts go, so a misspelt task type shows at once
                from collections import Counter
                counts = Counter(self.rewards.route_of(e.extra.get(data.task_key)) for e in ds)
                s.logger.write(f"reward routes of {what} {path}: " + ", ".join(
                    f"{r} {n} prompts -> {'rl.rewards' if r == RewardRouter.DEFAULT else 'rl.routes.' + r}"
                    for r, n in sorted(counts.items())))
        return ds

    def prompt_tokens(self, example) -> int:
        return len(self.tok.encode(render_prompt(self.cfg.rl.template, example.prompt), bos=True))

    def resume(self) -> None:
        """Continue from the newest complete checkpoint: weights, optimizer, data position, then vLLM."""
        extra = self.session.resume()
        if extra is None:
            return
        if extra.get("prompts"):
            self.loader.load_state_dict(extra["prompts"])
        if self.cfg.rl.ref_refresh_interval and self.ref_chunks is not None:
            self.refresh_reference()  # see the module notes: the reference restarts from the resumed policy
        self.sync_weights()

    def fit(self, steps: int | None = None, eval_every: int = 0) -> list[dict]:
        s = self.session
        steps = steps or self.cfg.train.train_steps
        history = []
        if eval_every and self.eval_set is not None and s.step == 0:  # the starting policy, on the same plot
            s.logger.log(0, self._eval_metrics(), advance=False)
        for step in range(s.step, steps):
            m = s.check_step(step + 1, self.train_step(step))
            s.ledger.record(step + 1, self._taken, skipped=m.get("skipped", 0.0) > 0)
            s.step = step + 1
            if eval_every and self.eval_set is not None and (s.step % eval_every == 0 or s.step == steps):
                m.update(self._eval_metrics())
            s.logger.log(s.step, m, show=("reward/total", "accuracy", "response_length/mean", "kl"))
            s.maybe_save({"prompts": self.loader.state_dict()})
            history.append(m)
            if s.should_stop():
                s.logger.write(f"{s.stopped}: saving at step {s.step} and stopping")
                break
        s.maybe_save({"prompts": self.loader.state_dict()}, force=True)
        return history

    def plot(self) -> str | None:
        if not self.session.is_main:
            return None
        from megatron_r1.metrics import plot_metrics
        return plot_metrics(os.path.join(self.cfg.run_dir, "metrics.jsonl"), os.path.join(self.cfg.run_dir, "grpo.png"),
                            [("reward", ["reward/total", "reward/accuracy", "reward/format"]),
                             ("held-out pass@1 (T=1)", ["eval/pass@1"]),
                             ("response length (tokens)", ["response_length/mean"])],
                            title="R1-Zero GRPO")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 grpo", description="R1-Zero / R1 GRPO")
    ap.add_argument("--config", required=True)
    ap.add_argument("--init-hf", required=True, help="the base policy (HF dir with tokenizer)")
    ap.add_argument("--eval", default=None, help="held-out prompts evaluated every --eval-every steps "
                                                 "(default: data.eval_path)")
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--export-hf", default=None)
    ap.add_argument("overrides", nargs="*")
    from megatron_r1 import dryrun
    dryrun.add_arguments(ap)
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    if a.dry_run:  # before anything allocates or joins a process group
        return dryrun.grpo(a, cfg, argv)
    eval_path = a.eval or cfg.data.eval_path
    if eval_path:  # a bad eval file fails now, not after the engine has started
        load_prompts(eval_path, cfg.data.prompt_key, cfg.data.answer_key, cfg.data.on_error)
    trainer = GRPOTrainer(cfg, a.init_hf)
    trainer.session.install_signal_handlers()  # again, after vLLM started: ours decide what a signal does
    if eval_path:
        trainer.eval_set = list(trainer.read_prompts(eval_path, "eval"))
    trainer.resume()
    trainer.fit(eval_every=a.eval_every)
    # stopped by a signal: checkpoint saved, no export, EXIT_STOPPED; else export, plot, <run_dir>/DONE
    return trainer.session.finish(a.export_hf or os.path.join(cfg.run_dir, "hf"), cfg.data.tokenizer or a.init_hf,
                                  dtype=torch.float32, before_done=trainer.plot)
