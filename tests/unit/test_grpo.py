"""GRPO math against plain-Python loop references and hand-computed numbers."""

import math

import pytest
import torch

from megatron_r1.rl.grpo import (
    agg_loss,
    dynamic_sampling_mask,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    kl_k3,
    loss_normalizer,
    masked_mean,
    overlong_filter,
    overlong_penalty,
)

# ---------------------------------------------------------------- advantages


def test_group_advantages_hand_computed():
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 4.0]), group_size=2)
    # group [1, 0]: mean 0.5, unbiased std sqrt(0.5); group [2, 4]: mean 3, std sqrt(2)
    s1, s3 = math.sqrt(0.5), math.sqrt(2.0)
    expected = [0.5 / s1, -0.5 / s1, 0.5 / s1, -0.5 / s1, -1 / s3, 1 / s3]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-5)


def test_group_advantages_loop_reference_2d():
    torch.manual_seed(0)
    rewards = torch.rand(3, 5)
    adv = group_advantages(rewards, group_size=5, eps=1e-6)
    assert adv.shape == (3, 5)
    for n in range(3):
        row = rewards[n].tolist()
        mean = sum(row) / 5
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / 4)
        for g in range(5):
            assert adv[n, g].item() == pytest.approx((row[g] - mean) / (std + 1e-6), rel=1e-4)


def test_group_advantages_zero_variance_and_singletons():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float32)
    assert torch.equal(group_advantages(rewards, 3), torch.zeros(6))
    assert torch.equal(group_advantages(rewards, 1), torch.zeros(6))  # G=1: no NaN from std
    assert torch.equal(group_advantages(rewards, 3, normalize_std=False), torch.zeros(6))


def test_dr_grpo_advantages_skip_std():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, normalize_std=False)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_group_advantages_rejects_bad_group_size():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_dynamic_sampling_mask():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    keep = dynamic_sampling_mask(rewards.flatten(), group_size=3)
    assert keep.tolist() == [False, True, False]
    assert keep.repeat_interleave(3).tolist() == [False] * 3 + [True] * 3 + [False] * 3


# ---------------------------------------------------------------- overlong, kl, entropy


def test_overlong_penalty_dapo_schedule():
    lengths = torch.tensor([5, 6, 8, 10, 12])
    # max 10, buffer 4: free up to 6 tokens, then -(L-6)/4, and -1 at or past 10.
    assert overlong_penalty(lengths, max_length=10, buffer=4).tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_overlong_filter_masks_truncated_rows():
    mask = torch.ones(3, 4)
    out = overlong_filter(mask, torch.tensor([False, True, False]))
    assert out.sum(-1).tolist() == [4.0, 0.0, 4.0]


def test_kl_k3_values():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-2.0, -2.0, -0.1])
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())]
    assert torch.allclose(kl_k3(logp, ref), torch.tensor(expected))
    assert kl_k3(torch.randn(100), torch.randn(100)).min() >= 0


def test_entropy_from_logits():
    assert entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    assert entropy_from_logits(torch.tensor([[0.0, -1e4]])).item() == pytest.approx(0.0, abs=1e-6)


def test_masked_mean_empty_is_zero():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


# ---------------------------------------------------------------- the loss

EPS_LOW, EPS_HIGH = 0.2, 0.28
# Ratios chosen so that: seq 0 (A>0) clips high at 1.5 and not at 0.5 (pessimistic side);
# seq 1 (A<0) clips low at 0.5 and not at 1.5; the last token of seq 1 is padding.
RATIOS = [[1.5, 0.9, 0.5, 1.0], [0.5, 1.5, 1.1, 1.2]]
MASK = [[1, 1, 1, 1], [1, 1, 1, 0]]
ADV = [1.0, -0.5]
OLD = [[-1.0, -0.7, -2.0, -1.2], [-0.3, -1.5, -0.9, -1.1]]
REF = [[-1.2, -0.6, -2.5, -1.0], [-0.2, -1.9, -0.9, -3.0]]


