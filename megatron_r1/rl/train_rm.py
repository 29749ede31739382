"""`megatron-r1 train-rm`: a reward model trained on preference pairs with the Bradley–Terry loss.

    megatron-r1 train-rm --config cfg.yaml --kind helpful --data pairs.jsonl [--eval heldout.jsonl]
                         [--init-hf DIR] [--tokenizer TOK] [overrides]

Notable choices
- Rows: `{"prompt", "chosen", "rejected"}` (JSONL or Parquet); the first malformed row is one error naming
  path:LINE. Each side is read as the serving reward will read it (`rl/reward_model.py` `rm_text`:
  the summary for `--kind helpful`, the whole response for `harmless`).
- The model is any of our configs (a tiny dense student, or the policy's architecture with `--init-hf`),
  trained by the same runtime as `sft` (TrainSession: dp / tp / pp, ZeRO-1, checkpoints every
  `train.save_interval` steps, resume from the newest, SIGTERM → save and exit 75). `parallel.cp` must be 1.
- `train.global_batch_size` and `train.micro_batch_size` count PAIRS; a micro-batch holds its pairs as
  alternating chosen / rejected rows, padded to the longest. The loss is divided by the global pair count,
  so any dp layout sums to the same gradient.
- Held-out pairwise accuracy (the fraction of pairs scored chosen > rejected) is measured before training,
  every `--eval-every` steps and at the end, logged as `eval/accuracy`, and written to `<export>/rm.json`
  with the kind and the scored token; without `--eval`, `--heldout-fraction` of the prompts of `--data`
  are held out (whole prompts, so held-out pairs are on unseen prompts).
- The export is a Hugging Face directory plus `rm.json`, which `rm_helpful:DIR` / `rm_harmless:DIR`
  (rl/rewards/model.py) load for GRPO and `megatron-r1 score`.
"""
from __future__ import annotations

import argparse
import json
import os
import random

import torch
import torch.distributed as dist

from megatron_r1.config import ConfigError, load_config
from megatron_r1.rl.reward_model import KINDS, RM_META, pad_rows, pairs_loss_fn, rm_ids, rm_text, sequence_scores


# ------------------------------------------------------------------------------------------- data
def read_pairs(path: str) -> list[tuple[str, str, str, str]]:
    """(origin, prompt, chosen, rejected) of every row; DataError naming path:LINE on the first bad one."""
    from pathlib import Path

    from megatron_r1.data.prompts import DataError, _jsonl_rows, _parquet_rows, _RowError
    keys = ("prompt", "chosen", "rejected")
    rows = _parquet_rows(Path(path), keys) if path.endswith(".parquet") else _jsonl_rows(Path(path))
    out = []
    for origin, r in rows:
        if isinstance(r, _RowError):
            raise DataError(f"{origin}: {r}")
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in keys):
            raise DataError(f"{origin}: expected an object with string fields {', '.join(map(repr, keys))}")
        out.append((origin, r["prompt"], r["chosen"], r["rejected"]))
    if not out:
        raise DataError(f"{path}: no preference pairs")
    return out


def tokenize_pairs(tok, pairs, kind: str, max_len: int) -> list[tuple[list[int], list[int]]]:
    return [(rm_ids(tok, rm_text(p, c, kind), max_len), rm_ids(tok, rm_text(p, r, kind), max_len))
            for _, p, c, r in pairs]


def heldout_split(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): whole prompts held out."""
    prompts = sorted({p[1] for p in pairs})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:max(1, round(fraction * len(prompts)))]) if len(prompts) > 1 else set()
    return [p for p in pairs if p[1] not in held], [p for p in pairs if p[1] in held]


def pair_micro_batches(pairs: list[tuple[list[int], list[int]]], mbs: int, normalizer: float,
                       multiple: int, pad_id: int) -> list[dict]:
    """Micro-batches of `mbs` pairs: rows chosen_0, rejected_0, chosen_1, ... with each row's last index."""
    out = []
    for i in range(0, len(pairs), mbs):
        rows = [ids for pair in pairs[i:i + mbs] for ids in pair]
        ids, last = pad_rows(rows, pad_id, multiple)
        out.append({"input_ids": ids, "last": last, "normalizer": normalizer})
    return out


