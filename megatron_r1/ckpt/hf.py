"""THE mapping between our parameters and Hugging Face checkpoint tensors: names, shards, FP8 blocks.

Notable choices
- Our parameter names are the HF names (see model/gpt.py). The table below holds only the
  exceptions: the MTP layer of DeepSeek's release carries its own copies of the embedding and
  output head (`model.layers.{L+k}.embed_tokens`, `.shared_head.head`), which we share with the main
  model; tied embeddings have no `lm_head.weight` on disk.
- Routed experts are stored stacked ([L, out, in] per projection, model/experts.py); `model_state` splits
  the stacks into one view per expert under its HF name (`per_expert`), and loading writes into those
  views (the join). So everything below, checkpoints and weight sync see one tensor per HF name.
- How a parameter is sliced comes from the model's placement table (`model.placement[name]`,
  parallel/placement.py), so loading, conversion and vLLM weight sync all slice the same way.
- Shards are streamed: `safe_open(...).get_slice(name)` reads only this rank's slice, so peak memory
  stays near one tensor, not the model.
- DeepSeek's FP8 release: e4m3 weights with a `weight_scale_inv` per 128×128 block (edge blocks
  partial); `dequantize_fp8` multiplies block-wise in float32, one block-row at a time, and casts
  to the target dtype.
- Problems are one `CheckpointError` line naming the file and the tensor.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Iterable, Iterator

import torch

from megatron_r1.config import ModelConfig

FP8_BLOCK = 128
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint problem a user can act on; the message names the file and the tensor."""


