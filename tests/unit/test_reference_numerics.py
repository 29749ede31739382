"""Our models against Hugging Face transformers (code nobody here wrote), in float32.

Tiny random models are built with transformers, saved, loaded with `megatron_r1.model.from_hf`, and
compared on random token batches: logits within 1e-4 × max|logit|, the LM loss, and the gradients of
parameters from every kind of module (embedding, MLA/GQA projections, norms, router, experts, head).
DeepSeek-V3 runs with YaRN and group-limited routing switched on, and a non-zero expert bias; a Llama
runs with Llama 3.1's rope scaling (rope_type llama3), shrunk so that most frequencies are rescaled.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_r1.model import from_hf, lm_loss  # noqa: E402
from megatron_r1.ckpt.hf import per_expert  # noqa: E402

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def _deepseek():
    cfg = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=512, qk_nope_head_dim=32,
        qk_rope_head_dim=64, v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, rope_scaling=YARN,
        max_position_embeddings=128, tie_word_embeddings=False)
    model = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # a trained router has a non-zero bias: make the selection depend on it
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.05)
    return model


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # zero-initialised biases would hide a bias bug
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=128, tie_word_embeddings=False, rope_theta=5e5)
    return transformers.LlamaForCausalLM(cfg)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _llama3():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=128, tie_word_embeddings=False,
                                   rope_parameters={**LLAMA3_ROPE, "rope_theta": 5e5})
    return transformers.LlamaForCausalLM(cfg)


def _hf_grad(ref, ours_name):
    """Gradient of the HF parameter that corresponds to our `ours_name` (HF fuses experts in memory)."""
    params = dict(ref.named_parameters())
    if ".mlp.experts." in ours_name:
        prefix, rest = ours_name.split(".mlp.experts.")
        e, proj = int(rest.split(".")[0]), rest.split(".")[1]
        inter = ref.config.moe_intermediate_size
        if proj == "down_proj":
            return params[f"{prefix}.mlp.experts.down_proj"].grad[e]
        gu = params[f"{prefix}.mlp.experts.gate_up_proj"].grad[e]
        return gu[:inter] if proj == "gate_proj" else gu[inter:]
    return params[ours_name].grad


CHECKED = {
    "deepseek": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_a_proj.weight",
                 "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.1.self_attn.q_a_layernorm.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.2.mlp.shared_experts.down_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.2.input_layernorm.weight",
                 "lm_head.weight", "model.norm.weight"],
    "qwen2": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.weight",
              "model.layers.1.mlp.down_proj.weight", "lm_head.weight"],
    "llama": ["model.embed_tokens.weight", "model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.up_proj.weight",
              "lm_head.weight"],
    "llama3": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"],
}


@pytest.mark.parametrize("arch", ["deepseek", "qwen2", "llama", "llama3"])
def test_matches_transformers(arch, tmp_path):
    torch.manual_seed(0)
    ref = {"deepseek": _deepseek, "qwen2": _qwen2, "llama": _llama, "llama3": _llama3}[arch]().float()
    ref.save_pretrained(tmp_path)
    ours = from_hf(str(tmp_path), dtype=torch.float32)
    ids = torch.randint(0, 256, (3, 24))

    # logits
    ref.eval()
    ours.eval()
    with torch.no_grad():
        want = ref(ids).logits
        got = ours.full_logits(ids)
    assert got.shape == want.shape == (3, 24, 256)
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), f"{arch}: max |Δlogit| {err:.3g}"

    # loss and gradients (train mode: no dropout in either model)
    ref.train()
    ours.train()
    ref_loss = ref(ids, labels=ids).loss
    ref_loss.backward()
    out = ours(ids, with_mtp=False)
    loss, _ = lm_loss(out, ids, None, ours.cfg, ours.mesh, normalizer=ids.numel() - ids.shape[0])
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    # by HF name: the expert stacks' gradients split into one view per expert (ckpt/hf.py per_expert)
    grads = per_expert(ours, {n: p.grad for n, p in ours.named_parameters()})
    if arch == "deepseek":  # experts that received tokens: compare one of them too
        used = [n for n, g in grads.items() if ".mlp.experts." in n and g is not None and g.abs().max() > 0]
        CHECKED[arch].append(used[0])
    for name in CHECKED[arch]:
        g_ref, g = _hf_grad(ref, name), grads[name]
        scale = g_ref.abs().max().item()
        assert scale > 0, name
        assert (g - g_ref).abs().max().item() <= 1e-4 * scale, f"{arch}: grad of {name}"


def test_group_limited_routing_is_exercised():
    """The routing test above must not pass by accident: with topk_group < n_group some experts are
    unreachable for a token, and the bias must change which experts are picked."""
    from megatron_r1.config import load_config
    from megatron_r1.model.deepseek_v3 import Router
    cfg = load_config("tiny-moe").model
    torch.manual_seed(0)
    r = Router(cfg)
    x = torch.randn(64, cfg.hidden_size)
    _, idx0, _ = r(x)
    groups = idx0 // (cfg.n_routed_experts // cfg.n_group)
    assert int(max(len(set(g.tolist())) for g in groups)) <= cfg.topk_group
    r.e_score_correction_bias[:] = torch.linspace(-1, 1, cfg.n_routed_experts)
    _, idx1, _ = r(x)
    assert not torch.equal(idx0.sort(-1).values, idx1.sort(-1).values)


def test_llama31_8b_rope_frequencies_match_transformers():
    """The full-size case the scaling exists for: head_dim 128, theta 5e5, factor 8 over 8,192 positions.
    (Treated as YaRN, 16 of these 64 inverse frequencies were off by up to 51%.)"""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_r1.config import load_config
    from megatron_r1.model.common import rope_frequencies

    m = load_config("llama-8b").model
    assert m.rope_scaling["type"] == "llama3"
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in m.to_hf_dict().items() if k != "rope_scaling"})
    want, want_amp = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    got, amp = rope_frequencies(m.dense_head_dim, m.rope_theta, m.rope_scaling, m.max_position_embeddings)
    assert got.shape == (64,) and amp == want_amp == 1.0
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
