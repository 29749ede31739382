"""Time RolloutEngine.update_weights (trainer -> vLLM hot-swap) on tiny models.

Prints, per model and bucket cap: bytes pushed, buckets, seconds, bytes/s, the cost
per tensor, and the peak host memory the push added (VmHWM reset before each push).
The producer clones each tensor when vLLM pulls it, as a gather or a dequantisation
would, so the peak shows what one push holds at once: up to a bucket of produced
tensors plus the layer vLLM has materialised but not finished.

    python benchmarks/weight_sync.py                       # tiny DeepSeek-V3, Qwen2, wider Qwen2
    python benchmarks/weight_sync.py --kinds qwen2 --bucket-mb 1 16 --repeats 5
    python benchmarks/weight_sync.py --layout tp=2 --world 2 --rollout-tp 2    # part 2's layout

Timings on a shared 2-core machine are noisy: the best of --repeats is shown.
The tiny models are overhead-bound (hundreds of small tensors, a re-layout per layer);
bytes/s on the 190 MB model is closer to the per-byte cost a large model would see.

Three parts, in order:
1. vLLM reload alone (one process, tensors already materialised), per model and bucket cap.
   A least-squares fit  seconds = c_tensor * tensors + c_byte * bytes  over these rows gives the
   per-tensor (Python/bookkeeping) and per-byte (copy + re-layout) costs of vLLM's reload.
2. The sync GRPO runs: `update_weights(TrainSession.full_state())` from a sharded training layout
   (run_ranks, gloo), split into the gather alone (the full_state stream consumed, no vLLM) and
   gather + reload. `--layout none` skips it.
3. Extrapolation to DeepSeek-V3 671B on H800 nodes (bf16 and FP8 weights) for the path the code
   takes today (every rank receives every full tensor) and for the targeted path (each GPU
   receives only its rollout shard). The hardware figures and what they assume are printed with
   the table; see benchmarks/weight_sync.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MODELS = {
    "deepseek_v3": ("deepseek_v3", {}),
    "qwen2": ("qwen2", {}),
    # ~47M parameters (190 MB in float32): big enough for per-byte costs to show
    "qwen2-wide": ("qwen2", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                 num_attention_heads=32, num_key_value_heads=8)),
}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc otherwise raises its mmap threshold after the first large free and keeps
        # freed tensors in the heap, so RSS never drops and the peak hides each push.
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)})
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bucket-mb", nargs="+", type=float, default=[0.25, 4, 64, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", help="engine dtype; tensors are pushed as stored (float32)")
    ap.add_argument("--layout", default="tp=2", help="part 2's training layout, e.g. 'tp=2,pp=2' or 'ep=2'; 'none' skips")
    ap.add_argument("--world", type=int, default=2, help="part 2's number of ranks")
    ap.add_argument("--rollout-tp", type=int, default=2, help="part 2's vLLM tensor-parallel size")
    ap.add_argument("--preset", default="tiny-moe", help="part 2's model preset")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from megatron_r1.rollout.engine import RolloutEngine
    from megatron_r1.rollout.tiny_hf import make_tiny_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix="weight_sync_") as tmp:
        for name in args.kinds:
            kind, overrides = MODELS[name]
            path = make_tiny_checkpoint(kind, os.path.join(tmp, name), **overrides)
            engine = RolloutEngine(str(path), dtype=args.dtype, max_model_len=256,
                                   kv_cache_bytes=64 << 20, max_num_seqs=8)
            tensors = load_file(os.path.join(path, "model.safetensors"))
            produced = lambda: ((n, t.clone()) for n, t in tensors.items())  # noqa: E731
            engine.update_weights(produced())  # warm-up: first reload allocates vLLM's bookkeeping
            for mb in args.bucket_mb:
                cap = max(1, int(mb * (1 << 20)))
                best = None
                for _ in range(args.repeats):
                    base = _rss_kb("VmRSS")
                    _reset_peak()
                    stats = engine.update_weights(produced(), bucket_bytes=cap)
                    peak_mb = (_rss_kb("VmHWM") - base) / 1024
                    if best is None or stats.seconds < best[0].seconds:
                        best = (stats, peak_mb)
                stats, peak_mb = best
                rows.append((name, mb, stats, peak_mb))
            del engine
            torch.cuda.empty_cache() if torch.cuda.is_available() else None

    print(f"\n== 1. vLLM reload alone ({args.dtype} engine, one process, best of {args.repeats})")
    print(f"{'model':<12} {'MB':>8} {'cap MB':>8} {'buckets':>8} {'tensors':>8} {'s':>8} "
          f"{'MB/s':>9} {'us/tensor':>10} {'ns/byte':>8} {'peak+MB':>8}")
    for name, mb, s, peak in rows:
        print(f"{name:<12} {s.bytes / 2**20:>8.1f} {mb:>8g} {s.num_buckets:>8} {s.num_tensors:>8} "
              f"{s.seconds:>8.3f} {s.bytes_per_s / 2**20:>9.1f} {1e6 * s.seconds / s.num_tensors:>10.0f} "
              f"{1e9 * s.seconds / s.bytes:>8.2f} {peak:>8.1f}")
    c_call, c_tensor, c_byte = fit_costs([(s.num_tensors, s.bytes, s.seconds) for _, _, s, _ in rows])
    print(f"fit over these rows: seconds = {c_call:.3f} per call + {1e6 * c_tensor:.0f} us/tensor * tensors + "
          f"{1e9 * c_byte:.2f} ns/byte * bytes  ({1 / c_byte / 1e9 if c_byte > 0 else float('inf'):.2f} GB/s per-byte rate)")

    per_tensor, source = c_tensor, "part 1's fit"
    if args.layout != "none":
        r = layout_part(args)
        # the reload of the DeepSeek-V3 architecture itself, per tensor, everything included (per-layer
        # re-layout, MLA absorption, MoE prepacking, the per-call overhead): an upper bound per tensor
        per_tensor, source = r["reload"] / r["tensors"], f"part 2's reload of {args.preset}, all costs per tensor"
    extrapolate(per_tensor, source)


def fit_costs(samples: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least squares  seconds = c_call + c_tensor * tensors + c_byte * bytes; negative terms dropped."""
    import torch

    a = torch.tensor([[1, n, b] for n, b, _ in samples], dtype=torch.float64)
    y = torch.tensor([[t] for _, _, t in samples], dtype=torch.float64)
    keep = [0, 1, 2]
    while True:
        sub = a[:, keep]
        scale = sub.abs().amax(0).clamp_min(1)  # the columns differ by ~1e8: solve on normalised columns
        c = torch.linalg.lstsq(sub / scale, y).solution[:, 0] / scale
        if (c >= 0).all() or len(keep) == 1:  # noise can push a small term below zero
            break
        keep.pop(int(c.argmin()))
    out = [0.0, 0.0, 0.0]
    for i, v in zip(keep, c.tolist()):
        out[i] = max(v, 0.0)
    return out[0], out[1], out[2]


