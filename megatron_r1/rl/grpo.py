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
- Policy-loss family (``policy_loss``), each per token before aggregation:
    ``ppo``    PPO/GRPO clipped surrogate, ``max(-A·r, -A·clip(r, 1-eps_low, 1+eps_high))``; with
               ``dual_clip_c`` (> 1) the loss of a negative-advantage token is capped at ``-c·A``
               (dual-clip PPO, Ye et al. 2020): a huge ratio on a bad token cannot blow the step up.
    ``gspo``   GSPO (Zheng et al. 2025): one ratio per sequence, ``s = exp(mean_t(logp - old))``
               (length-normalised), clipped at sequence level; every token of a sequence carries
               ``max(-A·s, -A·clip(s))`` and the gradient of ``s`` (sg[s]·r_t/sg[r_t] per token).
    ``cispo``  CISPO (MiniMax-M1): ``-sg[min(r, 1+eps_high)]·A·logp``: the IS weight is clipped and
               stop-gradient, and every token keeps its gradient (nothing is zeroed by the clip).
- Rollout/trainer mismatch correction (``rollout_is_weights``): the ratio ``pi_old/pi_rollout``
  of the same tokens (trainer vs vLLM logprobs of the same weights), per token or per sequence
  (product over its tokens), either truncated at C (TIS: weight ``min(ratio, C)``) or masked
  (MIS: tokens / sequences with a ratio outside [1/C, C] get weight 0 and drop out of the loss, but
  not out of the normaliser). The weights are constants (no gradient) that multiply the per-token
  policy loss (not the KL term).
- Metrics are detached 0-dim tensors over the local valid tokens (no ``.item()`` sync); the
  trainer reduces them across ranks if it wants global numbers.
"""

from __future__ import annotations

import torch

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
POLICY_LOSSES = ("ppo", "gspo", "cispo")
IS_MODES = ("none", "tis", "mis")
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


def policy_loss(
    logp_BT: torch.Tensor,
    old_BT: torch.Tensor,
    adv_B1: torch.Tensor,
    mask_BT: torch.Tensor,
    kind: str = "ppo",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token policy loss [B, T] of one of ``POLICY_LOSSES`` (see the module docstring); also the
    ratio the clip acted on [B, T] and a float mask of where the clip bound [B, T]."""
    if kind not in POLICY_LOSSES:
        raise ValueError(f"policy loss {kind!r}; choose from {POLICY_LOSSES}")
    log_ratio_BT = (logp_BT - old_BT).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    if kind == "gspo":
        # s_B = exp(mean over the sequence's valid tokens of the log-ratio); per token sg[s]·r_t/sg[r_t]
        # has the value of s and the gradient s·d(log r_t)/|y| summed over tokens = d s
        count_B1 = mask_BT.sum(-1, keepdim=True).clamp(min=1)
        seq_log_B1 = (log_ratio_BT * mask_BT).sum(-1, keepdim=True) / count_B1
        ratio_BT = torch.exp(seq_log_B1.detach() + log_ratio_BT - log_ratio_BT.detach()).expand_as(log_ratio_BT)
    else:
        ratio_BT = torch.exp(log_ratio_BT)
    if kind == "cispo":
        weight_BT = ratio_BT.detach().clamp(max=1 + eps_high)
        loss_BT = -adv_B1 * weight_BT * logp_BT
        clipped_BT = (ratio_BT.detach() > 1 + eps_high).to(logp_BT.dtype)
        return loss_BT, ratio_BT, clipped_BT
    unclipped_BT = -adv_B1 * ratio_BT
    clipped_loss_BT = -adv_B1 * ratio_BT.clamp(1 - eps_low, 1 + eps_high)
    # max of the two losses = min of the two objectives: the pessimistic PPO bound
    loss_BT = torch.maximum(unclipped_BT, clipped_loss_BT)
    clipped_BT = (clipped_loss_BT > unclipped_BT).to(logp_BT.dtype)
    if dual_clip_c is not None:
        if dual_clip_c <= 1:
            raise ValueError(f"dual_clip_c={dual_clip_c} must be > 1")
        cap_BT = -adv_B1 * dual_clip_c  # > 0 where A < 0
        dual_BT = (adv_B1 < 0) & (loss_BT > cap_BT)
        loss_BT = torch.where(dual_BT, cap_BT.expand_as(loss_BT), loss_BT)
        clipped_BT = torch.maximum(clipped_BT, dual_BT.to(clipped_BT.dtype))
    return loss_BT, ratio_BT, clipped_BT


