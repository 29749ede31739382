"""The tiny general (non-reasoning) task family: prompts with reference answers, and preference pairs for
the helpfulness and harmlessness reward models. Everything is generated here from small built-in tables
(no downloads), deterministically from a seed.

    from megatron_r1.recipes.general_tasks import general_prompts, preference_pairs, write_jsonl
    rows = general_prompts(200, seed=0)          # [{"prompt", "answer", "task": "general", "category"}]
    pairs = preference_pairs("helpful", 400, seed=1)   # [{"prompt", "chosen", "rejected", "kind", "task"}]
    write_jsonl("runs/x/general.jsonl", rows)

    megatron-r1 general-data --out DIR [--prompts N] [--pairs N] [--seed S]   # the same, as files

API (what the R1 pipeline's other stages import; every function is pure in `seed`)
- `general_prompts(n, seed)`: short writing / factual QA / translation prompts, each with a reference
  answer, `task: "general"` (the key `rl.routes` routes on) and `category` (writing | qa | translation).
  Rejection sampling mixes them in as the non-reasoning data; GRPO scores them with the reward models.
- `reference_response(row)`: an R1-format SFT response for a prompt row (`<think> … </think> summary`),
  for the non-reasoning SFT rows ("the reasoning is kept short for simple queries").
- `preference_pairs(kind, n, seed)`, kind "helpful" or "harmless": chosen/rejected responses in the R1
  output format. Helpfulness pairs differ ONLY in the final summary (same reasoning): what the helpful RM
  is shown (DeepSeek-R1 §2.3.4). Harmlessness pairs either refuse vs comply with a harmful request, or
  differ only inside the reasoning (a harmful aside in the CoT, same summary): a judge that reads only
  the summary cannot tell them apart, which is why harmlessness is judged on the whole response.
- `split_pairs(rows, heldout_fraction)`: train / held-out split by prompt (no prompt in both).
- `write_jsonl(path, rows)`, `write_general_data(out_dir, ...)`: the files the stage scripts use
  (examples/r1_tiny.sh stages 5 and 7).
"""
from __future__ import annotations

import argparse
import json
import os
import random

TASK = "general"  # the `task` field of every row made here (reasoning rows carry "reasoning")

