"""Step metrics: a JSONL log, TensorBoard event files, a progress bar, and PNG plots at the end.

Notable choices
- Only the logging rank (global rank 0) writes; metrics arrive already reduced over ranks.
- JSONL is the source of truth (one object per step, appended and flushed, so a killed run keeps its
  log and a resumed run continues it); TensorBoard and the plot are views of the same numbers.
- Each step appears once even after a crash: a run killed after logging step 7 but before saving it
  resumes from an older checkpoint (say 5) and logs 6, 7 again. `resume_at(5)` first drops the rows
  past 5 from the JSONL (rewritten atomically) and opens TensorBoard with `purge_step=6`, which makes
  TensorBoard hide the earlier events from step 6 on. A fresh start (no checkpoint) drops every row.
- Plots are drawn from the JSONL with matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import json
import math
import os
import time


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool = True, total_steps: int | None = None, desc: str = "train",
                 start_step: int = 0):
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        self._f = None  # the JSONL and TensorBoard open on the first row, or in `resume_at`
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._bar_args = dict(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)

    def _open(self, purge_step: int | None = None) -> None:
        """Open the JSONL, TensorBoard and the progress bar (not before: a run that fails while starting
        prints its error last, with no bar after it)."""
        from tqdm import tqdm
        if purge_step:
            self._bar_args["initial"] = purge_step - 1
        self._bar = tqdm(**self._bar_args)
        self._f = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(self.run_dir, "tensorboard"), purge_step=purge_step)
        except ImportError:  # tensorboard is a declared dependency; keep logging to JSONL regardless
            self._tb = None

    def resume_at(self, step: int | None) -> int:
        """The run continues after `step` (None: from scratch): drop the rows logged past it, in the JSONL
        and in TensorBoard's view. Call before the first `log`. Returns the number of rows dropped."""
        if not self.enabled:
            return 0
        if self._f is not None:
            raise RuntimeError("MetricsLogger.resume_at must come before the first log()")
        keep_through = -1 if step is None else step
        dropped = drop_rows_after(self.path, keep_through)
        self._open(purge_step=keep_through + 1)
        return dropped

    def log(self, step: int, metrics: dict, show: tuple[str, ...] = (), advance: bool = True) -> None:
        """One JSONL row and TensorBoard scalars; `advance=False` for a row that is not a step (step-0 eval)."""
        if not self.enabled:
            return
        if self._f is None:
            self._open()
        row = {"step": step, "time": time.time()}
        row.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._bar is not None and advance:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{metrics[k]:.3g}" for k in show if k in metrics})

    def write(self, text: str) -> None:
        """A line above the progress bar."""
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if self.enabled:
            if self._bar is not None:
                self._bar.close()
            if self._tb is not None:
                self._tb.close()
            if self._f is not None:
                self._f.close()


def drop_rows_after(path: str, keep_through: int) -> int:
    """Rewrite a JSONL of {"step": ...} rows (atomically) without the rows past `keep_through` and any line
    cut short by a kill; returns how many were dropped. The metrics log and the sample ledger share it."""
    dropped = 0
    if os.path.exists(path):
        kept = []
        with open(path, "rb") as f:
            for line in f:
                try:
                    row_step = json.loads(line).get("step")
                except (ValueError, AttributeError):  # a line cut short by the kill: not a row
                    dropped += bool(line.strip())
                    continue
                if isinstance(row_step, int) and row_step <= keep_through:
                    kept.append(line if line.endswith(b"\n") else line + b"\n")
                else:
                    dropped += 1
        if dropped:
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.writelines(kept)
            os.replace(tmp, path)
    return dropped


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(jsonl: str, out_png: str, panels: list[tuple[str, list[str]]], title: str = "") -> str:
    """One subplot per (title, [metric keys]); x axis = step. Returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(jsonl)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, markersize=3, label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
