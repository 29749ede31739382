"""Sharded checkpoints on gloo: exact resume, resharding on load, async save, kill -9 mid-save.

The model is `tiny-moe` (MLA, MoE with the router's expert bias, MTP) in float32, trained with the
runtime's ZeRO-1 AdamW and LM loss. Ranks are forked by megatron_r1/parallel/spawn.py.
"""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from megatron_r1.ckpt.checkpoint import (Checkpointer, latest_checkpoint, list_checkpoints, load_checkpoint,
                                         resolve_checkpoint, save_checkpoint)
from megatron_r1.ckpt.hf import CheckpointError
from megatron_r1.config import load_config
from megatron_r1.model.gpt import lm_loss
from megatron_r1.parallel.mesh import ParallelMesh
from megatron_r1.engine.runtime import build_optimizer, build_parallel_model, forward_only, train_step
from megatron_r1.parallel.spawn import run_ranks
from megatron_r1.parallel.tensor import gather_vocab

SEQ, GLOBAL_BATCH = 16, 4


def make_cfg(**par):
    over = ["train.params_dtype=float32", "train.lr=3e-3", "train.weight_decay=0.01",
            "train.clip_grad=1.0"] + [f"parallel.{k}={v}" for k, v in par.items()]
    return load_config("tiny-moe", over)


def global_batch(gen=None) -> torch.Tensor:
    """[GLOBAL_BATCH, SEQ]; from the global RNGs (torch, numpy, python) unless a generator is given,
    so a resume that forgot an RNG state draws different data."""
    if gen is not None:
        return torch.randint(0, 512, (GLOBAL_BATCH, SEQ), generator=gen)
    ids = torch.randint(0, 512, (GLOBAL_BATCH, SEQ))
    ids = (ids + int(np.random.randint(0, 512)) + random.randrange(512)) % 512
    return ids


def micro_batches(ids, mesh):
    mine = ids.chunk(mesh.dp)[mesh.dp_rank]  # this dp rank's share
    return [{"input_ids": mine[i:i + 1]} for i in range(mine.shape[0])]


def loss_fn(cfg, mesh):
    norm = float(GLOBAL_BATCH * (SEQ - 1))
    return lambda out, mb: lm_loss(out, mb["input_ids"], None, cfg.model, mesh, norm)


def step(chunks, opt, cfg, mesh, ids):
    return train_step(chunks, opt, micro_batches(ids, mesh), loss_fn(cfg, mesh), mesh)["loss"]


def logits(chunks, mesh, ids):
    res = forward_only(chunks, [{"input_ids": ids}], lambda out, mb: gather_vocab(out.logits, mesh), mesh,
                       broadcast=True)
    return res[0]


