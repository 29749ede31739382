"""Rejection sampling (DeepSeek-R1 stage 3): sample with the policy, keep what the rule rewards accept, as SFT rows.

    megatron-r1 rejection-sample --config cfg.yaml --init-hf POLICY_HF --data prompts.jsonl --out sft.jsonl \\
        [--samples 4] [--keep-per-prompt 1] [--min-score accuracy=1 --min-score language=0.95] [--dry-run]

Notable choices
- Same engine and rewards as GRPO: `rollout.engine.RolloutEngine` generates (rl.template, rl.temperature,
  rl.top_p, rl.max_response_len, rollout.*), and `rl.score.Scorer` (the trainer's `RewardCombiner` over
  `rl.rewards`, which `megatron-r1 score` runs too) scores. So "correct" means exactly what it meant during RL,
  and `megatron-r1 score --config CFG --input OUT` reproduces each row's `rewards`.
- Acceptance is per reward component: a sample is kept when every configured reward reaches its
  threshold (`--min-score NAME=X`; default 1.0 = perfect on every rule: right answer, right format, one
  language). Truncated samples (finish_reason "length") are dropped: an unfinished chain of thought is not
  an SFT target. Identical responses to one prompt are kept once; at most `--keep-per-prompt` per prompt,
  the highest total reward first (ties: sampling order).
- Output rows are `{"prompt", "response"}` with the prompt ALREADY RENDERED through the template, so
  `megatron-r1 sft --data out.jsonl` trains on exactly the text the policy saw; `question` (the raw
  prompt, for `megatron-r1 export-distill` to re-render for a student), `answer`, `reward` and `rewards`
  ride along.
- Multi-rank (srun / torchrun): the world is split into world / rollout.tp vLLM replicas, each takes a
  contiguous share of every chunk of prompts; rank 0 gathers and writes. Sample j of prompt i always
  draws seed + i·n + j, so the output does not depend on the number of replicas.
- `--readable` adds the paper's readability filters (rl/readability.py): a chain of thought mixing
  languages (share of words in the prompt's language below `--min-language`; the prompt's `lang` field,
  else its script), long paragraphs (`--max-paragraph-chars`), code blocks; rejections are counted per
  filter in the statistics.
- `--extra FILE` (repeatable) mixes non-reasoning SFT rows (`{"prompt", "response"}`, or `{"question",
  "response"}` rendered here through rl.template) into the output at `--extra-ratio` reasoning rows per
  non-reasoning row (the paper: ~600k : ~200k, 3), drawn without replacement with the run's seed and
  marked `"source": "non_reasoning"`; reasoning rows are `"source": "reasoning"`.
- The file is written to `OUT.tmp` and renamed at the end: a killed job leaves no half file that a
  later SFT stage would take for complete (rerun it; generation has no checkpoint).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from collections import Counter

from megatron_r1.config import Config, ConfigError, load_config, validate_rewards
from megatron_r1.rl.readability import FILTERS, prompt_language, unreadable


def parse_min_scores(items: list[str], rewards: dict) -> dict[str, float]:
    """`["accuracy=1", "language=0.9"]` over defaults of 1.0 for every configured reward."""
    out = {name: 1.0 for name in rewards}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in rewards:
            raise ConfigError(f"--min-score {item!r}: expected NAME=VALUE with NAME one of the configured "
                              f"rl.rewards ({', '.join(rewards)})")
        try:
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"--min-score {item!r}: {value!r} is not a number") from None
    return out


def select(texts: list[str], truncated: list[bool], total: list[float], components: dict[str, list[float]],
           group_size: int, min_scores: dict[str, float], keep_per_prompt: int,
           keep_truncated: bool = False, rejected: list | None = None) -> list[list[int]]:
    """Indices (into the flat [P·G] sample list) of the samples to keep, per prompt.
    `rejected[i]`: a reason (readability filter) sample i may not be kept, or None.

    Pure; the rules are in the module docstring."""
    if len(texts) % group_size:
        raise ValueError(f"{len(texts)} samples are not a whole number of groups of {group_size}")
    kept = []
    for p in range(len(texts) // group_size):
        idx = range(p * group_size, (p + 1) * group_size)
        ok = [i for i in idx
              if (keep_truncated or not truncated[i]) and not (rejected and rejected[i])
              and all(components[k][i] >= v for k, v in min_scores.items())]
        ok.sort(key=lambda i: -total[i])  # stable: ties keep sampling order
        seen, chosen = set(), []
        for i in ok:
            if texts[i] not in seen and len(chosen) < keep_per_prompt:
                seen.add(texts[i])
                chosen.append(i)
        kept.append(chosen)
    return kept


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def rejection_sample(cfg: Config, init_hf: str, data: str, out: str, samples: int, keep_per_prompt: int,
                     min_scores: dict[str, float], keep_truncated: bool = False, chunk: int = 256,
                     limit: int = 0, readable: dict | None = None, extra: list[str] = (),
                     extra_ratio: float = 3.0) -> dict | None:
    """Generate, score, filter, write; the statistics on rank 0, None elsewhere.

    Collective when torch.distributed is initialised with > 1 rank."""
    import torch.distributed as dist

    from megatron_r1.data.prompts import drop_overlong, load_prompts, report
    from megatron_r1.data.templates import render_prompt
    from megatron_r1.data.tokenizer import load_tokenizer
    from megatron_r1.rl.score import Scorer
    from megatron_r1.rollout.engine import RolloutEngine
    rl = cfg.rl
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    tp = cfg.rollout.tp
    if world % tp:
        raise ConfigError(f"rollout.tp={tp} does not divide the world size {world}")
    replicas, replica = world // tp, rank // tp
    tok = load_tokenizer(cfg.data.tokenizer or init_hf)
    # prompts that leave no room for a response in the engine are dropped and reported, not fatal
    dataset = drop_overlong(load_prompts(data, cfg.data.prompt_key, cfg.data.answer_key, cfg.data.on_error),
                            lambda e: len(tok.encode(render_prompt(rl.template, e.prompt), bos=True)),
                            cfg.rollout.max_model_len - 1)
    if rank == 0:
        for line in report(dataset, f"prompts {data}", f" (rollout.max_model_len={cfg.rollout.max_model_len})"):
            print(line, flush=True)
    examples = list(dataset)
    if limit:
        examples = examples[:limit]
    rewards = Scorer.from_config(rl.rewards)
    engine = RolloutEngine(init_hf, dtype="float32" if cfg.train.params_dtype == "float32" else "bfloat16",
                           max_model_len=cfg.rollout.max_model_len, seed=cfg.train.seed, tensor_parallel_size=tp,
                           gpu_memory_utilization=cfg.rollout.gpu_memory_utilization)
    stats = {"prompts": len(examples), "samples": 0, "truncated": 0, "kept": 0, "prompts_with_kept": 0}
    stats.update({f"pass/{k}": 0.0 for k in min_scores})
    if readable is not None:
        stats.update({f"filtered/{k}": 0 for k in FILTERS if k != "markup"})
    t0 = time.time()
    tmp = out + ".tmp"
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        f = open(tmp, "w")
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        per = -(-len(part) // replicas)
        lo, hi = min(replica * per, len(part)), min((replica + 1) * per, len(part))
        texts = [render_prompt(rl.template, e.prompt, tok) for e in part[lo:hi]]
        local: dict = {"rows": [], "samples": 0, "truncated": 0, "pass": {k: 0.0 for k in min_scores}}
        if texts:
            ids = [tok.encode(t, bos=True) for t in texts]
            max_new = min(rl.max_response_len, cfg.rollout.max_model_len - max(map(len, ids)))  # >= 1: see above
            groups = engine.generate(ids, n=samples, temperature=rl.temperature, top_p=rl.top_p, max_tokens=max_new,
                                     seed=cfg.train.seed + (start + lo) * samples)
            flat = [s for g in groups for s in g]
            refs = [e.answer for e in part[lo:hi] for _ in range(samples)]
            # our tokenizer's decode, as GRPO's rewards and SFT's tokenizer read it (not vLLM's streamed text)
            resp = [tok.decode(s.token_ids) for s in flat]
            scored = rewards(resp, refs)
            trunc = [s.finish_reason == "length" for s in flat]
            why = None
            if readable is not None:  # counted among the samples the rewards accept
                langs = [prompt_language(e.prompt, e.extra.get("lang")) for e in part[lo:hi] for _ in range(samples)]
                why = [unreadable(r, lang, markup=False, **readable) for r, lang in zip(resp, langs)]
                ok = [all(scored.components[k][i] >= v for k, v in min_scores.items()) for i in range(len(flat))]
                local["filtered"] = Counter(w for w, o in zip(why, ok) if w and o)
            kept = select(resp, trunc, scored.total, scored.components, samples, min_scores,
                          keep_per_prompt, keep_truncated, why)
            local["samples"], local["truncated"] = len(flat), sum(trunc)
            local["pass"] = {k: float(sum(scored.components[k][i] >= v for i in range(len(flat))))
                             for k, v in min_scores.items()}
            for p, chosen in enumerate(kept):
                e = part[lo + p]
                local["rows"].append([{"prompt": texts[p], "question": e.prompt, "response": resp[i],
                                       "answer": e.answer,
                                       "reward": scored.total[i],
                                       "rewards": {k: v[i] for k, v in scored.components.items()},
                                       "origin": e.origin, "source": "reasoning"} for i in chosen])
        parts = _gather(local, world)[::tp]  # the ranks of one TP group generated the same samples
        if rank == 0:
            for prt in parts:
                stats["samples"] += prt["samples"]
                stats["truncated"] += prt["truncated"]
                for k, v in prt["pass"].items():
                    stats[f"pass/{k}"] += v
                for k, v in prt.get("filtered", {}).items():
                    stats[f"filtered/{k}"] += v
                for rows in prt["rows"]:
                    stats["kept"] += len(rows)
                    stats["prompts_with_kept"] += bool(rows)
                    for row in rows:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            print(f"rejection-sample: {min(start + chunk, len(examples))}/{len(examples)} prompts, "
                  f"kept {stats['kept']} of {stats['samples']} samples ({time.time() - t0:.0f}s)", flush=True)
    if rank != 0:
        return None
    if extra:
        stats["non_reasoning"] = _write_extra(f, extra, stats["kept"], extra_ratio, rl.template, tok, cfg.train.seed)
    f.close()
    os.replace(tmp, out)
    for k in min_scores:
        stats[f"pass/{k}"] /= max(stats["samples"], 1)
    return stats


def _write_extra(f, paths: list[str], reasoning_rows: int, ratio: float, template: str, tok, seed: int) -> int:
    """Appends round(reasoning_rows / ratio) non-reasoning rows (all there are, if fewer) drawn from `paths`."""
    import random

    from megatron_r1.data.prompts import DataError
    from megatron_r1.data.templates import render_prompt
    from megatron_r1.sft.trainer import sft_records
    rows = []
    for path in paths:
        try:  # rendered prompts, as our SFT rows hold them
            rows += [{"prompt": p, "response": r, "origin": o} for o, p, r in sft_records(path, "prompt", "response")]
        except DataError:  # raw questions: rendered here, as the reasoning rows' prompts are
            rows += [{"prompt": render_prompt(template, q, tok), "question": q, "response": r, "origin": o}
                     for o, q, r in sft_records(path, "question", "response")]
    for row in rows:
        row["source"] = "non_reasoning"
    want = min(len(rows), round(reasoning_rows / ratio))
    for row in random.Random(seed).sample(rows, want):
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return want


def main(argv: list[str]) -> int:
    from megatron_r1 import dryrun
    ap = argparse.ArgumentParser(prog="megatron-r1 rejection-sample", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML config or model preset (rl.*, rollout.*, data.*)")
    ap.add_argument("--init-hf", required=True, help="the policy: HF dir with tokenizer")
    ap.add_argument("--data", default=None, help="prompts with reference answers (default data.train_path)")
    ap.add_argument("--out", required=True, help="SFT JSONL to write ({prompt, response} rows)")
    ap.add_argument("--samples", type=int, default=None, help="samples per prompt (default rl.group_size)")
    ap.add_argument("--keep-per-prompt", type=int, default=1)
    ap.add_argument("--min-score", action="append", default=[], metavar="NAME=X",
                    help="acceptance threshold of one configured reward (default 1.0 for each)")
    ap.add_argument("--keep-truncated", action="store_true", help="also accept samples cut at max tokens")
    ap.add_argument("--chunk", type=int, default=256, help="prompts generated per round (bounds host memory)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    ap.add_argument("--readable", action="store_true",
                    help="the paper's filters: mixed languages, long paragraphs, code blocks")
    ap.add_argument("--min-language", type=float, default=1.0, help="--readable: share of the prompt's language")
    ap.add_argument("--max-paragraph-chars", type=int, default=1000, help="--readable: longest paragraph")
    ap.add_argument("--extra", action="append", default=[], metavar="FILE",
                    help="non-reasoning SFT rows to mix in ({prompt|question, response} JSONL/Parquet)")
    ap.add_argument("--extra-ratio", type=float, default=3.0, help="reasoning rows per non-reasoning row")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.temperature=0.6")
    dryrun.add_arguments(ap)
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    validate_rewards(cfg.rl)
    data = a.data or cfg.data.train_path
    if not data:
        raise ConfigError("rejection-sample needs prompts: --data or data.train_path")
    min_scores = parse_min_scores(a.min_score, cfg.rl.rewards)
    samples = a.samples or cfg.rl.group_size
    if samples < 1 or a.keep_per_prompt < 1:
        raise ConfigError("--samples and --keep-per-prompt must be >= 1")
    if a.extra_ratio <= 0:
        raise ConfigError("--extra-ratio must be > 0")
    for path in a.extra:
        if not os.path.exists(path):
            raise ConfigError(f"--extra {path}: no such file")
    readable = ({"min_language": a.min_language, "max_paragraph_chars": a.max_paragraph_chars}
                if a.readable else None)
    if a.dry_run:
        return dryrun.rejection(a, cfg, argv)
    from megatron_r1.parallel.launch import destroy_distributed, init_distributed, resolve_env
    multi = resolve_env(os.environ, "gloo").world_size > 1
    if multi:  # one process alone needs no group: vLLM then runs its own in-process executor
        init_distributed()
    try:
        stats = rejection_sample(cfg, a.init_hf, data, a.out, samples, a.keep_per_prompt, min_scores,
                                 a.keep_truncated, a.chunk, a.limit, readable, a.extra, a.extra_ratio)
        if stats is not None:
            print("rejection-sample done: " + json.dumps(stats) + f" -> {a.out}", flush=True)
            # the stage's completion marker, as the trainers write theirs (stage scripts chain on it)
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(os.path.join(cfg.run_dir, "DONE.tmp"), "w") as f:
                json.dump({"out": os.path.abspath(a.out), **stats}, f, indent=2)
            os.replace(os.path.join(cfg.run_dir, "DONE.tmp"), os.path.join(cfg.run_dir, "DONE"))
    finally:
        if multi:
            destroy_distributed()
    return 0
