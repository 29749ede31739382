"""Evaluation as in the R1 paper: pass@1 averaged over k samples, and cons@k (majority vote).

    megatron-r1 eval --model HF_DIR --data eval.jsonl [--samples 8 --temperature 0.6] [--greedy]

Notable choices
- pass@1 = mean over problems of (correct samples / k); with `--greedy` k = 1 at temperature 0.
- cons@k: the most frequent extracted answer among the k samples (ties: the earliest), then checked.
  Votes are counted per *value*, not per spelling: answers the verifier finds equivalent
  (``\\frac{1}{2}``, ``0.5``, ``1/2``) are one candidate, so a right answer written three ways is
  not outvoted by a wrong one written one way.
- Answers are scored with the same accuracy reward the RL loop uses, so "accuracy" means one thing;
  the format rate uses the format-reward variant of the template (`r1_boxed` for `r1_chat`).
- Generation goes through the same `RolloutEngine` as GRPO (one vLLM code path).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

from megatron_r1.data.templates import get_template, render_prompt
from megatron_r1.rl.rewards import SymbolicVerifier, accuracy_reward_batch, format_reward
from megatron_r1.rl.rewards.accuracy import default_verifier, extract_answer, fast_match


def majority_vote(answers: Sequence[str | None], verifier: SymbolicVerifier | None = None) -> str | None:
    """The answer with the most equivalent votes (ties: the group seen first), or None if no
    sample has an answer. Each answer joins the first group whose representative it matches,
    by the reward's cheap tiers and then the symbolic verifier."""
    groups: list[list[str]] = []  # each group's first answer is its representative
    for a in answers:
        if a is None:
            continue
        for g in groups:
            same = fast_match(a, g[0])
            if same is None:
                same = (verifier or default_verifier()).equivalent(a, g[0])
            if same:
                g.append(a)
                break
        else:
            groups.append([a])
    if not groups:
        return None
    return max(groups, key=len)[0]  # max keeps the first of equal lengths


MAX_MODEL_LEN = 2048  # the `eval` command's engine context (prompt + response tokens)


def evaluate(engine, tokenizer, examples, template: str = "r1_zero", samples: int = 1, temperature: float = 0.0,
             max_tokens: int = 256, seed: int = 1234, dump: list | None = None) -> dict:
    """examples: objects with .prompt and .answer. Returns pass@1, cons@k, format rate, mean length.
    `dump`, if a list, receives one dict per generated sample (prompt, answer, completion, scores)."""
    prompts = [tokenizer.encode(render_prompt(template, e.prompt, tokenizer), bos=True) for e in examples]
    k = 1 if temperature == 0 else samples
    outs = engine.generate(prompts, n=k, temperature=temperature,
                           max_tokens=max_tokens, seed=seed)
    texts = [tokenizer.decode(s.token_ids) for group in outs for s in group]  # as the RL rewards read them
    refs = [e.answer for e in examples for _ in range(k)]
    correct = accuracy_reward_batch(texts, refs)
    variant = get_template(template).answer_format  # the format this template asks for
    fmt = [format_reward(t, variant=variant) for t in texts]
    extracted = [extract_answer(t) for t in texts]
    if dump is not None:
        dump.extend({"prompt": e.prompt, "answer": e.answer, "temperature": temperature, "completion": t,
                     "extracted": x, "correct": c, "format": f}
                    for e, t, x, c, f in zip((e for e in examples for _ in range(k)), texts, extracted, correct, fmt))
    per_problem = [sum(correct[i * k:(i + 1) * k]) / k for i in range(len(examples))]
    cons = []
    for i, e in enumerate(examples):
        winner = majority_vote(extracted[i * k:(i + 1) * k])
        if winner is None:
            cons.append(0.0)
            continue
        cons.append(accuracy_reward_batch([f"<answer> {winner} </answer>"], [e.answer])[0])
    n = max(len(examples), 1)
    return {"pass@1": sum(per_problem) / n, f"cons@{k}": sum(cons) / n, "format": sum(fmt) / max(len(fmt), 1),
            "response_length": sum(len(s.token_ids) for g in outs for s in g) / max(len(texts), 1),
            "samples": k, "temperature": temperature, "problems": len(examples)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 eval", description="pass@1 / cons@k on a prompt set")
    ap.add_argument("--model", required=True, help="HF directory (config, weights, tokenizer)")
    ap.add_argument("--data", required=True, help="JSONL/Parquet with prompt and answer fields")
    ap.add_argument("--template", default="r1_zero")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    ap.add_argument("--both", action="store_true", help="sampled (--samples, --temperature) and greedy, one engine")
    ap.add_argument("--dump", default=None, help="write every generated sample with its scores here (JSONL)")
    a = ap.parse_args(argv)
    import sys

    from megatron_r1.ckpt.hf import CheckpointError, check_hf_weights
    from megatron_r1.config import ModelConfig
    from megatron_r1.data.prompts import drop_overlong, load_prompts, report
    from megatron_r1.data.tokenizer import load_tokenizer
    from megatron_r1.rollout.engine import RolloutEngine
    # everything that can be wrong with the inputs fails here, in a second, before vLLM starts
    cj = os.path.join(a.model, "config.json")
    try:
        with open(cj, "rb") as f:
            model_cfg = ModelConfig.from_hf_dict(json.loads(f.read()))
    except OSError as e:
        raise CheckpointError(f"{cj}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise CheckpointError(f"{cj}: {e}") from None
    check_hf_weights(a.model, model_cfg)
    tok = load_tokenizer(a.model)
    data = load_prompts(a.data)
    data = drop_overlong(data, lambda e: len(tok.encode(render_prompt(a.template, e.prompt), bos=True)),
                         MAX_MODEL_LEN - 1)
    for line in report(data, f"eval data {a.data}", f" (the engine's max_model_len={MAX_MODEL_LEN})"):
        print(line, file=sys.stderr)
    data = list(data)
    if a.limit:
        data = data[:a.limit]
    engine = RolloutEngine(a.model, dtype="float32", max_model_len=MAX_MODEL_LEN)
    dump = [] if a.dump else None
    if a.both:
        res = {"sampled": evaluate(engine, tok, data, a.template, a.samples, a.temperature, a.max_tokens, dump=dump),
               "greedy": evaluate(engine, tok, data, a.template, 1, 0.0, a.max_tokens, dump=dump)}
    else:
        res = evaluate(engine, tok, data, a.template, a.samples, 0.0 if a.greedy else a.temperature, a.max_tokens,
                       dump=dump)
    print(json.dumps(res, indent=2))
    if a.out:  # whole or absent (scripts skip the evaluation when it exists)
        with open(a.out + ".tmp", "w") as f:
            json.dump(res, f, indent=2)
        os.replace(a.out + ".tmp", a.out)
    if a.dump:
        with open(a.dump, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in dump)
    return 0
