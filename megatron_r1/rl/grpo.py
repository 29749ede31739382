"""GRPO math: group advantages, DAPO filters/penalties, the clipped policy loss with k3 KL.

Pure functions on tensors, no model, no process groups. Shape legend:
    N prompts, G samples per prompt (a group), B = N·G sequences (or any micro-batch of them),
    T response tokens (right-padded; ``mask_BT`` is 1 on response tokens that count).

Notable choices:
- Advantages ``(r - mean_g) / (std_g + eps)`` use the unbiased std (as TRL and verl);
  ``normalize_std=False`` is Dr. GRPO. Groups whose rewards are all equal get advantage
  exactly 0 (set explicitly: float rounding of the mean would otherwise leave ±1e-8/eps).
- Clip-higher (DAPO): ``eps_low`` and ``eps_high`` bound the ratio at ``1-eps_low`` and
  ``1+eps_high``; equal values are PPO/GRPO clipping.
- KL is k3 (``exp(ref-logp) - (ref-logp) - 1``, unbiased, >= 0) added per token with ``beta``,
  as in the GRPO paper; the log-ratio is clamped to ±20 so ``exp`` cannot overflow.
- Loss aggregation (``loss_agg``):
    ``token_mean``               sum over all valid tokens / number of valid tokens (DAPO)
    ``seq_mean_token_mean``      mean over sequences of each sequence's token mean (GRPO paper)
    ``seq_mean_token_sum_norm``  mean over sequences of token sum / ``max_length`` (Dr. GRPO)
  "Sequences" are those with at least one valid token (an overlong-filtered sequence leaves
  the average instead of diluting it).
- Layout invariance: each mode is ``sum(unit losses) / number of units`` (units: tokens, or
  sequences). Passing ``normalizer`` = the number of units in the *global* batch (from
  ``loss_normalizer`` summed over micro-batches and all-reduced over data-parallel ranks) makes
  ``grpo_loss`` return that micro-batch's share of the global loss, so summing losses over
  micro-batches and SUM-reducing gradients over ranks gives exactly the gradient of one big
  batch, whatever the split. (If the gradient reduction averages over ``dp`` ranks, as DDP
  does, pass ``normalizer / dp`` instead.) Without ``normalizer`` the local count is used:
  the plain single-batch loss.
- Metrics are detached 0-dim tensors over the local valid tokens (no ``.item()`` sync); the
  trainer reduces them across ranks if it wants global numbers.
"""

from __future__ import annotations

import torch

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
_MAX_LOG_RATIO = 20.0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1; 0 (not NaN) where nothing is valid."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] or [N, G] -> [N, G] float32."""
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not have group_size={group_size} columns")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size).float()


def group_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """rewards [B] (group-major: the G samples of a prompt are adjacent) or [N, G]
    -> advantages of the same shape, float32."""
    r_NG = _groups(rewards, group_size)
    adv_NG = r_NG - r_NG.mean(-1, keepdim=True)
    if normalize_std and group_size > 1:
        adv_NG = adv_NG / (r_NG.std(-1, keepdim=True) + eps)
    constant_N1 = (r_NG.amax(-1) == r_NG.amin(-1)).unsqueeze(-1)
    return adv_NG.masked_fill(constant_N1, 0.0).reshape(rewards.shape)