# ------------------------------------------------------------------------------------------- eval
def heldout_accuracy(session, pairs: list[tuple[list[int], list[int]]], token_id: int, pad_id: int) -> dict:
    """Pairwise accuracy and mean BT loss over `pairs` (each dp rank scores a strided share). Collective."""
    mesh, cfg = session.mesh, session.cfg
    share = pairs[mesh.dp_rank::mesh.dp]
    sums = torch.zeros(3, dtype=torch.float64, device=mesh.device)  # correct, loss, pairs
    if share:
        mbs = pair_micro_batches(share, cfg.train.micro_batch_size, 1.0, mesh.tp, pad_id)

        def fn(out, mb):
            s = sequence_scores(out, mb["last"], token_id, mesh)
            margin = (s[0::2] - s[1::2]).double()
            return torch.stack([(margin > 0).double().sum(), -torch.nn.functional.logsigmoid(margin).sum(),
                                torch.tensor(float(len(margin)), dtype=torch.float64, device=margin.device)])

        from megatron_r1.engine.runtime import forward_only
        res = forward_only(session.chunks, mbs, fn, mesh)
        if res and mesh.tp_rank == 0:  # the last stage's tp rank 0 counts; every rank joins the sum
            sums = sums + torch.stack(res).sum(0)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    correct, loss, n = sums.tolist()
    return {"accuracy": correct / max(n, 1.0), "loss": loss / max(n, 1.0), "pairs": n}


