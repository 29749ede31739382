"""Weight sync (trainer -> co-located vLLM) on tiny models, measured; DeepSeek-V3 671B, extrapolated.

    python benchmarks/weight_sync.py --json runs/weight_sync.json         # all three parts
    python benchmarks/weight_sync.py --parts 2 3 --repeats 3              # the push and the extrapolation
    python benchmarks/weight_sync.py --parts 2 --layouts ep=2 tp=2,pp=2   # some layouts only

Timings on a shared 2-core machine are noisy: the best of --repeats is shown.

Three parts:
1. vLLM's reload of whole HF tensors alone (RolloutEngine.update_weights, one process), per model and
   bucket cap, with the peak host memory a push adds (VmHWM reset before each push).
2. The sync GRPO runs (rollout/sync.py): the transfer plan built once, then the targeted push, for the
   training -> rollout layouts tp2 -> tp2, ep2 -> tp1, tp2·pp2 -> tp2, ep4 -> tp2, tp2·ep2 -> tp2 (one
   spawned gloo world per (world size, rollout tp), one engine per world, layouts in turn). Per rank:
   the bytes it serves, receives from other ranks, copies from its own shards and sends; messages;
   seconds split into plan lookup, pack, send (batch_isend_irecv and wait), copy into vLLM's parameter
   views and vLLM's per-layer post-processing. A least-squares fit over the rows gives this machine's
   per-message, per-piece, per-module and per-byte costs.
3. DeepSeek-V3 671B, PP16 x EP64 training on 2048 H800 -> rollout engines of TP32·EP32: the broadcast
   path the code had before rollout/sync.py (every rank receives every full tensor) against the targeted
   push, bf16 and FP8, from part 2's host-side costs and published p2p link figures (sources beside
   the constants). See benchmarks/weight_sync.md.
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
    ap.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3])
    ap.add_argument("--layouts", nargs="+", default=None, metavar="LAYOUT",
                    help=f"part 2's training layouts (default all: {', '.join(t for t, _, _ in LAYOUTS)})")
    ap.add_argument("--sync-bucket-mb", type=float, default=0.25,
                    help="part 2's rollout.bucket_mb (small: the tiny models then travel in several buckets)")
    ap.add_argument("--preset", default="tiny-moe", help="part 2's model preset")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write every measured row and the fit here")
    args = ap.parse_args()
    report: dict = {"machine": os.uname().nodename, "cpus": os.cpu_count()}
    if 1 in args.parts:
        report["reload"] = reload_part(args)
    costs = None
    if 2 in args.parts:
        rows = layout_part(args)
        costs = fit_push(rows)
        report["push"], report["push_costs"] = rows, costs
        print(f"fit over these rows (this CPU, gloo): {1e6 * costs['message_s']:.0f} us/message + "
              f"{1e9 * costs['wire_s_per_byte']:.2f} ns/byte on the wire; pack + copy {1e6 * costs['piece_s']:.0f} "
              f"us/piece + {1e9 * costs['copy_s_per_byte']:.2f} ns/byte; vLLM post-processing "
              f"{1e6 * costs['module_s']:.0f} us/module + {1e9 * costs['post_s_per_byte']:.2f} ns/byte")
    if 3 in args.parts:
        report["extrapolation"] = extrapolate(costs)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")


def reload_part(args) -> list[dict]:
    """Part 1: vLLM's reload of whole HF tensors (RolloutEngine.update_weights) alone, one process."""
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

    return [dict(model=name, cap_mb=mb, bytes=s.bytes, tensors=s.num_tensors, buckets=s.num_buckets,
                 seconds=s.seconds, peak_mb=peak) for name, mb, s, peak in rows]


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



# training layout -> rollout tp, grouped by world: one engine per spawned world, layouts in turn
LAYOUTS = [("tp=2", 2, 2), ("ep=2", 2, 1), ("tp=2,pp=2", 4, 2), ("ep=4", 4, 2), ("tp=2,ep=2", 4, 2)]


def _parse_layout(text: str) -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}


