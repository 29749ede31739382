"""Models: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) and dense students (Qwen2, Llama) on the parallel layers.

    from megatron_r1.model import from_hf
    model = from_hf("path/to/hf_dir", dtype=torch.float32)
    logits = model(input_ids).logits          # [B, S, V] on one rank; model.full_logits(ids) gathers
"""
from __future__ import annotations

import json
import os
import warnings

import torch

from megatron_r1.config import ModelConfig
from megatron_r1.model.gpt import CausalLM, StageOutput, lm_loss

__all__ = ["CausalLM", "StageOutput", "lm_loss", "from_hf", "build_model"]


def build_model(cfg: ModelConfig, mesh=None, dtype=torch.float32, **stage) -> CausalLM:
    model = CausalLM(cfg, mesh, **stage)
    return model.to(dtype) if dtype != torch.float32 else model


def from_hf(path: str, dtype=torch.float32, mesh=None, progress: bool = False) -> CausalLM:
    """A model (one rank, or this rank's shard of `mesh`) filled from a HF dir: config.json + safetensors."""
    from megatron_r1.ckpt.hf import CheckpointError, checkpoint_files, load_hf_weights
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: no config.json")
    cfg = ModelConfig.from_hf_dict(json.load(open(cfg_path)))
    if cfg.num_nextn_predict_layers:
        # transformers drops the MTP layer when it saves; DeepSeek's release keeps it
        prefix = f"model.layers.{cfg.num_hidden_layers}."
        if not any(n.startswith(prefix) for n in checkpoint_files(path)):
            warnings.warn(f"{path}: no MTP layer ({prefix}*) in the checkpoint; building without MTP")
            cfg.num_nextn_predict_layers = 0
    from megatron_r1.parallel.placement import materialize
    with torch.device("meta"):
        model = CausalLM(cfg, mesh)
    for p in model.parameters():  # parameters only: rope frequencies and the expert bias stay float32
        p.data = p.data.to(dtype)
    # this rank's shards on its device; buffers computed at init (rope frequencies) are not in checkpoints
    materialize(model, model.mesh.device)
    load_hf_weights(model, path, cfg, model.mesh, progress=progress)
    return model
