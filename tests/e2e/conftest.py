"""Shared e2e fixtures: a random tiny-moe policy with the project's own tokenizer and the tiny task's prompts."""
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    from megatron_r1.ckpt.hf import hf_tensors, model_state, save_hf
    from megatron_r1.config import load_config
    from megatron_r1.model import CausalLM
    from megatron_r1.recipes.tiny_r1_zero import prepare
    from megatron_r1.training import copy_tokenizer
    root = tmp_path_factory.mktemp("grpo")
    info = prepare(str(root / "run"), docs=300, difficulty=1)
    cfg = load_config("examples/r1_zero_tiny.yaml", ["model.hidden_size=64", "model.num_hidden_layers=2",
                                                      "model.intermediate_size=128", "model.moe_intermediate_size=32"])
    torch.manual_seed(0)
    model = CausalLM(cfg.model)
    hf = root / "policy"
    save_hf(hf_tensors(model_state(model), cfg.model), cfg.model, str(hf), dtype=torch.float32)
    copy_tokenizer(info["tokenizer"], str(hf))
    return str(hf), info
