"""What every trainer (pretraining, SFT, GRPO) shares: one `TrainSession` per rank.

Notable choices
- Order matters: the model is filled (HF weights or a checkpoint) BEFORE the optimizer is built,
  because the ZeRO-1 optimizer copies the parameters into its fp32 master shards at construction.
- The learning-rate schedule is a pure function of the step (warmup, then constant / linear / cosine
  to `min_lr`), so resuming needs only the step.
- `dp_slice` gives a dp rank its contiguous share of a global batch; every rank draws the same global
  batch from the same seeded stream, so the data order does not depend on the layout.
- Export to Hugging Face streams the full tensors (`iter_full_state`) and only rank 0 writes.
- A stopped run is not a finished run. SIGTERM, SIGUSR1 (Slurm's warning before preemption or the time
  limit) and SIGINT (Ctrl-C; a second Ctrl-C aborts at once) all do the same: finish the step, save,
  write no export, exit `EXIT_STOPPED` (75, sysexits' EX_TEMPFAIL: "try again"), which the sbatch
  scripts turn into a requeue. Only a run that did its last step writes its export and then the
  completion marker `<run_dir>/DONE`; stage scripts chain on that marker, never on `hf/config.json`
  (an export of a half-trained policy must not look like the stage's result).
- Resume takes the newest checkpoint that loads: each candidate is checked cheaply (metadata, shard
  sizes, trainer state) and then read; one that fails on any rank is skipped on all, with its reason
  logged, for the next older one. When checkpoints exist and none loads, the run stops with that
  list rather than silently start over. The metrics log is then cut back to the resumed step.
  Checkpoints carry SHA-256 sums of their files (ckpt/checkpoint.py); a mismatch is such a failure, and
  falling back past a damaged checkpoint is printed as a WARNING on stderr too, not only in the log.
- A NaN/inf gradient (or loss, which makes one) skips the optimizer update: the global gradient norm is
  all-reduced before the decision, so every rank skips together. The step still consumes its data and
  counts (as Megatron does); it is logged with its reason, `skipped_steps` counts them in the metrics,
  and more than `train.max_skipped_steps` in a row stop the run with a `TrainingError`.
- The sample ledger `<run_dir>/ledger.jsonl`: one row per step naming the data rows it consumed (corpus
  rows, prompt `path:LINE`s). It is cut back with the metrics on resume, so across kills and restarts it
  lists what the final weights were trained on, each step once (the tests check that no row is skipped
  or repeated against an uninterrupted run).
- Test-only faults (megatron_r1/faults.py, an environment variable) strike inside the real loop; the
  loops call `faults.begin(step)` and the loss functions `faults.on_loss(loss)`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist

from megatron_r1.ckpt.convert import TOKENIZER_FILES  # one list, chat templates included
from megatron_r1.ckpt.hf import CheckpointError, hf_names, load_hf_weights, save_hf
from megatron_r1.config import Config, ConfigError, validate
from megatron_r1.faults import Faults
from megatron_r1.metrics import MetricsLogger, drop_rows_after
from megatron_r1.parallel.launch import init_distributed
from megatron_r1.parallel.mesh import ParallelMesh
from megatron_r1.engine.runtime import DTYPES, build_optimizer, build_parallel_model, iter_full_state


def current_dist_env():
    """The environment of a process group someone else initialised (tests, notebooks), else None."""
    if not dist.is_initialized():
        return None
    from megatron_r1.parallel.launch import DistEnv
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))  # a launcher's, else one node
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world, master_addr="",
                   master_port=0, backend=dist.get_backend(), launcher="existing")


EXIT_STOPPED = 75  # stopped by a signal after saving a checkpoint; run again (the scripts requeue) to continue
DONE = "DONE"  # <run_dir>/DONE: the run did its last step and wrote its export
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
LEDGER = "ledger.jsonl"


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, the rollout engine failed): one `error:` line, exit 1 (cli.py)."""