def _layout_rank(preset: str, layouts: list[str], rollout_tp: int, root: str, repeats: int,
                 bucket_bytes: int) -> list[dict]:
    import torch
    import torch.distributed as dist

    from megatron_r1.config import load_config
    from megatron_r1.data.tokenizer import write_word_tokenizer
    from megatron_r1.rollout.engine import RolloutEngine
    from megatron_r1.rollout.sync import WeightSync
    from megatron_r1.training import TrainSession

    engine, out = None, []
    for text in layouts:
        cfg = load_config(preset, ["train.params_dtype=float32", f"run_dir={root}/run-{text}"]
                          + [f"parallel.{k}={v}" for k, v in _parse_layout(text).items()])
        session = TrainSession(cfg, logger=False)
        if engine is None:  # initial weights are layout-independent: one export, one engine for every layout
            hf_dir = os.path.join(root, "hf")
            session.export_hf(hf_dir, dtype=torch.float32)
            if dist.get_rank() == 0:
                write_word_tokenizer(cfg.model.vocab_size, hf_dir)
            dist.barrier()
            engine = RolloutEngine(hf_dir, dtype="float32", tensor_parallel_size=rollout_tp, max_model_len=128,
                                   kv_cache_bytes=16 << 20, max_num_seqs=8, verbose=False)
        t0 = time.perf_counter()
        sync = WeightSync(engine, session.chunks, session.mesh, cfg.model, bucket_bytes)
        plan_s = time.perf_counter() - t0
        sync()  # warm-up
        best = None
        for _ in range(repeats):
            dist.barrier()  # start together: the push is collective
            st = sync()
            if best is None or st.seconds["total"] < best.seconds["total"]:
                best = st
        rank = dist.get_rank()
        out.append(dict(layout=text, rollout_tp=rollout_tp, world=dist.get_world_size(), rank=rank,
                        plan_build_s=plan_s, slices=len(sync.plan.slices[rank]),
                        served_bytes=sync.plan.received_bytes(rank, remote_only=False),
                        received=best.received, sent=best.sent, local=best.local, messages=best.messages,
                        buckets=best.buckets, pieces=best.pieces, modules=best.modules, seconds=best.seconds))
        session.close()
    return out


def layout_part(args) -> list[dict]:
    from megatron_r1.parallel.spawn import run_ranks

    cap = int(args.sync_bucket_mb * (1 << 20))
    worlds: dict[tuple[int, int], list[str]] = {}
    for text, world, rtp in LAYOUTS:
        if args.layouts and text not in args.layouts:
            continue
        worlds.setdefault((world, rtp), []).append(text)
    rows = []
    for (world, rtp), layouts in worlds.items():
        with tempfile.TemporaryDirectory(prefix="weight_sync_layout_") as tmp:
            res = run_ranks(_layout_rank, world, args.preset, layouts, rtp, tmp, args.repeats, cap,
                            timeout=1200, start_method="spawn")
        rows += [r for per_rank in res for r in per_rank]
    rows.sort(key=lambda r: ([t for t, _, _ in LAYOUTS].index(r["layout"]), r["rank"]))
    print(f"\n== 2. GRPO's sync (rollout/sync.py push), {args.preset} in float32, cap {args.sync_bucket_mb:g} MB, "
          f"best of {args.repeats} per rank; KiB and ms")
    print(f"{'training -> rollout':<24} {'rank':>4} {'served':>7} {'recv':>7} {'local':>7} {'sent':>7} {'msgs':>5} "
          f"{'plan':>6} {'pack':>6} {'send':>6} {'copy':>6} {'post':>6} {'total':>7}")
    for r in rows:
        s = r["seconds"]
        print(f"{r['layout'] + ' -> tp' + str(r['rollout_tp']):<24} {r['rank']:>4} {r['served_bytes'] >> 10:>7} "
              f"{r['received'] >> 10:>7} {r['local'] >> 10:>7} {r['sent'] >> 10:>7} {r['messages']:>5} "
              + " ".join(f"{1e3 * s[k]:>6.1f}" for k in ("plan", "pack", "send", "copy", "post")) +
              f" {1e3 * s['total']:>7.1f}")
    return rows


