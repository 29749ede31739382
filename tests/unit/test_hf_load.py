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


def _truncate(path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def test_truncated_shard_is_one_line_naming_the_file(sharded_dir):
    """A shard cut short (a copy that died, a full disk): the header promises bytes the file lacks."""
    from megatron_r1.ckpt.hf import check_hf_weights, load_hf_weights
    path, model = sharded_dir
    cfg = load_config("tiny-moe").model
    assert check_hf_weights(str(path), cfg) == len(json.load(open(path / "model.safetensors.index.json"))["weight_map"])
    shard = sorted(path.glob("model-*.safetensors"))[1]
    _truncate(shard, os.path.getsize(shard) // 2)
    with pytest.raises(CheckpointError, match=rf"^{shard}: truncated safetensors file \(\d+ bytes, the header needs \d+\)$"):
        check_hf_weights(str(path), cfg)
    with pytest.raises(CheckpointError, match=rf"^{shard}: unreadable safetensors file"):
        load_hf_weights(CausalLM(cfg), str(path), cfg, model.mesh)
    _truncate(shard, 5)  # not even the header's length
    with pytest.raises(CheckpointError, match=rf"^{shard}: unreadable safetensors file \(truncated or not"):
        check_hf_weights(str(path), cfg)


def test_truncated_single_file_and_header_shape_check(tmp_path):
    from megatron_r1.ckpt.hf import check_hf_weights, checkpoint_files
    cfg = load_config("tiny-qwen2").model
    model = CausalLM(cfg)
    save_hf(hf_tensors(model_state(model), cfg), cfg, str(tmp_path), dtype=torch.float32)
    single = tmp_path / "model.safetensors"
    wrong = load_config("tiny-qwen2", ["model.intermediate_size=96"]).model
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                              r"has shape \(\d+, \d+\), expected"):
        check_hf_weights(str(tmp_path), wrong)
    _truncate(single, os.path.getsize(single) - 1)
    with pytest.raises(CheckpointError, match=rf"^{single}: truncated safetensors file"):
        checkpoint_files(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_bytes(b'{"weight_map": \xff}')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: unreadable index"):
        checkpoint_files(str(tmp_path))


@pytest.mark.parametrize("preset,overrides", [
    ("tiny-moe", []), ("tiny-moe", ["model.first_k_dense_replace=2", "model.num_nextn_predict_layers=2"]),
    ("tiny-qwen2", []), ("tiny-llama", ["model.tie_word_embeddings=true"]),
    ("deepseek-v3-671b", ["model.num_hidden_layers=6", "model.n_routed_experts=16", "model.n_group=8",
                          "model.topk_group=4"])])
def test_expected_shapes_equal_the_whole_model(preset, overrides):
    """The dry run's name/shape table (one layer of each kind, renamed) equals a whole meta model's."""
    from megatron_r1.ckpt.hf import expected_shapes
    cfg = load_config(preset, overrides).model
    with torch.device("meta"):
        whole = {n: tuple(t.shape) for n, t in model_state(CausalLM(cfg)).items()}
    assert expected_shapes(cfg) == whole
