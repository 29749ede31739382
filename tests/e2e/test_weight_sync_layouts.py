"""Weight sync from a sharded training layout into co-located vLLM engines, on gloo + vLLM CPU.

Each case trains a tiny model in one layout, streams `TrainSession.full_state()` into a
`RolloutEngine` (exactly what GRPO does after every step) and checks, per rank:
  1. before any sync, vLLM's logprobs of a fixed sequence equal our parallel model's (the
     exported checkpoint and the training layout agree);
  2. one optimizer step (LM loss through `train_step`) changes vLLM's greedy generations after
     the sync, and vLLM's logprobs match the updated parallel model's forward (gathered);
  3. a bucket cap far below the model size splits the push into many buckets, no failure;
  4. syncing the same weights again (one bucket this time) changes nothing, bit for bit.

Notable choices
- Tolerance: both sides compute in float32 (the trainer's params_dtype and the engine dtype).
  The two forwards differ only in kernels and reduction order (vLLM absorbs MLA's W_UK/W_UV,
  fuses qkv/gate_up, uses its own CPU MoE and attention kernels). Measured max |Δ logprob| over
  the 15 scored tokens is 4.8e-7 to 9.5e-7 in every case, i.e. one or two float32 ulps at
  |logprob| ≈ 4-8. ATOL = 2e-4 leaves ~200x headroom for other CPUs and thread counts, yet is
  ~10,000x below what this step does to the logprobs (it moves them by 1-2.4 nat, which the test
  also asserts), so a stale or mis-sliced tensor cannot pass. A bfloat16 engine fed the same
  weights (measured once on moe_ep2_to_tp1): max |Δ| 0.015 before and 0.006 after the step,
  mean 0.003. That would need an ATOL of ~0.05 on these 4-layer models, growing with depth and
  length. GRPO watches it as `mismatch/*` rather than asserting it.
- The model is initialised with std 0.1, not 0.02: at 0.02 a tiny model is near-uniform
  (every logprob ≈ -ln 512), and matching logprobs would prove little.
- The tokenizer is a word-level one with exactly `vocab_size` entries, written beside the
  exported checkpoint: vLLM needs one to detokenize, and a BPE with fewer or more ids than the
  model would make some generated ids undecodable.
- Every case uses start_method="spawn": the ranks import vLLM, which starts threads (OpenMP,
  the engine core) that fork would copy from a parent that has already used them.
- One engine per process, alive until the rank returns (vLLM's parallel state is global).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

pytest.importorskip("vllm")

from megatron_r1.parallel.spawn import run_ranks  # noqa: E402

ATOL = 2e-4
SEQ = [1, 17, 250, 3, 99, 400, 5, 77, 130, 8, 311, 42, 9, 500, 64, 2]  # even length: MoE splits tokens over tp
PROMPTS = [[1, 17, 250, 3], [1, 99, 400], [1, 5]]
SMALL_CAP = 64 << 10  # far below the ~1-3 MB models: most buckets hold one or a few tensors

# name: (preset, training layout, world size, rollout tp, CI or long)
LAYOUTS = {
    "moe_tp2_to_tp2": ("tiny-moe", dict(tp=2), 2, 2),
    "moe_ep2_to_tp1": ("tiny-moe", dict(ep=2), 2, 1),
    "moe_tp2pp2_to_tp2x2": ("tiny-moe", dict(tp=2, pp=2), 4, 2),
    "llama_tp2_to_tp2": ("tiny-llama", dict(tp=2), 2, 2),
}
CI = {"moe_ep2_to_tp1", "llama_tp2_to_tp2"}  # ~1 min each on 2 cores; the others ~1.5 min each: long



def _our_logprobs(session, seq) -> torch.Tensor:
    """log p(seq[k+1] | seq[:k+1]) from the parallel model, on every rank (pp: broadcast from the last stage)."""
    from megatron_r1.engine.runtime import forward_only
    from megatron_r1.parallel.tensor import gather_vocab

    ids = torch.tensor([seq])

    def fn(out, mb):
        lp = gather_vocab(out.logits, session.mesh).float()[0].log_softmax(-1)
        return lp[:-1].gather(1, ids[0, 1:, None])[:, 0]

    return forward_only(session.chunks, [{"input_ids": ids}], fn, session.mesh, broadcast=True)[0]


def _perturb_by_training(session) -> float:
    """One AdamW step on an LM loss (lr 1e-2: the step moves every weight by ~lr)."""
    from megatron_r1.model.gpt import lm_loss
    from megatron_r1.engine.runtime import train_step

    cfg, mesh = session.cfg, session.mesh
    g = torch.Generator().manual_seed(7)
    batch = torch.randint(3, cfg.model.vocab_size, (2 * mesh.dp, len(SEQ)), generator=g)
    norm = float(batch.shape[0] * (batch.shape[1] - 1))
    loss = lambda out, mb: lm_loss(out, mb["input_ids"], None, cfg.model, mesh, norm)  # noqa: E731
    mine = session.dp_slice(batch)
    return train_step(session.chunks, session.optimizer, [{"input_ids": mine[i:i + 1]} for i in range(len(mine))],
                      loss, mesh)["loss"]


def _sync_rank(preset: str, layout: dict, rollout_tp: int, root: str) -> dict:
    import torch.distributed as dist

    from megatron_r1.config import load_config
    from megatron_r1.data.tokenizer import write_word_tokenizer
    from megatron_r1.rollout.engine import RolloutEngine, iter_buckets
    from megatron_r1.training import TrainSession

    t0 = time.perf_counter()
    # initializer_range 0.1 (not 0.02): peaked logits, so greedy decoding and logprobs react to weights
    over = ["model.initializer_range=0.1", "train.params_dtype=float32", "train.lr=1e-2", "train.weight_decay=0.0",
            "train.clip_grad=0.0",
            f"run_dir={root}/run"] + [f"parallel.{k}={v}" for k, v in layout.items()]
    cfg = load_config(preset, over)
    session = TrainSession(cfg, logger=False)
    hf_dir = os.path.join(root, "hf")
    session.export_hf(hf_dir, dtype=torch.float32)
    if dist.get_rank() == 0:
        write_word_tokenizer(cfg.model.vocab_size, hf_dir)
    dist.barrier()

    engine = RolloutEngine(hf_dir, dtype="float32", tensor_parallel_size=rollout_tp, max_model_len=128,
                           kv_cache_bytes=16 << 20, max_num_seqs=8, seed=0)
    t_engine = time.perf_counter()

    def greedy():
        return [s[0].token_ids for s in engine.generate(PROMPTS, temperature=0.0, max_tokens=10)]

    out = {"rank": dist.get_rank()}
    ours_before = _our_logprobs(session, SEQ)
    out["d_before"] = (torch.tensor(engine.score([SEQ])[0]) - ours_before).abs().max().item()
    out["spread"] = (ours_before.max() - ours_before.min()).item()
    gen_before = greedy()

    out["loss"] = _perturb_by_training(session)
    ours = _our_logprobs(session, SEQ)
    out["moved"] = (ours - ours_before).abs().max().item()

    sizes = []

    def recorded():
        for name, t in session.full_state():
            sizes.append(t.numel() * t.element_size())
            yield name, t

    small = engine.update_weights(recorded(), bucket_bytes=SMALL_CAP)
    score = engine.score([SEQ])[0]
    out["gen_before"], out["gen_after"] = gen_before, greedy()
    out["score"], out["ours"] = score, ours.tolist()
    out["d_after"] = (torch.tensor(score) - ours).abs().max().item()
    # the greedy packing the cap allows: a tensor above the cap travels alone, the rest fill up to it
    fake = ((str(i), torch.empty(n, dtype=torch.uint8, device="meta")) for i, n in enumerate(sizes))
    out["small"] = dict(buckets=small.num_buckets, tensors=small.num_tensors, bytes=small.bytes,
                        seconds=small.seconds, expected_buckets=len(list(iter_buckets(fake, SMALL_CAP))),
                        oversized=sum(n > SMALL_CAP for n in sizes))

    big = engine.update_weights(session.full_state(), bucket_bytes=1 << 30)
    out["big"] = dict(buckets=big.num_buckets, bytes=big.bytes, seconds=big.seconds)
    out["score_again"], out["gen_again"] = engine.score([SEQ])[0], greedy()
    out["t_engine"], out["t_total"] = t_engine - t0, time.perf_counter() - t0
    session.close()
    return out


@pytest.mark.parametrize("case", [c if c in CI else pytest.param(c, marks=pytest.mark.long) for c in LAYOUTS])
def test_sync_from_training_layout(case, tmp_path):
    preset, layout, world, rollout_tp = LAYOUTS[case]
    t0 = time.perf_counter()
    results = run_ranks(_sync_rank, world, preset, layout, rollout_tp, str(tmp_path), timeout=600,
                        start_method="spawn")
    wall = time.perf_counter() - t0
    d_before = max(r["d_before"] for r in results)
    d_after = max(r["d_after"] for r in results)
    print(f"\n{case}: world {world}, rollout tp {rollout_tp} -> {world // rollout_tp} engine(s); "
          f"max |Δ logprob| before {d_before:.2e}, after sync {d_after:.2e}; small cap: "
          f"{results[0]['small']['buckets']} buckets ({results[0]['small']['oversized']} tensors over the cap) for "
          f"{results[0]['small']['tensors']} tensors "
          f"({results[0]['small']['bytes'] / 2**20:.2f} MB); engine up after {results[0]['t_engine']:.0f} s, "
          f"wall {wall:.0f} s; logprob spread {results[0]['spread']:.2f}, moved by the step {results[0]['moved']:.2f}")
    for r in results:
        assert r["d_before"] < ATOL, (r["rank"], r["d_before"])
        assert r["spread"] > 1.0 and r["moved"] > 100 * ATOL, "a near-uniform model or a tiny step would prove little"
        assert r["gen_after"] != r["gen_before"], f"rank {r['rank']}: greedy generations ignored the update"
        assert r["d_after"] < ATOL, (r["rank"], r["d_after"], r["score"], r["ours"])
        # the cap splits the push instead of failing (tensors above it travel alone)
        assert r["small"]["buckets"] == r["small"]["expected_buckets"] > 1
        assert r["big"]["buckets"] == 1 and r["big"]["bytes"] == r["small"]["bytes"]
        # idempotent, bit for bit
        assert r["score_again"] == r["score"] and r["gen_again"] == r["gen_after"]
    # the ranks of one rollout TP group (consecutive global ranks) serve identical outputs
    for g in range(0, world, rollout_tp):
        group = results[g:g + rollout_tp]
        assert all(r["gen_after"] == group[0]["gen_after"] and r["score"] == group[0]["score"] for r in group)