def _example(requires_grad=True):
    old = torch.tensor(OLD, dtype=torch.float64)
    logp = (old + torch.log(torch.tensor(RATIOS, dtype=torch.float64))).requires_grad_(requires_grad)
    return logp, old, torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK), torch.tensor(REF, dtype=torch.float64)


def _loop_loss(logp, agg, beta, max_length=None):
    """Per-token GRPO loss with Python scalars, then aggregated by hand."""
    per_seq = []
    for b in range(len(MASK)):
        toks = []
        for t in range(len(MASK[b])):
            if not MASK[b][t]:
                continue
            lp, old, ref, a = logp[b][t], OLD[b][t], REF[b][t], ADV[b]
            ratio = torch.exp(lp - old)
            clipped_ratio = torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH)
            pg = torch.maximum(-a * ratio, -a * clipped_ratio)
            d = ref - lp
            toks.append(pg + beta * (torch.exp(d) - d - 1))
        per_seq.append(toks)
    if agg == "token_mean":
        flat = [x for toks in per_seq for x in toks]
        return sum(flat) / len(flat)
    if agg == "seq_mean_token_mean":
        return sum(sum(toks) / len(toks) for toks in per_seq) / len(per_seq)
    return sum(sum(toks) / max_length for toks in per_seq) / len(per_seq)


def test_grpo_loss_hand_computed_pg_only():
    logp, old, adv, mask, _ = _example()
    loss, m = grpo_loss(logp, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    # seq 0, A=+1: -min(1.5,1.28), -0.9, -max(0.5, 0.5 unclipped)=-0.5, -1.0
    # seq 1, A=-0.5: 0.5*max(0.5,0.8)=0.4, 0.5*1.5=0.75, 0.5*1.1=0.55 (4th is padding)
    expected = (-1.28 - 0.9 - 0.5 - 1.0 + 0.4 + 0.75 + 0.55) / 7
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    assert m["clip_frac"].item() == pytest.approx(2 / 7)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 7)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 7)
    assert m["ratio_max"].item() == pytest.approx(1.5)  # the padded 1.2 doesn't matter; 1.5 is valid
    assert m["ratio_min"].item() == pytest.approx(0.5)
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 0.9 + 0.5 + 1.0 + 0.5 + 1.5 + 1.1) / 7)
    assert "kl" not in m


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_grpo_loss_with_kl_matches_loop_reference(agg):
    beta = 0.1
    logp, old, adv, mask, ref = _example()
    loss, m = grpo_loss(logp, old, adv, mask, ref_logp=ref, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                        beta=beta, loss_agg=agg, max_length=8)
    (grad,) = torch.autograd.grad(loss, logp)

    logp_ref = logp.detach().clone().requires_grad_(True)
    expected = _loop_loss([[logp_ref[b, t] for t in range(4)] for b in range(2)], agg, beta, max_length=8)
    (grad_ref,) = torch.autograd.grad(expected, logp_ref)

    assert loss.item() == pytest.approx(expected.item(), abs=1e-9)
    assert torch.allclose(grad, grad_ref, atol=1e-9)
    # clipped tokens get no policy gradient, only the KL's
    kl_grad_00 = beta * (1 - math.exp(REF[0][0] - logp[0, 0].item()))  # d/dlogp of k3
    scale = {"token_mean": 1 / 7, "seq_mean_token_mean": 1 / 4 / 2, "seq_mean_token_sum_norm": 1 / 8 / 2}[agg]
    assert grad[0, 0].item() == pytest.approx(kl_grad_00 * scale, abs=1e-9)
    assert grad[1, 3].item() == 0.0  # padding
    kl_tokens = [math.exp(REF[b][t] - logp[b, t].item()) - (REF[b][t] - logp[b, t].item()) - 1
                 for b in range(2) for t in range(4) if MASK[b][t]]
    assert m["kl"].item() == pytest.approx(sum(kl_tokens) / 7)