# --------------------------------------------------------------------------------------- name table
def hf_aliases(cfg: ModelConfig) -> dict[str, str]:
    """HF names that are copies of one of our parameters: {hf_name: our_name}."""
    out = {}
    for k in range(cfg.num_nextn_predict_layers if cfg.model_type == "deepseek_v3" else 0):
        i = cfg.num_hidden_layers + k
        out[f"model.layers.{i}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"model.layers.{i}.shared_head.head.weight"] = "lm_head.weight"
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = "model.embed_tokens.weight"
    return out


def our_name(hf_name: str, cfg: ModelConfig) -> str:
    return hf_aliases(cfg).get(hf_name, hf_name)


def hf_names(our: str, cfg: ModelConfig) -> list[str]:
    """Every HF tensor that holds our parameter `our` (the parameter itself and its release copies)."""
    names = [] if (cfg.tie_word_embeddings and our == "lm_head.weight") else [our]
    return names + [h for h, o in hf_aliases(cfg).items() if o == our and h != our]


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers (the router's expert bias) by name, deduplicating tied ones.

    Stacked routed experts (model/experts.py) appear one per expert, as views of the stacks with the HF
    names and shapes (`...mlp.experts.17.up_proj.weight`, [F, H]): see `per_expert`."""
    out = dict(model.named_parameters(remove_duplicate=False))  # tied names too, as the same object
    out.update({k: v for k, v in model.state_dict().items() if k not in out and "tokens_per_expert" not in k})
    if "lm_head.weight" in out and "model.embed_tokens.weight" in out and \
            out["lm_head.weight"] is out["model.embed_tokens.weight"]:
        del out["lm_head.weight"]
    return per_expert(model, out)


def per_expert(model: torch.nn.Module, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`named` (by parameter name) with every expert stack `{prefix}.{proj}` replaced by one HF-named view
    per expert, `{prefix}.{expert id}.{proj}.weight` = stack[e]: the split. Writing into a view (a HF
    load, a checkpoint load) writes the stack: the join. Also for tensors shaped like the parameters
    (gradients, optimizer state), e.g. per_expert(model, {k: p.grad ...})."""
    owner = {}  # stack name -> (module prefix, module, projection)
    for prefix, mod in model.named_modules():
        if hasattr(mod, "expert_views"):
            owner.update({f"{prefix}.{k}": (prefix, mod) for k, _ in mod.named_parameters(recurse=False)})
    if not owner:
        return dict(named)
    out, done = {}, set()
    for name, t in named.items():  # the views take the place of their module's first stack (order is kept)
        if name not in owner:
            out[name] = t
            continue
        prefix, mod = owner[name]
        if prefix in done:
            continue
        done.add(prefix)
        stacks = {k: named[f"{prefix}.{k}"] for k, _ in mod.named_parameters(recurse=False) if f"{prefix}.{k}" in named}
        out.update({f"{prefix}.{v}": t for v, t in mod.expert_views(stacks).items()})
    return out


# ---------------------------------------------------------------------------------------------- FP8
def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.bfloat16, block: int = FP8_BLOCK):
    """w: [R, C] float8_e4m3fn, scale_inv: [ceil(R/b), ceil(C/b)] float32 -> w·scale per block, in `dtype`.

    One block-row (b rows) at a time, so the float32 temporaries are one block-row, not the tensor."""
    r, c = w.shape
    out = torch.empty(r, c, dtype=dtype, device=w.device)
    scale = scale_inv.to(w.device, torch.float32)
    for i in range(0, r, block):
        s = scale[i // block].repeat_interleave(block)[:c]  # [C]: this block-row's scales, column by column
        out[i:i + block] = (w[i:i + block].float() * s).to(dtype)
    return out


def quantize_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantisation in DeepSeek's release format: returns (w_fp8, weight_scale_inv).
    The project's one quantiser (kernels/fp8.py) with 128×128 weight blocks."""
    from megatron_r1.kernels.fp8 import quantize_blocks
    return quantize_blocks(w, (block, block))


# ---------------------------------------------------------------------------------- reading a dir
def checkpoint_files(path: str) -> dict[str, str]:
    """{hf tensor name: file path} for a HF dir (index or single file). Checks every shard exists."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, "rb") as fh:
                weight_map = json.loads(fh.read())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError) as e:  # bad JSON or UTF-8, no or a wrong weight_map
            raise CheckpointError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
        missing = sorted({f for f in weight_map.values() if not os.path.exists(os.path.join(path, f))})
        if missing:
            n = sum(1 for f in weight_map.values() if f == missing[0])
            raise CheckpointError(f"{os.path.join(path, missing[0])}: missing shard (the index names it for {n} "
                                  f"tensors)" + (f", and {len(missing) - 1} more missing shards" if len(missing) > 1 else ""))
        return {k: os.path.join(path, f) for k, f in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise CheckpointError(f"{path}: no model.safetensors or {INDEX_FILE}")
    return {k: single for k in read_safetensors_header(single)}


def names_by_file(files: dict[str, str]) -> dict[str, list[str]]:
    """{file path: [tensor names]} from `checkpoint_files`' {name: file}: one open per shard."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, f in files.items():
        by_file[f].append(name)
    return by_file


def iter_hf_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every tensor of an HF dir as stored, one safetensors file open at a time."""
    for fpath, names in sorted(names_by_file(checkpoint_files(path)).items()):
        with _safe_open(fpath) as f:
            for name in names:
                yield name, f.get_tensor(name)


def _safe_open(path: str):
    """`safe_open`, with a damaged file (truncated, not safetensors) as one CheckpointError naming it."""
    from safetensors import safe_open
    try:
        return safe_open(path, "pt")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def read_safetensors_header(path: str) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} from a safetensors file's header, reading only the
    header; checks that the file holds every byte the header promises (a truncated copy fails here)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise CheckpointError(f"{path}: unreadable safetensors file (truncated or not safetensors: "
                                      f"{size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()
               if isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, the header needs {8 + n + end})")
    return header


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """{our name: full shape} of a whole `cfg` model. Built on meta with one decoder layer of each kind
    (dense, MoE) and the MTP layers, then renamed over every layer index: layers of one kind differ only
    in their index, and a 61-layer, 256-expert model takes a second this way instead of a minute."""
    import dataclasses

    from megatron_r1.model.gpt import CausalLM
    n_layers = cfg.num_hidden_layers
    first = {}  # kind -> first layer of that kind
    for i in range(n_layers):
        first.setdefault(cfg.is_moe_layer(i), i)
    small_n = max(first.values()) + 1
    with torch.device("meta"):
        small = model_state(CausalLM(dataclasses.replace(cfg, num_hidden_layers=small_n)))
    out = {}
    layer = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
    for name, t in small.items():
        m = layer.match(name)
        if not m:
            out[name] = tuple(t.shape)
            continue
        j, rest = int(m.group(1)), m.group(2)
        if j >= small_n:  # MTP layer k sits at num_hidden_layers + k
            out[f"model.layers.{n_layers + j - small_n}.{rest}"] = tuple(t.shape)
        elif first[cfg.is_moe_layer(j)] == j:
            for i in range(n_layers):
                if cfg.is_moe_layer(i) == cfg.is_moe_layer(j):
                    out[f"model.layers.{i}.{rest}"] = tuple(t.shape)
    return out


def check_hf_weights(path: str, cfg: ModelConfig) -> int:
    """Headers and index only, no weights read: every tensor of a `cfg` model is on disk with its shape,
    no unknown tensor, FP8 weights have their scales. Returns the number of tensors; raises CheckpointError."""
    files = checkpoint_files(path)
    headers = {f: read_safetensors_header(f) for f in sorted(set(files.values()))}
    expected = expected_shapes(cfg)
    known = {h: n for n in expected for h in hf_names(n, cfg)}
    for hf, f in sorted(files.items()):
        if hf not in headers[f]:
            raise CheckpointError(f"{f}: no tensor '{hf}' although the index names this file for it")
        if hf.endswith("_scale_inv"):
            continue
        if hf not in known:
            raise CheckpointError(f"{f}: unknown tensor '{hf}' for a {cfg.model_type} model "
                                  f"with {cfg.num_hidden_layers} layers")
        shape, want = tuple(headers[f][hf]["shape"]), expected[known[hf]]
        if shape != want:
            raise CheckpointError(f"{f}: tensor '{hf}' has shape {shape}, expected {want}")
        if headers[f][hf]["dtype"].startswith("F8") and hf + "_scale_inv" not in files:
            raise CheckpointError(f"{f}: FP8 tensor '{hf}' has no '{hf}_scale_inv'")
    found = {known[h] for h in files if h in known}
    missing = [n for n in expected if n not in found]
    if missing:
        raise CheckpointError(f"{path}: missing tensor '{hf_names(missing[0], cfg)[0]}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return len(files)


def load_hf_weights(model: torch.nn.Module, path: str, cfg: ModelConfig, mesh, dtype=None,
                    progress: bool = False) -> None:
    """Fill `model` (any layout: tp slices, local experts, one pipeline chunk) from a HF directory."""
    files = checkpoint_files(path)
    params = model_state(model)
    # every name the full model has on disk, to tell "another rank's tensor" from "unknown tensor"
    with torch.device("meta"):
        from megatron_r1.model.gpt import CausalLM
        known = set()
        for n in model_state(CausalLM(cfg)):
            known.update(hf_names(n, cfg))
    filled: set[str] = set()
    it = sorted(names_by_file(files).items())
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="loading shards", unit="shard")
    for fpath, names in it:
        with _safe_open(fpath) as f:
            for hf in names:
                if hf.endswith("_scale_inv"):
                    continue
                if hf not in known:
                    raise CheckpointError(f"{fpath}: unknown tensor '{hf}' for a {cfg.model_type} model "
                                          f"with {cfg.num_hidden_layers} layers")
                ours = our_name(hf, cfg)
                if ours not in params or (ours in filled and hf != ours):
                    continue  # another rank's / stage's tensor, or a release copy of a shared one
                p, place = params[ours], model.placement[ours]
                sl = f.get_slice(hf)
                shape = tuple(sl.get_shape())
                want = place.full_shape(p.shape, mesh)
                if shape != want:
                    raise CheckpointError(f"{fpath}: tensor '{hf}' has shape {shape}, expected {want}")
                t = place.shard(sl, mesh)
                if t.dtype == torch.float8_e4m3fn:
                    scale_name = hf + "_scale_inv"
                    if scale_name not in files:
                        raise CheckpointError(f"{fpath}: FP8 tensor '{hf}' has no '{scale_name}'")
                    with _safe_open(files[scale_name]) as fs:
                        full = dequantize_fp8(f.get_tensor(hf), fs.get_tensor(scale_name), torch.float32)
                    t = place.shard(full, mesh)
                with torch.no_grad():
                    p.copy_(t.to(dtype or p.dtype))
                filled.add(ours)
    missing = [n for n in params if n not in filled]
    if missing:
        raise CheckpointError(f"{path}: missing tensor '{hf_names(missing[0], cfg)[0]}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


# ---------------------------------------------------------------------------------- writing a dir
def hf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf name, tensor) for a FULL state dict of ours, with the release copies the HF format expects."""
    for name, t in state.items():
        for hf in hf_names(name, cfg):
            yield hf, t


def save_hf(tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, out_dir: str,
            max_shard_bytes: int = 2 << 30, dtype=torch.bfloat16, fp8: bool = False) -> None:
    """Write config.json + sharded safetensors + index. `fp8`: DeepSeek's block-scaled release format
    for 2-D linear weights (not embeddings, norms, router or head)."""
    from safetensors.torch import save_file
    write_hf_config(cfg, out_dir, dtype, fp8)
    # shards are written as soon as they fill (peak memory ~ one shard), under temporary names until
    # the count n is known for DeepSeek/HF's model-0000i-of-0000n names
    shard: dict = {}
    sizes = [0]
    written: list[tuple[str, list[str]]] = []

    def flush():
        tmp = os.path.join(out_dir, f".shard-{len(written):05d}.tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        written.append((tmp, list(shard)))

    seen: set[int] = set()
    for name, t in tensors:
        t = t.detach().cpu()
        if t.data_ptr() in seen:  # a release copy (MTP's embedding/head): safetensors wants its own storage
            t = t.clone()
        seen.add(t.data_ptr())
        out = {}
        if fp8 and _fp8_eligible(name, t):
            q, s = quantize_fp8(t)
            out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = t.to(dtype if t.is_floating_point() and "e_score_correction_bias" not in name else t.dtype)
        nbytes = sum(v.numel() * v.element_size() for v in out.values())
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            flush()
            shard = {}
            sizes.append(0)
        shard.update({k: v.contiguous() for k, v in out.items()})
        sizes[-1] += nbytes
    flush()
    n = len(written)
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, os.path.join(out_dir, fname))
        weight_map.update({k: fname for k in names})
    if n > 1:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map},
                  open(os.path.join(out_dir, INDEX_FILE), "w"), indent=2)


def write_hf_config(cfg: ModelConfig, out_dir: str, dtype=torch.bfloat16, fp8: bool = False) -> None:
    """config.json (with DeepSeek's quantization_config when `fp8`) and generation_config.json."""
    os.makedirs(out_dir, exist_ok=True)
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    if fp8:
        hf_cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    json.dump(hf_cfg, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
               "temperature": 0.6, "top_p": 0.95}, open(os.path.join(out_dir, "generation_config.json"), "w"), indent=2)


_NOT_FP8 = re.compile(r"(embed_tokens|lm_head|shared_head\.head|norm|gate\.weight|e_score_correction_bias|eh_proj)")


def _fp8_eligible(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and not _NOT_FP8.search(name)
