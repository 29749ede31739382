"""Tiny random Hugging Face checkpoints that vLLM's CPU kernels accept, for rollout
tests and benchmarks (no hub downloads exist here).

Notable choices
- DeepSeek-V3 keeps kv_lora_rank=512 and qk_rope_head_dim=64 (the only values vLLM's
  CPU MLA kernel supports) and shrinks everything else; Qwen2 uses head_dim 32
  (vLLM CPU attention wants head sizes that are multiples of 32).
- `topk_method="noaux_tc"`, `scoring_func="sigmoid"` are written into the DeepSeek-V3
  config: transformers' DeepseekV3 always routes that way, but vLLM reads these keys
  (as in the real DeepSeek-V3 config.json) and otherwise builds a softmax router
  without `e_score_correction_bias`, so the checkpoint would not even load.
- The router correction bias is randomised (HF initialises it to zero) so the test
  exercises it, and `initializer_range` is raised so logits are peaked enough for
  greedy decoding to be sensitive to weight changes.
- Weights are saved in float32; the tokenizer is a byte-level BPE trained in-process
  on arithmetic strings, with <s>=0 and </s>=1 matching the configs' bos/eos.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

VOCAB = 1024


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [
        " ".join(f"{rng.randint(0, 999)} + {rng.randint(0, 999)} = {rng.randint(0, 1998)}" for _ in range(20))
        for _ in range(200)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_tiny_checkpoint(kind: str, path: str | Path, seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors (float32) and a tokenizer to `path`.
    kind: "deepseek_v3" (3 layers: 1 dense + 2 MoE with 8 experts, top-2, 2 groups)
    or "qwen2" (2 layers, 4 heads of 32, GQA 2); `overrides` replace config fields."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, max_position_embeddings=1024,
                  tie_word_embeddings=False, initializer_range=0.1)
    if kind == "deepseek_v3":
        config = DeepseekV3Config(**{**dict(
            hidden_size=256, intermediate_size=512, num_hidden_layers=3, first_k_dense_replace=1,
            # moe
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128,
            n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            topk_method="noaux_tc", scoring_func="sigmoid",
            # mla
            num_attention_heads=2, num_key_value_heads=2, q_lora_rank=64, kv_lora_rank=512,
            qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
            **common), **overrides})
        model = DeepseekV3ForCausalLM(config)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.uniform_(-0.5, 0.5)
    elif kind == "qwen2":
        config = Qwen2Config(**{**dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, **common), **overrides})
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny checkpoint kind {kind!r}; expected 'deepseek_v3' or 'qwen2'")
    model.float().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path
