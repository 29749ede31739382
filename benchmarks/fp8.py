"""FP8 training against bf16 on the tiny MoE: the final-loss gap, each layer's error, the dispatch bytes.

    nice python benchmarks/fp8.py                     # tiny-moe, 250 steps × 8 × 64 tokens, both runs (~10 min here)
    nice python benchmarks/fp8.py --steps 50          # a quick look

What runs: the project's own runtime on one rank (`build_parallel_model`, ZeRO-1 AdamW with float32
masters, `train_step`), params in bfloat16, twice from the same seed on the same batches: once with
`train.fp8=none` (bf16 GEMMs) and once with `train.fp8=blockwise` + `moe.dispatch_dtype=fp8` (every
MLA projection, dense MLP and expert GEMM on 1×128 / 128×128 block-scaled E4M3 operands, dispatched
tokens in FP8; embedding, head, router, norms in bf16 / float32). On a CPU the FP8 GEMMs are the
reference backend (float32 products of dequantised codes): FP8 numerics, not FP8 speed.

Data: the synthetic arithmetic pretraining corpus (data/arith.py, R1-Zero template) as UTF-8 bytes
(vocab 512 ⊇ 256 bytes), packed into rows of --seq tokens, the same rows in the same order for both runs.

Reported: the mean loss of the last 20 steps of each run and their relative gap (DeepSeek-V3 reports
< 0.25% at scale); each decoder layer's output error of the FP8 forward against the bf16 forward, both
from the FINAL bf16 weights on a held-out batch (‖h_fp8 − h_bf16‖ / ‖h_bf16‖, and the same for bf16
against float32, the floor any low-precision run sits on); and the dispatch all-to-all's bytes per
token from the tensors the FP8 dispatch actually builds (codes + float32 scales) against bf16.
"""
from __future__ import annotations

import argparse
import time

import torch

from megatron_r1.config import load_config
from megatron_r1.data.arith import DIFFICULTY, build_corpus
from megatron_r1.data.templates import R1_ZERO_TEMPLATE
from megatron_r1.engine.runtime import build_optimizer, build_parallel_model
from megatron_r1.engine.runtime import train_step
from megatron_r1.kernels.fp8 import FP8Use, dispatch_bytes_per_token, dispatch_quantize
from megatron_r1.model.gpt import CausalLM, lm_loss
from megatron_r1.parallel.mesh import ParallelMesh


def byte_rows(n_rows: int, seq: int, seed: int) -> torch.Tensor:
    """[n_rows, seq] token ids: the arithmetic corpus as bytes, documents separated by a newline."""
    docs, text = 0, b""
    while len(text) < n_rows * seq:
        text += "\n".join(build_corpus(500, R1_ZERO_TEMPLATE, seed + docs, DIFFICULTY[1])).encode() + b"\n"
        docs += 1
    return torch.tensor(list(text[:n_rows * seq]), dtype=torch.long).view(n_rows, seq)


def config(fp8: bool, a):
    return load_config(a.preset, ["train.params_dtype=bfloat16", f"train.lr={a.lr}", "train.lr_warmup_steps=0",
                                  f"train.seed={a.seed}", f"train.fp8={'blockwise' if fp8 else 'none'}",
                                  f"moe.dispatch_dtype={'fp8' if fp8 else 'bf16'}"])


def train(fp8: bool, rows: torch.Tensor, a) -> tuple[list[float], list]:
    cfg = config(fp8, a)
    mesh = ParallelMesh.single()
    chunks = build_parallel_model(cfg, mesh)
    opt = build_optimizer(chunks, cfg, mesh)
    losses, t0 = [], time.perf_counter()
    for step in range(a.steps):
        batch = rows[step * a.batch:(step + 1) * a.batch]
        n = float(batch[:, 1:].numel())

        def loss_fn(out, mb):
            return lm_loss(out, mb["input_ids"], None, cfg.model, mesh, n)
        m = train_step(chunks, opt, [{"input_ids": batch}], loss_fn, mesh)
        losses.append(m["loss"])
        if step % 50 == 0 or step == a.steps - 1:
            print(f"  {'fp8 ' if fp8 else 'bf16'} step {step:4d} loss {m['loss']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return losses, chunks


def layer_outputs(model: CausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o.detach().float()))
             for layer in model.model.layers.values()]
    with torch.no_grad():
        model(ids, with_mtp=False)
    for h in hooks:
        h.remove()
    return outs[:model.cfg.num_hidden_layers]


