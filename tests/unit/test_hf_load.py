"""Loading a Hugging Face directory: sharded + indexed files work; broken ones give one clear line."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_r1.ckpt.hf import CheckpointError, hf_tensors, model_state, save_hf
from megatron_r1.config import load_config
from megatron_r1.model import CausalLM, from_hf


@pytest.fixture()
def sharded_dir(tmp_path):
    cfg = load_config("tiny-moe").model
    torch.manual_seed(0)
    model = CausalLM(cfg)
    save_hf(hf_tensors(model_state(model), cfg), cfg, str(tmp_path), max_shard_bytes=1 << 20, dtype=torch.float32)
    return tmp_path, model


def test_sharded_roundtrip_with_mtp(sharded_dir):
    path, model = sharded_dir
    index = json.load(open(path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.4.shared_head.head.weight" in index["weight_map"]  # DeepSeek's MTP layout
    again = from_hf(str(path))
    assert again.mtp_depth == 1
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
        assert torch.equal(model(ids).mtp_logits[0], again(ids).mtp_logits[0])


def _rewrite(path, fname, fn):
    f = os.path.join(path, fname)
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _file_of(path, name):
    return json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"][name]


def test_missing_tensor(sharded_dir):
    path, _ = sharded_dir
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    f = _file_of(path, name)
    _rewrite(path, f, lambda t: t.pop(name))
    idx = json.load(open(path / "model.safetensors.index.json"))
    del idx["weight_map"][name]
    json.dump(idx, open(path / "model.safetensors.index.json", "w"))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        from_hf(str(path))


def test_missing_shard(sharded_dir):
    path, _ = sharded_dir
    f = _file_of(path, "lm_head.weight")
    os.remove(path / f)
    with pytest.raises(CheckpointError, match=f"{f}: missing shard"):
        from_hf(str(path))


def test_shape_mismatch(sharded_dir):
    path, _ = sharded_dir
    name = "model.layers.1.self_attn.q_b_proj.weight"
    f = _file_of(path, name)
    _rewrite(path, f, lambda t: t.__setitem__(name, torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=rf"{f}: tensor '{name}' has shape \(3, 3\), expected"):
        from_hf(str(path))


def test_unknown_tensor(sharded_dir):
    path, _ = sharded_dir
    f = _file_of(path, "lm_head.weight")
    _rewrite(path, f, lambda t: t.__setitem__("model.layers.9.mlp.foo.weight", torch.zeros(2)))
    idx = json.load(open(path / "model.safetensors.index.json"))
    idx["weight_map"]["model.layers.9.mlp.foo.weight"] = f
    json.dump(idx, open(path / "model.safetensors.index.json", "w"))
    with pytest.raises(CheckpointError, match="unknown tensor 'model.layers.9.mlp.foo.weight'"):
        from_hf(str(path))


def test_no_checkpoint_here(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        from_hf(str(tmp_path))
