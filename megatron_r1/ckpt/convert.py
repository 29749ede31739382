"""Conversion between Hugging Face directories and our sharded (DCP) checkpoints, streamed.

Notable choices
- **HF → ours writes a layout-independent checkpoint** (every tensor whole, under `model/<name>`),
  and `load_checkpoint` reshards it at load time for whatever mesh the run has. `--layout` is
  validated against the model (heads, experts, layers divisible…) and recorded in meta.json and
  config.yaml, but does not change the files: one converted checkpoint serves every layout, and
  no ranks need spawning to convert.
- **Streaming with DCP's own writer**: the state dict handed to `dcp.save` holds meta tensors
  (shapes and dtypes only); a planner resolves each tensor when the writer asks for it, reading it
  from its safetensors shard (mmap) and dequantising FP8 there. Peak memory is about one tensor
  (plus its float32 dequantisation), not one shard and not the model.
- FP8 (DeepSeek's release): e4m3 weights with `<name>_scale_inv`, one float32 scale per 128×128
  block, partial edge blocks; dequantised in float32 then cast (`hf.dequantize_fp8`) to bf16, or to
  `--dtype`. Other tensors keep their dtype unless `--dtype` is given, so bf16 → ours → bf16 is
  bit-exact. The release's MTP layer (`model.layers.{num_hidden_layers}`) is converted; its copies
  of the embedding and output head are the main model's tensors, stored once.
- **Ours → HF** reads whole tensors in batches of ~`budget` bytes from the DCP pieces (any layout)
  and streams them into `hf.save_hf`, which writes each safetensors shard as it fills.
- Tokenizer files travel along: HF → ours copies them to `<output>/tokenizer/`, ours → HF copies
  them back (or from the run config's `data.tokenizer` directory).
- Outputs are written to `<output>.tmp` and renamed when complete; an existing non-empty output
  is an error, never overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from collections import Counter

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from megatron_r1.ckpt.checkpoint import (COMPLETE, FORMAT, Piece, SavedIndex, _fsync_dir, read_pieces,
                                         resolve_checkpoint)
from megatron_r1.ckpt.hf import (CheckpointError, checkpoint_files, dequantize_fp8, hf_names, model_state,
                                 our_name, save_hf)
from megatron_r1.config import Config, ConfigError, ModelConfig, ParallelConfig, load_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


def parse_layout(spec: str | None) -> tuple[ParallelConfig, int]:
    """'tp2,pp2,ep4,dp2' -> (ParallelConfig, dp); dp is not a config field (it follows from the world size)."""
    par = ParallelConfig()
    dp = 1
    if not spec:
        return par, dp
    for item in spec.split(","):
        item = item.strip()
        for key in ("tp", "cp", "ep", "pp", "vpp", "dp"):
            if item.startswith(key) and item[len(key):].isdigit():
                if key == "dp":
                    dp = int(item[2:])
                else:
                    setattr(par, key, int(item[len(key):]))
                break
        else:
            if item == "sp":
                par.sp = True
                continue
            raise ConfigError(f"--layout item {item!r}: expected tpN, cpN, epN, ppN, vppN, dpN or sp")
    return par, dp


def _check_layout(par: ParallelConfig, dp: int, cfg: ModelConfig) -> dict:
    from megatron_r1.parallel.mesh import validate_layout
    world = par.tp * par.cp * par.pp * dp
    validate_layout(world, par, cfg)
    return {"tp": par.tp, "cp": par.cp, "dp": dp, "pp": par.pp, "ep": par.ep, "vpp": par.vpp, "world_size": world}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple, torch.dtype]]:
    """{our name: (full shape, dtype)} of a whole model (one rank), built on the meta device."""
    from megatron_r1.model.gpt import CausalLM
    with torch.device("meta"):
        model = CausalLM(cfg)
    return {n: (tuple(t.shape), t.dtype) for n, t in model_state(model).items()}


def _copy_tokenizer(src: str, dst: str) -> list[str]:
    copied = []
    if src and os.path.isdir(src):
        for f in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, f)):
                os.makedirs(dst, exist_ok=True)
                shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
                copied.append(f)
    return copied


def _prepare_output(output: str) -> str:
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise CheckpointError(f"{output}: output exists and is not empty (choose another --output)")
    tmp = output.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _finish_output(tmp: str, output: str) -> None:
    if os.path.isdir(output):
        os.rmdir(output)  # empty (checked in _prepare_output)
    os.rename(tmp, output)
    _fsync_dir(os.path.dirname(os.path.abspath(output)))


# ------------------------------------------------------------------------------------- HF -> ours
class _LazyPlanner(DefaultSavePlanner):
    """Plans with meta tensors; each tensor is read from its source only when the writer needs it."""

    def __init__(self, resolve, **kw):
        super().__init__(**kw)
        self._resolve = resolve

    def resolve_data(self, write_item):
        return self._resolve(write_item.index.fqn)


def hf_to_megatron(input_dir: str, output: str, layout: str | None = None, dtype: str | None = None,
                   progress: bool = True) -> str:
    """Convert a HF directory (bf16/fp32, or DeepSeek's FP8 release) into a sharded checkpoint at `output`."""
    from safetensors import safe_open
    cfg_path = os.path.join(input_dir, "config.json")
    if not os.path.isdir(input_dir):
        raise CheckpointError(f"{input_dir}: not a directory")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{input_dir}: no config.json")
    try:
        hf_cfg = json.load(open(cfg_path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    cfg = ModelConfig.from_hf_dict(hf_cfg)
    out_dtype = DTYPES.get(dtype) if dtype else None
    if dtype and out_dtype is None:
        raise ConfigError(f"--dtype {dtype}: expected bf16 or fp32 for --to megatron_r1")
    files = checkpoint_files(input_dir)
    if cfg.num_nextn_predict_layers and not any(n.startswith(f"model.layers.{cfg.num_hidden_layers}.")
                                                for n in files):
        warnings.warn(f"{input_dir}: no MTP layer (model.layers.{cfg.num_hidden_layers}.*); converting without MTP")
        cfg.num_nextn_predict_layers = 0
    par, dp = parse_layout(layout)
    layout_info = _check_layout(par, dp, cfg)
    expected = expected_tensors(cfg)

    # headers only: names, shapes, dtypes of every tensor, checked before anything is written
    handles: dict[str, object] = {}

    def handle(f):
        if f not in handles:
            try:
                handles[f] = safe_open(f, "pt")
            except Exception as e:  # noqa: BLE001 - a corrupt shard is one line
                raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
        return handles[f]

    sources: dict[str, str] = {}  # our name -> hf name
    meta_state: dict[str, torch.Tensor] = {}
    for hf, f in sorted(files.items()):
        if hf.endswith("_scale_inv"):
            continue
        ours = our_name(hf, cfg)
        if ours not in expected:
            raise CheckpointError(f"{f}: unknown tensor '{hf}' for a {cfg.model_type} model with "
                                  f"{cfg.num_hidden_layers} layers")
        sl = handle(f).get_slice(hf)
        shape = tuple(sl.get_shape())
        if shape != expected[ours][0]:
            raise CheckpointError(f"{f}: tensor '{hf}' has shape {shape}, expected {expected[ours][0]}")
        if ours != hf:
            continue  # a release copy (MTP's embedding / head) of a tensor stored once
        src_dtype = sl.get_dtype()
        is_fp8 = src_dtype in ("F8_E4M3", "F8_E5M2")
        if is_fp8 and hf + "_scale_inv" not in files:
            raise CheckpointError(f"{f}: FP8 tensor '{hf}' has no '{hf}_scale_inv'")
        t_dtype = _st_dtype(src_dtype, f, hf)
        if is_fp8:
            t_dtype = out_dtype or torch.bfloat16
        elif out_dtype is not None and t_dtype.is_floating_point and "e_score_correction_bias" not in hf:
            t_dtype = out_dtype
        sources[ours] = hf
        meta_state[f"model/{ours}"] = torch.empty(shape, dtype=t_dtype, device="meta")
    missing = [n for n in expected if n not in sources]
    if missing:
        raise CheckpointError(f"{input_dir}: missing tensor '{hf_names(missing[0], cfg)[0]}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    remaining = Counter(files[h] for h in sources.values())
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(remaining), desc="converting shards", unit="shard")

    def resolve(fqn: str) -> torch.Tensor:
        ours = fqn[len("model/"):]
        hf = sources[ours]
        f = files[hf]
        t = handle(f).get_tensor(hf)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = handle(files[hf + "_scale_inv"]).get_tensor(hf + "_scale_inv")
            t = dequantize_fp8(t, scale, meta_state[fqn].dtype)
        t = t.to(meta_state[fqn].dtype)
        remaining[f] -= 1
        if bar is not None and remaining[f] == 0:
            bar.update(1)
        return t

    tmp = _prepare_output(output)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save(meta_state, storage_writer=dcp.FileSystemWriter(tmp), planner=_LazyPlanner(resolve), no_dist=True)
    if bar is not None:
        bar.close()
    run = Config(model=cfg, parallel=par)
    tok = _copy_tokenizer(input_dir, os.path.join(tmp, "tokenizer"))
    if tok:
        run.data.tokenizer = os.path.join(os.path.abspath(output), "tokenizer")
    run.save(os.path.join(tmp, "config.yaml"))
    json.dump({"format": FORMAT, "step": 0, "layout": layout_info, "source": os.path.abspath(input_dir),
               "converted_from": "hf"}, open(os.path.join(tmp, "meta.json"), "w"), indent=2)
    with open(os.path.join(tmp, COMPLETE), "w") as fh:
        fh.write("converted\n")
    _finish_output(tmp, output)
    return output


def _st_dtype(name: str, f: str, hf: str) -> torch.dtype:
    table = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    if name not in table:
        raise CheckpointError(f"{f}: tensor '{hf}' has unsupported dtype {name}")
    return table[name]


# ------------------------------------------------------------------------------------- ours -> HF
def read_config(path: str) -> Config:
    cfg_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.yaml beside the checkpoint")
    raw = __import__("yaml").safe_load(open(cfg_path))
    return load_config(raw)


def iter_full_tensors(path: str, cfg: ModelConfig, budget_bytes: int = 1 << 30, index: SavedIndex | None = None):
    """(our name, full tensor) of every model tensor in a checkpoint (any layout), in model order."""
    index = index or SavedIndex(path)
    expected = expected_tensors(cfg)
    saved = set(index.names("model"))
    unknown = sorted(saved - set(expected))
    if unknown:
        raise CheckpointError(f"{path}: unknown tensor 'model/{unknown[0]}' for a {cfg.model_type} model with "
                              f"{cfg.num_hidden_layers} layers (config.yaml disagrees with the checkpoint?)")
    batch, size = [], 0
    names = list(expected)
    for i, name in enumerate(names):
        shape = expected[name][0]
        key = f"model/{name}"
        if key not in index.boxes:
            raise CheckpointError(f"{path}: missing tensor '{key}'")
        dtype = index.boxes[key][0][3]
        t = torch.empty(shape, dtype=dtype)
        batch.append(Piece(name, t, (0,) * len(shape), shape))
        size += t.numel() * t.element_size()
        if size >= budget_bytes or i == len(names) - 1:
            read_pieces(path, "model", batch, index, budget_bytes=budget_bytes)
            for p in batch:
                yield p.name, p.tensor
            batch, size = [], 0


def megatron_to_hf(input_path: str, output: str, dtype: str = "bf16", max_shard_bytes: int = 5 << 30,
                   progress: bool = True) -> str:
    """Export a checkpoint (a step dir, or a save dir: its newest) as a HF directory."""
    path = resolve_checkpoint(input_path)
    run = read_config(path)
    cfg = run.model
    fp8 = dtype == "fp8"
    out_dtype = torch.bfloat16 if fp8 else DTYPES.get(dtype)
    if out_dtype is None:
        raise ConfigError(f"--dtype {dtype}: expected bf16, fp32 or fp8 for --to hf")
    index = SavedIndex(path)
    tensors = iter_full_tensors(path, cfg, index=index)
    if progress:
        from tqdm import tqdm
        tensors = tqdm(tensors, total=len(index.names("model")), desc="exporting tensors", unit="tensor")

    def hf_stream():
        for name, t in tensors:
            for hf in hf_names(name, cfg):
                yield hf, t

    tmp = _prepare_output(output)
    save_hf(hf_stream(), cfg, tmp, max_shard_bytes=max_shard_bytes, dtype=out_dtype, fp8=fp8)
    if not _copy_tokenizer(os.path.join(path, "tokenizer"), tmp):
        _copy_tokenizer(run.data.tokenizer or "", tmp)
    _finish_output(tmp, output)
    return output
