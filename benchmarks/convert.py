"""Checkpoint conversion at scale: peak anonymous memory, throughput, and the 671B extrapolation.

Builds a synthetic DeepSeek-V3 *release-layout* FP8 checkpoint of a given size (DeepSeek-V3 names:
per-expert tensors, e4m3 weights with 128×128 `weight_scale_inv`, bf16 embeddings/norms/head, a
float32 router bias, an index over ~100 MB shards, the MTP layer `model.layers.{L}` with its own
copies of the embedding and head), then converts it with tools/convert_checkpoint.py

    hf (FP8) -> megatron_r1 (bf16)        and back        megatron_r1 -> hf (bf16)

in a subprocess whose RssAnon (summed over the converter and its workers) is sampled from
/proc every 0.1 s, as in issue 19. The interpreter's own share is the peak of the same command on a
tiny checkpoint (same imports, a few MB of tensors); "above interp." is the peak minus that.

    python benchmarks/convert.py                        # ~1 GB, --workers 1 and 2
    python benchmarks/convert.py --gb 2 --workers 1     # the doubled checkpoint
    python benchmarks/convert.py --gb 1 2 --workers 1 2 --repeats 3 --json runs/convert_bench.json

Everything is written under --dir (default: a fresh temporary directory, removed at the end).
Timings on a shared machine are noisy (the shortest of --repeats is shown, with every wall time);
the memory peaks and the CPU seconds are not. The 671B extrapolation uses CPU seconds per byte.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

# DeepSeek-V3's architecture (MLA, 1 shared + routed experts, first layer dense, MTP depth 1) at a
# width where one MoE layer is ~100 MB of FP8 weights; the layer count sets the size.
SYNTH = dict(model_type="deepseek_v3", vocab_size=32768, hidden_size=1024, intermediate_size=2816,
             num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=512,
             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=1,
             num_experts_per_tok=8, moe_intermediate_size=512, n_group=8, topk_group=4,
             routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True, scoring_func="sigmoid",
             topk_method="noaux_tc", num_nextn_predict_layers=1, max_position_embeddings=4096,
             rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


# the same architecture at test width: the converter's fixed cost (interpreter, torch, imports)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=32, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, n_group=4, topk_group=2)


def synth_config(layers: int, tiny: bool = False) -> dict:
    return dict(SYNTH, num_hidden_layers=layers, **(TINY if tiny else {}))


def release_tensors(hf_cfg: dict):
    """(hf name, shape, kind) of a DeepSeek release for `hf_cfg`: kind fp8 (plus a scale), bf16 or f32."""
    from megatron_r1.ckpt.convert import expected_tensors
    from megatron_r1.ckpt.hf import _fp8_eligible, hf_names
    from megatron_r1.config import ModelConfig
    import torch
    cfg = ModelConfig.from_hf_dict(hf_cfg)
    for name, (shape, dtype) in expected_tensors(cfg).items():
        for hf in hf_names(name, cfg):
            probe = torch.empty(shape, device="meta")
            kind = "fp8" if _fp8_eligible(hf, probe) else ("f32" if dtype == torch.float32 and
                                                             "e_score_correction_bias" in hf else "bf16")
            yield hf, shape, kind


def release_bytes(hf_cfg: dict) -> tuple[int, int]:
    """(bytes of the FP8 release, bytes of the same model in bf16) for `hf_cfg`, from shapes only."""
    fp8 = bf16 = 0
    for _, shape, kind in release_tensors(hf_cfg):
        n = 1
        for s in shape:
            n *= s
        if kind == "fp8":
            fp8 += n + 4 * (-(-shape[0] // 128)) * (-(-shape[1] // 128))
        else:
            fp8 += n * (4 if kind == "f32" else 2)
        bf16 += n * (4 if kind == "f32" else 2)
    return fp8, bf16


def make_release(out: str, gb: float, shard_mb: float = 100.0, seed: int = 0, tiny: bool = False) -> dict:
    """Write a synthetic FP8 release of about `gb` GB (decimal) under `out` (`tiny`: 4 layers at test
    width, whatever `gb`); returns facts about it."""
    import torch
    from safetensors.torch import save_file
    if tiny:
        layers = 4
    else:
        per_layer = release_bytes(synth_config(3))[0] - release_bytes(synth_config(2))[0]
        base = release_bytes(synth_config(2))[0] - 2 * per_layer
        layers = max(2, round((gb * 1e9 - base) / per_layer))
    hf_cfg = synth_config(layers, tiny)
    hf_cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    os.makedirs(out)
    json.dump(hf_cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    g = torch.Generator().manual_seed(seed)
    # random finite e4m3 bytes (0x7f/0xff are NaN), cut from one 64 MB pool at random offsets: the
    # converter's speed does not depend on the values, and drawing 1e9 random bytes would take minutes
    pool = torch.randint(0, 256, (64 << 20,), generator=g, dtype=torch.uint8)
    pool[(pool & 0x7F) == 0x7F] -= 1
    shards: list[dict] = [{}]
    size = [0]
    total = count = 0

    def flush():
        i = len(shards)
        save_file(shards[-1], os.path.join(out, f"part-{i:05d}.safetensors"), metadata={"format": "pt"})
        shards[-1] = {k: None for k in shards[-1]}  # names only from now on

    for name, shape, kind in release_tensors(hf_cfg):
        if kind == "fp8":
            # random finite e4m3 bytes (0x7f/0xff are NaN) and positive block scales
            n = shape[0] * shape[1]
            start = int(torch.randint(0, pool.numel() - n + 1, (), generator=g)) if n < pool.numel() else 0
            q = pool[start:start + n].reshape(shape).clone() if n <= pool.numel() else \
                pool.repeat(-(-n // pool.numel()))[:n].reshape(shape)
            s = torch.rand((-(-shape[0] // 128), -(-shape[1] // 128)), generator=g) * 1e-3 + 1e-5
            part = {name: q.view(torch.float8_e4m3fn), name + "_scale_inv": s}
        elif kind == "f32":
            part = {name: torch.rand(shape, generator=g) - 0.5}
        else:
            part = {name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)}
        nbytes = sum(t.numel() * t.element_size() for t in part.values())
        if size[-1] and size[-1] + nbytes > shard_mb * 1e6:
            flush()
            shards.append({})
            size.append(0)
        shards[-1].update(part)
        size[-1] += nbytes
        total += nbytes
        count += len(part)
    flush()
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out, f"part-{i:05d}.safetensors"), os.path.join(out, final))
        weight_map.update({k: final for k in names})
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)
    return {"layers": layers, "bytes": total, "tensors": count, "shards": n}


# ----------------------------------------------------------------------------------- measuring
def _rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; sample RssAnon of it and its descendants every 0.1 s. Peaks in bytes, wall in s."""
    import resource
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_total = peak_one = 0
    while proc.poll() is None:
        pids, todo = [], [proc.pid]
        while todo:
            p = todo.pop()
            pids.append(p)
            todo += _children(p)
        rss = [_rss_anon_kb(p) for p in pids]
        peak_total = max(peak_total, sum(rss))
        peak_one = max(peak_one, max(rss))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the converter and the workers it waited for
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    return {"peak_total": peak_total * 1024, "peak_one": peak_one * 1024, "wall": wall, "cpu": cpu}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def convert_cmd(src: str, dst: str, to: str, workers: int, extra: list[str]) -> list[str]:
    frm = "megatron_r1" if to == "hf" else "hf"
    cmd = [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "--from", frm, "--to", to,
           "--input", src, "--output", dst, "--workers", str(workers), "--no-progress"]
    if to == "megatron_r1":
        cmd += ["--dtype", "bf16"]
    else:
        cmd += ["--max-shard-gb", "0.1"]
    return cmd + extra