def fit_push(rows: list[dict]) -> dict:
    """Per-message, per-piece, per-module and per-byte costs of the push on this machine (least squares over
    ranks and layouts): send = a·messages + b·(bytes sent + received); pack + copy = c·pieces + d·bytes moved;
    post = e·modules + f·bytes served."""
    import torch

    def lsq(cols, y):
        a = torch.tensor(cols, dtype=torch.float64)
        scale = a.abs().amax(0).clamp_min(1)
        c = torch.linalg.lstsq(a / scale, torch.tensor(y, dtype=torch.float64)[:, None]).solution[:, 0] / scale
        return [max(v, 0.0) for v in c.tolist()]

    msg, per_byte = lsq([[r["messages"], r["sent"] + r["received"]] for r in rows], [r["seconds"]["send"] for r in rows])
    piece, copy = lsq([[r["pieces"], r["received"] + r["local"] + r["sent"]] for r in rows],
                      [r["seconds"]["pack"] + r["seconds"]["copy"] for r in rows])
    module, post = lsq([[r["modules"], r["served_bytes"]] for r in rows], [r["seconds"]["post"] for r in rows])
    return dict(message_s=msg, wire_s_per_byte=per_byte, piece_s=piece, copy_s_per_byte=copy, module_s=module,
                post_s_per_byte=post)


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


# Published figures for the targeted push (NCCL/RDMA point-to-point between GPUs of different nodes)
P2P_IB_GBPS = 45.0  # achieved per GPU over one 400 Gb/s CX7: DeepEP on H800 measured 43-58 GB/s RDMA (normal kernels,
#                     EP16-64) and 39-48 GB/s (low-latency, EP32-256), github.com/deepseek-ai/DeepEP docs/legacy.md;
#                     NVIDIA measured ~49 GB/s per GPU NIC<->GPU P2P on DGX H100, mlcommons/inference_results_v3.1
#                     closed/NVIDIA/documentation/start_from_device/dgx-h100.md. 45 GB/s sits inside both.
P2P_MSG_S = 20e-6  # per message (post + completion over IB); DeepEP's low-latency dispatch of a whole EP round
#                    is 77-194 us on H800 (same doc), so 20 us for one rendezvous p2p is on the safe side
ROLLOUT = dict(tp=32, ep=32)  # the rollout layout of the extrapolation: one engine = 4 nodes, attention TP32,
#                               experts EP32 (vLLM enable_expert_parallel; rollout.tp=32 rollout.ep=32)
SYNC_BUCKET = 1 << 30  # rollout.bucket_mb of examples/r1_zero_671b.yaml


