"""Time RolloutEngine.update_weights (trainer -> vLLM hot-swap) on tiny models.

Prints, per model and bucket cap: bytes pushed, buckets, seconds, bytes/s, the cost
per tensor, and the peak host memory the push added (VmHWM reset before each push).
The producer clones each tensor when vLLM pulls it, as a gather or a dequantisation
would, so the peak shows what one push holds at once: up to a bucket of produced
tensors plus the layer vLLM has materialised but not finished.

    python benchmarks/weight_sync.py                       # tiny DeepSeek-V3, Qwen2, wider Qwen2
    python benchmarks/weight_sync.py --kinds qwen2 --bucket-mb 1 16 --repeats 5

Timings on a shared 2-core machine are noisy: the best of --repeats is shown.
The tiny models are overhead-bound (hundreds of small tensors, a re-layout per layer);
bytes/s on the 190 MB model is closer to the per-byte cost a large model would see.
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

    print(f"\n{'model':<12} {'MB':>8} {'cap MB':>8} {'buckets':>8} {'tensors':>8} {'s':>8} "
          f"{'MB/s':>9} {'us/tensor':>10} {'ns/byte':>8} {'peak+MB':>8}")
    for name, mb, s, peak in rows:
        print(f"{name:<12} {s.bytes / 2**20:>8.1f} {mb:>8g} {s.num_buckets:>8} {s.num_tensors:>8} "
              f"{s.seconds:>8.3f} {s.bytes_per_s / 2**20:>9.1f} {1e6 * s.seconds / s.num_tensors:>10.0f} "
              f"{1e9 * s.seconds / s.bytes:>8.2f} {peak:>8.1f}")


if __name__ == "__main__":
    main()