def per_layer_errors(weights: CausalLM, ids: torch.Tensor, a) -> list[tuple[float, float]]:
    """Per decoder layer: (FP8 vs bf16, bf16 vs float32) relative error of its output, from `weights`."""
    cfg8 = config(True, a)
    state = weights.state_dict()
    runs = {}
    for name, fp8, dtype in (("fp8", FP8Use.from_config(cfg8), torch.bfloat16), ("bf16", FP8Use(), torch.bfloat16),
                             ("fp32", FP8Use(), torch.float32)):
        m = CausalLM(cfg8.model, fp8=fp8).to(dtype)
        m.load_state_dict(state)
        runs[name] = layer_outputs(m.eval(), ids)
    rel = lambda x, y: ((x - y).norm() / y.norm()).item()  # noqa: E731
    return [(rel(f, b), rel(b, r)) for f, b, r in zip(runs["fp8"], runs["bf16"], runs["fp32"])]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16-only", action="store_true",
                    help="only the bf16 run (with another --seed: the bf16-vs-bf16 spread the FP8 gap compares to)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = byte_rows(a.steps * a.batch + a.batch, a.seq, 1234)  # the data never depends on --seed
    held_out = rows[-a.batch:]
    print(f"{a.preset}: {a.steps} steps × {a.batch} × {a.seq} byte tokens, params bf16, lr {a.lr:g}, seed {a.seed}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    t0 = time.perf_counter()
    bf16, chunks = train(False, rows, a)
    k = min(20, a.steps)
    if a.bf16_only:
        print(f"\nbf16 seed {a.seed}: final loss (mean of last {k}) {sum(bf16[-k:]) / k:.4f}")
        return
    fp8, _ = train(True, rows, a)
    lb, lf = sum(bf16[-k:]) / k, sum(fp8[-k:]) / k
    print(f"\n| run | first loss | final loss (mean of last {k}) |\n|---|---|---|")
    print(f"| bf16 | {bf16[0]:.4f} | {lb:.4f} |\n| FP8 blockwise + FP8 dispatch | {fp8[0]:.4f} | {lf:.4f} |")
    print(f"\nrelative gap of the final loss: (fp8 − bf16) / bf16 = {(lf - lb) / lb:+.3%}")

    print("\n| layer | FP8 vs bf16 | bf16 vs float32 |\n|---|---|---|")
    for i, (e8, e16) in enumerate(per_layer_errors(chunks[0], held_out, a)):
        print(f"| {i} | {e8:.2%} | {e16:.2%} |")

    cfg = config(True, a)
    h = cfg.model.hidden_size
    codes, scales = dispatch_quantize(torch.randn(a.batch * a.seq, h, dtype=torch.bfloat16))
    sent = (codes.numel() * codes.element_size() + scales.numel() * scales.element_size()) / codes.shape[0]
    print("\n| dispatch bytes per token copy | bf16 | fp8 (codes + scales) | ratio |\n|---|---|---|---|")
    print(f"| {a.preset} (h = {h}), from the tensors sent | {2 * h} | {sent:g} | {sent / (2 * h):.3f} |")
    print(f"| DeepSeek-V3 (h = 7168), formula | {dispatch_bytes_per_token(7168, 'bf16'):g} | "
          f"{dispatch_bytes_per_token(7168, 'fp8'):g} | "
          f"{dispatch_bytes_per_token(7168, 'fp8') / dispatch_bytes_per_token(7168, 'bf16'):.3f} |")
    assert sent == dispatch_bytes_per_token(h, "fp8")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
