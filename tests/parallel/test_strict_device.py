"""The device guard of `check-parallel --strict-device` catches what would break on a GPU, and a model is
built on `meta` and materialised on its device without a host copy.

The layouts of tests/parallel/test_equivalence.py all run under the guard (strict_device=True); here the
guard is shown to fail, naming file:line, on a planted device-less tensor and a planted `.item()`
inside a real two-rank training step, and to stay quiet on the same step without them.
"""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_r1.engine.check import default_batch, make_config, parse_layout, target_count
from megatron_r1.engine.runtime import build_optimizer, build_parallel_model, forward_only, train_step
from megatron_r1.engine.strict import StrictDevice, StrictDeviceError
from megatron_r1.model.gpt import lm_loss
from megatron_r1.parallel.mesh import ParallelMesh
from megatron_r1.parallel.spawn import RankError
from megatron_r1.parallel.tensor import vocab_parallel_logprobs
from tests.parallel.harness import run_ranks

HERE = os.path.relpath(__file__, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _line(marker: str) -> int:
    for i, line in enumerate(open(__file__), 1):
        if line.rstrip().endswith(f"# {marker}") and "def _line" not in line:
            return i
    raise AssertionError(marker)


def _step(plant: bool):
    """One training step of tiny-moe (MTP on) at tp2·ep2 under the guard, then a forward-only pass; with
    `plant`, the loss function creates a tensor without a device and reads a value to the host."""
    cfg = make_config("tiny-moe")
    cfg.parallel, _ = parse_layout("tp2,ep2")
    mesh = ParallelMesh.build(cfg.parallel, cfg.model)
    chunks = build_parallel_model(cfg, mesh)
    opt = build_optimizer(chunks, cfg, mesh)
    batch = default_batch(cfg, ["tp2,ep2"])[:2]
    n = target_count(batch)

    def loss_fn(out, mb):
        loss, metrics = lm_loss(out, mb["input_ids"], mb["loss_mask"], cfg.model, mesh, n)
        if plant:
            metrics["planted"] = torch.zeros(())  # PLANTED-FACTORY
            if loss.item() < 0:  # PLANTED-ITEM
                pass
        return loss, metrics

    with StrictDevice():
        loss = train_step(chunks, opt, batch, loss_fn, mesh)["loss"]
    if plant:
        return loss

    def logprobs(out, mb):  # GRPO's forward-only pass (old / reference log-probabilities)
        ids = mb["input_ids"]
        return vocab_parallel_logprobs(out.logits, ids[:, (out.positions + 1).clamp(max=ids.shape[1] - 1)], mesh)

    with StrictDevice():
        lp = forward_only(chunks, batch, logprobs, mesh)
    return loss, len(lp)


def test_guard_catches_planted_tensor_and_item():
    with pytest.raises(RankError) as e:
        run_ranks(_step, 2, True, timeout=240)
    msg = str(e.value)
    assert "StrictDeviceError" in msg
    assert f"{HERE}:{_line('PLANTED-FACTORY')}: torch.zeros(...) without device=" in msg, msg
    assert f"{HERE}:{_line('PLANTED-ITEM')}: host transfer .item() in loss_fn()" in msg, msg
    assert re.search(r"2 device finding\(s\)", msg), msg  # nothing else in the step


def test_guard_passes_the_same_step_without_them():
    out = run_ranks(_step, 2, False, timeout=240)
    assert out[0] == out[1] and torch.isfinite(torch.tensor(out[0][0])) and out[0][1] == 2


def test_guard_unit():
    """Findings are file:line; *_like / new_* and explicit devices pass; allow-listed functions pass."""
    x = torch.ones(3)
    g = StrictDevice(raise_on_exit=False)
    with g:
        torch.zeros(2, device=x.device)
        torch.zeros_like(x)
        x.new_ones(2)
        torch.arange(3)  # FACTORY
        if x.sum() > 0:  # BOOL
            pass
    assert set(g.findings) == {f"{HERE}:{_line('FACTORY')}", f"{HERE}:{_line('BOOL')}"}, g.findings
    with pytest.raises(StrictDeviceError, match=r"\.tolist\(\)"):
        with StrictDevice():
            x.tolist()


class _HostAllocations(TorchDispatchMode):
    """Bytes of every tensor an op puts on the CPU (parameters, buffers, temporaries alike)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.largest = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.bytes += t.numel() * t.element_size()
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_build_on_meta_allocates_no_host_memory():
    """A DeepSeek-V3 671B first pipeline stage (4 layers, 256 experts: 14.2B parameters, 28 GB in bf16) built for a device
    that is not the host: nothing of it is allocated on the CPU, and its placement table is complete."""
    cfg = make_config("deepseek-v3-671b", ["train.params_dtype=bfloat16", "parallel.pp=16",
                                           "parallel.first_stage_layers=4", "parallel.last_stage_layers=1"])
    mesh = ParallelMesh.single(device="meta")
    mesh.pp = 16  # this rank: pipeline stage 0 of 16 (groups are not needed to build)
    track = _HostAllocations()
    with track:
        (chunk,) = build_parallel_model(cfg, mesh)
    n = sum(p.numel() for p in chunk.parameters())
    assert n > 14e9 and {p.device.type for p in chunk.parameters()} == {"meta"}
    assert {p.dtype for p in chunk.parameters()} == {torch.bfloat16}
    assert track.bytes == 0, f"{track.bytes} bytes allocated on the host (largest {track.largest})"
    names = {k for k, _ in chunk.named_parameters()}
    assert names <= {k for k, _ in chunk.placement.items()}
    assert chunk.placement["model.layers.3.mlp.experts.255.down_proj.weight"].group == "edp"
    assert chunk.placement["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"].group == "dp_cp"


def test_materialise_on_cpu_allocates_only_the_shards():
    """On the CPU the host IS the device: the parameters allocated are this rank's shards, and the only
    other sizeable tensor is one full parameter at a time (the layout-independent init draw)."""
    cfg = make_config("tiny-moe")
    track = _HostAllocations()
    mesh = ParallelMesh.single(device="cpu")
    with track:
        (chunk,) = build_parallel_model(cfg, mesh, init=False)
    params = sum(p.numel() * p.element_size() for p in chunk.parameters())
    buffers = sum(b.numel() * b.element_size() for b in chunk.buffers())
    assert params + buffers <= track.bytes <= 1.1 * (params + buffers), (track.bytes, params, buffers)


def test_check_parallel_cli_strict_device():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-m", "megatron_r1.cli", "check-parallel", "--preset", "tiny-llama",
                        "--layout", "tp2,sp", "--strict-device"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
