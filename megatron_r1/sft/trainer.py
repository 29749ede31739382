"""Language-model training on the 5D runtime: pretraining on packed corpora, and SFT.

    megatron-r1 pretrain --config cfg.yaml --data PREFIX [overrides]   # Megatron .bin/.idx corpus
    megatron-r1 sft --config cfg.yaml --data rows.jsonl [--init-hf DIR] # {"prompt", "response"} rows (or .parquet)

Notable choices
- One loop for both: a global batch is drawn from a seeded stream (same on every rank), sliced per dp
  rank, cut into micro-batches and handed to `train_step` with the LM loss; the normaliser is the
  global number of target tokens, so gradients are layout-independent sums.
- SFT (cold start, distillation of dense students) masks the prompt: only response tokens are
  targets. Rows longer than `train.seq_length` are truncated and counted in the metrics.
- SFT `--epochs N` sets the step count to N passes over the rows (ceil(N·rows / global batch)); the
  row order is a fresh permutation per pass.
- SFT micro-batches are padding-free by length (`--pack`, on by default): a dp rank's rows are sorted
  by length and each micro-batch is cut at its longest row's last target token (rounded up to what the
  layout splits: 2·cp, tp under SP/MoE), so a short row never pads to `train.seq_length`. Each row
  stays its own sequence (attention never crosses rows) and tokens after a row's last target change
  nothing before them in a causal model, so the LM loss and its gradients equal the padded run's
  (tests/e2e/test_sft_pack.py, 1e-6 in float32). MoE routing no longer sees pad tokens. Packing
  several rows into one sequence would save more, but needs a document mask in the attention kernel.
- The MTP loss (λ·CE of the D extra heads) is on whenever the model has MTP modules.
- At the end the policy is exported as a Hugging Face directory (`<run_dir>/hf`) with the tokenizer,
  ready for vLLM, GRPO, evaluation or `tools/convert_checkpoint.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from megatron_r1.config import ConfigError, load_config
from megatron_r1.model.gpt import lm_loss
from megatron_r1.engine.runtime import train_step
from megatron_r1.training import TrainSession


def _normalizer(masks: torch.Tensor, session: TrainSession) -> float:
    """Global number of target tokens (token t>0 with mask 1) over every dp rank's rows."""
    n = masks[:, 1:].sum().to(torch.float64)
    if session.mesh.dp_group is not None:
        dist.all_reduce(n, group=session.mesh.dp_group)
    return float(n)