class Ledger:
    """`<run_dir>/ledger.jsonl`: {"step", "rows": [...], "skipped"?} per step, appended and flushed by rank 0
    (every rank draws the same global batch), so a killed run keeps what it logged."""

    def __init__(self, run_dir: str, enabled: bool):
        self.path, self.enabled, self._f = os.path.join(run_dir, LEDGER), enabled, None

    def resume_at(self, step: int | None) -> None:
        if self.enabled:
            drop_rows_after(self.path, -1 if step is None else step)

    def record(self, step: int, rows: list, skipped: bool = False) -> None:
        if not self.enabled:
            return
        if self._f is None:
            self._f = open(self.path, "a")
        self._f.write(json.dumps({"step": step, "rows": rows, **({"skipped": True} if skipped else {})}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def lr_at(step: int, cfg: Config) -> float:
    t = cfg.train
    if t.lr_warmup_steps and step < t.lr_warmup_steps:
        return t.lr * (step + 1) / t.lr_warmup_steps
    if t.lr_decay_style == "constant":
        return t.lr
    span = max(1, t.train_steps - t.lr_warmup_steps)
    frac = min(1.0, (step - t.lr_warmup_steps) / span)
    if t.lr_decay_style == "linear":
        return t.min_lr + (t.lr - t.min_lr) * (1 - frac)
    if t.lr_decay_style == "cosine":
        return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    raise ConfigError(f"train.lr_decay_style={t.lr_decay_style!r}: expected constant, linear or cosine")


class TrainSession:
    def __init__(self, cfg: Config, init_hf: str | None = None, desc: str = "train", logger: bool = True,
                 rl: bool = False):
        torch.manual_seed(cfg.train.seed)
        self.cfg = cfg
        self.env = current_dist_env() or init_distributed()
        validate(cfg, self.env.world_size, rl=rl)  # every cross-field rule, before a model or engine exists
        self.mesh = ParallelMesh.build(cfg.parallel, cfg.model)
        self.chunks = build_parallel_model(cfg, self.mesh, init=not init_hf)
        if init_hf:
            dtype = DTYPES[cfg.train.params_dtype]
            for chunk in self.chunks:
                load_hf_weights(chunk, init_hf, cfg.model, self.mesh, dtype=dtype, progress=self.is_main)
        self.optimizer = build_optimizer(self.chunks, cfg, self.mesh)
        self.step = 0
        from megatron_r1.ckpt.checkpoint import Checkpointer
        self.ckpt_dir = cfg.train.save_dir or os.path.join(cfg.run_dir, "ckpt")
        self.checkpointer = Checkpointer(self.ckpt_dir, self.mesh, keep_last=cfg.train.keep_last)
        # preemption (Slurm's --signal=B:USR1@T forwarded by the script, SIGTERM) or Ctrl-C: finish the
        # step, save, stop. The flag is agreed over all ranks each step so no rank is left in a collective.
        self._signalled: str | None = None
        self.stopped: str | None = None  # the signal's name once the loop has stopped on it
        self._saved_step: int | None = None
        self.install_signal_handlers()
        self.logger = MetricsLogger(cfg.run_dir, enabled=self.is_main and logger, total_steps=cfg.train.train_steps,
                                    desc=desc)
        self.ledger = Ledger(cfg.run_dir, enabled=self.is_main and logger)
        self.faults = Faults(self.env.rank, cfg.run_dir)  # test-only; none unless MEGATRON_R1_TEST_FAULTS is set
        self.skipped_steps = 0  # optimizer steps skipped for a NaN/inf gradient, over the run (checkpointed)
        self.skipped_in_row = 0
        if self.is_main:
            os.makedirs(cfg.run_dir, exist_ok=True)
            cfg.save(os.path.join(cfg.run_dir, "config.yaml"))
            done = os.path.join(cfg.run_dir, DONE)
            if os.path.exists(done):  # started again (more steps?): not finished until it ends again
                os.remove(done)

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def set_lr(self, step: int) -> float:
        self.optimizer.lr = lr_at(step, self.cfg)
        return self.optimizer.lr

    def dp_slice(self, rows):
        """This dp rank's contiguous share of a global batch (tensor rows or a list)."""
        n, dp, r = len(rows), self.mesh.dp, self.mesh.dp_rank
        if n % dp:
            raise ConfigError(f"global batch of {n} is not divisible by dp={dp}")
        per = n // dp
        return rows[r * per:(r + 1) * per]

    def full_state(self):
        """(HF name, full tensor) of every parameter, streamed; collective over all ranks."""
        for name, t in iter_full_state(self.chunks, self.mesh):
            for hf in hf_names(name, self.cfg.model):
                yield hf, t

    def export_hf(self, out_dir: str, tokenizer_dir: str | None = None, dtype=torch.bfloat16) -> str | None:
        """Write a HF directory (config, safetensors, tokenizer). Collective; rank 0 writes."""
        tensors = self.full_state()
        if self.is_main:
            save_hf(tensors, self.cfg.model, out_dir, dtype=dtype)
            if tokenizer_dir:
                copy_tokenizer(tokenizer_dir, out_dir)
        else:
            for _ in tensors:  # take part in the collectives
                pass
        if dist.is_initialized():
            dist.barrier()
        return out_dir if self.is_main else None

    def install_signal_handlers(self) -> None:
        """(Re)install the save-and-stop handlers (after a library that may have set its own)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._signalled == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving (the CLI prints one line)
        self._signalled = self._signalled or name
        if self.is_main:
            sys.stderr.write(f"\n{name}: saving after this step, then stopping"
                             + (" (Ctrl-C again to abort without saving)\n" if signum == signal.SIGINT else "\n"))
            sys.stderr.flush()

    def should_stop(self) -> bool:
        """True on every rank once any rank has been signalled (collective: call once per step)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            stop = self._signalled is not None
        else:
            flag = torch.tensor(float(self._signalled is not None), device=self.mesh.device)  # NCCL: device tensors
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            self.stopped = self._signalled or "a signal on another rank"
        return stop

    def resume(self) -> dict | None:
        """Load the newest checkpoint of this run that loads, if any; returns its `extra` (data position...).

        Collective. A candidate that fails on any rank is skipped on every rank (logged with its reason);
        when checkpoints exist and none loads, raises CheckpointError listing them."""
        from megatron_r1.ckpt.checkpoint import list_checkpoints, verify_checkpoint
        found = list_checkpoints(self.ckpt_dir)
        skipped: list[str] = []
        for _, path in reversed(found):
            try:
                verify_checkpoint(path, part=(self.env.rank, self.env.world_size))  # each rank hashes 1/world
                info = self.checkpointer.load(self.chunks, self.optimizer, path=path)
                err = None
            except CheckpointError as e:
                err = str(e)
            errors = [err]
            if dist.is_initialized() and dist.get_world_size() > 1:
                errors = [None] * dist.get_world_size()
                dist.all_gather_object(errors, err)
            bad = next((e for e in errors if e), None)
            if bad is None:
                break
            skipped.append(f"{os.path.basename(path)}: {bad}")
            if self.is_main:
                self.logger.write(f"resume: skipping {path}: {bad}")
                sys.stderr.write(f"WARNING: checkpoint {path} refused ({bad}); trying the previous one\n")
                sys.stderr.flush()
        else:
            if found:
                raise CheckpointError(f"{self.ckpt_dir}: no checkpoint loads ({'; '.join(skipped)}); move the "
                                      f"directory away to start from scratch")
            self.logger.resume_at(None)
            self.ledger.resume_at(None)
            return None
        self.step = int(info["step"])
        self._saved_step = self.step
        self.skipped_steps = int((info.get("extra") or {}).get("session", {}).get("skipped_steps", 0))
        dropped = self.logger.resume_at(self.step)
        self.ledger.resume_at(self.step)
        if self.is_main:
            older = f" (skipped {len(skipped)} newer that did not load)" if skipped else ""
            self.logger.write(f"resumed from {info['path']} at step {self.step}{older}"
                              + (f"; dropped {dropped} metrics rows logged after it" if dropped else ""))
            if skipped:
                sys.stderr.write(f"WARNING: resumed from {info['path']} (step {self.step}), an OLDER checkpoint: "
                                 f"{len(skipped)} newer one(s) refused\n")
        return info.get("extra") or {}

    def check_step(self, step: int, metrics: dict) -> dict:
        """After step `step`'s optimizer update(s) (`metrics["skipped"]` > 0: one was skipped for a NaN/inf
        gradient norm): count, log the reason, add `skipped_steps` to the metrics; more than
        `train.max_skipped_steps` skipped steps in a row raise TrainingError. Same result on every rank."""
        skipped = metrics.get("skipped", 0.0) > 0
        if skipped:
            self.skipped_steps += 1
            self.skipped_in_row += 1
            reason = (f"non-finite gradient norm ({metrics.get('grad_norm')})"
                      + (f", loss {metrics.get('loss')}" if not math.isfinite(metrics.get("loss", 0.0)) else ""))
            limit = self.cfg.train.max_skipped_steps
            if self.is_main:
                self.logger.write(f"step {step}: optimizer step skipped: {reason} ({self.skipped_in_row} in a row, "
                                  f"{self.skipped_steps} in the run; train.max_skipped_steps={limit})")
            if self.skipped_in_row > limit:
                self.logger.close()  # the progress bar ends before the error line, not after it
                raise TrainingError(f"step {step}: {self.skipped_in_row} optimizer steps in a row skipped for "
                                    f"NaN/inf gradients (last: {reason}), more than train.max_skipped_steps={limit}; "
                                    f"stopping (checkpoints in {self.ckpt_dir})")
        else:
            self.skipped_in_row = 0
        metrics["skipped_steps"] = float(self.skipped_steps)
        return metrics

    def maybe_save(self, extra: dict, force: bool = False) -> str | None:
        """Save every `train.save_interval` steps (and when forced, e.g. at the end, unless just saved)."""
        every = self.cfg.train.save_interval
        if not force and not (every and self.step % every == 0):
            return None
        if force and self._saved_step == self.step:
            return None
        self._saved_step = self.step
        extra = {**extra, "session": {"skipped_steps": self.skipped_steps}}
        from megatron_r1.ckpt.checkpoint import CheckpointSaveError
        try:
            return self.checkpointer.save(self.step, self.chunks, self.optimizer, extra=extra, config=self.cfg)
        except CheckpointSaveError:  # every rank raises it; the error line comes last, after the progress bar
            self.logger.close()
            raise

    def finish(self, export_dir: str, tokenizer_dir: str | None = None, dtype=torch.bfloat16, before_done=None) -> int:
        """End of a trainer's main: the exit status. Stopped by a signal: the checkpoint is saved, no export,
        `EXIT_STOPPED`. Finished: export to `export_dir`, `before_done()` (plots...), then `<run_dir>/DONE`."""
        if self.stopped:
            self.close()
            if self.is_main:
                sys.stderr.write(f"stopped by {self.stopped} at step {self.step}: checkpoint saved in {self.ckpt_dir}, "
                                 f"no export; exit {EXIT_STOPPED} (run again to resume)\n")
            return EXIT_STOPPED
        out = self.export_hf(export_dir, tokenizer_dir, dtype=dtype)
        if before_done is not None:
            before_done()
        self.close()
        if self.is_main:
            _write_json_atomic(os.path.join(self.cfg.run_dir, DONE),
                               {"step": self.step, "export": os.path.abspath(out), "checkpoint": self.ckpt_dir,
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return 0

    def close(self):
        self.checkpointer.wait()
        self.logger.close()
        self.ledger.close()


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_tokenizer(src: str, dst: str) -> None:
    src = src if os.path.isdir(src) else os.path.dirname(src)
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