def dynamic_sampling_mask(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: bool [N], True for groups to keep (rewards not all equal, so the
    group carries a learning signal). ``mask.repeat_interleave(G)`` gives the per-sample [B] mask."""
    r_NG = _groups(rewards, group_size)
    return r_NG.amax(-1) != r_NG.amin(-1)


def overlong_filter(mask_BT: torch.Tensor, truncated_B: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: truncated responses (hit the length limit) get no loss."""
    return mask_BT * (~truncated_B.bool()).unsqueeze(-1).to(mask_BT.dtype)


def overlong_penalty(lengths_B: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the reward [B]: 0 up to ``max_length - buffer``
    tokens, then linear down to -1 at ``max_length``, and -1 beyond."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer={buffer} must be in (0, max_length={max_length}]")
    expected = max_length - buffer
    penalty = (expected - lengths_B.float()) / buffer
    return penalty.clamp(min=-1.0, max=0.0)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from samples of pi; any shape."""
    d = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(d) - d - 1


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> entropy [...] (float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _check_agg(loss_agg: str, max_length: int | None) -> None:
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg={loss_agg!r}; choose from {LOSS_AGGS}")
    if loss_agg == "seq_mean_token_sum_norm" and not max_length:
        raise ValueError("loss_agg='seq_mean_token_sum_norm' (Dr. GRPO) needs max_length (the generation limit)")


def loss_normalizer(mask_BT: torch.Tensor, loss_agg: str = "token_mean") -> torch.Tensor:
    """The number of averaging units in this (micro-)batch: valid tokens for ``token_mean``,
    sequences with any valid token otherwise. Sum it over micro-batches and ranks, then pass
    it as ``grpo_loss(normalizer=...)``."""
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg={loss_agg!r}; choose from {LOSS_AGGS}")
    if loss_agg == "token_mean":
        return (mask_BT > 0).sum().float()
    return (mask_BT.sum(-1) > 0).sum().float()


def agg_loss(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    loss_agg: str = "token_mean",
    normalizer: torch.Tensor | float | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar; see the module docstring for the modes and
    ``normalizer``."""
    _check_agg(loss_agg, max_length)
    mask_BT = mask_BT.to(loss_BT.dtype)
    if loss_agg == "token_mean":
        total = masked_sum(loss_BT, mask_BT)
    elif loss_agg == "seq_mean_token_mean":
        total = masked_mean(loss_BT, mask_BT, dim=-1).sum()
    else:
        total = (masked_sum(loss_BT, mask_BT, dim=-1) / max_length).sum()
    if normalizer is None:
        normalizer = loss_normalizer(mask_BT, loss_agg).clamp(min=1)
    return total / normalizer


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    loss_agg: str = "token_mean",
    normalizer: torch.Tensor | float | None = None,
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + beta·k3 KL.

    logp [B, T] (current policy, carries grad), old_logp [B, T] (rollout policy),
    advantages [B] (one per sequence, broadcast over its tokens), mask [B, T],
    ref_logp [B, T] or None (needed when beta > 0; if given with beta = 0 the KL is only logged).
    Returns (scalar loss, metrics).
    """
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp")
    # bf16 log-probs are upcast: exp of a bf16 log-ratio is off by up to ~0.4% near 1.
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp_BT, old_BT = logp.to(dtype), old_logp.to(dtype)
    mask_BT = mask.to(dtype)
    adv_B1 = advantages.to(dtype).unsqueeze(-1)

    log_ratio_BT = (logp_BT - old_BT).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio_BT = torch.exp(log_ratio_BT)
    pg_unclipped_BT = -adv_B1 * ratio_BT
    pg_clipped_BT = -adv_B1 * ratio_BT.clamp(1 - eps_low, 1 + eps_high)
    # max of the two losses = min of the two objectives: the pessimistic PPO bound.
    pg_BT = torch.maximum(pg_unclipped_BT, pg_clipped_BT)
    per_token_BT = pg_BT

    metrics: dict[str, torch.Tensor] = {}
    if ref_logp is not None:
        kl_BT = kl_k3(logp_BT, ref_logp.to(dtype))
        if beta > 0:
            per_token_BT = pg_BT + beta * kl_BT
        metrics["kl"] = masked_mean(kl_BT, mask_BT).detach()

    loss = agg_loss(per_token_BT, mask_BT, loss_agg, normalizer, max_length)

    with torch.no_grad():
        clipped_BT = (pg_clipped_BT > pg_unclipped_BT).float()
        valid = mask_BT > 0
        metrics["pg_loss"] = agg_loss(pg_BT, mask_BT, loss_agg, normalizer, max_length).detach()
        metrics["clip_frac"] = masked_mean(clipped_BT, mask_BT)
        metrics["clip_frac_low"] = masked_mean(clipped_BT * (adv_B1 < 0), mask_BT)
        metrics["clip_frac_high"] = masked_mean(clipped_BT * (adv_B1 > 0), mask_BT)
        metrics["ratio_mean"] = masked_mean(ratio_BT, mask_BT)
        # torch.where, not `if valid.any()`: no host sync; an all-padding batch reports 1.
        one = ratio_BT.new_tensor(1.0)
        metrics["ratio_max"] = torch.where(valid.any(), ratio_BT.masked_fill(~valid, -torch.inf).amax(), one)
        metrics["ratio_min"] = torch.where(valid.any(), ratio_BT.masked_fill(~valid, torch.inf).amin(), one)
    return loss, metrics
