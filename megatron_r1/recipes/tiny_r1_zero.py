"""The main job in miniature: everything `examples/r1_zero_tiny.sh` needs that is not a trainer.

    megatron-r1 prepare-tiny --run-dir runs/r1_zero_tiny     # task data, tokenizer, tokenised corpus
    megatron-r1 report-tiny  --run-dir runs/r1_zero_tiny     # before/after table + where things are

Notable choices
- No downloads: the arithmetic task, the pretraining corpus (with deliberate noise: slips, broken
  format, bare answers) and the sentencepiece tokenizer are all made here (megatron_r1/data/arith.py,
  data/tokenizer.py), then tokenised into Megatron's .bin/.idx format.
- The held-out eval problems never appear in the corpus nor in the RL prompts.
- The model's vocabulary is fixed at 512 rows (tiny-moe); the tokenizer is trained to at most that.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re

from megatron_r1.data.arith import (DIFFICULTY, Languages, read_jsonl, sample_problem, worked_solution, write_jsonl,
                                    write_task)
from megatron_r1.data.templates import R1_ZERO_TEMPLATE, render_prompt

VOCAB = 512


def r1_texts() -> list[str]:
    """Tokenizer-only texts of the later R1 stages (r1_chat prompts, readable R1 responses): the base never
    pretrains on them, but the tokenizer knows their pieces, so SFT learns whole tokens, not bytes."""
    return [render_prompt("r1_chat", r["prompt"]) + r["response"] for r in long_cot_exemplars(6)] * 20


def long_cot_exemplars(n: int, seed: int = 0) -> list[dict]:
    """Hand-written-style long CoTs in the readable R1 format, half English half Chinese: the few-shot
    exemplars of `megatron-r1 cold-start-data` (drawn from their own stream, never a held-out problem's)."""
    from megatron_r1.sft.cold_start import summary
    rng = random.Random(f"exemplars-{seed}")
    out = []
    for i in range(n):
        p = sample_problem(rng, DIFFICULTY[1]).posed_in(("en", "zh")[i % 2])
        out.append({"prompt": p.question, "response": f"<think> {worked_solution(p)} </think> "
                    f"{summary(p.answer, p.lang)}", "answer": p.answer, "lang": p.lang})
    return out


def prepare(run_dir: str, docs: int, difficulty: int, seed: int = 0, langs: Languages = Languages(),
            n_train: int = 4000, n_eval: int = 200) -> dict:
    from megatron_r1.data.indexed import build_indexed_dataset
    from megatron_r1.data.tokenizer import load_tokenizer, train_sentencepiece
    paths = write_task(run_dir, R1_ZERO_TEMPLATE, seed=seed, cfg=DIFFICULTY[difficulty], n_docs=docs,
                       n_train=n_train, n_eval=n_eval, langs=langs)
    tok_dir = os.path.join(run_dir, "tokenizer")
    texts = [r["text"] for r in read_jsonl(paths["corpus"])[:8000]]
    if langs.bilingual:  # the R1 pipeline (examples/r1_tiny.sh); R1-Zero's tokenizer stays as it was
        texts += r1_texts()
        expression = lambda q: re.search(r"\d[\d +*-]*\d", q).group()  # noqa: E731
        held_out = {expression(r["prompt"]) for r in read_jsonl(paths["eval"])}
        write_jsonl(os.path.join(run_dir, "data", "exemplars.jsonl"),
                    [e for e in long_cot_exemplars(16, seed) if expression(e["prompt"]) not in held_out][:8])
    train_sentencepiece(texts, tok_dir, vocab_size=VOCAB)
    tok = load_tokenizer(tok_dir)
    if tok.vocab_size > VOCAB:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens, more than the model's {VOCAB}")
    if langs.bilingual:
        from megatron_r1.data.tokenizer import write_student_tokenizer
        # the distilled students' tokenizers: our pieces, their chat formats; their bos/eos ids are in
        # examples/r1_tiny_student.yaml and r1_tiny.sh
        for style, ids in (("qwen2", (None, 514)), ("llama3", (512, 513))):
            path = write_student_tokenizer(os.path.join(tok_dir, "tokenizer.model"),
                                           os.path.join(run_dir, f"student_{style}"), style)
            student = load_tokenizer(path)
            if (student.bos_id, student.eos_id) != ids:
                raise ValueError(f"{path}: bos/eos ids {(student.bos_id, student.eos_id)}, expected {ids}")
    prefix = build_indexed_dataset(str(paths["corpus"]), os.path.join(run_dir, "data", "corpus"), tok)
    info = {"tokenizer": tok_dir, "corpus_prefix": prefix, "train": str(paths["train"]), "eval": str(paths["eval"]),
            "vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id}
    json.dump(info, open(os.path.join(run_dir, "data", "info.json"), "w"), indent=2)
    return info


def prepare_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 prepare-tiny")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--docs", type=int, default=60000)
    ap.add_argument("--difficulty", type=int, default=1, choices=sorted(DIFFICULTY))
    ap.add_argument("--zh", type=float, default=0.0, help="share of problems posed in Chinese (bilingual task)")
    ap.add_argument("--switch", type=float, default=0.0,
                    help="share of corpus solutions that switch language mid-CoT (bilingual task)")
    ap.add_argument("--train", type=int, default=4000, help="RL train prompts")
    ap.add_argument("--eval", type=int, default=200, help="held-out eval problems")
    a = ap.parse_args(argv)
    try:
        langs = Languages(a.zh, a.switch)
    except ValueError as e:
        ap.error(str(e))
    info = prepare(a.run_dir, a.docs, a.difficulty, langs=langs, n_train=a.train, n_eval=a.eval)
    print(json.dumps(info, indent=2))
    return 0


def report_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 report-tiny")
    ap.add_argument("--run-dir", required=True)
    a = ap.parse_args(argv)
    base = json.load(open(os.path.join(a.run_dir, "eval_base.json")))
    final = json.load(open(os.path.join(a.run_dir, "eval_final.json")))
    s = base["sampled"]
    print(f"\nheld-out set: {s['problems']} problems never seen in pretraining or RL")
    print(f"{'':40s}{'base':>10s}{'after GRPO':>12s}")
    pct = lambda v: f"{100 * v:9.1f}%"  # noqa: E731
    for mode, label in (("sampled", f"T={s['temperature']:g}, {s['samples']} samples/problem"), ("greedy", "greedy")):
        b, f = base[mode], final[mode]
        print(f"{'pass@1 (' + label + ')':40s}{pct(b['pass@1'])}{pct(f['pass@1']):>12s}")
        print(f"{'format rate (' + label + ')':40s}{pct(b['format'])}{pct(f['format']):>12s}")
    b, f = base["sampled"], final["sampled"]
    print(f"{'response length, tokens (sampled)':40s}{b['response_length']:10.1f}{f['response_length']:12.1f}")
    delta = 100 * (f["pass@1"] - b["pass@1"])
    print(f"\npass@1 at the sampling temperature: {delta:+.1f} points")
    for what, p in [("metrics (JSONL)", "grpo/metrics.jsonl"), ("TensorBoard", "grpo/tensorboard"),
                    ("plot", "grpo/grpo.png"), ("final HF checkpoint", "grpo/hf"), ("base model (HF)", "pretrain/hf")]:
        print(f"{what:22s}{os.path.join(a.run_dir, p)}")
    return 0