def extrapolate(costs: dict | None) -> dict:
    """DeepSeek-V3 671B, PP16 x EP64 training on 2048 H800 -> rollout TP32·EP32 engines: today's broadcast
    (the code before this change) against the targeted push, bf16 and FP8, from measured costs (part 2's
    fit, this CPU) and the published link figures above."""
    m = model_tensors_671b()
    gpus, stages, ep_train = 2048, 16, 64
    tp, ep = ROLLOUT["tp"], ROLLOUT["ep"]
    main_params = m["params"] - m["mtp"]
    main_share = main_params / m["params"]
    print(f"\n== 3. DeepSeek-V3 671B: PP{stages} x EP{ep_train} training on {gpus} H800 -> rollout engines of "
          f"TP{tp}·EP{ep} ({tp // GPUS_PER_NODE} nodes each, {gpus // tp} engines)")
    print(f"model: {m['params'] / 1e9:.1f} B params in {m['n']:.0f} HF tensors incl. MTP; vLLM serves "
          f"{main_params / 1e9:.1f} B (no MTP); routed experts {m['expert'] / 1e9:.1f} B")
    print(f"links: IB p2p {P2P_IB_GBPS:g} GB/s per GPU, {1e6 * P2P_MSG_S:.0f} us per message (published, see "
          f"source); NVLink {NVLINK_GBPS:g} GB/s; HBM {HBM_GBPS:g} GB/s; broadcast latency {1e6 * COLLECTIVE_LATENCY_S:.0f} "
          f"us per tensor (assumed)")
    measured = costs is not None
    costs = costs or dict(piece_s=50e-6, module_s=1e-3, copy_s_per_byte=0.0, post_s_per_byte=0.0)
    print(f"host-side overheads {'measured in part 2' if measured else 'NOT measured (part 2 skipped), assumed'}: "
          f"{1e6 * costs['piece_s']:.0f} us per piece written, {1e6 * costs['module_s']:.0f} us per vLLM module "
          f"post-processed (Python + CPU kernels on this 2-core CPU: upper bounds for a GPU host); bytes at HBM rate")
    print(f"{'weights':<6} {'path':<14} {'GB in/GPU':>9} {'msgs/GPU':>9} {'wire s':>7} {'latency s':>9} "
          f"{'copy s':>7} {'post s':>7} {'total s':>8}")
    out = []
    for fmt in ("bf16", "fp8"):
        if fmt == "bf16":
            stream_bytes, stream_tensors, expert_bytes = 2 * m["params"], m["n"], 2 * m["expert"]
        else:  # e4m3 linear weights + fp32 128x128 block scales (1/4096 of their bytes, as extra tensors)
            stream_bytes = m["fp8"] * (1 + 4 / 128 ** 2) + 2 * (m["params"] - m["fp8"])
            stream_tensors, expert_bytes = m["n"] + m["n_fp8"], m["expert"] * (1 + 4 / 128 ** 2)
        main_bytes, expert_main = stream_bytes * main_share, expert_bytes * main_share
        n_expert_main = m["n_expert"] * main_share * (2 if fmt == "fp8" else 1)
        n_dense_main = stream_tensors * main_share - n_expert_main
        modules = 12 * 61 + 3  # vLLM modules with weights per GPU: ~12 per decoder layer, embedding, norm, head
        # A: today (before rollout/sync.py): every full tensor broadcast to all 2048 ranks; at best a node takes
        # the model in over its 8 NICs and every GPU gets all of it over NVLink; one collective per tensor
        wire_a = stream_bytes / 1e9 / min(NVLINK_GBPS, IB_GBPS * GPUS_PER_NODE)
        lat_a = stream_tensors * COLLECTIVE_LATENCY_S
        copy_a = 2 * stream_bytes / 1e9 / HBM_GBPS + stream_tensors * costs["piece_s"]
        post_a = 2 * main_bytes / tp / 1e9 / HBM_GBPS + modules * costs["module_s"]  # vLLM keeps its slice
        out.append(_row(fmt, "A: broadcast", stream_bytes, stream_tensors, wire_a, lat_a, copy_a, post_a))
        # B: targeted push: each GPU receives its slice of every dense tensor (/tp) and its ep-share of the experts;
        # peers: the nearest holder of each slice (training stage p holds 1/16 of the layers; dense parts are
        # replicated over the stage's 128 GPUs, so a node-mate or the least-loaded GPU sends them, experts come
        # from the 2 EP ranks per stage holding them) -> ~ (1 + 2) * 16 peers, and one message per bucket
        shard = (main_bytes - expert_main) / tp + expert_main / ep
        local = shard / stages / (gpus // stages // GPUS_PER_NODE)  # same stage and node: a device copy
        peers = 3 * stages
        msgs = peers + shard / SYNC_BUCKET
        wire_b = (shard - local) / 1e9 / P2P_IB_GBPS
        lat_b = msgs * P2P_MSG_S
        pieces = n_dense_main + n_expert_main / ep  # a slice of every dense tensor, whole tensors of its experts
        # pack on the owner and copy into vLLM's views (a read + write each), plus the host-side cost per piece
        copy_b = 2 * 2 * shard / 1e9 / HBM_GBPS + pieces * costs["piece_s"]
        post_b = 2 * shard / 1e9 / HBM_GBPS + modules * costs["module_s"]  # vLLM's per-layer processing
        out.append(_row(fmt, "B: targeted", shard, msgs, wire_b, lat_b, copy_b, post_b))
        sol = shard / 1e9 / (P2P_IB_GBPS / 0.9)  # speed of light: the shard over the NIC's line rate (50 GB/s)
        out[-1]["speed_of_light_s"] = sol
        out[-1]["pieces"] = pieces
        print(f"{'':<6} {'':<14} speed of light: {shard / 1e9:.1f} GB at {P2P_IB_GBPS / 0.9:.0f} GB/s line rate = "
              f"{sol:.2f} s")
    return {"rollout": ROLLOUT, "rows": out}


def _row(fmt, path, nbytes, msgs, wire, lat, copy, post) -> dict:
    total = wire + lat + copy + post
    print(f"{fmt:<6} {path:<14} {nbytes / 1e9:>9.1f} {msgs:>9.0f} {wire:>7.2f} {lat:>9.2f} {copy:>7.2f} {post:>7.2f} "
          f"{total:>8.2f}")
    return dict(weights=fmt, path=path, gb_in_per_gpu=nbytes / 1e9, messages=msgs, wire_s=wire, latency_s=lat,
                copy_s=copy, post_s=post, total_s=total)


if __name__ == "__main__":
    main()
