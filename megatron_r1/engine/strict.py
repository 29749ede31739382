"""`check-parallel --strict-device`: a guard that proves a step would run on a GPU, on a CPU.

    with StrictDevice():            # raises StrictDeviceError on exit, naming file:line of each finding
        train_step(...)

Notable choices
- A `TorchFunctionMode` sees every torch call made while it is active. It records two kinds of finding:
    factory   a tensor created without an explicit `device=` (torch.zeros, arange, tensor, ...) by OUR
              code (a file of this repository: megatron_r1/ or tests/); library internals choose their own.
              On a GPU such a tensor lands on the CPU and the next op or collective fails or syncs.
    host      a device-to-host transfer (.item(), .tolist(), .cpu(), .numpy(), .to("cpu"), float(t),
              int(t), bool(t) as in `if t > 0:`, t used as an index), attributed to the innermost frame of
              our code (also when a library call made it for us), unless that frame's function is on
              ALLOWED_HOST_SYNCS below: each one is a sync a step cannot do without, with the reason.
- A meta-device run cannot stand in for this: MoE routing is data-dependent and its counts do not exist
  on `meta` (`bincount` has no meta kernel).
- Findings are collected, not raised at once: every rank runs the same code, so every rank reaches the
  end of the step and fails there with the whole list, instead of one rank leaving its peers in a
  collective.
- `*_like` and `Tensor.new_*` factories inherit the device of their argument and pass.
"""
from __future__ import annotations

import os
import sys

import torch
from torch.overrides import TorchFunctionMode

import megatron_r1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(megatron_r1.__file__)))
_HERE = os.path.abspath(__file__)
_OURS = (os.path.join(REPO, "megatron_r1") + os.sep, os.path.join(REPO, "tests") + os.sep)

FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.range, torch.linspace,
             torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm, torch.tensor,
             torch.as_tensor, torch.scalar_tensor, torch.empty_strided}
T = torch.Tensor
HOST = {T.item: ".item()", T.tolist: ".tolist()", T.cpu: ".cpu()", T.numpy: ".numpy()", T.__float__: "float(tensor)",
        T.__int__: "int(tensor)", T.__bool__: "bool(tensor)", T.__index__: "tensor as an index"}

# (file relative to the repository, function) -> why the step needs this host transfer. Keep it short.
ALLOWED_HOST_SYNCS = {
    # the all-to-all's variable split sizes size its receive buffer on the host: one sync per MoE layer
    ("megatron_r1/parallel/expert.py", "moe_dispatch_combine"): "all-to-all split sizes",
    # skip a step whose global gradient norm is NaN/inf (train.max_skipped_steps): the decision is taken on the
    # host from the all-reduced norm, once per optimizer step, as Megatron's found_inf check does
    ("megatron_r1/parallel/data.py", "step"): "NaN/inf step skip, once per optimizer step",
    # the step's scalar metrics, read once at its very end
    ("megatron_r1/engine/runtime.py", "_to_host"): "the step's metrics, once per step",
    # metric names exist only on the last pipeline stage: pickled to the others once per step
    ("megatron_r1/engine/runtime.py", "_reduce_metrics"): "metric names broadcast (pp > 1), once per step",
    # GRPO: the vLLM-vs-trainer mismatch statistics and the policy-ratio extrema, once per step each
    ("megatron_r1/rl/trainer.py", "_reduce_last_stage"): "GRPO mismatch metrics, once per step",
    ("megatron_r1/rl/trainer.py", "_ratio_extrema"): "GRPO ratio min/max, once per step",
    ("megatron_r1/rl/trainer.py", "_reduce_route_flips"): "GRPO routing-replay flip fraction, once per step",
}


_COMPREHENSIONS = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")


class StrictDeviceError(RuntimeError):
    pass


def _ours(filename: str) -> bool:
    f = os.path.abspath(filename)
    return f != _HERE and f.startswith(_OURS)


def _where(frame) -> str:
    return f"{os.path.relpath(frame.f_code.co_filename, REPO)}:{frame.f_lineno}"


class StrictDevice(TorchFunctionMode):
    """Record device-less factory calls and host transfers made while active; raise on exit if any."""

    def __init__(self, raise_on_exit: bool = True):
        super().__init__()
        self.raise_on_exit = raise_on_exit
        self.findings: dict[str, str] = {}  # "file:line" -> what happened there (first occurrence)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1)
            while caller is not None and os.path.abspath(caller.f_code.co_filename) == _HERE:
                caller = caller.f_back
            if caller is not None and _ours(caller.f_code.co_filename):
                self.findings.setdefault(_where(caller), f"torch.{func.__name__}(...) without device=")
        elif func in HOST or (func is T.to and _to_host(args, kwargs)):
            self._host(HOST.get(func, '.to("cpu")'))
        return func(*args, **kwargs)

    def _host(self, what: str) -> None:
        frame = sys._getframe(2)
        while frame is not None and not _ours(frame.f_code.co_filename):
            frame = frame.f_back
        if frame is None:
            return  # no code of ours on the stack: not this step's doing
        func = frame
        while func.f_code.co_name in _COMPREHENSIONS and func.f_back is not None:
            func = func.f_back  # a comprehension belongs to the function that contains it
        key = (os.path.relpath(func.f_code.co_filename, REPO), func.f_code.co_name)
        if key not in ALLOWED_HOST_SYNCS:
            self.findings.setdefault(_where(frame), f"host transfer {what} in {func.f_code.co_name}()")

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        if exc_type is None and self.findings and self.raise_on_exit:
            raise StrictDeviceError(self.report())
        return False

    def report(self) -> str:
        lines = [f"{len(self.findings)} device finding(s) inside the step (--strict-device):"]
        lines += [f"  {where}: {what}" for where, what in sorted(self.findings.items())]
        return "\n".join(lines)


def _to_host(args, kwargs) -> bool:
    """Is this `Tensor.to(...)` call a device-to-host copy of a tensor that is not on the CPU already?"""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].device.type == "cpu":
        return False
    dev = kwargs.get("device")
    if dev is None:
        dev = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
    return dev is not None and torch.device(dev).type == "cpu"