# ------------------------------------------------------------------------------------------- main
def train(session, tok, kind: str, train_pairs, heldout_pairs, eval_every: int = 0) -> dict:
    """The loop; returns the held-out metrics at the end and before training (`initial`, when this run
    started at step 0), and the last step's training metrics."""
    from megatron_r1.engine.runtime import train_step
    cfg, mesh = session.cfg, session.mesh
    g, mb, steps = cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.train_steps
    token_id = tok.eos_id
    if not 0 <= token_id < cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer's eos id {token_id} is outside model.vocab_size={cfg.model.vocab_size}")
    data = tokenize_pairs(tok, train_pairs, kind, cfg.train.seq_length)
    held = tokenize_pairs(tok, heldout_pairs, kind, cfg.train.seq_length)
    loss_fn = pairs_loss_fn(token_id, mesh)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    order: list[int] = []
    extra = session.resume()
    if extra and extra.get("data"):
        order = list(extra["data"]["order"])
        gen.set_state(extra["data"]["gen"])
    state = lambda: {"data": {"order": list(order), "gen": gen.get_state()}}  # noqa: E731

    def log_eval(step: int, advance: bool) -> dict:
        ev = heldout_accuracy(session, held, token_id, tok.pad_id) if held else {}
        if ev:
            session.logger.log(step, {"eval/accuracy": ev["accuracy"], "eval/loss": ev["loss"]}, advance=advance)
        return ev

    initial = log_eval(0, advance=False) if session.step == 0 else {}
    last: dict = {}
    for step in range(session.step, steps):
        lr = session.set_lr(step)
        batch = []
        for _ in range(g):  # the global batch, identical on every rank; this dp rank takes its slice
            if not order:
                order = torch.randperm(len(data), generator=gen).tolist()
            batch.append(data[order.pop()])
        m = train_step(session.chunks, session.optimizer,
                       pair_micro_batches(session.dp_slice(batch), mb, float(g), mesh.tp, tok.pad_id), loss_fn, mesh)
        n = max(m["pairs"], 1.0)
        last = {"loss": m["bt_loss_sum"] / n, "accuracy": m["correct"] / n, "lr": lr, "grad_norm": m["grad_norm"]}
        session.step = step + 1
        if eval_every and session.step % eval_every == 0 and session.step != steps:
            ev = heldout_accuracy(session, held, token_id, tok.pad_id) if held else {}
            last.update({f"eval/{k}": v for k, v in ev.items() if k != "pairs"})
        session.logger.log(session.step, last, show=("loss", "accuracy", "lr"))
        session.maybe_save(state())
        if session.should_stop():
            session.logger.write(f"{session.stopped}: saving at step {session.step} and stopping")
            break
    session.maybe_save(state(), force=True)
    ev = heldout_accuracy(session, held, token_id, tok.pad_id) if held else {"accuracy": float("nan"), "pairs": 0}
    if held and not session.stopped:
        session.logger.log(session.step, {"eval/accuracy": ev["accuracy"], "eval/loss": ev["loss"]}, advance=False)
    return {"heldout": ev, "initial": initial, "last": last, "token_id": token_id}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 train-rm", description="train a reward model on preference pairs "
                                                                          "(Bradley-Terry)")
    ap.add_argument("--config", required=True, help="YAML config or model preset (e.g. tiny-qwen2)")
    ap.add_argument("--kind", required=True, choices=sorted(KINDS),
                    help="helpful: judges the final summary; harmless: the whole response")
    ap.add_argument("--data", required=True, help="JSONL/Parquet rows {prompt, chosen, rejected}")
    ap.add_argument("--eval", default=None, help="held-out pairs (default: --heldout-fraction of --data's prompts)")
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=0, help="held-out accuracy every N steps (and at the ends)")
    ap.add_argument("--init-hf", default=None, help="start from this Hugging Face directory (e.g. the SFT policy)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer (HF dir or .model); default data.tokenizer or --init-hf")
    ap.add_argument("--export-hf", default=None, help="where to write the reward model (default <run_dir>/hf)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    from megatron_r1 import dryrun
    dryrun.add_arguments(ap)
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    if cfg.parallel.cp > 1:
        raise ConfigError(f"train-rm: parallel.cp={cfg.parallel.cp} is not supported (use dp, tp or pp)")
    if not 0 < a.heldout_fraction < 1:
        raise ConfigError(f"--heldout-fraction={a.heldout_fraction} must be in (0, 1)")
    if a.dry_run:  # before anything allocates or joins a process group
        return dryrun.train_rm(a, cfg, argv)
    from megatron_r1.data.tokenizer import load_tokenizer
    from megatron_r1.training import TrainSession
    tok_path = a.tokenizer or cfg.data.tokenizer or a.init_hf
    if not tok_path:
        raise ConfigError("train-rm needs a tokenizer: --tokenizer, data.tokenizer or --init-hf")
    tok = load_tokenizer(tok_path)
    pairs = read_pairs(a.data)
    train_pairs, held = (pairs, read_pairs(a.eval)) if a.eval else heldout_split(pairs, a.heldout_fraction,
                                                                                  cfg.train.seed)
    session = TrainSession(cfg, init_hf=a.init_hf, desc="train-rm")
    if session.is_main:
        session.logger.write(f"train-rm ({a.kind}): {len(train_pairs)} training pairs, {len(held)} held out")
    res = train(session, tok, a.kind, train_pairs, held, a.eval_every)
    out = a.export_hf or os.path.join(cfg.run_dir, "hf")

    def write_meta():
        if not session.is_main:
            return
        meta = {"kind": a.kind, "judges": KINDS[a.kind], "score_token_id": res["token_id"],
                "max_length": cfg.train.seq_length, "heldout_accuracy": res["heldout"]["accuracy"],
                "heldout_pairs": int(res["heldout"]["pairs"]), "train_pairs": len(train_pairs), "steps": session.step}
        with open(os.path.join(out, RM_META), "w") as f:
            json.dump(meta, f, indent=2)
        session.logger.write(f"train-rm done: held-out accuracy {meta['heldout_accuracy']:.3f} on "
                             f"{meta['heldout_pairs']} pairs; reward model in {out}")

    return session.finish(out, tok_path, dtype=torch.float32, before_done=write_meta)
