"""`megatron-r1 <command>`: one entry point for every stage and tool.

Notable choices
- Subcommands import their module lazily, so `megatron-r1 params` works without vLLM.
- Errors a user can act on (bad config, bad checkpoint, bad data) print one line, `error: ...`, and
  exit 2; a traceback means a bug in megatron-r1.
- Exit statuses: 0 done (trainers: last step, export, `<run_dir>/DONE` written); 1 a run that cannot go
  on (`training.TrainingError`: NaN/inf gradients step after step, a crash inside the rollout engine),
  one `error:` line too; 2 a user error (a checkpoint save that failed for lack of space included);
  75 (`training.EXIT_STOPPED`) a trainer stopped by SIGTERM / SIGUSR1 / SIGINT after saving a
  checkpoint, to be run again (the sbatch scripts requeue); 130 interrupted outside a training loop
  (a second Ctrl-C, or Ctrl-C while loading), nothing saved; 1 a dry run that found problems.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module, function taking argv, one-line help)
COMMANDS = {
    "params": ("megatron_r1.cli", "params_main", "parameter counts of a preset or config"),
    "check-parallel": ("megatron_r1.engine.check", "main", "prove a parallel layout equals one rank"),
    "plan": ("megatron_r1.tools.plan_parallel", "main", "memory / bubble / all-to-all plan of a layout"),
    "convert": ("megatron_r1.tools.convert_checkpoint", "main", "convert checkpoints HF <-> megatron_r1"),
    "grpo": ("megatron_r1.rl.trainer", "main", "R1-Zero / R1 GRPO training"),
    "pretrain": ("megatron_r1.sft.trainer", "pretrain_main", "language-model pretraining (tiny base models)"),
    "sft": ("megatron_r1.sft.trainer", "main", "supervised fine-tuning (cold start, distillation)"),
    "train-rm": ("megatron_r1.rl.train_rm", "main", "train a reward model on preference pairs (Bradley-Terry)"),
    "eval": ("megatron_r1.eval.runner", "main", "pass@1 / cons@k evaluation"),
    "eval-table": ("megatron_r1.eval.runner", "table_main", "one table from several `eval --out` results"),
    "rejection-sample": ("megatron_r1.rl.rejection", "main", "sample with the policy, keep rule-reward passes as SFT rows"),
    "score": ("megatron_r1.rl.score", "main", "score response rows with registered rewards (the trainer's code path)"),
    "export-distill": ("megatron_r1.tools.export_distill_dataset", "main",
                       "rejection samples -> deduplicated, decontaminated chat rows for a student"),
    "cold-start-data": ("megatron_r1.sft.cold_start", "main",
                        "long-CoT SFT rows in the readable R1 format from R1-Zero outputs and few-shot prompting"),
    "prepare-tiny": ("megatron_r1.recipes.tiny_r1_zero", "prepare_main", "data + tokenizer of the tiny R1-Zero demo"),
    "general-data": ("megatron_r1.recipes.general_tasks", "main", "the tiny general task family: prompts and preference pairs"),
    "report-tiny": ("megatron_r1.recipes.tiny_r1_zero", "report_main", "before/after table of the tiny demo"),
}


def user_errors() -> tuple[type, ...]:
    """Exception types that mean 'the input is wrong', not 'the code is wrong'."""
    from megatron_r1.config import ConfigError
    errs: list[type] = [ConfigError, FileNotFoundError]
    for mod, name in (("megatron_r1.ckpt.hf", "CheckpointError"), ("megatron_r1.data.prompts", "DataError"),
                      ("megatron_r1.rollout.engine", "VllmVersionError")):
        try:
            errs.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def training_errors() -> tuple[type, ...]:
    """A run that cannot go on: not the input's fault, but one line says what happened."""
    from megatron_r1.training import TrainingError
    return (TrainingError,)


def params_main(argv: list[str]) -> int:
    import argparse
    from megatron_r1.config import load_config
    ap = argparse.ArgumentParser(prog="megatron-r1 params", description=COMMANDS["params"][2])
    ap.add_argument("source", nargs="?", default="deepseek-v3-671b", help="preset name or YAML config")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_hidden_layers=4")
    a = ap.parse_args(argv)
    n = load_config(a.source, a.overrides).model.num_parameters()
    print(f"total      {n['total'] / 1e9:8.2f} B  (main model)")
    print(f"activated  {n['activated'] / 1e9:8.2f} B  per token (without the input-embedding lookup)")
    print(f"           {n['activated_with_embedding'] / 1e9:8.2f} B  per token with it")
    print(f"mtp        {n['mtp'] / 1e9:8.2f} B  (MTP module(s), embedding and head shared)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: megatron-r1 <command> [args]\n\ncommands:")
        for name, (_, _, doc) in COMMANDS.items():
            print(f"  {name:15s} {doc}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; run `megatron-r1 --help`", file=sys.stderr)
        return 2
    mod, fn, _ = COMMANDS[cmd]
    try:
        return int(getattr(importlib.import_module(mod), fn)(rest) or 0)
    except SystemExit:  # argparse's --help and usage errors: not worth importing torch to classify
        raise
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except training_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (nothing saved since the last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
