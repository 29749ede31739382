"""Conversion between Hugging Face directories and our sharded (DCP) checkpoints, streamed.

Notable choices
- **HF → ours writes a layout-independent checkpoint** (every tensor under `model/<name>`: whole,
  or as row boxes `model/<name>[r0:r1,...]` when bigger than the chunk budget), and
  `load_checkpoint` reshards it at load time for whatever mesh the run has. `--layout` is
  validated against the model (heads, experts, layers divisible…) and recorded in meta.json and
  config.yaml, but does not change the files: one converted checkpoint serves every layout, and
  no ranks need spawning to convert.
- **Memory is bounded by the chunk budget, not the model** (`--budget-mb`, default 64: a chunk's
  float32 size). HF → ours reads each piece's rows from its safetensors shard (only those rows),
  dequantises FP8 block-row by block-row, writes the piece into the open `.distcp` file and drops it
  (`ckpt/stream.py`: DCP's own writer keeps a whole file's tensors until the file closes, i.e. the
  model). Ours → HF plans the output shards from shapes alone, then reads each tensor in row chunks
  through memory maps of the saved pieces (any layout) and appends the bytes to a safetensors file
  whose header was written first. Measured: `benchmarks/convert.md`.
- **Parallel over shards** (`--workers N`, default: the cores available): HF → ours converts one
  source shard into one `.distcp` file per unit, ours → HF writes one output shard per unit; units
  run in spawned processes (one thread each) and their results are assembled in unit order, so the
  output is byte-identical whatever N.
- FP8 (DeepSeek's release): e4m3 weights with `<name>_scale_inv`, one float32 scale per 128×128
  block, partial edge blocks; dequantised in float32 then cast (`hf.dequantize_fp8`) to bf16, or to
  `--dtype`. Other tensors keep their dtype unless `--dtype` is given, so bf16 → ours → bf16 is
  bit-exact. The release's MTP layer (`model.layers.{num_hidden_layers}`) is converted; its copies
  of the embedding and output head are the main model's tensors, stored once.
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
from dataclasses import dataclass

import torch

from megatron_r1.ckpt.checkpoint import (COMPLETE, FORMAT, SavedIndex, _fsync_dir, box_key, resolve_checkpoint,
                                         verify_checkpoint)
from megatron_r1.ckpt.hf import (FP8_BLOCK, INDEX_FILE, CheckpointError, _fp8_eligible, checkpoint_files,
                                 dequantize_fp8, hf_names, model_state, our_name, quantize_fp8, write_hf_config)
from megatron_r1.ckpt.stream import (DcpFileWriter, SafetensorsWriter, SavedItem, SavedPieces, nbytes, read_box,
                                     row_ranges, write_dcp_metadata)
from megatron_r1.config import Config, ConfigError, ModelConfig, ParallelConfig, load_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}
DEFAULT_BUDGET = 64 << 20  # bytes of one chunk in float32; peak memory is a small multiple of it


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
    """{our name: (full shape, dtype)} of a whole model (one rank), built on the meta device.

    `nn.init.normal_` is a no-op meanwhile (transformers' `no_init_weights` does the same): on meta
    tensors it computes nothing, yet its dispatch took 112 s of the 671B model's build here."""
    from megatron_r1.model.gpt import CausalLM
    normal_ = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda t, *args, **kwargs: t
    try:
        with torch.device("meta"):
            model = CausalLM(cfg)
    finally:
        torch.nn.init.normal_ = normal_
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


# ---------------------------------------------------------------------------------------- workers
def default_workers(total_bytes: int) -> int:
    """The cores available; 1 under 1 GB, where starting processes (each imports torch) costs more than it saves."""
    if total_bytes < 1 << 30:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _init_worker() -> None:
    torch.set_num_threads(1)  # one core per worker: N workers on N cores, no oversubscription


def _run_units(fn, jobs: list, workers: int, progress: bool, desc: str) -> list:
    """fn(job) for every job, in separate processes when workers > 1; results in job order, so the
    output never depends on which worker finished first."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm
    workers = min(workers, len(jobs))
    pool = None
    if workers > 1:
        # fork where there is one: workers inherit the imported modules instead of each importing torch
        # again (seconds per worker). Safe here: the parent has run no parallel torch op, and with fork
        # the executor starts every worker up front, before any thread of its own or the progress bar.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init_worker)
        list(pool.map(_nothing, range(workers)))  # every worker started before the bar's monitor thread
    bar = tqdm(total=len(jobs), desc=desc, unit="shard", disable=not progress)
    # one thread in-process too: conversion is copies and elementwise ops on chunks, and torch's thread
    # pool on a busy machine made each block-row op ~10x slower (measured: 240 s instead of 20 s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        for r in (pool.map(fn, jobs) if pool is not None else map(fn, jobs)):
            out.append(r)
            bar.update(1)
    finally:
        torch.set_num_threads(threads)
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out


def _nothing(_):
    return None


# ------------------------------------------------------------------------------------- HF -> ours
@dataclass(frozen=True)
class _HfPiece:
    """One piece to write: rows [r0, r1) of HF tensor `hf` (its FP8 scale in `scale_file`), as `key`."""
    key: str
    hf: str
    file: str
    scale_file: str | None
    rows: tuple[int, int]
    ndim: int
    dtype: torch.dtype


def _write_hf_unit(job: tuple[str, str, list[_HfPiece]]) -> list[SavedItem]:
    """Convert the pieces read from one source shard into one .distcp file; one piece in memory at a time."""
    from safetensors import safe_open
    out_dir, rel, pieces = job
    writer = DcpFileWriter(out_dir, rel)
    handles: dict[str, object] = {}

    def handle(f):
        if f not in handles:
            handles[f] = safe_open(f, "pt")
        return handles[f]

    for p in pieces:
        r0, r1 = p.rows
        sl = handle(p.file).get_slice(p.hf)
        t = sl[r0:r1] if p.ndim else handle(p.file).get_tensor(p.hf)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = handle(p.scale_file).get_slice(p.hf + "_scale_inv")[r0 // FP8_BLOCK:-(-r1 // FP8_BLOCK)]
            t = dequantize_fp8(t, scale, p.dtype)
        writer.write(p.key, t.to(p.dtype))
        del t
    return writer.close()


def hf_to_megatron(input_dir: str, output: str, layout: str | None = None, dtype: str | None = None,
                   progress: bool = True, workers: int | None = None, budget_bytes: int = DEFAULT_BUDGET) -> str:
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
    by_file: dict[str, list[_HfPiece]] = {}
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
        t_dtype = _st_dtype(src_dtype, f, hf)
        scale_file = None
        if is_fp8:
            scale_file = files.get(hf + "_scale_inv")
            if scale_file is None:
                raise CheckpointError(f"{f}: FP8 tensor '{hf}' has no '{hf}_scale_inv'")
            want = tuple(-(-s // FP8_BLOCK) for s in shape)
            got = tuple(handle(scale_file).get_slice(hf + "_scale_inv").get_shape())
            if len(shape) != 2 or got != want:
                raise CheckpointError(f"{scale_file}: tensor '{hf}_scale_inv' has shape {got}, expected {want} "
                                      f"(one scale per {FP8_BLOCK}x{FP8_BLOCK} block of {shape})")
            t_dtype = out_dtype or torch.bfloat16
        elif out_dtype is not None and t_dtype.is_floating_point and "e_score_correction_bias" not in hf:
            t_dtype = out_dtype
        sources[ours] = hf
        # a tensor bigger than the budget becomes row boxes `name[r0:r1,...]`; loaders reassemble any boxes
        for r0, r1 in row_ranges(shape, budget_bytes):
            offs, sizes = (r0,) + (0,) * (len(shape) - 1), (r1 - r0,) + shape[1:]
            key = "model/" + box_key(ours, offs, sizes if shape else (), shape)
            by_file.setdefault(f, []).append(_HfPiece(key, hf, f, scale_file, (r0, r1), len(shape), t_dtype))
    missing = [n for n in expected if n not in sources]
    if missing:
        raise CheckpointError(f"{input_dir}: missing tensor '{hf_names(missing[0], cfg)[0]}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    handles.clear()

    tmp = _prepare_output(output)
    # one unit per source shard, written to its own .distcp file: the files do not depend on --workers
    jobs = [(tmp, f"__{i}_0.distcp", pieces) for i, (_, pieces) in enumerate(sorted(by_file.items()))]
    if workers is None:
        workers = default_workers(sum(os.path.getsize(f) for f in set(files.values())))
    results = _run_units(_write_hf_unit, jobs, workers, progress, "converting shards")
    write_dcp_metadata(tmp, [item for items in results for item in items])
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


@dataclass(frozen=True)
class _HfEntry:
    """One tensor of an output safetensors shard: HF name, our tensor, shape, saved and output dtypes."""
    hf: str
    ours: str
    shape: tuple
    saved: torch.dtype
    dtype: torch.dtype  # float8_e4m3fn: quantised with a `_scale_inv` entry after it
    boxes: tuple  # the saved boxes of `ours`: ((key, offsets, sizes, dtype), ...)

    def files_entries(self) -> list[tuple[str, tuple, torch.dtype]]:
        if self.dtype == torch.float8_e4m3fn:
            return [(self.hf, self.shape, self.dtype),
                    (self.hf + "_scale_inv", tuple(-(-s // FP8_BLOCK) for s in self.shape), torch.float32)]
        return [(self.hf, self.shape, self.dtype)]


_PIECES: dict[str, SavedPieces] = {}  # the checkpoint being exported, set by megatron_to_hf; forked workers
#                                       inherit it, spawned ones read the metadata once each


def _write_hf_shard(job: tuple[str, str, str, list[_HfEntry], int]) -> None:
    """Write one output safetensors shard, reading and converting one row chunk at a time."""
    ckpt, out_dir, fname, entries, budget = job
    if ckpt not in _PIECES:
        _PIECES[ckpt] = SavedPieces(ckpt)
    pieces = _PIECES[ckpt]
    writer = SafetensorsWriter(os.path.join(out_dir, fname), [x for e in entries for x in e.files_entries()])
    for e in entries:
        scales = []
        for r0, r1 in row_ranges(e.shape, budget):
            offs = (r0,) + (0,) * (len(e.shape) - 1) if e.shape else ()
            sizes = (r1 - r0,) + e.shape[1:] if e.shape else ()
            t = read_box(pieces, e.boxes, f"model/{e.ours}", offs, sizes, e.saved)
            if e.dtype == torch.float8_e4m3fn:  # rows come in whole 128-row blocks: quantising chunks = the tensor
                q, s = quantize_fp8(t)
                writer.write(e.hf, q)
                scales.append(s)
            else:
                writer.write(e.hf, t.to(e.dtype))
            del t
        if scales:
            writer.write(e.hf + "_scale_inv", torch.cat(scales))
    writer.close()


def megatron_to_hf(input_path: str, output: str, dtype: str = "bf16", max_shard_bytes: int = 5 << 30,
                   progress: bool = True, workers: int | None = None, budget_bytes: int = DEFAULT_BUDGET) -> str:
    """Export a checkpoint (a step dir, or a save dir: its newest) as a HF directory."""
    path = resolve_checkpoint(input_path)
    verify_checkpoint(path)  # a truncated or missing shard is one line naming it, before anything is written
    run = read_config(path)
    cfg = run.model
    fp8 = dtype == "fp8"
    out_dtype = torch.bfloat16 if fp8 else DTYPES.get(dtype)
    if out_dtype is None:
        raise ConfigError(f"--dtype {dtype}: expected bf16, fp32 or fp8 for --to hf")
    index = SavedIndex(path)
    expected = expected_tensors(cfg)
    unknown = sorted(set(index.names("model")) - set(expected))
    if unknown:
        raise CheckpointError(f"{path}: unknown tensor 'model/{unknown[0]}' for a {cfg.model_type} model with "
                              f"{cfg.num_hidden_layers} layers (config.yaml disagrees with the checkpoint?)")
    # the shards are planned from shapes and dtypes alone (the rule of hf.save_hf), then written independently
    shards: list[list[_HfEntry]] = [[]]
    size = 0
    for name, (shape, _) in expected.items():
        key = f"model/{name}"
        if key not in index.boxes:
            raise CheckpointError(f"{path}: missing tensor '{key}'")
        saved_shape = index.global_shape(key)
        if saved_shape != tuple(shape):
            raise CheckpointError(f"{path}: tensor '{key}' has shape {saved_shape}, expected {tuple(shape)}")
        saved = index.boxes[key][0][3]
        for hf in hf_names(name, cfg):
            probe = torch.empty(shape, dtype=saved, device="meta")
            if fp8 and _fp8_eligible(hf, probe):
                want = torch.float8_e4m3fn
            elif saved.is_floating_point and "e_score_correction_bias" not in hf:
                want = out_dtype
            else:
                want = saved
            e = _HfEntry(hf, name, tuple(shape), saved, want, tuple(index.boxes[key]))
            n = sum(nbytes(s, d) for _, s, d in e.files_entries())
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += n
    count = len(shards)
    names = ["model.safetensors"] if count == 1 else \
        [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]

    tmp = _prepare_output(output)
    write_hf_config(cfg, tmp, out_dtype, fp8)
    jobs = [(path, tmp, fname, entries, budget_bytes) for fname, entries in zip(names, shards)]
    if workers is None:
        workers = default_workers(sum(nbytes(s, d) for es in shards for e in es for _, s, d in e.files_entries()))
    _PIECES.clear()
    _PIECES[path] = SavedPieces(path)
    try:
        _run_units(_write_hf_shard, jobs, workers, progress, "exporting shards")
    finally:
        _PIECES.clear()
    if count > 1:
        weight_map = {n: fname for fname, entries in zip(names, shards)
                      for e in entries for n, _, _ in e.files_entries()}
        total = sum(nbytes(s, d) for entries in shards for e in entries for _, s, d in e.files_entries())
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
                  open(os.path.join(tmp, INDEX_FILE), "w"), indent=2)
    if not _copy_tokenizer(os.path.join(path, "tokenizer"), tmp):
        _copy_tokenizer(run.data.tokenizer or "", tmp)
    _finish_output(tmp, output)
    return output
