"""The recompute primitive and its config: stochastic regions recompute exactly (RNG replayed), side
effects can tell a recompute apart, and bad settings are one clear ConfigError."""
import pytest
import torch
import torch.nn.functional as F

from megatron_r1.config import ConfigError, load_config
from megatron_r1.parallel.recompute import Recompute, checkpoint_region, recomputing


def _dropout_mlp(x, w):
    return F.dropout(torch.tanh(x @ w), p=0.5, training=True) @ w.t()


def test_stochastic_region_recomputes_exactly():
    """Without the RNG replay the recomputed dropout mask differs and so does every gradient."""
    x0, w0 = torch.randn(8, 16), torch.randn(16, 16)

    def grads(recompute: bool):
        torch.manual_seed(0)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = checkpoint_region(_dropout_mlp, x, w) if recompute else _dropout_mlp(x, w)
        torch.rand(100)  # the RNG moves on before backward, as other layers' forwards would move it
        (y * y).sum().backward()
        return y.detach(), x.grad, w.grad

    for a, b in zip(grads(False), grads(True)):
        assert torch.equal(a, b)


def test_recomputing_flag_only_during_backward_rerun():
    seen = []

    def f(x):
        seen.append(recomputing())
        return x.sin()

    x = torch.randn(4, requires_grad=True)
    checkpoint_region(f, x).sum().backward()
    assert seen == [False, True] and not recomputing()
    with torch.no_grad():  # no autograd: a plain call, nothing to recompute
        checkpoint_region(f, x)
    assert seen == [False, True, False]


def test_settings_from_config():
    rc = Recompute.from_train(load_config("tiny-moe", ["train.recompute=selective"]).train)
    assert rc.selects("layernorm") and rc.selects("mla_up_proj") and rc.selects("moe_act")
    assert not rc.selects("moe") and not rc.full_layer(0)
    rc = Recompute.from_train(load_config("tiny-moe", ["train.recompute=full", "train.recompute_num_layers=2"]).train)
    assert rc.full_layer(1) and not rc.full_layer(2) and not rc.selects("layernorm")
    assert not Recompute.from_train(load_config("tiny-moe").train).full_layer(0)


@pytest.mark.parametrize("override,msg", [
    ("train.recompute=partial", "train.recompute='partial': expected one of none, selective, full"),
    ("train.recompute_modules=[attn]", "train.recompute_modules[0]='attn': expected one of core_attn"),
    ("train.recompute_num_layers=-1", "train.recompute_num_layers=-1 must be >= 0"),
])
def test_bad_settings(override, msg):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        load_config("tiny-moe", [override])


def test_memory_benchmark_prints_savings(capsys):
    import benchmarks.recompute_memory as bench
    bench.main(["--batch", "1", "--seq", "32", "--quick"])
    rows = {line[:52].strip(): float(line[52:].split()[0]) for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["full (every block)"] < rows["selective (default: layernorm, mla_up_proj, moe_act)"] < rows["none"]