class Counter:
    """A stand-in LR scheduler: only its state round-trip matters here."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


# ------------------------------------------------------------------------------------ exact resume
def _resume(save_dir, par, n_before, n_after):
    import torch.distributed as dist
    cfg = make_cfg(**par)
    mesh = ParallelMesh.build(cfg.parallel, cfg.model)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    chunks = build_parallel_model(cfg, mesh)
    opt = build_optimizer(chunks, cfg, mesh)
    sched = Counter()
    for _ in range(n_before):
        step(chunks, opt, cfg, mesh, global_batch())
        sched.n += 1
    ck = Checkpointer(save_dir, mesh, keep_last=2)
    ck.save(n_before, chunks, opt, sched, extra={"samples_seen": n_before * GLOBAL_BATCH}, config=cfg)
    straight = [step(chunks, opt, cfg, mesh, global_batch()) for _ in range(n_after)]

    # a fresh process state: other weights, other RNG streams, a new optimizer
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    chunks2 = build_parallel_model(cfg, mesh, seed=77)
    opt2 = build_optimizer(chunks2, cfg, mesh)
    sched2 = Counter()
    state = load_checkpoint(save_dir, chunks2, mesh, opt2, sched2)
    resumed = [step(chunks2, opt2, cfg, mesh, global_batch()) for _ in range(n_after)]
    bias = [b for c in chunks2 for n, b in c.named_buffers() if n.endswith("e_score_correction_bias")]
    dist.barrier()
    return straight, resumed, state["step"], state["extra"], sched2.n, float(sum(b.abs().sum() for b in bias))


def test_exact_resume_bitwise(tmp_path):
    """tp2 (sp) × dp2 with ZeRO-1: save after 2 steps; 2 more steps vs resume + 2: identical losses."""
    out = run_ranks(_resume, 4, str(tmp_path), dict(tp=2, sp=True), 2, 2)
    straight, resumed, step_, extra, sched_n, bias = out[0]
    assert straight == resumed, (straight, resumed)  # bit for bit
    assert step_ == 2 and extra == {"samples_seen": 8} and sched_n == 2
    assert bias > 0  # the router's expert bias moved and was restored (else losses would differ)
    ck = latest_checkpoint(str(tmp_path))
    assert os.path.isfile(os.path.join(ck, "config.yaml"))
    assert load_config(os.path.join(ck, "config.yaml")).parallel.tp == 2
    assert sorted(os.listdir(os.path.join(ck, "rng"))) == [f"rank_{r:05d}.pt" for r in range(4)]


# ----------------------------------------------------------------------------------- resharding
PROBE_SEED = 9


@torch.no_grad()
def perturb(chunks, mesh):
    """Layout-independent non-trivial weights and expert bias (drawn at full shape per name, then sliced)."""
    import zlib
    from megatron_r1.ckpt.hf import model_state
    for c in chunks:
        for name, t in model_state(c).items():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            place = c.placement[name]
            full = torch.randn(place.full_shape(t.shape, mesh), generator=g) * (0.5 if "bias" in name else 0.05)
            t.add_(place.shard(full, mesh))


def _save_model(save_dir, par):
    cfg = make_cfg(**par)
    mesh = ParallelMesh.build(cfg.parallel, cfg.model)
    chunks = build_parallel_model(cfg, mesh)
    perturb(chunks, mesh)
    save_checkpoint(save_dir, 7, chunks, mesh, config=cfg)
    return logits(chunks, mesh, global_batch(torch.Generator().manual_seed(PROBE_SEED)))


def _load_model(save_dir, par):
    cfg = make_cfg(**par)
    mesh = ParallelMesh.build(cfg.parallel, cfg.model)
    chunks = build_parallel_model(cfg, mesh, seed=4321)
    assert load_checkpoint(save_dir, chunks, mesh)["step"] == 7
    return logits(chunks, mesh, global_batch(torch.Generator().manual_seed(PROBE_SEED)))


@pytest.fixture(scope="module")
def saved_tp2_pp2(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tp2pp2"))
    return d, run_ranks(_save_model, 4, d, dict(tp=2, pp=2))[0]


@pytest.mark.parametrize("world,par", [(2, dict(ep=2)), (1, dict()), (4, dict(tp=2, ep=2, sp=True)),
                                       (4, dict(tp=2, pp=2))],
                         ids=["ep2xdp2", "one_rank", "tp2sp_ep2_dp2", "same_tp2xpp2"])
def test_reshard_model_on_load(saved_tp2_pp2, world, par):
    """Saved under tp2·pp2 (MTP's embedding copy on the last stage), loaded under other layouts."""
    d, ref = saved_tp2_pp2
    got = run_ranks(_load_model, world, d, par)[0]
    if par == dict(tp=2, pp=2):
        assert torch.equal(got, ref)
    else:  # another tp/ep only reorders float32 sums
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_export_tp2_pp2_to_hf(saved_tp2_pp2, tmp_path):
    """ckpt/convert.py exports the tp2·pp2 pieces (a tensor's tp slices in separate boxes, row- or
    column-wise; the last stage's embedding copy) in row chunks small enough to cut across boxes, in
    two worker processes: every exported tensor equals the full tensor `read_pieces` assembles."""
    from safetensors.torch import load_file

    from megatron_r1.ckpt.checkpoint import Piece, SavedIndex, read_pieces
    from megatron_r1.ckpt.convert import megatron_to_hf
    from megatron_r1.ckpt.hf import checkpoint_files, our_name
    d, _ = saved_tp2_pp2
    path = resolve_checkpoint(d)
    index = SavedIndex(path)
    split = [n for n, b in index.boxes.items() if len(b) > 1]
    assert len(split) > 10 and any(o[1] for b in index.boxes.values() for _, o, _, _ in b if len(o) == 2)
    out = tmp_path / "hf"
    megatron_to_hf(d, str(out), dtype="fp32", max_shard_bytes=256 << 10, progress=False, workers=2,
                   budget_bytes=4096)
    cfg = make_cfg().model
    exported = {k: v for f in sorted(set(checkpoint_files(str(out)).values())) for k, v in load_file(f).items()}
    assert len(set(checkpoint_files(str(out)).values())) > 2
    for hf, t in exported.items():
        name = our_name(hf, cfg)
        want = Piece(name, torch.empty(t.shape, dtype=torch.float32), (0,) * t.dim(), tuple(t.shape))
        read_pieces(path, "model", [want], index)
        assert torch.equal(t, want.tensor), hf


def _train_save_continue(save_dir, par):
    cfg = make_cfg(**par)
    mesh = ParallelMesh.build(cfg.parallel, cfg.model)
    chunks = build_parallel_model(cfg, mesh)
    opt = build_optimizer(chunks, cfg, mesh)
    g = torch.Generator().manual_seed(5)
    step(chunks, opt, cfg, mesh, global_batch(g))
    step(chunks, opt, cfg, mesh, global_batch(g))
    save_checkpoint(save_dir, 2, chunks, mesh, opt, config=cfg)
    probe = global_batch(torch.Generator().manual_seed(PROBE_SEED))
    before = logits(chunks, mesh, probe)
    loss3 = step(chunks, opt, cfg, mesh, global_batch(g))
    return before, loss3, logits(chunks, mesh, probe)


def _load_continue(save_dir, par):
    cfg = make_cfg(**par)
    mesh = ParallelMesh.build(cfg.parallel, cfg.model)
    chunks = build_parallel_model(cfg, mesh, seed=4321)
    opt = build_optimizer(chunks, cfg, mesh)
    load_checkpoint(save_dir, chunks, mesh, opt)
    g = torch.Generator().manual_seed(5)
    global_batch(g), global_batch(g)  # the batches of steps 1-2, consumed before the save
    probe = global_batch(torch.Generator().manual_seed(PROBE_SEED))
    before = logits(chunks, mesh, probe)
    loss3 = step(chunks, opt, cfg, mesh, global_batch(g))
    return before, loss3, logits(chunks, mesh, probe), opt.step_count


@pytest.fixture(scope="module")
def trained_tp2_dp2(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tp2dp2"))
    return d, run_ranks(_train_save_continue, 4, d, dict(tp=2, sp=True))[0]


@pytest.mark.parametrize("world,par", [(1, dict()), (4, dict())], ids=["one_rank", "dp4"])
def test_reshard_optimizer_on_load(trained_tp2_dp2, world, par):
    """ZeRO-1 AdamW state saved under tp2·sp·dp2 and reassembled under another layout: the next
    step (moments, master weights, step count) matches the run that never stopped."""
    d, (ref_before, ref_loss3, ref_after) = trained_tp2_dp2
    before, loss3, after, steps = run_ranks(_load_continue, world, d, par)[0]
    torch.testing.assert_close(before, ref_before, atol=2e-5, rtol=1e-5)
    assert steps == 3
    assert abs(loss3 - ref_loss3) < 1e-5, (loss3, ref_loss3)
    torch.testing.assert_close(after, ref_after, atol=5e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def trained_ep2(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ep2"))
    return d, run_ranks(_train_save_continue, 2, d, dict(ep=2))[0]


@pytest.mark.parametrize("world,par", [(1, dict()), (4, dict(ep=4))], ids=["one_rank", "ep4"])
def test_reshard_expert_optimizer_state(trained_ep2, world, par):
    """Expert weights and ZeRO-1 state (stacked [4, F, H] per projection on each of the ep2 ranks) loaded on
    one rank (one [8, F, H] stack) and under ep4 (2 experts a rank): the next step matches the run that
    never stopped."""
    d, (ref_before, ref_loss3, ref_after) = trained_ep2
    before, loss3, after, steps = run_ranks(_load_continue, world, d, par)[0]
    torch.testing.assert_close(before, ref_before, atol=2e-5, rtol=1e-5)
    assert steps == 3 and abs(loss3 - ref_loss3) < 1e-5, (loss3, ref_loss3)
    torch.testing.assert_close(after, ref_after, atol=5e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------- async
def _async(save_dir):
    cfg = make_cfg(tp=2)
    mesh = ParallelMesh.build(cfg.parallel, cfg.model)
    chunks = build_parallel_model(cfg, mesh)
    ck = Checkpointer(save_dir, mesh, keep_last=2, async_save=True)
    snaps = []
    for s in range(1, 4):
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.add_(0.01)
        snaps.append([p.detach().clone() for p in chunks[0].parameters()])
        ck.save(s, chunks)
        with torch.no_grad():  # training goes on while the checkpoint is written
            for p in chunks[0].parameters():
                p.mul_(2.0)
    ck.wait()
    fresh = build_parallel_model(cfg, mesh, seed=9)
    st = load_checkpoint(save_dir, fresh, mesh)
    same = all(torch.equal(a, b) for a, b in zip(snaps[-1], fresh[0].parameters()))
    return st["step"], same, [s for s, _ in list_checkpoints(save_dir)]


def test_async_save_gloo(tmp_path):
    step_, same, kept = run_ranks(_async, 2, str(tmp_path))[0]
    assert step_ == 3 and same and kept == [2, 3]
    assert open(tmp_path / "latest").read().strip() == "step_000003"


# --------------------------------------------------------------------------------------- kill -9
KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    import torch.distributed.checkpoint as dcp
    from megatron_r1.config import load_config
    from megatron_r1.model import CausalLM
    from megatron_r1.ckpt.checkpoint import save_checkpoint
    cfg = load_config("tiny-moe").model
    torch.manual_seed(0)
    model = CausalLM(cfg)
    save_checkpoint(sys.argv[1], 1, model, model.mesh)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    write = dcp.FileSystemWriter.write_data
    def slow_write(self, plan, planner):  # the data files are being written when we get killed
        fut = write(self, plan, planner)
        print("WRITING", flush=True)
        time.sleep(600)
        return fut
    dcp.FileSystemWriter.write_data = slow_write
    save_checkpoint(sys.argv[1], 2, model, model.mesh)
""")


def test_kill9_mid_save_keeps_previous(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "WRITING" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(f"saver died: {proc.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "saver never reached the second save"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.path.isdir(tmp_path / "step_000002.tmp")  # the partial one is there...
    assert latest_checkpoint(str(tmp_path)).endswith("step_000001")  # ...and ignored
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "step_000002"))

    from megatron_r1.model import CausalLM
    cfg = load_config("tiny-moe").model
    torch.manual_seed(0)
    want = CausalLM(cfg)
    got = CausalLM(cfg)
    with torch.no_grad():
        for p in got.parameters():
            p.zero_()
    assert load_checkpoint(str(tmp_path), got, got.mesh)["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(want.parameters(), got.parameters()))
    # the next save of that step clears the debris and commits
    save_checkpoint(str(tmp_path), 2, got, got.mesh)
    assert not os.path.exists(tmp_path / "step_000002.tmp")
    assert latest_checkpoint(str(tmp_path)).endswith("step_000002")


def test_latest_is_newest_complete(tmp_path):
    """A crash after the rename but before `latest` was rewritten: scanning finds the newer one."""
    from megatron_r1.model import CausalLM
    cfg = load_config("tiny-moe").model
    model = CausalLM(cfg)
    save_checkpoint(str(tmp_path), 1, model, model.mesh, keep_last=None)
    save_checkpoint(str(tmp_path), 2, model, model.mesh, keep_last=None)
    (tmp_path / "latest").write_text("step_000001\n")  # stale hint
    os.makedirs(tmp_path / "step_000003")  # no marker: ignored
    assert latest_checkpoint(str(tmp_path)).endswith("step_000002")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "step_000003"))


def test_replicas_written_once(saved_tp2_pp2):
    """tp2·pp2 holds norms, MLA's low-rank projections, the router, experts and the embedding copy on
    several ranks; DCP's planner writes each key once, so the files are about one model in size."""
    from megatron_r1.ckpt.hf import model_state
    d, _ = saved_tp2_pp2
    ck = latest_checkpoint(d)
    written = sum(os.path.getsize(os.path.join(ck, f)) for f in os.listdir(ck) if f.endswith(".distcp"))
    cfg = make_cfg()
    with torch.device("meta"):
        from megatron_r1.model import CausalLM
        model_bytes = sum(t.numel() * 4 for t in model_state(CausalLM(cfg.model)).values())
    assert model_bytes < written < 1.15 * model_bytes  # (torch.save framing per tensor on top)


def test_damaged_checkpoint_is_one_line_naming_the_file(tmp_path):
    """A COMPLETE checkpoint damaged afterwards (a shard cut short, a torn trainer state): the cheap
    check and a real read both fail with one CheckpointError naming the file."""
    from megatron_r1.ckpt.checkpoint import verify_checkpoint
    from megatron_r1.model import CausalLM
    cfg = load_config("tiny-moe").model
    model = CausalLM(cfg)
    path = save_checkpoint(str(tmp_path), 1, model, model.mesh)
    assert verify_checkpoint(path)["step"] == 1
    shard = next(f for f in sorted(os.listdir(path)) if f.endswith(".distcp"))
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, shard)) // 3)
    with pytest.raises(CheckpointError, match=rf"^{path}/{shard}: truncated checkpoint shard \(\d+ bytes, "
                                              rf"the metadata needs \d+\)$"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=rf"^{path}/{shard}: cannot read tensor 'model/"):
        load_checkpoint(path, CausalLM(cfg), model.mesh)
    (tmp_path / "step_000001" / "trainer_state.pt").write_bytes(b"\x80\x02torn")
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=rf"^{path}/{shard}: missing checkpoint shard$"):
        verify_checkpoint(path)
    (tmp_path / "step_000001" / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"^{path}/.metadata: unreadable checkpoint metadata"):
        verify_checkpoint(path)


# --------------------------------------------------------------------------- HF names of expert stacks
def _hf_roundtrip_ep(d):
    """ep2: export the full model to HF (stacks split into one tensor per expert), reload it into a fresh
    ep2 model (the per-expert tensors joined into this rank's stacks)."""
    from megatron_r1.ckpt.hf import hf_tensors, load_hf_weights, save_hf
    from megatron_r1.engine.runtime import gather_full_state
    cfg = make_cfg(ep=2)
    mesh = ParallelMesh.build(cfg.parallel, cfg.model)
    chunks = build_parallel_model(cfg, mesh)
    perturb(chunks, mesh)
    full = gather_full_state(chunks, mesh)
    if mesh.rank == 0:
        save_hf(hf_tensors(full, cfg.model), cfg.model, d, dtype=torch.float32)
    torch.distributed.barrier()
    fresh = build_parallel_model(cfg, mesh, seed=4321)
    load_hf_weights(fresh[0], d, cfg.model, mesh)
    stacks = {n: p for n, p in chunks[0].named_parameters() if n.endswith("experts.up_proj")}
    same = all(torch.equal(a, b) for a, b in zip(chunks[0].parameters(), fresh[0].parameters()))
    return same, [n for n in full if ".mlp.experts." in n], {n: tuple(p.shape) for n, p in stacks.items()}


def test_expert_stacks_export_and_load_one_hf_tensor_per_expert(tmp_path):
    same, expert_names, stacks = run_ranks(_hf_roundtrip_ep, 2, str(tmp_path))[0]
    assert same  # every parameter, the ep-sharded stacks included, reloaded bit for bit
    # every MoE layer (and the MTP's): 8 experts × 3 projections by name, whichever rank held them
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in expert_names and len(expert_names) == 3 * 8 * len(stacks)
    assert stacks and all(s[0] == 4 for s in stacks.values())  # 8 experts over ep2: 4 per rank, stacked
    from megatron_r1.ckpt.hf import read_safetensors_header
    header = read_safetensors_header(str(tmp_path / "model.safetensors"))
    assert tuple(header["model.layers.1.mlp.experts.7.down_proj.weight"]["shape"]) == (64, 32)
