"""Configs: presets, YAML, dotted overrides, and errors that name the key."""
import json
import subprocess
import sys

import pytest
import torch

from megatron_r1.config import ConfigError, ModelConfig, load_config
from megatron_r1.model import CausalLM


def test_671b_parameter_counts():
    n = load_config("deepseek-v3-671b").model.num_parameters()
    assert abs(n["total"] / 671e9 - 1) < 0.01
    # DeepSeek's "37B activated" is a rounded figure: ours is 36.63B (-1.01%) counting the weights a token is
    # multiplied with (rounds to 37B), 37.55B (+1.49%) with the input-embedding lookup
    assert round(n["activated"] / 1e9) == 37
    assert abs(n["activated"] / 37e9 - 1) < 0.0102 and abs(n["activated_with_embedding"] / 37e9 - 1) < 0.015
    assert n["activated_with_embedding"] - n["activated"] == 129280 * 7168


def test_671b_shape_is_the_published_one():
    m = load_config("deepseek-v3-671b").model
    assert (m.num_hidden_layers, m.hidden_size, m.num_attention_heads, m.q_lora_rank, m.kv_lora_rank) == (61, 7168, 128, 1536, 512)
    assert (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (128, 64, 128)
    assert (m.n_routed_experts, m.n_shared_experts, m.num_experts_per_tok, m.n_group, m.topk_group) == (256, 1, 8, 8, 4)
    assert (m.routed_scaling_factor, m.first_k_dense_replace, m.moe_intermediate_size, m.intermediate_size) == (2.5, 3, 2048, 18432)
    assert (m.vocab_size, m.num_nextn_predict_layers, m.rope_scaling["factor"]) == (129280, 1, 40.0)


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-qwen2", "tiny-llama"])
def test_counts_match_the_built_model(preset):
    """num_parameters() is arithmetic; the model is the truth."""
    cfg = load_config(preset).model
    with torch.device("meta"):
        model = CausalLM(cfg)
    built = sum(p.numel() for n, p in model.named_parameters())
    n = cfg.num_parameters()
    assert built == n["total"] + n["mtp"]


def test_the_documented_command_prints_the_counts():
    out = subprocess.run([sys.executable, "-c", "from megatron_r1.config import load_config; "
                          "print(load_config('deepseek-v3-671b').model.num_parameters())"],
                         capture_output=True, text=True, check=True).stdout
    assert "'total': 671" in out


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {preset: tiny-moe, hidden_size: 128}\nparallel: {tp: 2}\nrl: {group_size: 4}\n")
    cfg = load_config(str(p), ["model.num_hidden_layers=2", "rl.eps_high=0.28", "train.lr=1e-5", "run_dir=runs/x"])
    assert cfg.model.hidden_size == 128 and cfg.model.num_hidden_layers == 2 and cfg.model.kv_lora_rank == 512
    assert cfg.parallel.tp == 2 and cfg.rl.group_size == 4 and cfg.rl.eps_high == 0.28 and cfg.train.lr == 1e-5
    assert cfg.run_dir == "runs/x"
    cfg.save(str(tmp_path / "resolved.yaml"))
    again = load_config(str(tmp_path / "resolved.yaml"))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("text,overrides,needle", [
    ("model: tiny-moe\n", ["model.hidden_sze=3"], "unknown config key 'model.hidden_sze'"),
    ("model: tiny-moe\n", ["model.hidden_size=abc"], "model.hidden_size: expected int"),
    ("model: tiny-moe\n", ["parallel.sp=maybe"], "parallel.sp: expected bool"),
    ("model: tiny-moe\nrl: {grop_size: 4}\n", [], "unknown config key 'rl.grop_size'"),
    ("model: tiny-moe\ntrainer: {}\n", [], "unknown config section 'trainer'"),
    ("model: [tiny-moe\n", [], "invalid YAML"),
    ("model: no-such-model\n", [], "unknown model preset 'no-such-model'"),
    ("model: {preset: tiny-moe, n_group: 3}\n", [], "n_group=3 does not divide n_routed_experts=8"),
])
def test_errors_name_the_key(tmp_path, text, overrides, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(p), overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_prints_one_error_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {preset: tiny-moe, hiden: 1}\n")
    r = subprocess.run([sys.executable, "-m", "megatron_r1.cli", "params", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config key 'model.hiden'"


def test_real_hf_config_loads(tmp_path):
    """A DeepSeek release-style config.json (rope_scaling, quantization_config, auto_map, ...) loads."""
    hf = load_config("deepseek-v3-671b").model.to_hf_dict()
    hf.pop("rope_parameters")
    hf.update(auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, ep_size=1,
              quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}, torch_dtype="bfloat16")
    cfg = ModelConfig.from_hf_dict(json.loads(json.dumps(hf)))
    assert cfg.rope_scaling["factor"] == 40.0 and cfg.n_routed_experts == 256