def test_grpo_loss_needs_ref_for_beta():
    logp, old, adv, mask, _ = _example()
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, beta=0.1)


def test_token_vs_sequence_aggregation():
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert agg_loss(loss, mask, "token_mean").item() == pytest.approx(7 / 5)
    assert agg_loss(loss, mask, "seq_mean_token_mean").item() == pytest.approx((1 + 3) / 2)
    assert agg_loss(loss, mask, "seq_mean_token_sum_norm", max_length=4).item() == pytest.approx((4 / 4 + 3 / 4) / 2)
    with pytest.raises(ValueError, match="max_length"):
        agg_loss(loss, mask, "seq_mean_token_sum_norm")


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_sum_matches_full_batch(agg):
    """Split a batch unevenly, give every part the global normaliser, sum the losses:
    same loss and same gradient as the whole batch (what micro-batching + DP SUM do)."""
    torch.manual_seed(0)
    B, T = 6, 7
    logp = (-torch.rand(B, T, dtype=torch.float64) * 2).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(B, T, dtype=torch.float64)
    ref = logp.detach() + 0.3 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    lengths = torch.tensor([7, 2, 5, 0, 3, 6])  # includes an empty (overlong-filtered) row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    kw = dict(ref_logp=None, eps_low=0.2, eps_high=0.28, beta=0.05, loss_agg=agg, max_length=T)

    full, _ = grpo_loss(logp, old, adv, mask, **{**kw, "ref_logp": ref})
    (g_full,) = torch.autograd.grad(full, logp)

    parts = [slice(0, 4), slice(4, 6)]
    normalizer = sum(loss_normalizer(mask[s], agg) for s in parts)  # an all-reduce across ranks in training
    total = sum(grpo_loss(logp[s], old[s], adv[s], mask[s], **{**kw, "ref_logp": ref[s]},
                          normalizer=normalizer)[0] for s in parts)
    (g_parts,) = torch.autograd.grad(total, logp)

    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(g_parts, g_full, atol=1e-12)

    # Without the global normaliser, averaging per-part means is NOT the same loss.
    naive = sum(grpo_loss(logp[s], old[s], adv[s], mask[s], **{**kw, "ref_logp": ref[s]})[0] for s in parts) / 2
    assert naive.item() != pytest.approx(full.item(), abs=1e-6)


# ---------------------------------------------------------------- the loss family and mismatch correction
from megatron_r1.rl.grpo import policy_loss, rollout_is_weights  # noqa: E402


def _leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_dual_clip_caps_negative_advantage_losses():
    # one sequence, three tokens with ratios 5, 2 and 0.5 (old logp 0); advantage -1; eps 0.2, c = 3
    logp = _leaf([[math.log(5.0), math.log(2.0), math.log(0.5)]])
    loss, _, clipped = policy_loss(logp, torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[-1.0]]),
                                   torch.ones(1, 3), "ppo", 0.2, 0.2, dual_clip_c=3.0)
    # PPO alone: max(r, clip(r)) = 5, 2, 0.8; the dual clip caps the first at c·|A| = 3
    assert loss[0].tolist() == pytest.approx([3.0, 2.0, 0.8])
    loss.sum().backward()
    # d/dlogp of -A·r = r where the unclipped branch is active; 0 where a clip (either) bound
    assert logp.grad[0].tolist() == pytest.approx([0.0, 2.0, 0.0])
    assert clipped.tolist() == [[1.0, 0.0, 1.0]]
    # positive advantages are untouched by the dual clip
    pos, _, _ = policy_loss(logp.detach(), torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1.0]]),
                            torch.ones(1, 3), "ppo", 0.2, 0.2, dual_clip_c=3.0)
    assert pos[0].tolist() == pytest.approx([-1.2, -1.2, -0.5])