def rollout_is_weights(
    old_BT: torch.Tensor,
    rollout_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    mode: str = "tis",
    level: str = "token",
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights for the rollout/trainer mismatch: (weights [B, T], metrics).

    ratio = pi_old(trainer) / pi_rollout(vLLM) per token, or per sequence (the product over its valid
    tokens, broadcast to them). TIS: weight min(ratio, cap). MIS: weight 1 inside [1/cap, cap] and 0 outside
    (the token, or the whole sequence, leaves the loss; it stays in the normaliser, so the loss scale does
    not depend on how many tokens the mismatch dropped and no collective is needed). No gradient."""
    if mode not in IS_MODES or mode == "none":
        raise ValueError(f"rollout IS mode {mode!r}; choose from tis, mis")
    if level not in ("token", "sequence"):
        raise ValueError(f"rollout IS level {level!r}; choose from token, sequence")
    if cap <= 1:
        raise ValueError(f"rollout IS cap={cap} must be > 1")
    with torch.no_grad():
        mask_BT = mask_BT.to(old_BT.dtype)
        log_BT = ((old_BT - rollout_BT) * mask_BT).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        if level == "sequence":
            log_BT = log_BT.sum(-1, keepdim=True).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).expand_as(log_BT)
        ratio_BT = torch.exp(log_BT)
        if mode == "tis":
            weight_BT = ratio_BT.clamp(max=cap)
            hit_BT = (ratio_BT > cap).to(mask_BT.dtype)
        else:
            weight_BT = ((ratio_BT >= 1 / cap) & (ratio_BT <= cap)).to(mask_BT.dtype)
            hit_BT = 1 - weight_BT
        valid = mask_BT > 0
        one = ratio_BT.new_tensor(1.0)
        metrics = {
            "is_ratio_mean": masked_mean(ratio_BT, mask_BT),
            "is_ratio_max": torch.where(valid.any(), ratio_BT.masked_fill(~valid, -torch.inf).amax(), one),
            "is_ratio_min": torch.where(valid.any(), ratio_BT.masked_fill(~valid, torch.inf).amin(), one),
            "is_weight_mean": masked_mean(weight_BT, mask_BT),
            "is_clipped_frac": masked_mean(hit_BT, mask_BT),  # truncated (TIS) or masked (MIS) tokens
        }
    return weight_BT * mask_BT, metrics


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
    policy: str = "ppo",
    dual_clip_c: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss (``policy``: ppo / gspo / cispo, optional dual clip) + beta·k3 KL.

    logp [B, T] (current policy, carries grad), old_logp [B, T] (the policy that sampled, as the trainer
    computes it), advantages [B] (one per sequence, broadcast over its tokens), mask [B, T],
    ref_logp [B, T] or None (needed when beta > 0; if given with beta = 0 the KL is only logged),
    is_weights [B, T] or None (rollout-mismatch importance weights, constants; see rollout_is_weights).
    Returns (scalar loss, metrics).
    """
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp")
    # bf16 log-probs are upcast: exp of a bf16 log-ratio is off by up to ~0.4% near 1.
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp_BT, old_BT = logp.to(dtype), old_logp.to(dtype)
    mask_BT = mask.to(dtype)
    adv_B1 = advantages.to(dtype).unsqueeze(-1)

    pg_BT, ratio_BT, clipped_BT = policy_loss(logp_BT, old_BT, adv_B1, mask_BT, policy, eps_low, eps_high,
                                              dual_clip_c)
    if is_weights is not None:
        pg_BT = pg_BT * is_weights.to(dtype).detach()
    per_token_BT = pg_BT

    metrics: dict[str, torch.Tensor] = {}
    if ref_logp is not None:
        kl_BT = kl_k3(logp_BT, ref_logp.to(dtype))
        if beta > 0:
            per_token_BT = pg_BT + beta * kl_BT
        metrics["kl"] = masked_mean(kl_BT, mask_BT).detach()

    loss = agg_loss(per_token_BT, mask_BT, loss_agg, normalizer, max_length)

    with torch.no_grad():
        ratio_BT = ratio_BT.detach()
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
