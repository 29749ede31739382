"""Cold-start data (DeepSeek-R1 §2.3.1): long-CoT SFT rows in the readable R1 format, from two sources.

    megatron-r1 cold-start-data --init-hf R1_ZERO_HF --data train.jsonl --out cold_start.jsonl \\
        [--samples 4] [--exemplars long_cot.jsonl --shots 2 --few-shot-model HF] [--limit N]

Notable choices
- Source "r1_zero": the R1-Zero policy answers each prompt in its own template (``--source-template``,
  default ``r1_zero``); correct samples (the RL accuracy reward) in R1-Zero's format are rewritten
  into the readable format: the thought kept as written, the ``<answer>`` tag replaced by a summary in
  the prompt's language with the answer boxed ("The answer is \\boxed{71}." / "答案是 \\boxed{71}。"). This
  is the paper's "gathering DeepSeek-R1-Zero outputs in a readable format ... post-processing".
- Source "few_shot": the paper's "few-shot prompting with a long CoT as an example": ``--shots``
  exemplar rows (``{"prompt", "response"}`` already in the readable format; the tiny task writes them,
  recipes/tiny_r1_zero.py) precede the question as ``Question: … / Answer: …`` lines, and the model
  (``--few-shot-model``, default the R1-Zero policy) continues; its line is the candidate response.
  Exemplars are drawn per prompt in the prompt's language where there are such exemplars.
- Every candidate passes the same filters: correct answer, then readability (rl/readability.py: one
  language, well-formed markup, no code blocks, no overlong paragraphs). Identical responses to one
  prompt are kept once; at most ``--keep-per-prompt`` per prompt and source.
- Output rows ``{"prompt", "response"}`` with the prompt rendered through ``--template`` (default
  ``r1_chat``, whose format reward ``r1_boxed`` the rows satisfy) and the tokenizer, as
  ``megatron-r1 sft`` reads them; ``question``, ``answer``, ``lang`` and ``source`` ride along (so
  ``export-distill`` can re-render them for a student). A per-filter count is printed and written to
  ``OUT.stats.json``; the file is written to ``OUT.tmp`` and renamed (its existence means complete).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter

from megatron_r1.data.templates import render_prompt
from megatron_r1.rl.readability import FILTERS, prompt_language, unreadable

SUMMARY = {"en": "The answer is \\boxed{{{}}}.", "zh": "答案是 \\boxed{{{}}}。"}


def summary(answer: str, lang: str) -> str:
    return SUMMARY.get(lang, SUMMARY["en"]).format(answer)


def readable_from_r1_zero(response: str, lang: str) -> str | None:
    """R1-Zero's ``<think> T </think> <answer> A </answer>`` as ``<think> T </think> summary(A)``; None
    when the response is not in that format (the format reward's r1_zero variant)."""
    from megatron_r1.rl.rewards.accuracy import extract_answer
    from megatron_r1.rl.rewards.formatting import format_reward
    if format_reward(response, variant="r1_zero") != 1.0:
        return None
    thought = response[response.index("<think>") + len("<think>"):response.index("</think>")].strip()
    answer = extract_answer(response)
    if not thought or not answer:
        return None
    return f"<think> {thought} </think> {summary(answer, lang)}"


def few_shot_prompt(exemplars: list[dict], question: str) -> str:
    shots = "".join(f"Question: {e['prompt']}\nAnswer: {e['response']}\n\n" for e in exemplars)
    return f"{shots}Question: {question}\nAnswer:"


def few_shot_response(continuation: str) -> str:
    """The model's answer line: up to the first newline (the exemplars are one line each)."""
    return continuation.split("\n", 1)[0].strip()


def pick_exemplars(exemplars: list[dict], lang: str, shots: int, rng: random.Random) -> list[dict]:
    same = [e for e in exemplars if prompt_language(e["prompt"], e.get("lang")) == lang] or exemplars
    return rng.sample(same, min(shots, len(same)))


def keep(candidates: list[str], refs: list[str], langs: list[str], per_prompt: int, keep_per_prompt: int,
         stats: Counter, min_language: float, max_paragraph_chars: int) -> list[list[int]]:
    """Indices of the kept candidates per prompt (flat list of [P·per_prompt]); counts each rejection."""
    from megatron_r1.rl.rewards.accuracy import accuracy_reward_batch
    correct = accuracy_reward_batch(candidates, refs)
    out = []
    for p in range(len(candidates) // per_prompt):
        seen, chosen = set(), []
        for i in range(p * per_prompt, (p + 1) * per_prompt):
            if correct[i] < 1.0:
                stats["wrong_answer"] += 1
                continue
            why = unreadable(candidates[i], langs[i], min_language=min_language,
                             max_paragraph_chars=max_paragraph_chars)
            if why:
                stats[why] += 1
            elif candidates[i] in seen:
                stats["duplicate"] += 1
            elif len(chosen) < keep_per_prompt:
                seen.add(candidates[i])
                chosen.append(i)
        out.append(chosen)
    return out


def main(argv: list[str]) -> int:
    from megatron_r1.config import ConfigError
    ap = argparse.ArgumentParser(prog="megatron-r1 cold-start-data", description=__doc__.split("\n")[0])
    ap.add_argument("--init-hf", required=True, help="the R1-Zero policy (HF dir with tokenizer)")
    ap.add_argument("--data", required=True, help="prompts with reference answers (JSONL/Parquet)")
    ap.add_argument("--out", required=True, help="SFT JSONL to write")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt and source")
    ap.add_argument("--keep-per-prompt", type=int, default=1, help="per source")
    ap.add_argument("--source-template", default="r1_zero", help="the template the R1-Zero policy was trained on")
    ap.add_argument("--template", default="r1_chat", help="the template the rows are rendered for")
    ap.add_argument("--exemplars", default=None, help="readable long-CoT rows for few-shot prompting (none: skip)")
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--include-exemplars", action="store_true",
                    help="also keep the exemplars themselves as rows (the paper's human-written cold-start part)")
    ap.add_argument("--few-shot-model", default=None, help="HF dir prompted few-shot (default --init-hf)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--min-language", type=float, default=1.0, help="share of the thought in the prompt's language")
    ap.add_argument("--max-paragraph-chars", type=int, default=1000)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args(argv)
    if a.samples < 1 or a.keep_per_prompt < 1 or a.shots < 1:
        raise ConfigError("--samples, --keep-per-prompt and --shots must be >= 1")
    from megatron_r1.data.arith import read_jsonl
    from megatron_r1.data.prompts import load_prompts
    from megatron_r1.data.tokenizer import load_tokenizer
    from megatron_r1.eval.runner import check_model_dir
    from megatron_r1.rollout.engine import RolloutEngine
    check_model_dir(a.init_hf)
    if a.few_shot_model:
        check_model_dir(a.few_shot_model)
    exemplars = []
    if a.exemplars:
        if not os.path.exists(a.exemplars):
            raise FileNotFoundError(f"--exemplars {a.exemplars}: no such file")
        exemplars = read_jsonl(a.exemplars)
        if not exemplars or any(unreadable(e["response"], e.get("lang")) for e in exemplars):
            raise ConfigError(f"--exemplars {a.exemplars}: need rows of readable {{prompt, response}} "
                              "(<think> … </think> summary, one language)")
    examples = list(load_prompts(a.data))
    if a.limit:
        examples = examples[:a.limit]
    tok = load_tokenizer(a.init_hf)
    langs = [prompt_language(e.prompt, e.extra.get("lang")) for e in examples]
    n = a.samples
    refs = [e.answer for e in examples for _ in range(n)]
    flat_langs = [lang for lang in langs for _ in range(n)]
    stats: Counter = Counter()
    rows: list[dict] = []

    def emit(source: str, candidates: list[str]):
        stats[f"{source}/candidates"] += len(candidates)
        before = Counter(stats)
        kept = keep(candidates, refs, flat_langs, n, a.keep_per_prompt, stats, a.min_language,
                    a.max_paragraph_chars)
        for k in ("wrong_answer", "duplicate", *FILTERS):
            stats[f"{source}/{k}"] += stats[k] - before[k]
        for p, chosen in enumerate(kept):
            e = examples[p]
            for i in chosen:
                rows.append({"prompt": render_prompt(a.template, e.prompt, tok), "response": candidates[i],
                             "question": e.prompt, "answer": e.answer, "lang": langs[p], "source": source})
        stats[f"{source}/kept"] += sum(map(len, kept))

    engine = RolloutEngine(a.init_hf, dtype="float32", max_model_len=a.max_model_len)
    ids = [tok.encode(render_prompt(a.source_template, e.prompt, tok), bos=True) for e in examples]
    outs = engine.generate(ids, n=n, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens, seed=a.seed)
    texts = [tok.decode(s.token_ids) for g in outs for s in g]
    emit("r1_zero", [readable_from_r1_zero(t, lang) or t for t, lang in zip(texts, flat_langs)])
    if exemplars:
        if a.few_shot_model and a.few_shot_model != a.init_hf:
            del engine
            engine = RolloutEngine(a.few_shot_model, dtype="float32", max_model_len=a.max_model_len)
            tok = load_tokenizer(a.few_shot_model)
        rng = random.Random(a.seed)
        prompts = [few_shot_prompt(pick_exemplars(exemplars, lang, a.shots, rng), e.prompt)
                   for e, lang in zip(examples, langs)]
        ids = [tok.encode(p, bos=True) for p in prompts]
        too_long = [len(x) for x in ids if len(x) + a.max_tokens > a.max_model_len]
        if too_long:
            raise ConfigError(f"few-shot prompts of up to {max(too_long)} tokens + --max-tokens {a.max_tokens} do "
                              f"not fit --max-model-len {a.max_model_len}: fewer --shots or a longer context")
        outs = engine.generate(ids, n=n, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens,
                               stop=["\n"], seed=a.seed + 1)
        emit("few_shot", [few_shot_response(tok.decode(s.token_ids)) for g in outs for s in g])
    if a.include_exemplars:
        rows += [{"prompt": render_prompt(a.template, e["prompt"], tok), "response": e["response"],
                  "question": e["prompt"], "answer": e.get("answer"), "lang": prompt_language(e["prompt"], e.get("lang")),
                  "source": "exemplar"} for e in exemplars]
        stats["exemplar/kept"] = len(exemplars)
    for k in ("wrong_answer", "duplicate", *FILTERS):
        stats.pop(k, None)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".stats.json", "w") as f:
        json.dump({"prompts": len(examples), "rows": len(rows), **stats}, f, indent=2)
    with open(a.out + ".tmp", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(a.out + ".tmp", a.out)
    print("cold-start-data: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())), file=sys.stderr)
    print(f"cold-start-data: {len(rows)} rows from {len(examples)} prompts -> {a.out}")
    if not rows:
        print("warning: no sample passed the filters", file=sys.stderr)
    return 0
