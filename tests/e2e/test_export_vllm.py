"""A training checkpoint exported to HF loads in transformers and in vLLM with our logits.

One `tiny-moe` (MLA + noaux_tc MoE with a random expert bias + MTP) saved as a sharded checkpoint,
exported with tools/convert_checkpoint.py (bf16 weights, tokenizer from the run config), then:
transformers' DeepseekV3ForCausalLM (which drops the MTP layer) and vLLM through RolloutEngine, both
in float32 on the same bf16 weights, against our model holding those weights.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_r1.ckpt.checkpoint import save_checkpoint
from megatron_r1.ckpt.hf import checkpoint_files
from megatron_r1.config import load_config
from megatron_r1.model import CausalLM

REPO = Path(__file__).resolve().parents[2]
SEQ = [5, 6, 7, 8, 100, 200, 300, 400, 500, 600, 700, 800, 900, 17]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from megatron_r1.rollout.tiny_hf import _tokenizer
    root = tmp_path_factory.mktemp("export")
    tok_dir = root / "tokenizer"
    _tokenizer().save_pretrained(str(tok_dir))
    cfg = load_config("tiny-moe", ["model.vocab_size=1024", "model.initializer_range=0.1",
                                   f"data.tokenizer={tok_dir}"])
    torch.manual_seed(0)
    model = CausalLM(cfg.model).eval()
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.uniform_(-0.5, 0.5)
        for p in model.parameters():  # the weights the bf16 export holds; the expert bias stays float32
            p.copy_(p.to(torch.bfloat16))
    save_checkpoint(str(root / "run"), 10, model, model.mesh, config=cfg)

    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = root / "hf"
    assert tool.main(["--from", "megatron_r1", "--to", "hf", "--input", str(root / "run"), "--output", str(out),
                      "--dtype", "bf16", "--no-progress"]) == 0
    return out, model


def ours_logprobs(model, seq):
    with torch.no_grad():
        logits = model.full_logits(torch.tensor([seq]))[0].float()
    return logits.log_softmax(-1)[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0]


def test_export_layout(exported):
    out, model = exported
    files = checkpoint_files(str(out))
    assert all(t.endswith(".safetensors") for t in files.values())
    assert "model.layers.4.shared_head.head.weight" in files  # DeepSeek's MTP layout is kept
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    assert json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"


def test_transformers_loads_export(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, model = exported
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()  # drops the MTP layer
    ids = torch.tensor([SEQ])
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(model.full_logits(ids), ref, atol=2e-4, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.decode(tok("12 + 7 = 19")["input_ids"]) == "12 + 7 = 19"


def test_vllm_loads_export(exported):
    pytest.importorskip("vllm")
    from megatron_r1.rollout.engine import RolloutEngine
    out, model = exported
    engine = RolloutEngine(str(out), dtype="float32", max_model_len=256, kv_cache_bytes=64 << 20, max_num_seqs=8)
    # prompt logprobs: vLLM's on the exported weights vs ours on the same values
    got = torch.tensor(engine.score([SEQ])[0])
    want = ours_logprobs(model, SEQ)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    # it generates, and greedy decoding follows our argmax
    sample = engine.generate([SEQ[:4]], temperature=0.0, max_tokens=6)[0][0]
    assert len(sample.token_ids) == 6
    seq = SEQ[:4] + sample.token_ids
    with torch.no_grad():
        greedy = model.full_logits(torch.tensor([seq]))[0, 3:-1].argmax(-1).tolist()
    assert greedy == sample.token_ids
    torch.testing.assert_close(torch.tensor(sample.logprobs), ours_logprobs(model, seq)[3:], atol=2e-3, rtol=1e-3)