# ----------------------------------------------------------------------------- 2. from a training layout



def _layout_rank(preset: str, layout: dict, rollout_tp: int, root: str, repeats: int, bucket_bytes: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_r1.config import load_config
    from megatron_r1.data.tokenizer import write_word_tokenizer
    from megatron_r1.rollout.engine import RolloutEngine
    from megatron_r1.training import TrainSession

    cfg = load_config(preset, ["train.params_dtype=float32", f"run_dir={root}/run"]
                      + [f"parallel.{k}={v}" for k, v in layout.items()])
    session = TrainSession(cfg, logger=False)
    hf_dir = os.path.join(root, "hf")
    session.export_hf(hf_dir, dtype=torch.float32)
    if dist.get_rank() == 0:
        write_word_tokenizer(cfg.model.vocab_size, hf_dir)
    dist.barrier()
    engine = RolloutEngine(hf_dir, dtype="float32", tensor_parallel_size=rollout_tp, max_model_len=128,
                           kv_cache_bytes=16 << 20, max_num_seqs=8)
    engine.update_weights(session.full_state(), bucket_bytes)  # warm-up

    def best(fn):
        times = []
        for _ in range(repeats):
            dist.barrier()  # start together: the gather is collective
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    n_bytes = n_tensors = 0
    for _, t in session.full_state():
        n_bytes += t.numel() * t.element_size()
        n_tensors += 1
    gather = best(lambda: [None for _ in session.full_state()])
    sync = best(lambda: engine.update_weights(session.full_state(), bucket_bytes))
    local = list(session.full_state())
    reload = best(lambda: engine.update_weights(local, bucket_bytes))
    session.close()
    return dict(bytes=n_bytes, tensors=n_tensors, gather=gather, sync=sync, reload=reload)


def layout_part(args) -> None:
    from megatron_r1.parallel.spawn import run_ranks

    layout = {k: int(v) for k, v in (kv.split("=") for kv in args.layout.split(","))}
    cap = int(max(args.bucket_mb) * (1 << 20))
    with tempfile.TemporaryDirectory(prefix="weight_sync_layout_") as tmp:
        res = run_ranks(_layout_rank, args.world, args.preset, layout, args.rollout_tp, tmp, args.repeats, cap,
                        timeout=900, start_method="spawn")
    r = max(res, key=lambda x: x["sync"])  # the slowest rank sets the step time
    print(f"\n== 2. GRPO's sync: update_weights(TrainSession.full_state()), {args.preset} trained at {args.layout} "
          f"on {args.world} ranks (gloo) -> vLLM TP{args.rollout_tp} x {args.world // args.rollout_tp} engine(s), "
          f"cap {cap >> 20} MB, best of {args.repeats}, slowest rank")
    print(f"{'':<28} {'s':>8} {'MB/s':>8} {'us/tensor':>10}   ({r['tensors']} tensors, {r['bytes'] / 2**20:.2f} MB per rank)")
    for label, key in (("gather only (full_state)", "gather"), ("reload only (materialised)", "reload"),
                       ("gather + reload (GRPO)", "sync")):
        print(f"{label:<28} {r[key]:>8.3f} {r['bytes'] / r[key] / 2**20:>8.1f} {1e6 * r[key] / r['tensors']:>10.0f}")
    return r


# ----------------------------------------------------------------------------- 3. 671B on H800

# Figures of an H800 (SXM) node; the table below prints which path uses which.
NVLINK_GBPS = 160.0  # per GPU per direction as achieved: DeepSeek-V3 tech report (arXiv 2412.19437) §3.2.2
#                      ("NVLink offers 160 GB/s, ~3.2x IB"); spec: 400 GB/s bidirectional per GPU (H100: 900)
IB_GBPS = 50.0  # per GPU: 8 x 400 Gb/s NDR ConnectX-7 per node, one NIC per GPU (same report: "IB (50 GB/s)")
PCIE_GBPS = 64.0  # Gen5 x16 per direction: host <-> GPU (sleep-mode offload/onload of weights)
HBM_GBPS = 3350.0  # HBM3 per GPU (H100/H800 SXM datasheet)
GPU_GB, GPUS_PER_NODE = 80.0, 8
BUCKET_BYTES = 512 << 20  # rollout.bucket_mb's default
COLLECTIVE_LATENCY_S = 100e-6  # per broadcast over 2048 ranks (NCCL tree, ~log2(2048) hops): an assumption


def model_tensors_671b() -> dict:
    """Counts of DeepSeek-V3 671B's HF tensors from our own model definition (meta device).

    Builds the dense layers, one MoE layer and the MTP layer, and scales the MoE layer to the
    rest: a full meta model takes a minute on 2 cores."""
    import dataclasses

    import torch

    from megatron_r1.ckpt.hf import _fp8_eligible, hf_names, model_state
    from megatron_r1.config import load_config
    from megatron_r1.model.gpt import CausalLM

    cfg = load_config("deepseek-v3-671b").model
    k = cfg.first_k_dense_replace
    small = dataclasses.replace(cfg, num_hidden_layers=k + 1)
    with torch.device("meta"):
        state = model_state(CausalLM(small))
    acc = {key: 0.0 for key in ("n", "params", "expert", "n_expert", "fp8", "n_fp8", "mtp", "n_mtp")}
    for name, t in state.items():
        for hf in hf_names(name, small):
            layer = int(hf.split(".")[2]) if hf.startswith("model.layers.") else -1
            weight = cfg.num_hidden_layers - k if layer == k else 1  # the MoE layer stands for all of them
            n = t.numel() * weight
            acc["n"] += weight
            acc["params"] += n
            acc["expert"] += n if ".experts." in hf else 0
            acc["n_expert"] += weight if ".experts." in hf else 0
            if _fp8_eligible(hf, t):
                acc["fp8"] += n
                acc["n_fp8"] += weight
            if layer > k:  # the MTP layer (index L in the release)
                acc["mtp"] += n
                acc["n_mtp"] += 1
    return acc


def extrapolate(c_tensor: float, source: str) -> None:
    m = model_tensors_671b()
    gpus = 2048
    main_params = m["params"] - m["mtp"]  # vLLM's main model skips the MTP layer (no speculative decoding)
    print(f"\n== 3. DeepSeek-V3 671B on {gpus} H800 (PP16 x EP64 training, ZeRO-1 DP; DeepSeek's layout)")
    print(f"model: {m['params'] / 1e9:.1f} B params in {m['n']:.0f} HF tensors incl. MTP "
          f"({m['mtp'] / 1e9:.1f} B in {m['n_mtp']:.0f} tensors, release copies of embedding/head included); "
          f"routed experts {m['expert'] / 1e9:.1f} B; FP8-eligible {m['fp8'] / 1e9:.1f} B in {m['n_fp8']:.0f} tensors")
    print(f"hardware per GPU: IB {IB_GBPS:g} GB/s, NVLink {NVLINK_GBPS:g} GB/s per direction (achieved; spec 400 "
          f"bidirectional), PCIe Gen5 {PCIE_GBPS:g} GB/s, HBM {HBM_GBPS:g} GB/s; per-tensor vLLM cost "
          f"{1e6 * c_tensor:.0f} us ({source}; this CPU, an upper bound for a GPU host); collective latency {1e6 * COLLECTIVE_LATENCY_S:.0f} us")
    print(f"{'weights':<6} {'engine':<22} {'path':<10} {'GB in/GPU':>9} {'tensors/GPU':>11} {'wire s':>7} "
          f"{'latency s':>9} {'vLLM s':>7} {'HBM s':>6} {'total s':>8} {'GB/s/GPU':>8}")
    print("  wire: bytes / link rate; latency: collectives x latency; vLLM: tensors x per-tensor cost; "
          "HBM: read + write of the bytes on the GPU")
    for fmt in ("bf16", "fp8"):
        main_share = main_params / m["params"]  # vLLM's share of the stream (MTP: 2%)
        if fmt == "bf16":
            stream_bytes, stream_tensors, expert_bytes, n_expert = 2 * m["params"], m["n"], 2 * m["expert"], m["n_expert"]
        else:  # e4m3 linear weights + one fp32 scale per 128x128 block (1/4096 of the bytes) as extra tensors
            stream_bytes = m["fp8"] + 2 * (m["params"] - m["fp8"])
            stream_tensors, expert_bytes, n_expert = m["n"] + m["n_fp8"], m["expert"], 2 * m["n_expert"]
        main_bytes, expert_bytes, n_expert = stream_bytes * main_share, expert_bytes * main_share, n_expert * main_share
        n_dense = stream_tensors * main_share - n_expert
        # the smallest engine whose weights take at most ~55% of 80 GB (KV cache and activations need the rest)
        g_r = GPUS_PER_NODE
        while main_bytes / g_r > 0.55 * GPU_GB * 1e9:
            g_r *= 2
        engine = f"TP8 x EP{g_r} ({g_r // GPUS_PER_NODE} nodes)"
        # A (the code today): iter_full_state broadcasts every full tensor to all ranks and every vLLM rank
        # is handed the whole model, keeping its slice. At best (NCCL rings, one NIC per channel) a node
        # takes the model in over its 8 NICs (400 GB/s) and every GPU receives all of it over NVLink.
        wire = stream_bytes / 1e9 / min(NVLINK_GBPS, IB_GBPS * GPUS_PER_NODE)
        lat = stream_tensors * COLLECTIVE_LATENCY_S
        vllm = stream_tensors * c_tensor
        hbm = 2 * stream_bytes / 1e9 / HBM_GBPS
        _row(fmt, engine, "A: today", stream_bytes, stream_tensors, wire, lat, vllm, hbm)
        # B (targeted): each GPU receives only its rollout shard: attention/dense TP8-sharded, experts
        # EP-sharded over the engine; sources are spread over all 16 pipeline stages (other nodes), so
        # ~all of it crosses IB, balanced: every GPU also sends as much as it receives.
        shard = (main_bytes - expert_bytes) / GPUS_PER_NODE + expert_bytes / g_r
        n_shard = n_dense + n_expert / g_r  # a slice of every dense tensor, whole tensors of its experts
        # what a GPU already holds (its stage's 1/16 of the layers, 4 of the 256/g_r experts it serves),
        # if training and rollout ranks are aligned: a device-local copy, no wire
        local = expert_bytes / g_r * (1 / 16) * (4 / (256 / g_r))
        wire_b = (shard - local) / 1e9 / IB_GBPS
        lat_b = shard / BUCKET_BYTES * COLLECTIVE_LATENCY_S  # one all-to-all per bucket
        _row(fmt, engine, "B: shards", shard, n_shard, wire_b, lat_b, n_shard * c_tensor, 2 * shard / 1e9 / HBM_GBPS)
        print(f"{'':<6} sleep level 1 (weights to host and back over PCIe) would add 2 x {shard / 1e9:.0f} GB / "
              f"{PCIE_GBPS:g} GB/s = {2 * shard / 1e9 / PCIE_GBPS:.1f} s per step; level 2 (drop them: the sync "
              f"overwrites them anyway) adds nothing")


def _row(fmt, engine, path, nbytes, ntensors, wire, lat, vllm, hbm) -> None:
    total = wire + lat + vllm + hbm
    print(f"{fmt:<6} {engine:<22} {path:<10} {nbytes / 1e9:>9.1f} {ntensors:>11.0f} {wire:>7.1f} {lat:>9.1f} "
          f"{vllm:>7.1f} {hbm:>6.2f} {total:>8.1f} {nbytes / 1e9 / total:>8.1f}")


if __name__ == "__main__":
    main()
