"""First measurements on a new GPU: what the kernels and the runtime reach, in one JSON.

    python benchmarks/gpu_first_look.py                       # the real sizes, on cuda:0
    python benchmarks/gpu_first_look.py --smoke               # every section at toy sizes (CPU: < 2 min)
    python benchmarks/gpu_first_look.py --sections gemm,experts --budget-scale 2 --out runs/gpu.json

Sections, each with a wall-clock budget (cases after the budget is spent are recorded as skipped),
each written to the JSON as soon as it finishes (a crash keeps the sections before it):
  gemm       bf16 GEMM TFLOP/s at square sizes; FP8 (torch._scaled_mm, e4m3, tensor-wise scales) where
             the device supports it. The bf16 ceiling is the MFU denominator when the device's peak is
             not in PEAK_BF16.
  experts    the routed-expert SwiGLU (forward + backward) with the `loop` and `grouped` kernels
             (kernels/), DeepSeek-V3 widths H 7168, F 2048, 4 / 8 / 16 / 32 local experts, balanced
             and skewed routing (half the rows to one expert, one expert empty).
  attention  the attention backends (kernels/: torch = is_causal SDPA, dense_mask, a cp2 rank's query
             chunks over a key prefix, flex and te when available) at MLA's head dims (Dqk 192, Dv 128),
             16 heads (128 / tp 8), S 4096 and 16384, forward + backward.
  slice      a DeepSeek-V3-width slice (1 dense + 1 MoE layer, 32 experts top-8, S 4096, bf16) through
             our runtime (build_parallel_model, DistributedAdamW, train_step) on one device: step time,
             model FLOPs utilisation (6·activated params·tokens + causal attention, over the peak) and
             peak memory.
  fp8        block-scaled FP8 (DeepSeek-V3: 1×128 activation tiles, 128×128 weight blocks, E4M3) side by side
             with bf16: the GEMM alone (torch's F.scaled_mm block-wise, Hopper), the linear forward + backward
             (3 GEMMs) and the experts' grouped GEMM per backend of the registry: `reference` (float32
             products of dequantised codes, runs anywhere), `te` (Transformer Engine Float8BlockScaling,
             when importable on Hopper), against the bf16 F.linear / grouped GEMM; sizes 4096, 8192 and
             DeepSeek-V3's expert shape (H 7168, F 2048, 8 local experts).
  weight_sync the trainer side of the weight sync: full tensors streamed by iter_full_state, named by
             ckpt/hf.py, bucketed (rollout/engine.iter_buckets) and cloned as a consumer would: GB/s.
Every case records its shapes, dtype, device and the error text if it failed; nothing is extrapolated.
The JSON file holds {"runs": [...]}; each invocation appends one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12, "A800": 312e12}
SECTIONS = ("gemm", "experts", "attention", "slice", "weight_sync", "fp8")
BUDGET_S = {"gemm": 60, "experts": 120, "attention": 120, "slice": 180, "weight_sync": 60, "fp8": 120}


# ----------------------------------------------------------------------------------------- helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, warmup: int, reps: int) -> float:
    """Median seconds of fn() over reps, after warmup calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


class Section:
    """Runs cases until the budget is spent; each case's result (or error) is recorded."""

    def __init__(self, name: str, budget: float):
        self.name, self.budget, self.start = name, budget, time.perf_counter()
        self.cases: list[dict] = []

    def case(self, desc: dict, fn):
        if time.perf_counter() - self.start > self.budget:
            self.cases.append({**desc, "status": "skipped", "reason": f"section budget {self.budget:.0f}s spent"})
            return
        try:
            self.cases.append({**desc, "status": "ok", **fn()})
        except Exception as e:  # a failing case is a result too (e.g. a kernel a device lacks)
            self.cases.append({**desc, "status": "error", "error": f"{type(e).__name__}: {e}"[:500]})
        print(f"  {self.name}: {self.cases[-1]}", flush=True)

    def skip(self, desc: dict, reason: str):
        self.cases.append({**desc, "status": "skipped", "reason": reason})
        print(f"  {self.name}: {self.cases[-1]}", flush=True)

    def result(self) -> dict:
        return {"budget_s": self.budget, "elapsed_s": round(time.perf_counter() - self.start, 2), "cases": self.cases}


