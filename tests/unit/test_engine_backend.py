"""The rollout engine's attention-backend choice: decided from the model, dtype and CPU, never left to
vLLM's preference for AMX (which accepts bf16/fp16 MLA weights only). Pure function, no vLLM."""
import pytest

from megatron_r1.rollout.engine import choose_attention_backend, cpu_flags


@pytest.mark.parametrize("dtype,amx,want", [
    ("float32", False, "CPU_MLA"),
    ("float32", True, "CPU_MLA"),  # the AMX machine that broke every float32 DeepSeek-V3 engine
    ("bfloat16", False, "CPU_MLA"),
    ("bfloat16", True, "AMX_MLA"),
    ("float16", True, "AMX_MLA"),
])
def test_mla_choice(dtype, amx, want):
    assert choose_attention_backend(on_gpu=False, is_mla=True, dtype=dtype, amx=amx) == want


def test_dense_models_use_cpu_attn():
    for amx in (False, True):
        assert choose_attention_backend(on_gpu=False, is_mla=False, dtype="float32", amx=amx) == "CPU_ATTN"


def test_gpu_keeps_vllm_selection_unless_asked():
    assert choose_attention_backend(on_gpu=True, is_mla=True, dtype="bfloat16", amx=False) is None


@pytest.mark.parametrize("kw,msg", [
    (dict(is_mla=True, dtype="float32", amx=True, requested="AMX_MLA"), "bfloat16/float16 weights only"),
    (dict(is_mla=True, dtype="bfloat16", amx=False, requested="AMX_MLA"), "needs a CPU with AMX"),
    (dict(is_mla=True, dtype="float32", amx=False, requested="CPU_ATTN"), "cannot run an MLA model"),
    (dict(is_mla=False, dtype="float32", amx=False, requested="CPU_MLA"), "for MLA models"),
    (dict(is_mla=True, dtype="float32", amx=False, requested="FLASH"), "expected one of"),
])
def test_impossible_requests_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        choose_attention_backend(on_gpu=False, **kw)


def test_cpu_flags_report_amx_as_torch_sees_it():
    import torch
    f = cpu_flags()
    assert f["amx"] == torch.cpu._is_amx_tile_supported()
    assert f["torch_capability"] == torch.backends.cpu.get_cpu_capability()
