#!/usr/bin/env python
"""Export a distillation dataset: teacher samples -> chat-format SFT rows for a student.

    megatron-r1 export-distill --input rs.jsonl [--input extra.parquet ...] --output DIR \\
        [--tokenizer STUDENT_TOKENIZER_DIR] [--decontaminate eval.jsonl ...] [--format jsonl|parquet] \\
        [--ngram 8 --overlap 0.5] [--val-fraction 0.05] [--seed 0] [--max-tokens N]

Writes DIR/train.{jsonl,parquet} and DIR/validation.{jsonl,parquet}, then prints a summary: rows in and
out per filter, and a histogram of the written rows' token lengths.

Notable choices
- Inputs: rows of `megatron-r1 rejection-sample` (`prompt` rendered by the teacher's template,
  `question` the raw prompt, `response` the teacher's output), and extra JSONL/Parquet files whose rows
  are either `{"messages": [{role, content}, ...]}` ending with the assistant turn, or
  `{"question"|"prompt": ..., "response": ...}`. A prompt rendered by our `r1_zero` or plain `chat`
  template is read back into the question; any other rendered prompt (special tokens such as
  `<|im_start|>`) without a `question` field is refused, never trained on as text.
- The teacher's reasoning is kept: the assistant message is the whole response, `<think>…</think>`
  and summary (a response that starts inside a prefilled `<think>` gets the tag back).
- Each output row holds `messages` (for `datasets` and other trainers) and the same conversation
  rendered for the student, `prompt` + `response`, which `megatron-r1 sft` trains on as is. Rendering
  uses the student tokenizer's own chat template when it has one: the prompt is the template with the
  generation prompt; the response is what the template puts after it for the assistant turn, found by
  rendering a sentinel (so templates that drop reasoning from assistant turns cannot drop it here), with
  a trailing eos token removed because `sft` appends eos. A generation prompt that prefills the thought
  (R1-distill's `<think>\n`) is not repeated in the response. Without a chat template: our plain `chat`
  format.
- Filters, in order: deduplication (same conversation after whitespace normalisation; the first kept),
  decontamination (a row goes when at least `--overlap` of its user text's n-grams, `--ngram` tokens
  of words and symbols, occur in the evaluation prompts; a text shorter than n is one n-gram), then
  `--max-tokens`. Rows removed by each are counted.
- Split: rows are grouped by user text, so all answers to one question land on one side; groups are
  shuffled with `--seed` and the first ones fill the validation fraction. Both files keep input order.
- Output is plain JSONL (one object per line) or Parquet with `messages` as a list of structs: both are
  what `datasets.load_dataset("json"|"parquet", ...)` reads with pyarrow.
- A malformed input row is one error, `error: FILE:LINE: what is wrong` (Parquet: `FILE:row N`), exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from megatron_r1.config import ConfigError
from megatron_r1.data.prompts import DataError, _jsonl_rows, _parquet_rows, _RowError
from megatron_r1.data.templates import R1_MATH_INSTRUCTION, R1_ZERO_TEMPLATE, render_prompt

ROLES = ("system", "user", "assistant")


@dataclass
class Row:
    messages: list[dict[str, str]]  # ..., then the assistant turn
    origin: str  # "FILE:LINE" of the input row


# ------------------------------------------------------------------------------------------- reading
_R1_ZERO_RE = re.compile(re.escape(R1_ZERO_TEMPLATE).replace(re.escape("{prompt}"), "(.*)"), re.DOTALL)
_CHAT_TURN_RE = re.compile(r"<\|(system|user|assistant)\|>\n(.*?)\n(?=<\|(?:system|user|assistant)\|>\n)", re.DOTALL)
_SPECIAL_RE = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜]{1,40}｜>")


def unrender(prompt: str) -> list[dict[str, str]]:
    """The messages behind a prompt string: one rendered by `r1_zero` or the plain `chat` format is read
    back; plain text is one user message; anything else with special tokens is an error."""
    m = _R1_ZERO_RE.fullmatch(prompt)
    if m:
        return [{"role": "user", "content": m.group(1)}]
    turns = _CHAT_TURN_RE.findall(prompt)
    if turns and "".join(f"<|{r}|>\n{c}\n" for r, c in turns) + "<|assistant|>\n" == prompt:
        msgs = [{"role": r, "content": c} for r, c in turns]
        suffix = "\n" + R1_MATH_INSTRUCTION  # r1_chat's addition to the question
        if msgs[-1]["content"].endswith(suffix):
            msgs[-1]["content"] = msgs[-1]["content"][: -len(suffix)]
        return msgs
    if _SPECIAL_RE.search(prompt):
        raise _RowError("'prompt' is rendered by a chat template this tool cannot read back; "
                        "give the raw prompt as 'question'")
    return [{"role": "user", "content": prompt}]


def _messages(value, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return unrender(value) if key == "prompt" else [{"role": "user", "content": value}]
    if (isinstance(value, list) and value and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value)):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise _RowError(f"field {key!r} must be a string or a list of {{role, content}} messages with role in {ROLES}")


def _response(text: str) -> str:
    if "</think>" in text and "<think>" not in text:
        return "<think>\n" + text  # the template had prefilled the tag
    return text


def parse_row(row, origin: str) -> Row:
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {type(row).__name__}")
    if row.get("messages") is not None:
        msgs = _messages(row["messages"], "messages")
        if msgs[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in msgs):
            raise _RowError("'messages' must hold a user turn and end with the assistant's")
        msgs[-1]["content"] = _response(msgs[-1]["content"])
    else:
        key = "question" if row.get("question") is not None else "prompt"
        if row.get(key) is None or not isinstance(row.get("response"), str):
            raise _RowError("expected 'messages', or 'question'/'prompt' with a string 'response'")
        msgs = _messages(row[key], key) + [{"role": "assistant", "content": _response(row["response"])}]
    if not msgs[-1]["content"].strip():
        raise _RowError("empty assistant response")
    return Row(msgs, origin)


def _rows_of(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return _parquet_rows(path, ())
    if path.suffix in (".jsonl", ".json"):
        return _jsonl_rows(path)
    raise DataError(f"{path}: unsupported extension {path.suffix!r} (use .jsonl or .parquet)")


def read_inputs(paths: list[str]) -> tuple[list[Row], dict[str, int]]:
    rows, per_file = [], {}
    for path in map(Path, paths):
        n = 0
        for origin, raw in _rows_of(path):
            try:
                if isinstance(raw, _RowError):
                    raise raw
                rows.append(parse_row(raw, origin))
            except _RowError as e:
                raise DataError(f"{origin}: {e}") from None
            n += 1
        per_file[str(path)] = n
    return rows, per_file


# ------------------------------------------------------------------------------------------- filters
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def user_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word-and-symbol n-grams of lower-cased text ("23 * 7" and "23 + 7" differ); a text shorter than
    n tokens is one n-gram."""
    toks = _TOKEN_RE.findall(text.lower())
    if not toks:
        return set()
    if len(toks) < n:
        return {tuple(toks)}
    return {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def dedup(rows: list[Row]) -> list[Row]:
    seen, out = set(), []
    for r in rows:
        key = json.dumps([[m["role"], " ".join(m["content"].split())] for m in r.messages])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _eval_texts(path: Path) -> list[str]:
    """The prompts of an evaluation file: its `messages` user turns, `question`, `problem` or
    `prompt` field (read back if rendered), else every string field of the row."""
    texts = []
    for origin, raw in _rows_of(path):
        if isinstance(raw, _RowError) or not isinstance(raw, dict):
            raise DataError(f"{origin}: {raw if isinstance(raw, _RowError) else 'expected a JSON object'}")
        try:
            for key in ("messages", "question", "problem", "prompt"):
                if raw.get(key) is not None:
                    texts.append(user_text(_messages(raw[key], key)))
                    break
            else:
                texts.append("\n".join(v for v in raw.values() if isinstance(v, str)))
        except _RowError as e:
            raise DataError(f"{origin}: {e}") from None
    return texts


def decontaminate(rows: list[Row], eval_paths: list[str], n: int, overlap: float) -> tuple[list[Row], dict[str, int]]:
    """Drops rows at least `overlap` of whose user-text n-grams occur in the evaluation prompts.
    Returns the kept rows and, per evaluation file, how many rows it removed (a row is charged to the
    file holding most of its matching n-grams)."""
    index: dict[tuple[str, ...], int] = {}  # n-gram -> first evaluation file holding it
    for k, path in enumerate(eval_paths):
        for text in _eval_texts(Path(path)):
            for g in ngrams(text, n):
                index.setdefault(g, k)
    removed = Counter()
    kept = []
    for r in rows:
        grams = ngrams(user_text(r.messages), n)
        hits = [index[g] for g in grams if g in index]
        if hits and len(hits) >= overlap * len(grams):
            removed[eval_paths[Counter(hits).most_common(1)[0][0]]] += 1
        else:
            kept.append(r)
    return kept, {p: removed[p] for p in eval_paths}


def split(rows: list[Row], val_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, validation), each in input order."""
    def key(r: Row) -> str:
        return " ".join(user_text(r.messages).split())

    sizes = Counter(map(key, rows))
    keys = sorted(sizes)
    random.Random(f"export-distill:{seed}").shuffle(keys)
    want, val_keys, n_val = round(val_fraction * len(rows)), set(), 0
    for k in keys:
        if n_val >= want:
            break
        val_keys.add(k)
        n_val += sizes[k]
    return [r for r in rows if key(r) not in val_keys], [r for r in rows if key(r) in val_keys]


# ------------------------------------------------------------------------------------------ rendering
_SENTINEL = "\u2063MEGATRON_R1_ASSISTANT\u2063"


class Renderer:
    """Conversation -> (prompt, response) text for the student."""

    def __init__(self, tokenizer=None):
        self.tok = tokenizer  # megatron_r1.data.tokenizer.Tokenizer or None

    @property
    def uses_chat_template(self) -> bool:
        return self.tok is not None and bool(self.tok.chat_template)

    def __call__(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        history, content = messages[:-1], messages[-1]["content"]
        prompt = render_prompt("chat", history, self.tok)
        if not self.uses_chat_template:
            return prompt, content
        full = self.tok.apply_chat_template(history + [{"role": "assistant", "content": _SENTINEL}],
                                            tokenize=False, add_generation_prompt=False)
        if full.count(_SENTINEL) != 1:
            raise ConfigError("the student tokenizer's chat template does not render an assistant message as is; "
                              "cannot export for it")
        head, tail = full.split(_SENTINEL)
        if head.startswith(prompt):  # the turn opens with what the generation prompt already holds
            before = head[len(prompt):]
        elif prompt.startswith(head):  # the generation prompt prefills more, e.g. R1-distill's "<think>\n"
            before, prefill = "", prompt[len(head):]
            if content.startswith(prefill):
                content = content[len(prefill):]
            elif prefill.strip() and content.lstrip().startswith(prefill.strip()):
                content = content.lstrip()[len(prefill.strip()):].lstrip("\n")
        else:
            raise ConfigError("the student tokenizer's chat template renders the assistant turn differently from "
                              "its generation prompt; cannot export for it")
        if (prompt + before).rstrip().endswith("<think>") and content.startswith("<think>"):
            content = content[len("<think>"):].lstrip("\n")  # the template already opened the thought
        eos = getattr(self.tok.backend, "eos_token", None)
        tail = tail.rstrip()
        if eos and tail.endswith(eos):
            tail = tail[: -len(eos)]  # sft appends eos itself
        return prompt, before + content + tail

    def num_tokens(self, prompt: str, response: str) -> int:
        return len(self.tok.encode(prompt, bos=True)) + len(self.tok.encode(response, eos=True))


# -------------------------------------------------------------------------------------------- writing
def write(rows: list[dict], path: Path, fmt: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "jsonl":
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        message = pa.struct([("role", pa.string()), ("content", pa.string())])
        schema = pa.schema([("messages", pa.list_(message)), ("prompt", pa.string()), ("response", pa.string()),
                            ("origin", pa.string())])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    os.replace(tmp, path)


def histogram(lengths: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """Text bars over power-of-two buckets (the last `bins` of them up to the longest row)."""
    if not lengths:
        return ["  (no rows)"]
    k = max(1, math.ceil(math.log2(max(lengths) + 1)))
    edges = [2 ** i for i in range(max(0, k - bins + 1), k + 1)]
    counts = [0] * len(edges)
    for x in lengths:
        counts[next(i for i, hi in enumerate(edges) if x <= hi)] += 1
    peak, first = max(counts), next(i for i, c in enumerate(counts) if c)
    lows = [0] + [e + 1 for e in edges[:-1]]
    return [f"  {lo:>7}-{hi:<7} {c:>7}  {'#' * round(width * c / peak)}"
            for lo, hi, c in list(zip(lows, edges, counts))[first:]]


def export(inputs: list[str], output: str, fmt: str = "jsonl", decontam: list[str] = (), ngram: int = 8,
           overlap: float = 0.5, val_fraction: float = 0.05, seed: int = 0, tokenizer: str | None = None,
           max_tokens: int = 0, out=sys.stdout) -> dict:
    """The whole export; returns the counts it prints."""
    if fmt not in ("jsonl", "parquet"):
        raise ConfigError(f"--format {fmt!r}: expected jsonl or parquet")
    if ngram < 1 or not 0 < overlap <= 1 or not 0 <= val_fraction < 1:
        raise ConfigError(f"--ngram {ngram} must be >= 1, --overlap {overlap} in (0, 1] and "
                          f"--val-fraction {val_fraction} in [0, 1)")
    if max_tokens and tokenizer is None:
        raise ConfigError("--max-tokens counts tokens: it needs --tokenizer")
    tok = None
    if tokenizer is not None:
        from megatron_r1.data.tokenizer import load_tokenizer
        tok = load_tokenizer(tokenizer)
    render = Renderer(tok)

    rows, per_file = read_inputs(inputs)
    stats: dict = {"inputs": per_file, "rows_in": len(rows)}
    rows = dedup(rows)
    stats["after_dedup"] = len(rows)
    rows, removed = decontaminate(rows, list(decontam), ngram, overlap) if decontam else (rows, {})
    stats["decontaminated"] = removed
    stats["after_decontamination"] = len(rows)
    rendered, lengths, too_long = [], [], 0
    for r in rows:
        prompt, response = render(r.messages)
        n = render.num_tokens(prompt, response) if tok is not None else len(_TOKEN_RE.findall(prompt + response))
        if max_tokens and n > max_tokens:
            too_long += 1
            continue
        rendered.append((r, {"messages": r.messages, "prompt": prompt, "response": response, "origin": r.origin}))
        lengths.append(n)
    stats["too_long"], stats["after_max_tokens"] = too_long, len(rendered)
    by_row = {id(r): d for r, d in rendered}
    train, val = split([r for r, _ in rendered], val_fraction, seed)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, part in (("train", train), ("validation", val)):
        files[name] = out_dir / f"{name}.{fmt}"
        write([by_row[id(r)] for r in part], files[name], fmt)
    stats.update(train=len(train), validation=len(val), chat_template=render.uses_chat_template)

    unit = "tokens" if tok is not None else "word/symbol tokens (no --tokenizer)"
    p = lambda s="": print(s, file=out)  # noqa: E731
    p("export-distill summary")
    for path, n in per_file.items():
        p(f"  in     {n:>8}  {path}")
    p(f"  rows   {stats['rows_in']:>8}  read")
    p(f"  dedup  {stats['rows_in'] - stats['after_dedup']:>8}  duplicates removed -> {stats['after_dedup']}")
    for path, n in removed.items():
        p(f"  decon  {n:>8}  removed, {ngram}-gram overlap >= {overlap:g} with {path}")
    if removed:
        p(f"         {'':>8}  -> {stats['after_decontamination']}")
    if max_tokens:
        p(f"  length {too_long:>8}  over {max_tokens} tokens removed -> {stats['after_max_tokens']}")
    p(f"  out    {len(train):>8}  train       {files['train']}")
    p(f"  out    {len(val):>8}  validation  {files['validation']}")
    p(f"  rendering: {'the student tokenizer' + chr(39) + 's chat template' if render.uses_chat_template else 'plain chat format'}")
    p(f"length histogram of the rows written ({unit}, prompt + response):")
    for line in histogram(lengths):
        p(line)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 export-distill", description=__doc__.split("\n")[0])
    ap.add_argument("--input", action="append", required=True, metavar="FILE",
                    help="rejection-sampling output or extra JSONL/Parquet rows (repeatable)")
    ap.add_argument("--output", required=True, metavar="DIR", help="writes train.* and validation.* here")
    ap.add_argument("--decontaminate", action="append", default=[], metavar="EVAL_FILE",
                    help="evaluation prompts (JSONL/Parquet) whose n-grams must not appear (repeatable)")
    ap.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"])
    ap.add_argument("--ngram", type=int, default=8, help="n-gram size for decontamination (default 8)")
    ap.add_argument("--overlap", type=float, default=0.5,
                    help="remove a row when this share of its prompt's n-grams is in an eval prompt (default 0.5)")
    ap.add_argument("--val-fraction", type=float, default=0.05, help="share of rows for validation (default 0.05)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    ap.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="the student's HF tokenizer: its chat template renders the rows, its tokens are counted")
    ap.add_argument("--max-tokens", type=int, default=0, help="drop rows longer than this (needs --tokenizer)")
    a = ap.parse_args(argv)
    try:
        export(a.input, a.output, a.format, a.decontaminate, a.ngram, a.overlap, a.val_fraction, a.seed,
               a.tokenizer, a.max_tokens)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
