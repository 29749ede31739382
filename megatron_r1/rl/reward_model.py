"""Reward models: a causal LM of ours read as a scalar scorer, its Bradley–Terry loss, and serving.

Notable choices
- The scalar head is one row of the output layer: the score of a sequence is the logit of a fixed
  token (`score_token_id`, the tokenizer's eos) at the sequence's last position, where the input is
  that eos. r(x) = w_eos · h_last(x) is a linear head on the final hidden state, and the reward model
  stays an ordinary checkpoint of our GPT / student classes: the same runtime trains it (dp, tp, pp,
  ZeRO-1, resumable checkpoints), the same HF export holds it, `from_hf` loads it. `rm.json` beside
  the export records the token, the kind and the held-out accuracy.
- What a reward model reads is fixed in one place (`rm_text`), for training and serving alike: the
  user's prompt, a blank line, then the judged part of the response. The helpfulness RM judges the
  final summary only (text after the last `</think>`, `<answer>` tags removed), the harmlessness RM
  the whole response, reasoning included (DeepSeek-R1 §2.3.4).
- Bradley–Terry: loss = −log σ(r(chosen) − r(rejected)), summed over pairs and divided by the global
  pair count, so micro-batches and dp ranks add up to one batch (like every loss of the runtime).
- Under tp the score's logit lives on the rank that holds the eos column of the vocab-parallel head:
  each rank contributes its part (zero elsewhere) and one all-reduce sums them (identity backward, as
  Megatron's row-parallel output), so every tp rank holds the same scores and loss.
- Serving (`RewardModel`): each rollout replica loads the RM whole on its own device (an RM is small
  next to the policy) and scores its own samples in no-grad batches; loaded models are cached per path.
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache

import torch
import torch.nn.functional as F

from megatron_r1.config import ConfigError

RM_META = "rm.json"
KINDS = {"helpful": "summary", "harmless": "response"}  # kind -> what it judges
_THINK_END = "</think>"
_ANSWER_TAGS = re.compile(r"</?answer>")


def summary_of(response: str) -> str:
    """The final summary of an R1-format response: what follows the last `</think>` (answer tags
    dropped); a response with no closed reasoning is all summary."""
    i = response.rfind(_THINK_END)
    tail = response[i + len(_THINK_END):] if i >= 0 else response
    return _ANSWER_TAGS.sub("", tail).strip()


def rm_text(prompt: str, response: str, kind: str) -> str:
    """The text a `kind` reward model scores (training and serving)."""
    if kind not in KINDS:
        raise ConfigError(f"reward-model kind {kind!r}: expected one of {', '.join(KINDS)}")
    judged = summary_of(response) if KINDS[kind] == "summary" else response.strip()
    return f"{prompt.strip()}\n\n{judged}" if prompt else judged


def prompt_text(prompt) -> str:
    """A prompt row's prompt as plain text (chat messages joined by their contents)."""
    if isinstance(prompt, list):
        return "\n".join(m.get("content", "") for m in prompt if isinstance(m, dict))
    return prompt or ""


def rm_ids(tok, text: str, max_len: int) -> list[int]:
    """bos + tokens + eos, cut to `max_len` keeping the final eos (the scored position)."""
    ids = tok.encode(text, bos=True, eos=True)
    return ids if len(ids) <= max_len else ids[:max_len - 1] + [tok.eos_id]


def pad_rows(rows: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, S], last [B]): right-padded to a length that is a multiple of `multiple` (host tensors)."""
    s = max(map(len, rows))
    s = -(-s // multiple) * multiple
    ids = torch.full((len(rows), s), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)


# ------------------------------------------------------------------------------------ scores, loss
def sequence_scores(out, last_B: torch.Tensor, token_id: int, mesh) -> torch.Tensor:
    """Scores [B] (float32): logit of `token_id` at position `last_B[b]` of each row.

    out.logits: [B, S_l, V/tp] this rank's positions (out.positions [S_l]) and vocab slice."""
    from megatron_r1.parallel.tensor import reduce_from_region
    if mesh.cp > 1:
        raise ConfigError("reward models do not support parallel.cp > 1 (the scored position lives on one cp rank)")
    logits = out.logits
    v_local = logits.shape[-1]
    k = token_id - mesh.tp_rank * v_local
    # a rank without the column still contributes (zeros) so its loss has a graph to backpropagate
    col_BS = logits[..., k].float() if 0 <= k < v_local else logits[..., 0].float() * 0
    at_last_BS = (out.positions.unsqueeze(0) == last_B.unsqueeze(1)).float()
    return reduce_from_region((col_BS * at_last_BS).sum(1), mesh.tp_group)


def bradley_terry_loss(chosen_B: torch.Tensor, rejected_B: torch.Tensor, normalizer: float):
    """(Σ −log σ(r_c − r_r) / normalizer, {loss_sum, correct, pairs}) — sums, for the runtime's reduction."""
    margin = chosen_B - rejected_B
    nll = -F.logsigmoid(margin)
    return nll.sum() / normalizer, {"bt_loss_sum": nll.sum().detach(), "correct": (margin > 0).float().sum(),
                                    "pairs": torch.tensor(float(len(margin)), device=margin.device)}


def pairs_loss_fn(token_id: int, mesh):
    """loss_fn for `train_step` over micro-batches whose rows alternate chosen, rejected."""
    def fn(out, mb):
        s = sequence_scores(out, mb["last"], token_id, mesh)
        return bradley_terry_loss(s[0::2], s[1::2], mb["normalizer"])
    return fn


# ----------------------------------------------------------------------------------------- serving
class RewardModel:
    """A trained reward model (a `train-rm` export) scoring texts on one device."""

    def __init__(self, path: str, device=None, batch_size: int = 16):
        from megatron_r1.data.tokenizer import load_tokenizer
        from megatron_r1.model import from_hf
        from megatron_r1.parallel.mesh import ParallelMesh, default_device
        meta_path = os.path.join(path, RM_META)
        if not os.path.isfile(meta_path):
            raise ConfigError(f"{path}: not a reward model (no {RM_META}; make one with `megatron-r1 train-rm`)")
        self.meta = json.load(open(meta_path))
        self.path, self.kind = path, self.meta["kind"]
        self.mesh = ParallelMesh.single(device=device or default_device())
        # bf16 on an accelerator (half the memory beside the policy), float32 on CPU (tests compare exactly)
        dtype = torch.float32 if self.mesh.device.type == "cpu" else torch.bfloat16
        self.model = from_hf(path, mesh=self.mesh, dtype=dtype)
        self.model.use_mtp = False
        self.model.eval()
        self.tok = load_tokenizer(path)
        self.token_id, self.max_len, self.batch_size = int(self.meta["score_token_id"]), int(self.meta["max_length"]), batch_size

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            ids, last = pad_rows([rm_ids(self.tok, t, self.max_len) for t in texts[i:i + self.batch_size]],
                                 self.tok.pad_id)
            ids, last = ids.to(self.mesh.device), last.to(self.mesh.device)
            res = self.model(ids, with_mtp=False)
            out.extend(sequence_scores(res, last, self.token_id, self.mesh).tolist())  # one host read per batch
        return out

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        return self.score_texts([rm_text(prompt_text(p), r, self.kind) for p, r in zip(prompts, responses)])


@lru_cache(maxsize=8)
def load_reward_model(path: str) -> RewardModel:
    """One loaded copy per path and process (the GRPO loop scores every step with the same RMs)."""
    return RewardModel(path)