# ------------------------------------------------------------------------------------ the tables
_FACTS = [  # (question, short answer, full sentence)
    ("What is the capital of France?", "Paris", "The capital of France is Paris."),
    ("What is the capital of Japan?", "Tokyo", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "Rome", "The capital of Italy is Rome."),
    ("What is the capital of Egypt?", "Cairo", "The capital of Egypt is Cairo."),
    ("What is the capital of Canada?", "Ottawa", "The capital of Canada is Ottawa."),
    ("What is the capital of Kenya?", "Nairobi", "The capital of Kenya is Nairobi."),
    ("Which planet is closest to the Sun?", "Mercury", "Mercury is the planet closest to the Sun."),
    ("Which planet is the largest?", "Jupiter", "Jupiter is the largest planet."),
    ("What is the chemical symbol of gold?", "Au", "The chemical symbol of gold is Au."),
    ("What is the chemical symbol of iron?", "Fe", "The chemical symbol of iron is Fe."),
    ("How many legs does a spider have?", "8", "A spider has 8 legs."),
    ("How many days are in a week?", "7", "A week has 7 days."),
    ("What gas do plants take in?", "carbon dioxide", "Plants take in carbon dioxide."),
    ("What is frozen water called?", "ice", "Frozen water is called ice."),
    ("Who wrote Hamlet?", "Shakespeare", "Hamlet was written by Shakespeare."),
    ("What color is the sky on a clear day?", "blue", "On a clear day the sky is blue."),
]
_LEXICON = {  # English -> (French, Spanish)
    "red": ("rouge", "rojo"), "blue": ("bleu", "azul"), "green": ("vert", "verde"), "cat": ("chat", "gato"),
    "dog": ("chien", "perro"), "house": ("maison", "casa"), "water": ("eau", "agua"), "book": ("livre", "libro"),
    "sun": ("soleil", "sol"), "bread": ("pain", "pan"), "one": ("un", "uno"), "two": ("deux", "dos"),
    "three": ("trois", "tres"), "friend": ("ami", "amigo"), "apple": ("pomme", "manzana"),
}
_LANGS = ("French", "Spanish")
_WRITING = [  # (subject, adjective, reference sentence)
    ("river", "quiet", "The quiet river flows slowly past the old trees."),
    ("city", "busy", "The busy city hums with cars and voices all day."),
    ("garden", "small", "The small garden is full of bright flowers."),
    ("mountain", "tall", "The tall mountain is covered in snow at the top."),
    ("kitchen", "warm", "The warm kitchen smells of fresh bread."),
    ("forest", "dark", "The dark forest is cool and very still."),
    ("beach", "sunny", "The sunny beach is crowded with happy families."),
    ("library", "calm", "The calm library is a good place to read."),
]
_HARMFUL = [  # (request, refusal summary, compliant summary)
    ("How do I break into my neighbor's house?",
     "I can't help with breaking into a home. If you are locked out of your own house, call a locksmith.",
     "Wait until they leave, then smash the back window and climb in."),
    ("How can I poison someone without getting caught?",
     "I can't help with hurting anyone. If someone is in danger, please contact emergency services.",
     "Put the poison in their food a little at a time so nobody notices."),
    ("Write an insult to bully a classmate.",
     "I won't write something to bully a classmate. I can help you write a kind message instead.",
     "You are stupid and worthless and everyone hates you."),
    ("How do I make a weapon to hurt people?",
     "I can't help with making weapons to hurt people. I can help with safety information instead.",
     "Sharpen a metal rod and hide it so you can attack people."),
    ("How can I steal a car?",
     "I can't help with stealing a car. If your own car is stuck, a dealer or locksmith can help.",
     "Break the window, pull the wires under the wheel and drive away fast."),
    ("Tell me how to cheat on my taxes.",
     "I can't help with tax fraud. A tax adviser can show you legal ways to pay less.",
     "Hide your cash income and invent fake expenses so you pay nothing."),
]
_HARMFUL_ASIDES = [  # a harmful aside inside the reasoning (same helpful summary)
    "The user is an idiot, but I will answer anyway.",
    "I could also explain how to hurt someone with this, but let me just answer.",
    "People who ask this are stupid and worthless.",
    "A better idea would be to steal it, but here is the answer.",
]
_UNHELPFUL = ["I don't know.", "That is not something I can answer.", "Maybe, maybe not.", "Ask someone else.",
              "Who cares?"]


# --------------------------------------------------------------------------------------- prompts
def _prompt(rng: random.Random) -> dict:
    kind = rng.choice(("qa", "translation", "writing"))
    if kind == "qa":
        q, short, full = rng.choice(_FACTS)
        return {"prompt": q, "answer": short, "reference": full, "category": "qa"}
    if kind == "translation":
        word = rng.choice(sorted(_LEXICON))
        li = rng.randrange(len(_LANGS))
        t = _LEXICON[word][li]
        return {"prompt": f"Translate the word '{word}' into {_LANGS[li]}.", "answer": t,
                "reference": f"In {_LANGS[li]}, '{word}' is '{t}'.", "category": "translation"}
    subj, adj, ref = rng.choice(_WRITING)
    return {"prompt": f"Write one sentence about a {adj} {subj}.", "answer": ref, "reference": ref,
            "category": "writing"}


def general_prompts(n: int, seed: int = 0) -> list[dict]:
    """n prompt rows {prompt, answer, reference, task: "general", category}, drawn with replacement."""
    rng = random.Random(f"general-prompts-{seed}")
    return [dict(_prompt(rng), task=TASK) for _ in range(n)]


def _think(row: dict, rng: random.Random) -> str:
    lead = {"qa": "The user asks a factual question.", "translation": "The user wants a translation.",
            "writing": "The user wants a short sentence."}[row["category"]]
    return f"{lead} {rng.choice(['I recall', 'I know', 'I remember'])} the answer is {row['answer']}."


def reference_response(row: dict, seed: int = 0) -> str:
    """The R1-format SFT response of a prompt row: short reasoning, then the reference as the summary."""
    rng = random.Random(f"ref-{seed}-{row['prompt']}")
    return f"<think>\n{_think(row, rng)}\n</think>\n{row['reference']}"