def _best(runs: list[dict]) -> dict:
    """Repeats: the highest memory peaks and the shortest wall (the least disturbed by other load)."""
    best = dict(min(runs, key=lambda m: m["wall"]))
    best.update(peak_total=max(m["peak_total"] for m in runs), peak_one=max(m["peak_one"] for m in runs),
                walls=[m["wall"] for m in runs])
    return best


def run_both_ways(work: str, release: str, workers: int, extra: list[str], tag: str,
                  repeats: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ours, back = os.path.join(work, f"ours-{tag}"), os.path.join(work, f"back-{tag}")
    runs_a, runs_b = [], []
    for _ in range(repeats):
        shutil.rmtree(ours, ignore_errors=True)
        shutil.rmtree(back, ignore_errors=True)
        runs_a.append(measure(convert_cmd(release, ours, "megatron_r1", workers, extra), env))
        runs_b.append(measure(convert_cmd(ours, back, "hf", workers, extra), env))
    a, b = _best(runs_a), _best(runs_b)
    a.update(input=dir_bytes(release), output=dir_bytes(ours))
    b.update(input=a["output"], output=dir_bytes(back))
    shutil.rmtree(back)
    shutil.rmtree(ours)
    return {"to_megatron_r1": a, "to_hf": b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, nargs="+", default=[1.0], help="synthetic release sizes (decimal GB)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--extra", default="", help="more converter arguments, e.g. '--budget-mb 32'")
    ap.add_argument("--repeats", type=int, default=1, help="runs per case: the shortest wall and highest peaks count")
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="convert_bench_")
    os.makedirs(work, exist_ok=True)
    extra = args.extra.split()
    results = {"machine": f"{os.cpu_count()} CPUs", "runs": []}
    try:
        tiny = os.path.join(work, "tiny")
        shutil.rmtree(tiny, ignore_errors=True)
        make_release(tiny, 0, shard_mb=1, tiny=True)
        base = run_both_ways(work, tiny, 1, extra, "tiny")
        results["interpreter"] = {d: base[d]["peak_total"] for d in base}
        print(f"interpreter's own (tiny checkpoint, --workers 1): "
              + ", ".join(f"{d} {base[d]['peak_total'] / 1e9:.2f} GB" for d in base))
        print(f"{'release':>8} {'tensors':>7} {'workers':>7} {'direction':>15} {'output':>8} "
              f"{'peak RssAnon':>12} {'above interp.':>13} {'max/process':>11} {'wall':>7} {'GB/s out':>8} "
              f"{'CPU s':>6}  walls")
        for gb in args.gb:
            release = os.path.join(work, f"release-{gb:g}")
            shutil.rmtree(release, ignore_errors=True)
            facts = make_release(release, gb)
            for w in args.workers:
                r = run_both_ways(work, release, w, extra, f"{gb:g}-{w}", args.repeats)
                for d, m in r.items():
                    above = m["peak_one"] - results["interpreter"][d]
                    print(f"{facts['bytes'] / 1e9:7.2f}G {facts['tensors']:7d} {w:7d} {d:>15} "
                          f"{m['output'] / 1e9:7.2f}G {m['peak_total'] / 1e9:11.2f}G {above / 1e9:12.2f}G "
                          f"{m['peak_one'] / 1e9:10.2f}G {m['wall']:6.1f}s {m['output'] / 1e9 / m['wall']:8.3f} "
                          f"{m['cpu']:6.1f}  {' '.join(f'{x:.1f}' for x in m['walls'])}", flush=True)
                    results["runs"].append(dict(release_gb=facts["bytes"] / 1e9, tensors=facts["tensors"],
                                                workers=w, direction=d, above_interpreter=above, **m))
            shutil.rmtree(release)
        extrapolate(results)
    finally:
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            json.dump(results, open(args.json, "w"), indent=2)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def extrapolate(results: dict) -> None:
    """671B: RAM ≤ the parent + N workers, each an interpreter plus the measured bound; hours = output
    bytes / (one worker's measured rate × N), i.e. assuming the disks keep up with N workers."""
    from megatron_r1.config import load_config
    cfg = load_config("deepseek-v3-671b").model
    fp8, bf16 = release_bytes(cfg.to_hf_dict())
    results["671b"] = {"fp8_bytes": fp8, "bf16_bytes": bf16}
    print(f"\nDeepSeek-V3 671B: FP8 release {fp8 / 1e9:.0f} GB, bf16 {bf16 / 1e9:.0f} GB (from the preset's shapes)")
    for d in ("to_megatron_r1", "to_hf"):
        ones = [r for r in results["runs"] if r["workers"] == 1 and r["direction"] == d]
        if not ones:
            continue
        bound = max(r["above_interpreter"] for r in ones)
        # one worker's rate in CPU time (user+sys), the slower size: wall time on a shared machine mostly
        # measures the other load; a worker with a core of its own runs at about this rate
        rate = min(r["output"] / r["cpu"] for r in ones)
        interp = results["interpreter"][d]
        twos = [r for r in results["runs"] if r["workers"] == 2 and r["direction"] == d]
        wall1 = {o["release_gb"]: o["wall"] for o in ones}
        speed = "; --workers 2 vs 1 (wall): " + ", ".join(
            f"{r['release_gb']:.1f} GB {wall1[r['release_gb']] / r['wall']:.2f}x" for r in twos) if twos else ""
        print(f"  {d}: one worker {rate / 1e9:.3f} GB of bf16 output per CPU second, "
              f"{interp / 1e9:.2f} GB interpreter + {bound / 1e9:.2f} GB{speed}")
        for n in (1, 16, 64):
            ram = (n + (n > 1)) * interp + n * bound
            print(f"    {n:3d} workers: RAM <= {ram / 1e9:5.1f} GB, {bf16 / (rate * n) / 3600:6.2f} h")
        results["671b"][d] = {"bound": bound, "rate": rate, "interpreter": interp}
    print("  (hours assume N workers each keep the one-worker CPU rate measured here, i.e. N free cores and "
          "disks that keep up)")


if __name__ == "__main__":
    main()