def test_gspo_sequence_ratio_and_gradient_against_a_loop():
    torch.manual_seed(0)
    logp = _leaf(torch.randn(3, 4).mul(0.05).tolist())
    old = torch.randn(3, 4, dtype=torch.float64).mul(0.05)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([[1.0], [-0.5], [2.0]], dtype=torch.float64)
    eps = 0.03
    loss, ratio, _ = policy_loss(logp, old, adv, mask, "gspo", eps, eps)
    (loss * mask).sum().backward()
    for b in range(3):
        toks = [t for t in range(4) if mask[b, t]]
        d = [logp[b, t].item() - old[b, t].item() for t in toks]
        s = math.exp(sum(d) / len(d))
        a = adv[b, 0].item()
        want = max(-a * s, -a * min(max(s, 1 - eps), 1 + eps))
        for t in toks:
            assert ratio[b, t].item() == pytest.approx(s, rel=1e-12)
            assert loss[b, t].item() == pytest.approx(want, rel=1e-12)
            # every token of the sequence carries the sequence loss; the sum over its tokens is |y|·loss,
            # whose gradient wrt one token's logp is |y|·(-a·s/|y|) = -a·s when unclipped, else 0
            unclipped = -a * s >= -a * min(max(s, 1 - eps), 1 + eps)
            assert logp.grad[b, t].item() == pytest.approx(-a * s if unclipped else 0.0, rel=1e-9, abs=1e-12)


def test_cispo_keeps_gradients_of_clipped_tokens():
    logp = _leaf([[math.log(2.0), math.log(1.1), math.log(0.5)]])
    old = torch.zeros(1, 3, dtype=torch.float64)
    loss, _, clipped = policy_loss(logp, old, torch.tensor([[1.5]], dtype=torch.float64), torch.ones(1, 3),
                                   "cispo", 0.2, 0.28)
    w = [1.28, 1.1, 0.5]  # sg[min(r, 1 + eps_high)]
    assert loss[0].tolist() == pytest.approx([-1.5 * wi * lp for wi, lp in zip(w, logp.detach()[0].tolist())])
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.5 * wi for wi in w])  # the clipped token keeps a gradient
    assert clipped.tolist() == [[1.0, 0.0, 0.0]]


@pytest.mark.parametrize("mode,level", [("tis", "token"), ("tis", "sequence"), ("mis", "token"), ("mis", "sequence")])
def test_rollout_is_weights_against_a_loop(mode, level):
    torch.manual_seed(1)
    old = torch.randn(4, 5) * 0.4
    rollout = old + torch.randn(4, 5) * 0.4
    mask = (torch.rand(4, 5) > 0.2).float()
    cap = 1.5
    w, m = rollout_is_weights(old, rollout, mask, mode, level, cap)
    for b in range(4):
        seq = math.exp(sum(old[b, t].item() - rollout[b, t].item() for t in range(5) if mask[b, t]))
        for t in range(5):
            if not mask[b, t]:
                assert w[b, t] == 0
                continue
            r = seq if level == "sequence" else math.exp(old[b, t].item() - rollout[b, t].item())
            want = min(r, cap) if mode == "tis" else float(1 / cap <= r <= cap)
            assert w[b, t].item() == pytest.approx(want, rel=1e-5)
    assert 0 <= m["is_clipped_frac"] <= 1 and m["is_ratio_min"] <= m["is_ratio_mean"] <= m["is_ratio_max"]


def test_is_weights_scale_only_the_policy_term():
    logp = _leaf([[0.1, -0.2]])
    base, _ = grpo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2),
                        ref_logp=torch.zeros(1, 2), beta=0.5)
    half, _ = grpo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2),
                        ref_logp=torch.zeros(1, 2), beta=0.5, is_weights=torch.full((1, 2), 0.5))
    kl = kl_k3(logp.detach(), torch.zeros(1, 2)).mean()
    assert (base - 0.5 * kl).item() * 0.5 == pytest.approx((half - 0.5 * kl).item(), rel=1e-6)