def micro_batches(ids: torch.Tensor, mask: torch.Tensor, mbs: int, normalizer: float,
                  trim_multiple: int = 0) -> list[dict]:
    """`trim_multiple` > 0: padding-free by length (module docstring): rows sorted by their last target
    position, each micro-batch cut after its longest one, rounded up to a multiple of `trim_multiple`."""
    if trim_multiple <= 0:
        return [{"input_ids": ids[i:i + mbs], "loss_mask": mask[i:i + mbs], "normalizer": normalizer}
                for i in range(0, len(ids), mbs)]
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    need = (mask.ne(0) * pos).amax(dim=1)  # [B] tokens up to and including the last target (0: none)
    order = torch.argsort(need, descending=True, stable=True)
    out = []
    for i in range(0, len(ids), mbs):
        rows = order[i:i + mbs]
        s = max(int(need[rows[0]]), 1)  # the micro-batch's longest row: one small host read per micro-batch
        s = min(-(-s // trim_multiple) * trim_multiple, ids.shape[1])
        out.append({"input_ids": ids[rows, :s], "loss_mask": mask[rows, :s], "normalizer": normalizer})
    return out


def trim_multiple(session: TrainSession) -> int:
    """The sequence-length multiple the layout splits (engine.runtime.check_micro_batches)."""
    mesh = session.mesh
    split_tp = mesh.tp > 1 and (mesh.sp or session.cfg.model.is_moe)
    return (2 * mesh.cp if mesh.cp > 1 else 1) * (mesh.tp if split_tp else 1)


def run_lm_training(session: TrainSession, next_global_batch, steps: int, data_state=None,
                    show=("loss", "lr"), batch_rows=None, pack: bool = False) -> dict:
    """The loop: `next_global_batch() -> (ids [G, S], loss_mask [G, S])`, identical on every rank.

    `data_state()` returns the data position saved in checkpoints (every `train.save_interval` steps);
    `batch_rows()` names the rows of the last batch for the sample ledger."""
    cfg, mesh = session.cfg, session.mesh
    model_cfg = cfg.model

    def loss_fn(out, mb):
        loss, met = lm_loss(out, mb["input_ids"], mb["loss_mask"], model_cfg, mesh, mb["normalizer"])
        return session.faults.on_loss(loss), met

    last = {}
    for step in range(session.step, steps):
        t0 = time.time()
        session.faults.begin(step + 1)
        lr = session.set_lr(step)
        ids, mask = next_global_batch()
        rows = batch_rows() if batch_rows else []
        ids, mask = session.dp_slice(ids), session.dp_slice(mask)
        norm = _normalizer(mask, session)
        mbs = micro_batches(ids, mask, cfg.train.micro_batch_size, norm, trim_multiple(session) if pack else 0)
        metrics = train_step(session.chunks, session.optimizer, mbs, loss_fn, mesh, skip_nonfinite=True)
        dt = time.time() - t0
        tokens = float(norm)
        last = {"loss": metrics["lm_loss_sum"] / max(tokens, 1.0), "total_loss": metrics["loss"], "lr": lr,
                "grad_norm": metrics.get("grad_norm", 0.0), "tokens_per_s": tokens / dt, "step_time": dt,
                "moe_max_violation": metrics.get("moe_max_violation", 0.0)}
        for k, v in metrics.items():
            if k.startswith("mtp") and k.endswith("_loss_sum"):
                last[k.replace("_sum", "")] = v / max(tokens, 1.0)
        session.check_step(step + 1, {**last, **metrics})  # metrics' "loss" is the total, NaN when any part is
        last.update(skipped=metrics["skipped"], skipped_steps=float(session.skipped_steps))
        session.step = step + 1
        session.ledger.record(session.step, rows, skipped=metrics["skipped"] > 0)
        session.logger.log(session.step, last, show=show)
        session.maybe_save({"data": data_state() if data_state else None})
        if session.should_stop():
            session.logger.write(f"{session.stopped}: saving at step {session.step} and stopping")
            break
    session.maybe_save({"data": data_state() if data_state else None}, force=True)
    return last


def sft_records(path: str, prompt_key: str, response_key: str):
    """(origin, prompt, response) of every SFT row of a .jsonl or .parquet file, read as the RL prompts are
    (data/prompts.py: bytes decoded per line, Parquet errors named); the first malformed row is a DataError
    naming path:LINE (Parquet: path:row N)."""
    from pathlib import Path

    from megatron_r1.data.prompts import DataError, _jsonl_rows, _parquet_rows, _RowError
    rows = (_parquet_rows(Path(path), (prompt_key, response_key)) if path.endswith(".parquet")
            else _jsonl_rows(Path(path)))
    for origin, r in rows:
        if isinstance(r, _RowError):
            raise DataError(f"{origin}: {r}")
        try:
            p, resp = r[prompt_key], r[response_key]
            if not (isinstance(p, str) and isinstance(resp, str)):
                raise TypeError(f"'{prompt_key}' and '{response_key}' must be strings")
        except (KeyError, TypeError) as e:
            raise DataError(f"{origin}: expected an object with '{prompt_key}' and '{response_key}' "
                            f"({type(e).__name__}: {e})") from None
        yield origin, p, resp


def _sft_rows(paths: list[str], tokenizer, seq_length: int, prompt_key: str, response_key: str):
    """Tokenised SFT rows of every file: (ids, mask) with mask 1 on response tokens (and the final eos)."""
    rows, truncated = [], 0
    for _, p, resp in (r for path in paths for r in sft_records(path, prompt_key, response_key)):
        pi = tokenizer.encode(p, bos=True)
        ri = tokenizer.encode(resp, eos=True)
        ids, mask = pi + ri, [0] * len(pi) + [1] * len(ri)
        if len(ids) > seq_length:
            truncated += 1
            ids, mask = ids[:seq_length], mask[:seq_length]
        rows.append((ids, mask))
    return rows, truncated


def _common_args(ap: argparse.ArgumentParser, many_data: bool = False) -> None:
    ap.add_argument("--config", required=True, help="YAML config or model preset")
    if many_data:
        ap.add_argument("--data", required=True, action="append", help="SFT rows; repeat to combine files")
    else:
        ap.add_argument("--data", required=True)
    ap.add_argument("--init-hf", default=None, help="start from this Hugging Face directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer (HF dir or .model); default data.tokenizer")
    ap.add_argument("--export-hf", default=None, help="where to write the final HF dir (default <run_dir>/hf)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    from megatron_r1 import dryrun
    dryrun.add_arguments(ap)


def pretrain_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 pretrain", description="pretraining on a packed Megatron corpus")
    _common_args(ap)
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    if a.dry_run:  # before anything allocates or joins a process group
        from megatron_r1 import dryrun
        return dryrun.pretrain(a, cfg, argv)
    from megatron_r1.data.indexed import PackedDataset
    data = PackedDataset(a.data, cfg.train.seq_length, seed=cfg.train.seed)
    session = TrainSession(cfg, init_hf=a.init_hf, desc="pretrain")
    extra = session.resume()
    if extra and extra.get("data"):
        data.load_state_dict(extra["data"])
    g = cfg.train.global_batch_size

    def next_batch():
        ids = data.next_batch(g)
        return ids, torch.ones_like(ids)

    last = run_lm_training(session, next_batch, cfg.train.train_steps, data_state=data.state_dict,
                           batch_rows=data.last_rows)
    out = a.export_hf or os.path.join(cfg.run_dir, "hf")

    def done():
        if session.is_main:
            session.logger.write(f"pretrain done: loss {last.get('loss', float('nan')):.4f}; HF model in {out}")

    # stopped by a signal: checkpoint saved, no export, EXIT_STOPPED; else export and <run_dir>/DONE
    return session.finish(out, a.tokenizer or cfg.data.tokenizer, dtype=torch.float32, before_done=done)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 sft", description="supervised fine-tuning on prompt/response rows")
    _common_args(ap, many_data=True)
    ap.add_argument("--prompt-key", default="prompt")
    ap.add_argument("--response-key", default="response")
    ap.add_argument("--epochs", type=float, default=0,
                    help="passes over the rows; sets train.train_steps = ceil(epochs * rows / global batch)")
    ap.add_argument("--no-pack", dest="pack", action="store_false",
                    help="pad every row to train.seq_length (default: padding-free micro-batches by length)")
    a = ap.parse_args(argv)
    if a.epochs < 0:
        raise ConfigError(f"--epochs {a.epochs}: must be > 0 (or 0: train.train_steps decides)")
    cfg = load_config(a.config, a.overrides)
    if a.dry_run:  # before anything allocates or joins a process group
        from megatron_r1 import dryrun
        return dryrun.sft(a, cfg, argv)
    from megatron_r1.data.tokenizer import load_tokenizer
    tok_path = a.tokenizer or cfg.data.tokenizer or a.init_hf
    if not tok_path:
        raise ConfigError("sft needs a tokenizer: --tokenizer, data.tokenizer or --init-hf")
    tok = load_tokenizer(tok_path)
    rows, truncated = _sft_rows(a.data, tok, cfg.train.seq_length, a.prompt_key, a.response_key)
    if not rows:
        raise ConfigError(f"sft: {', '.join(a.data)}: no rows")
    if a.epochs:
        import math
        cfg.train.train_steps = max(1, math.ceil(a.epochs * len(rows) / cfg.train.global_batch_size))
    session = TrainSession(cfg, init_hf=a.init_hf, desc="sft")
    g, s = cfg.train.global_batch_size, cfg.train.seq_length
    gen = torch.Generator().manual_seed(cfg.train.seed)
    order: list[int] = []
    taken: list[int] = []  # the rows of the last batch, for the sample ledger

    def next_batch():
        nonlocal order
        ids = torch.full((g, s), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((g, s), dtype=torch.long)
        taken.clear()
        for i in range(g):
            if not order:
                order = torch.randperm(len(rows), generator=gen).tolist()
            taken.append(order.pop())
            r_ids, r_mask = rows[taken[-1]]
            ids[i, :len(r_ids)] = torch.tensor(r_ids)
            mask[i, :len(r_mask)] = torch.tensor(r_mask)
        return ids, mask

    if session.is_main and truncated:
        session.logger.write(f"sft: {truncated} of {len(rows)} rows truncated to {s} tokens")
    if session.is_main and a.epochs:
        session.logger.write(f"sft: {a.epochs:g} epochs of {len(rows)} rows = {cfg.train.train_steps} steps of {g}")
    extra = session.resume()
    if extra and extra.get("data"):
        order = list(extra["data"]["order"])
        gen.set_state(extra["data"]["gen"])
    run_lm_training(session, next_batch, cfg.train.train_steps,
                    data_state=lambda: {"order": list(order), "gen": gen.get_state()}, batch_rows=lambda: list(taken),
                    pack=a.pack)
    return session.finish(a.export_hf or os.path.join(cfg.run_dir, "hf"), tok_path)
