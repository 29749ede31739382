"""Evaluation as in the R1 paper: pass@1 averaged over k samples, and cons@k (majority vote).

    megatron-r1 eval --model HF_DIR --data eval.jsonl [--samples 8 --temperature 0.6 --top-p 0.95] [--greedy]
    megatron-r1 eval --model base=DIR1 --model r1=DIR2 ... --data eval.jsonl --table table.md  # one table

Notable choices
- pass@1 = mean over problems of (correct samples / k); with `--greedy` k = 1 at temperature 0.
- cons@k: the most frequent extracted answer among the k samples (ties: the earliest), then checked.
  Votes are counted per *value*, not per spelling: answers the verifier finds equivalent
  (``\\frac{1}{2}``, ``0.5``, ``1/2``) are one candidate, so a right answer written three ways is
  not outvoted by a wrong one written one way.
- Answers are scored with the same accuracy reward the RL loop uses, so "accuracy" means one thing;
  the format rate uses the format-reward variant of the template (`r1_boxed` for `r1_chat`).
- Generation goes through the same `RolloutEngine` as GRPO (one vLLM code path), in `--dtype` with a
  `--max-model-len` context (float32 and 2048 by default: the tiny models are float32).
- Language consistency is measured against each prompt's own language (its row's `lang`, else Han
  characters in the question mean Chinese), not a fixed one: on a bilingual set it sees an answer written
  wholly in the wrong language, which the RL reward's `lang=auto` cannot.
- Several `--model`s make one table (markdown, a row per model), evaluated one after another on the same
  problems and seeds. Consecutive models that vLLM would build the same engine for (same config.json but its
  name, same tokenizer and generation files: `engine_signature`) share one engine: the next model's weights
  are swapped in through the GRPO hot-swap path instead of starting vLLM again (seconds, not a start-up),
  with identical results (a test compares them with fresh engines).
- `--out-dir DIR` writes each model's result to DIR/LABEL.json as soon as it is done and skips a model whose
  file exists, so a stopped evaluation of many models resumes where it stopped.
- `--model-template LABEL=TEMPLATE` gives one model another prompt template than `--template` (a base model
  prompted as R1-Zero next to chat-tuned ones), so one call evaluates models of different stages and the
  models of one architecture still share an engine.
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
             max_tokens: int = 256, seed: int = 1234, dump: list | None = None, top_p: float = 1.0) -> dict:
    """examples: objects with .prompt and .answer (and .extra["lang"] on bilingual sets). Returns pass@1,
    cons@k, format rate, language consistency (mean share of the thought's words in the prompt's
    language), mean length. `dump`, if a list, receives one dict per generated sample (prompt, answer,
    completion, scores)."""
    from megatron_r1.rl.readability import prompt_language
    from megatron_r1.rl.rewards.language import chain_of_thought, language_share
    prompts = [tokenizer.encode(render_prompt(template, e.prompt, tokenizer), bos=True) for e in examples]
    k = 1 if temperature == 0 else samples
    sampling = {"top_p": top_p} if top_p != 1.0 else {}
    outs = engine.generate(prompts, n=k, temperature=temperature,
                           max_tokens=max_tokens, seed=seed, **sampling)
    texts = [tokenizer.decode(s.token_ids) for group in outs for s in group]  # as the RL rewards read them
    refs = [e.answer for e in examples for _ in range(k)]
    correct = accuracy_reward_batch(texts, refs)
    variant = get_template(template).answer_format  # the format this template asks for
    fmt = [format_reward(t, variant=variant) for t in texts]
    extracted = [extract_answer(t) for t in texts]
    langs = [prompt_language(e.prompt, getattr(e, "extra", {}).get("lang")) for e in examples for _ in range(k)]
    lang = [language_share(chain_of_thought(t), x) for t, x in zip(texts, langs)]
    if dump is not None:
        dump.extend({"prompt": e.prompt, "template": template, "answer": e.answer, "temperature": temperature,
                     "completion": t, "extracted": x, "correct": c, "format": f, "language": g}
                    for e, t, x, c, f, g in zip((e for e in examples for _ in range(k)), texts, extracted, correct, fmt,
                                                lang))
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
            "language": sum(lang) / max(len(lang), 1), "top_p": top_p,
            "response_length": sum(len(s.token_ids) for g in outs for s in g) / max(len(texts), 1),
            "samples": k, "temperature": temperature, "problems": len(examples)}


ENGINE_FILES = ("tokenizer", "special_tokens", "generation_config", "vocab", "merges", "chat_template", "added_tokens")


def engine_signature(path: str) -> str:
    """What vLLM builds an engine from, apart from the weights: config.json without its name and stored dtype
    (the engine computes in --dtype; swapped-in tensors are cast to it), and the tokenizer and generation
    files. HF dirs with equal signatures can share an engine."""
    import hashlib
    h = hashlib.sha256()
    with open(os.path.join(path, "config.json"), "rb") as f:
        cfg = json.loads(f.read())
    for key in ("_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for name in sorted(os.listdir(path)):
        if name.startswith(ENGINE_FILES):
            h.update(name.encode())
            with open(os.path.join(path, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def check_model_dir(path: str):
    """The HF directory's config and weights, checked in a second before vLLM starts; its ModelConfig."""
    from megatron_r1.ckpt.hf import CheckpointError, check_hf_weights
    from megatron_r1.config import ModelConfig
    cj = os.path.join(path, "config.json")
    try:
        with open(cj, "rb") as f:
            model_cfg = ModelConfig.from_hf_dict(json.loads(f.read()))
    except OSError as e:
        raise CheckpointError(f"{cj}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise CheckpointError(f"{cj}: {e}") from None
    check_hf_weights(path, model_cfg)
    return model_cfg


TABLE_COLUMNS = (("pass@1", "pass@1"), ("cons@k", "cons@{k}"), ("format", "format"), ("language", "language"),
                 ("length", "response_length"))


def table(results: dict[str, dict]) -> str:
    """One markdown table, a row per model: pass@1, cons@k, format and language-consistency rates, length."""
    head = "| model | " + " | ".join(c for c, _ in TABLE_COLUMNS) + " |"
    lines = [head, "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for label, r in results.items():
        cells = []
        for _, key in TABLE_COLUMNS:
            v = r.get(key.format(k=r.get("samples")))
            cells.append("-" if v is None else f"{v:.1f}" if key == "response_length" else f"{100 * v:.1f}%")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    k = {r.get("samples") for r in results.values()}
    t = {(r.get("temperature"), r.get("top_p", 1.0)) for r in results.values()}
    if len(k) == 1 and len(t) == 1:
        (k,), ((temp, top_p),) = k, t
        lines.append(f"\n{next(iter(results.values())).get('problems')} held-out problems; T={temp:g}, "
                     f"top-p={top_p:g}, k={k} samples per problem (pass@1 = mean over the k; cons@k = majority "
                     "vote); language = share of the thought's words in the prompt's language")
    return "\n".join(lines)


def _model_arg(value: str) -> tuple[str, str]:
    """`LABEL=DIR` or `DIR` (labelled by its path)."""
    label, sep, path = value.partition("=")
    return (label, path) if sep and label and not os.path.isdir(value) else (value, value)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 eval", description="pass@1 / cons@k on a prompt set")
    ap.add_argument("--model", required=True, action="append", metavar="[LABEL=]HF_DIR",
                    help="HF directory (config, weights, tokenizer); repeat for a table of several models")
    ap.add_argument("--data", required=True, help="JSONL/Parquet with prompt and answer fields")
    ap.add_argument("--template", default="r1_zero", help="the prompt template (and format-reward variant)")
    ap.add_argument("--model-template", action="append", default=[], metavar="LABEL=TEMPLATE",
                    help="another template for one --model (models of one architecture then still share an engine)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (the R1 paper: 0.95)")
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="the engine's compute dtype")
    ap.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN, help="the engine's context (prompt + response)")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    ap.add_argument("--out-dir", default=None,
                    help="write each model's result to DIR/LABEL.json when it is done; skip models whose file exists")
    ap.add_argument("--both", action="store_true", help="sampled (--samples, --temperature) and greedy, one engine")
    ap.add_argument("--dump", default=None, help="write every generated sample with its scores here (JSONL)")
    ap.add_argument("--table", default=None, help="also write the markdown table here")
    a = ap.parse_args(argv)
    import gc
    import sys

    from megatron_r1.config import ConfigError
    from megatron_r1.data.prompts import drop_overlong, load_prompts, report
    from megatron_r1.data.tokenizer import load_tokenizer
    from megatron_r1.ckpt.hf import iter_hf_tensors
    from megatron_r1.rollout.engine import RolloutEngine
    from megatron_r1.training import _write_json_atomic
    if not 0 < a.top_p <= 1 or a.max_model_len < 2 or a.samples < 1:
        raise ConfigError("need 0 < --top-p <= 1, --max-model-len >= 2 and --samples >= 1")
    models = [_model_arg(m) for m in a.model]
    if len({label for label, _ in models}) < len(models):
        raise ConfigError(f"two --model share a label: {[label for label, _ in models]}")
    if a.out_dir and any(os.sep in label for label, _ in models):
        raise ConfigError("--out-dir names each result by its model's label: give --model LABEL=HF_DIR")
    templates = {label: a.template for label, _ in models}
    for value in a.model_template:
        label, sep, name = value.partition("=")
        if not sep or label not in templates:
            raise ConfigError(f"--model-template {value!r}: expected LABEL=TEMPLATE with the LABEL of a --model "
                              f"({', '.join(templates)})")
        templates[label] = name
    for name in set(templates.values()):  # an unknown template fails here, before vLLM starts
        try:
            get_template(name)
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
    for _, path in models:  # everything that can be wrong with the inputs fails here, before vLLM starts
        check_model_dir(path)
    results, dump = {}, ([] if a.dump else None)
    if a.out_dir:
        os.makedirs(a.out_dir, exist_ok=True)
    engine, signature = None, None
    for label, path in models:
        done = os.path.join(a.out_dir, f"{label}.json") if a.out_dir else None
        if done and os.path.exists(done):
            print(f"eval {label}: {done} exists, skipped", file=sys.stderr)
            with open(done) as f:
                results[label] = json.load(f)
            continue
        tok = load_tokenizer(path)
        data = load_prompts(a.data)
        template = templates[label]
        data = drop_overlong(data, lambda e: len(tok.encode(render_prompt(template, e.prompt, tok), bos=True)),
                             a.max_model_len - 1)
        for line in report(data, f"eval data {a.data}", f" (the engine's max_model_len={a.max_model_len})"):
            print(line, file=sys.stderr)
        data = list(data)
        if a.limit:
            data = data[:a.limit]
        if engine is not None and engine_signature(path) == signature:
            stats = engine.update_weights(iter_hf_tensors(path))
            print(f"eval {label}: {stats.num_tensors} tensors of {path} swapped into the running engine "
                  f"({stats.seconds:.1f} s)", file=sys.stderr)
        else:
            del engine
            gc.collect()
            print(f"eval {label}: starting a vLLM engine for {path}", file=sys.stderr)
            engine = RolloutEngine(path, dtype=a.dtype, max_model_len=a.max_model_len)
            signature = engine_signature(path)
        kw = dict(max_tokens=a.max_tokens, top_p=a.top_p, dump=dump)
        if a.both:
            res = {"sampled": evaluate(engine, tok, data, template, a.samples, a.temperature, **kw),
                   "greedy": evaluate(engine, tok, data, template, 1, 0.0, **kw)}
        else:
            res = evaluate(engine, tok, data, template, a.samples, 0.0 if a.greedy else a.temperature, **kw)
        if dump is not None and len(models) > 1:
            for row in dump:
                row.setdefault("model", label)
        results[label] = res
        if done:  # whole or absent
            _write_json_atomic(done, res)
    res = results[models[0][0]] if len(models) == 1 else results
    print(json.dumps(res, indent=2))
    if len(models) > 1 or a.table:
        md = table({k: (v["sampled"] if a.both else v) for k, v in results.items()})
        print("\n" + md)
        if a.table:
            with open(a.table, "w") as f:
                f.write(md + "\n")
    if a.out:  # whole or absent (scripts skip the evaluation when it exists)
        _write_json_atomic(a.out, res)
    if a.dump:
        with open(a.dump, "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in dump)
    return 0


def table_main(argv: list[str]) -> int:
    """`megatron-r1 eval-table LABEL=RESULT.json ...`: one table from saved `eval --out` results."""
    ap = argparse.ArgumentParser(prog="megatron-r1 eval-table", description=table_main.__doc__)
    ap.add_argument("results", nargs="+", metavar="LABEL=RESULT_JSON")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    a = ap.parse_args(argv)
    results = {}
    for item in a.results:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = os.path.basename(item).removesuffix(".json"), item
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{path}: cannot read an eval result ({e})") from None
        results[label] = r.get("sampled", r)
    md = table(results)
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md + "\n")
    return 0