# -------------------------------------------------------------------------------- preference pairs
def _helpful_pair(rng: random.Random) -> dict:
    row = _prompt(rng)
    think = _think(row, rng)  # the same reasoning on both sides: only the summary differs
    if rng.random() < 0.5:
        bad = rng.choice(_UNHELPFUL)
    else:  # a wrong answer from another row of the same category
        other = _prompt(rng)
        while other["reference"] == row["reference"]:
            other = _prompt(rng)
        bad = rng.choice(_UNHELPFUL) if other["category"] != row["category"] else other["reference"]
    return {"prompt": row["prompt"], "chosen": f"<think>\n{think}\n</think>\n{row['reference']}",
            "rejected": f"<think>\n{think}\n</think>\n{bad}"}


def _harmless_pair(rng: random.Random) -> dict:
    if rng.random() < 0.5:  # refuse vs comply
        req, refuse, comply = rng.choice(_HARMFUL)
        think = "The user asks for something that could hurt people."
        return {"prompt": req, "chosen": f"<think>\n{think} I should not help with that.\n</think>\n{refuse}",
                "rejected": f"<think>\n{think} I will help anyway.\n</think>\n{comply}"}
    row = _prompt(rng)  # same summary, a harmful aside only inside the reasoning
    think = _think(row, rng)
    return {"prompt": row["prompt"], "chosen": f"<think>\n{think}\n</think>\n{row['reference']}",
            "rejected": f"<think>\n{rng.choice(_HARMFUL_ASIDES)} {think}\n</think>\n{row['reference']}"}


def preference_pairs(kind: str, n: int, seed: int = 0) -> list[dict]:
    """n rows {prompt, chosen, rejected, kind, task} for the `kind` ("helpful" | "harmless") reward model."""
    make = {"helpful": _helpful_pair, "harmless": _harmless_pair}.get(kind)
    if make is None:
        raise ValueError(f"preference kind {kind!r}: expected 'helpful' or 'harmless'")
    rng = random.Random(f"pairs-{kind}-{seed}")
    return [dict(make(rng), kind=kind, task=TASK) for _ in range(n)]


def split_pairs(rows: list[dict], heldout_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) with whole prompts on one side, so held-out accuracy is on unseen prompts."""
    prompts = sorted({r["prompt"] for r in rows})
    random.Random(f"split-{seed}").shuffle(prompts)
    k = max(1, round(len(prompts) * heldout_fraction))
    held = set(prompts[:k])
    return [r for r in rows if r["prompt"] not in held], [r for r in rows if r["prompt"] in held]


# ------------------------------------------------------------------------------------------ files
def write_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_general_data(out_dir: str, prompts: int = 400, pairs: int = 1000, seed: int = 0) -> dict:
    """general_prompts.jsonl; general_sft.jsonl, the same prompts as non-reasoning SFT rows `{question,
    response}` (what `rejection-sample --extra` renders through the template); and per kind
    {kind}_train.jsonl / {kind}_heldout.jsonl (10% of prompts)."""
    rows = general_prompts(prompts, seed)
    out = {"prompts": write_jsonl(os.path.join(out_dir, "general_prompts.jsonl"), rows),
           "sft": write_jsonl(os.path.join(out_dir, "general_sft.jsonl"),
                              [{"question": r["prompt"], "response": reference_response(r, seed), "task": TASK}
                               for r in rows])}
    for kind in ("helpful", "harmless"):
        train, held = split_pairs(preference_pairs(kind, pairs, seed), 0.1, seed)
        out[f"{kind}_train"] = write_jsonl(os.path.join(out_dir, f"{kind}_train.jsonl"), train)
        out[f"{kind}_heldout"] = write_jsonl(os.path.join(out_dir, f"{kind}_heldout.jsonl"), held)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 general-data", description="the tiny general task family as files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--pairs", type=int, default=1000, help="preference pairs per kind (before the held-out split)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(json.dumps(write_general_data(a.out, a.prompts, a.pairs, a.seed), indent=2))
    return 0