# ------------------------------------------------------------------------------------------- gemm
def section_gemm(sec: Section, dev, smoke: bool, reps):
    sizes = [128, 256] if smoke else [4096, 8192, 16384]
    for n in sizes:
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        sec.case({"kind": "bf16", "m": n, "n": n, "k": n},
                 lambda: _tflops(2 * n ** 3, timeit(lambda: a @ b, dev, *reps)))
    for n in sizes:
        def fp8():
            a8 = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
            b8 = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
            one = torch.ones((), device=dev)
            return _tflops(2 * n ** 3, timeit(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16),
                                              dev, *reps))
        sec.case({"kind": "fp8_e4m3_tensorwise", "m": n, "n": n, "k": n}, fp8)


def _tflops(flops: float, s: float) -> dict:
    return {"seconds": s, "tflops": flops / s / 1e12}


# ---------------------------------------------------------------------------------------- experts
def section_experts(sec: Section, dev, smoke: bool, reps):
    from megatron_r1 import kernels
    from megatron_r1.model.experts import GroupedExperts
    h, f = (64, 32) if smoke else (7168, 2048)
    rows_per_expert = 16 if smoke else 2048
    for n_local in ((4, 8) if smoke else (4, 8, 16, 32)):
        total = rows_per_expert * n_local
        balanced = [rows_per_expert] * n_local
        skewed = [total // 2] + [0] + [0] * (n_local - 2)
        rest = total - total // 2
        for i in range(2, n_local):
            skewed[i] = rest // (n_local - 2) + (1 if i - 2 < rest % (n_local - 2) else 0)
        with torch.device(dev):  # the model's stacked storage: both kernels read it in place
            ex = GroupedExperts(h, f, list(range(n_local)), out_std=0.02).to(torch.bfloat16)
        for routing, counts in (("balanced", balanced), ("skewed", skewed)):
            x = torch.randn(total, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
            c = torch.tensor(counts, device=dev)
            for backend in ("loop", "grouped"):
                def run(backend=backend, x=x, c=c, counts=counts):
                    fn = kernels.get_kernel("experts", backend)

                    def step():
                        y = fn(x, c, ex, counts)
                        y.backward(torch.ones_like(y))
                    s = timeit(step, dev, *reps)
                    return _tflops(3 * 2 * 3 * total * h * f, s)  # 3 GEMMs, forward + 2× backward
                sec.case({"backend": backend, "routing": routing, "local_experts": n_local, "rows": total,
                          "h": h, "f": f, "dtype": "bf16"}, run)


# -------------------------------------------------------------------------------------- attention
def section_attention(sec: Section, dev, smoke: bool, reps):
    from megatron_r1 import kernels
    n, dqk, dv = (2, 24, 16) if smoke else (16, 192, 128)
    for s in ((64, 128) if smoke else (4096, 16384)):
        q, k, v = (torch.randn(1, n, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for d in (dqk, dqk, dv))
        c = s // 4  # cp2, rank 0: query chunks 0 and 3 of 4
        variants = [(b, None, s) for b in ("torch", "dense_mask", "flex", "te")]
        variants += [("torch", ((0, c), (3 * c, c)), 2 * c)]
        for backend, chunks, sq in variants:
            if backend not in kernels.backends("attention") and backend != "dense_mask":
                sec.skip({"backend": backend, "s": s}, "not available here (flex: CUDA only; te: needs "
                                                       "Transformer Engine on CUDA)")
                continue

            def run(backend=backend, chunks=chunks, sq=sq):
                fn = kernels.get_kernel("attention", backend)
                qq = q[:, :, :sq].detach().requires_grad_()

                def step():
                    o = fn(qq, k, v, dqk ** -0.5, chunks)
                    o.backward(torch.ones_like(o))
                sec_s = timeit(step, dev, *reps)
                # causal FLOPs actually needed: each query row sees its prefix; fwd QKᵀ + PV, bwd 2× fwd
                rows = [(off + i + 1) for off, m in (chunks or ((0, s),)) for i in range(m)]
                return _tflops(3 * 2 * n * sum(rows) * (dqk + dv), sec_s)
            sec.case({"backend": backend, "s": s, "query_rows": sq, "cp_chunks": chunks, "heads": n,
                      "dqk": dqk, "dv": dv, "dtype": "bf16"}, run)


# -------------------------------------------------------------------------------------------- fp8
def section_fp8(sec: Section, dev, smoke: bool, reps):
    from megatron_r1 import kernels
    from megatron_r1.kernels import _GroupedMM
    from megatron_r1.kernels.fp8 import quantize_blocks
    avail = {name: kernels.backends(name) for name in ("fp8_linear", "fp8_grouped_mm")}
    why_te = "Transformer Engine with Float8BlockScaling on a Hopper GPU is not available here"
    for n in ((128, 256) if smoke else (4096, 8192)):
        shape = {"m": n, "n": n, "k": n}
        x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, n, device=dev, dtype=torch.bfloat16) * 0.02
        sec.case({"what": "gemm", "backend": "bf16", **shape},
                 lambda: _tflops(2 * n ** 3, timeit(lambda: x @ w.t(), dev, *reps)))
        if dev.type != "cuda":
            sec.skip({"what": "gemm", "backend": "torch_scaled_mm_blockwise", **shape},
                     "F.scaled_mm block-wise scales need CUDA (the CPU kernel does tensor- and row-wise only)")
        else:
            def blockwise():
                xq, xs = quantize_blocks(x, (1, 128))
                wq, ws = quantize_blocks(w, (128, 128))
                xs = xs.t().contiguous().t()  # activation scales token-major, as cuBLASLt wants

                def mm():
                    return F.scaled_mm(xq, wq.t(), xs, F.ScalingType.BlockWise1x128, ws.t(),
                                       F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
                return _tflops(2 * n ** 3, timeit(mm, dev, *reps))
            sec.case({"what": "gemm", "backend": "torch_scaled_mm_blockwise", **shape}, blockwise)
        for backend in ("bf16", "reference", "te"):
            if backend != "bf16" and backend not in avail["fp8_linear"]:
                sec.skip({"what": "linear_fwd_bwd", "backend": backend, **shape}, why_te)
                continue

            def linear(backend=backend):
                fn = F.linear if backend == "bf16" else kernels.get_kernel("fp8_linear", backend)
                xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()

                def step():
                    y = fn(xx, ww)
                    y.backward(torch.ones_like(y))
                return _tflops(3 * 2 * n ** 3, timeit(step, dev, *reps))  # Fprop, Dgrad, Wgrad
            sec.case({"what": "linear_fwd_bwd", "backend": backend, **shape}, linear)
    n_exp, rows, h, f = (4, 64, 128, 128) if smoke else (8, 2048, 7168, 2048)
    x = torch.randn(n_exp * rows, h, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n_exp, f, h, device=dev, dtype=torch.bfloat16) * 0.02  # [L, out, in], the experts' stack
    offs = torch.arange(1, n_exp + 1, device=dev, dtype=torch.int32) * rows
    for backend in ("bf16", "reference", "te"):
        desc = {"what": "grouped_fwd_bwd", "backend": backend, "experts": n_exp, "rows_per_expert": rows, "h": h,
                "f": f}
        if backend != "bf16" and backend not in avail["fp8_grouped_mm"]:
            sec.skip(desc, why_te)
            continue

        def grouped(backend=backend):
            fn = _GroupedMM.apply if backend == "bf16" else kernels.get_kernel("fp8_grouped_mm", backend)
            xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()

            def step():
                y = fn(xx, ww, offs)
                y.backward(torch.ones_like(y))
            return _tflops(3 * 2 * n_exp * rows * h * f, timeit(step, dev, *reps))
        sec.case(desc, grouped)


# ------------------------------------------------------------------------------------------- slice
def slice_config(smoke: bool):
    from megatron_r1.config import load_config
    over = ["model.num_hidden_layers=2", "model.first_k_dense_replace=1", "model.n_routed_experts=32",
            "model.num_experts_per_tok=8", "model.num_nextn_predict_layers=0", "train.params_dtype=bfloat16"]
    if smoke:
        over += ["model.hidden_size=64", "model.intermediate_size=128", "model.moe_intermediate_size=32",
                 "model.num_attention_heads=4", "model.q_lora_rank=32", "model.kv_lora_rank=64",
                 "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=16", "model.v_head_dim=16",
                 "model.vocab_size=512", "model.rope_scaling=null"]
    return load_config("deepseek-v3-671b", over), (64 if smoke else 4096)


def section_slice(sec: Section, dev, smoke: bool, reps, peak: float | None):
    from megatron_r1.model.gpt import lm_loss
    from megatron_r1.parallel.mesh import ParallelMesh
    from megatron_r1.engine.runtime import build_optimizer, build_parallel_model, train_step
    cfg, s = slice_config(smoke)
    m = cfg.model

    def run():
        mesh = ParallelMesh.single(device=dev)
        chunks = build_parallel_model(cfg, mesh)  # built on meta, materialised on the device
        opt = build_optimizer(chunks, cfg, mesh)
        ids = torch.randint(0, m.vocab_size, (1, s), device=dev)
        mb = [{"input_ids": ids}]

        def loss_fn(out, batch):
            return lm_loss(out, batch["input_ids"], None, m, mesh, float(s - 1))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sec_s = timeit(lambda: train_step(chunks, opt, mb, loss_fn, mesh), dev, *((0, 1) if smoke else reps))
        active = m.num_parameters()["activated"]  # weights a token multiplies with (head in, embedding out)
        flops = 6 * active * s + 3 * 2 * m.num_attention_heads * (s * (s + 1) / 2) * (m.qk_head_dim + m.v_head_dim) \
            * m.num_hidden_layers
        out = {"seconds_per_step": sec_s, "tokens": s, "model_tflops_per_step": flops / 1e12,
               "achieved_tflops": flops / sec_s / 1e12, "activated_params": active}
        if peak:
            out["mfu"] = flops / sec_s / peak
            out["peak_flops"] = peak
        if dev.type == "cuda":
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
        return out
    sec.case({"layers": "1 dense + 1 MoE", "experts": m.n_routed_experts, "top_k": m.num_experts_per_tok,
              "hidden": m.hidden_size, "seq": s, "dtype": "bf16"}, run)


# ------------------------------------------------------------------------------------- weight sync
def section_weight_sync(sec: Section, dev, smoke: bool, reps):
    from megatron_r1.ckpt.hf import hf_names
    from megatron_r1.parallel.mesh import ParallelMesh
    from megatron_r1.engine.runtime import build_parallel_model, iter_full_state
    from megatron_r1.rollout.engine import iter_buckets
    cfg, _ = slice_config(smoke)
    mesh = ParallelMesh.single(device=dev)
    chunks = build_parallel_model(cfg, mesh)
    for bucket_mb in ((1, 16) if smoke else (128, 512)):
        def run(bucket_mb=bucket_mb):
            moved = [0, 0]

            def produce():
                named = ((hf, t) for name, t in iter_full_state(chunks, mesh) for hf in hf_names(name, cfg.model))
                for bucket in iter_buckets(named, bucket_mb << 20):
                    for _, t in bucket:
                        moved[0] += t.clone().numel() * t.element_size()
                    moved[1] += 1
            sec_s = timeit(produce, dev, 0, 1)
            return {"seconds": sec_s, "gb": moved[0] / 1e9, "gb_per_s": moved[0] / sec_s / 1e9, "buckets": moved[1]}
        sec.case({"bucket_mb": bucket_mb, "dtype": "bf16", "layout": "one rank"}, run)


# -------------------------------------------------------------------------------------------- main
def device_info(dev) -> dict:
    info = {"device": str(dev), "torch": torch.__version__, "host": platform.node(), "cpu": platform.processor()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(name=p.name, memory_gb=p.total_memory / 1e9, capability=f"{p.major}.{p.minor}")
    else:
        info.update(name=f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    return info


def write(path: str, run: dict, first: bool) -> None:
    data = {"runs": []}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    if first:
        data["runs"].append(run)
    else:
        data["runs"][-1] = run
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes, every section (CPU: < 2 min)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--out", default="runs/gpu_first_look.json")
    ap.add_argument("--device", default=None, help="default cuda:0 if available, else cpu")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's budget")
    a = ap.parse_args(argv)
    sections = [s for s in a.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"error: unknown section(s) {', '.join(bad)}; expected some of {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    dev = torch.device(a.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    reps = (1, 2) if a.smoke else (2, 5)
    info = device_info(dev)
    peak = next((v for k, v in PEAK_BF16.items() if k in info.get("name", "")), None)
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "smoke": a.smoke, "info": info,
           "sections": {}}
    write(a.out, run, first=True)
    print(f"gpu_first_look on {info['name']} -> {a.out}", flush=True)
    for name in sections:
        budget = BUDGET_S[name] * a.budget_scale * (0.25 if a.smoke else 1)
        sec = Section(name, budget)
        try:
            if name == "slice":
                section_slice(sec, dev, a.smoke, reps, peak or _gemm_ceiling(run))
            else:
                globals()[f"section_{name}"](sec, dev, a.smoke, reps)
        except Exception:
            sec.cases.append({"status": "error", "error": traceback.format_exc()[-800:]})
        run["sections"][name] = sec.result()
        write(a.out, run, first=False)
    print(f"done: {a.out}")
    return 0


def _gemm_ceiling(run: dict) -> float | None:
    """Best measured bf16 GEMM FLOP/s of this run, when the device's peak is not known."""
    cases = run["sections"].get("gemm", {}).get("cases", [])
    best = [c["tflops"] for c in cases if c.get("kind") == "bf16" and c.get("status") == "ok"]
    return max(best) * 1e12 if best else None


if __name__ == "__main__":
    sys.exit(main())
