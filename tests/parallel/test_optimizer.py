"""AdamW written out elementwise must equal torch.optim.AdamW; the canonical element order is a bijection."""
import torch

from megatron_r1.parallel.data import adamw_, canonical_flat, canonical_view


def test_adamw_matches_torch_bitwise():
    torch.manual_seed(0)
    p0 = torch.randn(257, 33) * 0.02
    ref = p0.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    mine, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step in range(1, 6):
        g = torch.randn_like(p0) * 10 ** (-step)
        ref.grad = g.clone()
        opt.step()
        adamw_(mine, g, m, v, step, 3e-3, 0.9, 0.95, 1e-8, 0.1)
        assert torch.equal(mine, ref.detach())
        assert torch.equal(m, opt.state[ref]["exp_avg"]) and torch.equal(v, opt.state[ref]["exp_avg_sq"])


def test_canonical_order_roundtrip():
    p = torch.nn.Parameter(torch.randn(3, 4, 5))
    for d in (0, 1, 2):
        flat = canonical_flat(p.detach(), d)
        assert torch.equal(canonical_view(flat.clone(), p, d), p.detach())
        # a tp slice along d is one contiguous range of the canonical order
        half = p.detach().narrow(d, 0, 1)
        assert torch.equal(canonical_flat(half, d), flat[:half.numel()])
