"""`--dry-run` for every entry point (grpo, sft, pretrain, rejection-sample): check a job on any machine.

    megatron-r1 grpo --config examples/r1_zero_671b.yaml --init-hf /ckpt/dsv3_bf16 --dry-run \\
        --nodes 64 --gpus-per-node 8 --dispatch-dtype fp8        # recompute: train.recompute of the config

Notable choices
- Nothing is allocated and torch.distributed is never initialised: the config is built (with the same
  overrides), the layout is checked with `mesh.validate_layout` and planned with `parallel/plan.py` for a
  HYPOTHETICAL world of nodes × GPUs per node. The world comes from --nodes/--gpus-per-node, else from the
  Slurm allocation (SLURM_JOB_NUM_NODES × SLURM_GPUS_ON_NODE / SLURM_NTASKS_PER_NODE), else 1 × 1; the
  report says which, because a dry run on 1 node of a 64-node layout is the point of the exercise.
- Three levels, each on its own line prefix:
    `error:`    the layout is impossible (a ConfigError: the CLI prints it and exits 2);
    `missing:`  / `problem:` a path that does not exist, a vLLM that is absent or too old, a plan that does
                not fit the GPU, a batch that does not split over the ranks -> exit 1 after the full report
                (every problem at once, not one per submission);
    `warning:`  what the runtime cannot do yet although the plan is valid (a layer split that differs
                from the plan's) -> still exit 0, so a script can dry-run the 671B layout
                today and see, in one place, what stands between it and a real run.
- Inputs are read as far as is cheap, so a bad file costs a second here, not an engine start there:
  every data row is parsed and validated as the trainer will (the first error named; prompts are
  tokenized and those too long to fit counted), safetensors headers and the index are checked against
  the config's names and shapes (and the files' lengths against the headers), and the checkpoints
  resume would use are checked (metadata, shard sizes, trainer state). No weight is loaded.
- The plan is the trainer's: seq length and global batch per optimizer step are derived from the config
  the way the trainer uses them (GRPO: prompt + response tokens, rollout batch / updates_per_batch).
  Activation recompute is the config's (`train.recompute`, `recompute_modules`, `recompute_num_layers`:
  the runtime runs what the plan assumes); `--recompute` is a shorthand for `train.recompute=`, and
  `--dispatch-dtype` for `moe.dispatch_dtype=` (the all-to-all bytes the plan counts are what
  parallel/expert.py sends). GPU memory is a plan-only flag.
- The co-located vLLM engine is outside the planner's model; the report adds its bf16 weights per GPU
  (parameters / rollout.tp) to the trainer's resident state, as a warning when they exceed the GPU.
- `--plan-json PATH` writes `plan.plan_to_dict` plus the world and the verdict, for scripts and tests.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from megatron_r1.config import Config, ConfigError, validate

GPU_ENV = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("dry run (check config, layout, plan, paths, versions; allocate nothing)")
    g.add_argument("--dry-run", action="store_true", help="check everything and print the plan, then exit")
    g.add_argument("--nodes", type=int, default=None,
                   help="nodes of the planned job (default: the Slurm allocation, else 1)")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs (= ranks) per node (default: the Slurm allocation, else 1)")
    g.add_argument("--recompute", choices=["none", "selective", "full"], default=None,
                   help="shorthand for train.recompute=... (default: the config's)")
    g.add_argument("--dispatch-dtype", choices=["bf16", "fp8"], default=None,
                   help="shorthand for moe.dispatch_dtype=... (default: the config's)")
    g.add_argument("--gpu-mem-gb", type=float, default=80.0)
    g.add_argument("--plan-json", default=None, help="also write the plan and verdict as JSON here")


def hypothetical_world(a: argparse.Namespace, environ=os.environ) -> tuple[int, int, str]:
    """(nodes, gpus per node, where they came from)."""
    nodes, gpn, src = a.nodes, a.gpus_per_node, []
    if nodes is None:
        raw = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
        nodes = int(raw) if raw else 1
        src.append("nodes from the Slurm allocation" if raw else "nodes default 1")
    else:
        src.append("--nodes")
    if gpn is None:
        raw = next((environ[k] for k in GPU_ENV if environ.get(k, "0").split("(")[0] not in ("", "0")), None)
        gpn = int(raw.split("(")[0]) if raw else 1
        src.append("GPUs per node from the Slurm allocation" if raw else "GPUs per node default 1")
    else:
        src.append("--gpus-per-node")
    if nodes < 1 or gpn < 1:
        raise ConfigError(f"dry run: nodes={nodes} and gpus-per-node={gpn} must be >= 1")
    return nodes, gpn, ", ".join(src)


# ------------------------------------------------------------------------------------------ checks
class Report:
    def __init__(self):
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.lines: list[str] = []

    def line(self, s: str = "") -> None:
        self.lines.append(s)
        print(s, flush=True)

    def problem(self, s: str, kind: str = "problem") -> None:
        self.problems.append(f"{kind}: {s}")
        print(f"{kind}: {s}", flush=True)

    def warn(self, s: str) -> None:
        self.warnings.append(s)
        print(f"warning: {s}", flush=True)


def _check_hf_dir(r: Report, what: str, path: str, cfg: Config, need_tokenizer: bool) -> None:
    before = len(r.problems)
    if not os.path.isdir(path):
        return r.problem(f"{what} {path} (a Hugging Face directory)", "missing")
    need = {"config.json": ["config.json"],
            "weights (model.safetensors or model.safetensors.index.json)":
                ["model.safetensors", "model.safetensors.index.json"]}
    if need_tokenizer:
        need["tokenizer (tokenizer.json or tokenizer.model)"] = ["tokenizer.json", "tokenizer.model"]
    for label, names in need.items():
        if not any(os.path.exists(os.path.join(path, n)) for n in names):
            r.problem(f"{what} {path}: no {label}", "missing")
    cj = os.path.join(path, "config.json")
    if os.path.isfile(cj):
        from megatron_r1.config import ModelConfig
        try:
            hf = ModelConfig.from_hf_dict(json.load(open(cj)))
        except (ConfigError, ValueError) as e:
            return r.problem(f"{cj}: {e}")
        keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "n_routed_experts", "num_nextn_predict_layers")
        diff = [f"{k} {getattr(hf, k)} vs config {getattr(cfg.model, k)}" for k in keys
                if getattr(hf, k) != getattr(cfg.model, k)]
        if diff:
            r.problem(f"{cj} does not match the config's model: {'; '.join(diff)}")
    if len(r.problems) == before:  # headers and index against the config's shapes; no weight is read
        from megatron_r1.ckpt.hf import CheckpointError, check_hf_weights
        try:
            n = check_hf_weights(path, cfg.model)
        except CheckpointError as e:
            return r.problem(str(e))
        r.line(f"  ok        {what}: {path} ({n} tensors: names, shapes, file sizes)")


def _check_prompts(r: Report, what: str, path: str | None, cfg: Config, tokenizer: str | None,
                   limit: int | None) -> None:
    """Every row parsed and validated as the trainer will (data.on_error), the first error named;
    with a tokenizer, the prompts longer than `limit` tokens (dropped at load) counted."""
    from megatron_r1.data.prompts import DataError, drop_overlong, load_prompts, report
    if not path:
        return r.problem(f"{what}: not set", "missing")
    if not os.path.exists(path):
        return r.problem(f"{what} {path}", "missing")
    try:
        ds = load_prompts(path, cfg.data.prompt_key, cfg.data.answer_key, cfg.data.on_error)
    except DataError as e:
        return r.problem(f"{what}: {e}")
    note = ""
    if tokenizer and limit:
        from megatron_r1.data.templates import render_prompt
        from megatron_r1.data.tokenizer import load_tokenizer
        try:
            tok = load_tokenizer(tokenizer)
            ds = drop_overlong(ds, lambda e: len(tok.encode(render_prompt(cfg.rl.template, e.prompt), bos=True)),
                               limit)
        except DataError as e:
            return r.problem(f"{what}: {e}")
        except Exception as e:  # noqa: BLE001 - the tokenizer check is the path check's business
            note = f"; prompt lengths not checked (tokenizer {tokenizer}: {type(e).__name__}: {e})"
        else:
            note = f"; every prompt tokenized (limit {limit} tokens)"
    for line in report(ds, path, f" (limit {limit} tokens)" if limit else ""):
        r.warn(line)
    r.line(f"  ok        {what}: {path} ({len(ds)} rows parsed and validated{note})")


def _check_sft_rows(r: Report, path: str, prompt_key: str, response_key: str) -> None:
    from megatron_r1.data.prompts import DataError
    from megatron_r1.sft.trainer import sft_records
    if not os.path.exists(path):
        return r.problem(f"data (--data) {path}", "missing")
    try:
        n = sum(1 for _ in sft_records(path, prompt_key, response_key))
    except DataError as e:
        return r.problem(f"data (--data): {e}")
    r.line(f"  ok        data (--data): {path} ({n} rows parsed and validated)")


def _check_corpus(r: Report, prefix: str) -> None:
    """A Megatron .bin/.idx corpus: the index read, the .bin as long as the index says."""
    missing = [prefix + s for s in (".bin", ".idx") if not os.path.exists(prefix + s)]
    if missing:
        return r.problem(f"data (--data) {', '.join(missing)}", "missing")
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        ds = IndexedDataset(prefix, mmap=False)
        idx = ds.index
        need = int(idx.sequence_pointers[-1]) + int(idx.sequence_lengths[-1]) * idx.dtype_size if len(idx) else 0
    except Exception as e:  # noqa: BLE001 - megatron-core asserts on a damaged index
        return r.problem(f"{prefix}.idx: unreadable Megatron corpus index ({type(e).__name__}: {e})")
    size = os.path.getsize(prefix + ".bin")
    if size < need:
        return r.problem(f"{prefix}.bin: truncated ({size} bytes, the index needs {need})")
    r.line(f"  ok        data (--data): {prefix}{{.bin,.idx}} ({len(idx)} documents)")


def _check_resume(r: Report, save_dir: str) -> None:
    """What the trainer's resume will do: the newest checkpoint whose metadata, shard sizes and trainer
    state read back (no tensor is loaded); the ones it would skip, with why."""
    from megatron_r1.ckpt.checkpoint import list_checkpoints, verify_checkpoint
    from megatron_r1.ckpt.hf import CheckpointError
    found = list_checkpoints(save_dir)
    for _, path in reversed(found):
        try:
            info = verify_checkpoint(path)
        except CheckpointError as e:
            r.warn(f"resume: would skip {path}: {e}")
            continue
        lay = info.get("layout") or {}
        saved = ",".join(f"{k}{lay[k]}" for k in ("tp", "cp", "ep", "pp", "dp") if k in lay) or "unknown layout"
        return r.line(f"  resume    from {path} (step {info['step']}, {info['tensors']} tensors, saved as {saved})")
    if found:
        return r.problem(f"resume: none of the {len(found)} checkpoints in {save_dir} loads")
    r.line(f"  resume    none: starts from the initial weights ({save_dir})")


def _check_file(r: Report, what: str, path: str | None, suffixes: tuple = ("",)) -> None:
    if not path:
        return r.problem(f"{what}: not set", "missing")
    absent = [path + s for s in suffixes if not os.path.exists(path + s)]
    if absent:
        return r.problem(f"{what} {', '.join(absent)}", "missing")
    r.line(f"  ok        {what}: {path}" + ("" if suffixes == ("",) else f"{{{','.join(suffixes)}}}"))


def _versions(r: Report, needs_vllm: bool, cfg: Config) -> None:
    import torch
    from megatron_r1.rollout.engine import check_vllm_version, installed_vllm_version
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    r.line(f"  torch     {torch.__version__} ({cuda}; this machine: "
           f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPUs)")
    found = installed_vllm_version()
    try:
        check_vllm_version(found)
        r.line(f"  vllm      {found} (ok)")
    except ImportError as e:
        if needs_vllm:
            r.problem(str(e), "problem")
        else:
            r.line(f"  vllm      {found or 'not installed'} (not needed by this command)")
    from megatron_r1.kernels import fp8_path
    r.line(f"  FP8       {fp8_path(cfg)}")


def _runtime_warnings(r: Report, cfg: Config, plan, a) -> None:
    """What the plan allows but megatron_r1.parallel cannot run yet."""
    from megatron_r1.parallel.plan import _fmt_split
    m, par = cfg.model, cfg.parallel
    from megatron_r1.parallel.mesh import stage_layer_counts
    try:
        runtime_split = stage_layer_counts(m.num_hidden_layers, par.pp, par.vpp, par.first_stage_layers,
                                           par.last_stage_layers)
    except ConfigError as e:
        r.warn(f"runtime: {e}; the plan assumed {_fmt_split(plan.split)}")
    else:
        if list(runtime_split) != list(plan.split):
            r.warn(f"runtime: the config splits the layers as {_fmt_split(runtime_split)}, the plan as "
                   f"{_fmt_split(plan.split)}")


def _rollout(r: Report, cfg: Config, world: int, plan, gpu_mem_gb: float) -> None:
    """The rollout layout and its memory per GPU beside the training state (parallel/plan.py rollout_memory)."""
    from megatron_r1.config import validate_rollout_layout
    from megatron_r1.parallel.plan import format_rollout_memory, rollout_memory
    ro = cfg.rollout
    if world % ro.tp:
        return r.problem(f"rollout.tp={ro.tp} does not divide the world size {world}")
    try:
        validate_rollout_layout(ro, world)
    except ConfigError as e:
        return r.problem(str(e))
    replicas = world // ro.tp
    if plan is None:
        n = cfg.model.num_parameters()
        return r.line(f"  rollout   vLLM co-located, tp={ro.tp} dp={ro.dp} ep={ro.ep}: {replicas} replicas; bf16 "
                      f"weights {n['total'] * 2 / ro.tp / 1e9:.1f} GB per GPU (no training plan: memory not checked)")
    mem = rollout_memory(plan, cfg.model, tp=ro.tp, ep=ro.ep, dp=ro.dp,
                         gpu_memory_utilization=ro.gpu_memory_utilization, sleeps=ro.sleep_between_steps,
                         sleep_level=ro.sleep_level, beta=cfg.rl.beta, max_model_len=ro.max_model_len)
    lines = format_rollout_memory(mem)
    r.line("  " + lines[0] + f"; {replicas} replicas of tp={ro.tp}")
    for s in lines[1:]:
        r.line("  " + s)
    if not mem.fits:
        r.warn(f"rollout: co-located memory does not fit {gpu_mem_gb:g} GB per GPU (rollout phase "
               f"{mem.rollout_phase:.1f} GB, training phase {mem.training_phase:.1f} GB); " + "; ".join(mem.advice))


def _would_run(r: Report, command: str, argv: list[str], nodes: int, gpn: int) -> None:
    strip = {"--dry-run"}
    with_value = {"--nodes", "--gpus-per-node", "--recompute", "--dispatch-dtype", "--gpu-mem-gb", "--plan-json"}
    keep, skip = [], False
    for i, x in enumerate(argv):
        if skip:
            skip = False
            continue
        flag = x.split("=", 1)[0]
        if flag in ("--recompute", "--dispatch-dtype"):  # not flags of the real run: their config overrides
            key = "train.recompute" if flag == "--recompute" else "moe.dispatch_dtype"
            keep.append(f"{key}=" + (x.split("=", 1)[1] if "=" in x else argv[i + 1]))
            skip = "=" not in x
            continue
        if x in strip:
            continue
        if x in with_value:
            skip = True
            continue
        if x.split("=", 1)[0] in with_value:
            continue
        keep.append(x)
    r.line(f"would run   srun --nodes={nodes} --ntasks-per-node={gpn} --gpus-per-node={gpn} \\")
    r.line(f"              megatron-r1 {command} {' '.join(keep)}")
    r.line(f"            = {nodes * gpn} ranks, one per GPU; rendezvous from the first host of the node list")


# ------------------------------------------------------------------------------------------- main
def run(command: str, a: argparse.Namespace, cfg: Config, argv: list[str], *, seq_length: int | None,
        global_batch_size: int | None, paths, needs_vllm: bool, extra_checks=None) -> int:
    """The shared report. `paths`: callables `(report) -> None` that check one input each."""
    from megatron_r1.parallel.mesh import validate_layout
    from megatron_r1.parallel.plan import PlanOptions, format_plan, make_plan, plan_to_dict
    r = Report()
    nodes, gpn, src = hypothetical_world(a)
    world = nodes * gpn
    host_nodes = os.environ.get("SLURM_JOB_NUM_NODES", "1")
    r.line(f"dry run: megatron-r1 {command} (no model allocated, torch.distributed not initialised)")
    n = cfg.model.num_parameters()
    r.line(f"config      {a.config} ({cfg.model.model_type}, {cfg.model.num_hidden_layers} layers, "
           f"{n['total'] / 1e9:.1f}B params); run_dir {cfg.run_dir}")
    r.line(f"world       PLANNED {nodes} nodes × {gpn} GPUs = {world} ranks ({src}); this dry run runs on "
           f"{socket.gethostname()} ({host_nodes} node{'s' if host_nodes != '1' else ''} allocated), "
           f"which does not change the plan")
    if a.recompute is not None:
        cfg.train.recompute = a.recompute
    if a.dispatch_dtype is not None:
        cfg.moe.dispatch_dtype = a.dispatch_dtype
    par = cfg.parallel
    plan = None
    if seq_length is not None:
        # the layer split is checked (and reported as a warning) below, against the plan's; every other
        # rule is an error (raised as ConfigError -> exit 2 with the arithmetic)
        dp = validate_layout(world, par, cfg.model, check_split=False)
        r.line(f"layout      tp={par.tp} cp={par.cp} ep={par.ep} pp={par.pp} vpp={par.vpp} -> dp={dp} "
               f"(validate_layout on {world} ranks)")
        opts = PlanOptions(gpus=world, parallel=par, seq_length=seq_length,
                           first_stage_layers=par.first_stage_layers, last_stage_layers=par.last_stage_layers,
                           micro_batch_size=cfg.train.micro_batch_size, global_batch_size=global_batch_size,
                           recompute=cfg.train.recompute, dispatch_dtype=cfg.moe.dispatch_dtype,
                           recompute_modules=cfg.train.recompute_modules,
                           recompute_num_layers=cfg.train.recompute_num_layers,
                           param_dtype="fp32" if cfg.train.params_dtype == "float32" else "bf16",
                           gpu_mem_gb=a.gpu_mem_gb)
        plan = make_plan(cfg.model, opts, model_name=os.path.basename(str(a.config)))
        r.line("")
        for s in format_plan(plan).splitlines():
            r.line("  " + s if s else "")
        r.line("")
        if not plan.fits:
            r.problem(f"plan: the worst stage needs {plan.worst.total_bytes / 1e9:.1f} GB > {a.gpu_mem_gb:g} GB per GPU")
        _runtime_warnings(r, cfg, plan, a)
    for check in extra_checks or ():
        check(r, world, plan)
    r.line("checks")
    if needs_vllm:
        _rollout(r, cfg, world, plan, a.gpu_mem_gb)
    for check in paths:
        check(r)
    _versions(r, needs_vllm, cfg)
    if command != "rejection-sample":
        _check_resume(r, cfg.train.save_dir or os.path.join(cfg.run_dir, "ckpt"))
    else:
        r.line("  output    written once at the end (no checkpoints)")
    _would_run(r, command, argv, nodes, gpn)
    verdict = "FAILED" if r.problems else "OK"
    r.line(f"dry run {verdict}: {len(r.problems)} problem(s), {len(r.warnings)} warning(s)")
    if a.plan_json:
        out = {"command": command, "world": {"nodes": nodes, "gpus_per_node": gpn, "ranks": world, "source": src},
               "plan": plan_to_dict(plan) if plan is not None else None, "problems": r.problems,
               "warnings": r.warnings, "ok": not r.problems}
        os.makedirs(os.path.dirname(os.path.abspath(a.plan_json)), exist_ok=True)
        with open(a.plan_json, "w") as f:
            json.dump(out, f, indent=2)
    sys.stdout.flush()
    return 1 if r.problems else 0


# ------------------------------------------------------------------------------- per entry point
def grpo(a: argparse.Namespace, cfg: Config, argv: list[str]) -> int:
    rl = cfg.rl
    seq = rl.max_prompt_len + rl.max_response_len
    mult = 2 * cfg.parallel.cp * cfg.parallel.tp if cfg.parallel.cp > 1 else cfg.parallel.tp
    seq = -(-seq // mult) * mult  # the trainer pads to this multiple (rl/trainer.py pad_multiple)
    n = rl.prompts_per_step * rl.group_size

    def batch_checks(r: Report, world: int, plan) -> None:
        try:  # the trainer's own checks (config.validate), for the planned world
            validate(cfg, world, rl=True)
        except ConfigError as e:
            r.problem(str(e))
        if rl.max_prompt_len + rl.max_response_len > cfg.rollout.max_model_len:
            r.warn(f"rollout.max_model_len={cfg.rollout.max_model_len} < max_prompt_len + max_response_len = "
                   f"{rl.max_prompt_len + rl.max_response_len}: responses are cut to fit")

    tok = cfg.data.tokenizer
    limit = min(rl.max_prompt_len, cfg.rollout.max_model_len - 1)
    paths = [lambda r: _check_hf_dir(r, "init policy (--init-hf)", a.init_hf, cfg, need_tokenizer=not tok),
             lambda r: _check_prompts(r, "prompts (data.train_path)", cfg.data.train_path, cfg, tok or a.init_hf,
                                      limit)]
    if tok:
        paths.append(lambda r: _check_file(r, "tokenizer (data.tokenizer)", tok))
    if getattr(a, "eval", None):
        paths.append(lambda r: _check_prompts(r, "eval prompts (--eval)", a.eval, cfg, tok or a.init_hf, limit))
    paths.append(lambda r: _check_reward_models(r, rl))
    return run("grpo", a, cfg, argv, seq_length=seq, global_batch_size=n // max(rl.updates_per_batch, 1), paths=paths,
               needs_vllm=True, extra_checks=[batch_checks])


def _check_reward_models(r: Report, rl) -> None:
    """Every reward model a reward mapping names (rl.rewards, rl.routes.*): trained and of the right kind. One
    not trained yet is a warning: its stage may be queued ahead of this one (the scripts' afterok chain)."""
    from megatron_r1.rl.rewards.registry import get_reward_spec, split_name
    for where, mapping in [("rl.rewards", rl.rewards)] + [(f"rl.routes.{t}", m) for t, m in rl.routes.items()]:
        for full, value in mapping.items():
            name, kw = split_name(str(full))
            spec = get_reward_spec(name)
            if spec.check is None:
                continue
            opts = dict(kw, **{k: v for k, v in (value.items() if isinstance(value, dict) else ()) if k != "weight"})
            try:
                spec.check(**opts)
                r.line(f"  ok        {where}.{name}: {opts.get(spec.arg or '', '')}")
            except ConfigError as e:
                r.warn(f"{where}.{name}: {e}")


def _lm_paths(a, cfg: Config, data_suffixes: tuple) -> list:
    if data_suffixes == ("",):  # sft rows
        paths = [lambda r, d=d: _check_sft_rows(r, d, a.prompt_key, a.response_key)
                 for d in (a.data if isinstance(a.data, list) else [a.data])]
    else:
        paths = [lambda r: _check_corpus(r, a.data)]
    tok = a.tokenizer or cfg.data.tokenizer
    if a.init_hf:
        paths.append(lambda r: _check_hf_dir(r, "init weights (--init-hf)", a.init_hf, cfg, need_tokenizer=not tok))
    if tok:
        paths.append(lambda r: _check_file(r, "tokenizer", tok))
    return paths


def sft(a: argparse.Namespace, cfg: Config, argv: list[str]) -> int:
    if not (a.tokenizer or cfg.data.tokenizer or a.init_hf):
        raise ConfigError("sft needs a tokenizer: --tokenizer, data.tokenizer or --init-hf")
    return run("sft", a, cfg, argv, seq_length=cfg.train.seq_length,
               global_batch_size=cfg.train.global_batch_size, paths=_lm_paths(a, cfg, ("",)), needs_vllm=False)


def train_rm(a: argparse.Namespace, cfg: Config, argv: list[str]) -> int:
    def pairs(r: Report, what: str, path: str) -> None:
        from megatron_r1.data.prompts import DataError
        from megatron_r1.rl.train_rm import read_pairs
        if not os.path.exists(path):
            return r.problem(f"{what} {path}", "missing")
        try:
            r.line(f"  ok        {what}: {path} ({len(read_pairs(path))} pairs parsed and validated)")
        except DataError as e:
            r.problem(f"{what}: {e}")

    if not (a.tokenizer or cfg.data.tokenizer or a.init_hf):
        raise ConfigError("train-rm needs a tokenizer: --tokenizer, data.tokenizer or --init-hf")
    paths = [lambda r: pairs(r, "pairs (--data)", a.data)] + _lm_paths(a, cfg, ("",))[1:]
    if a.eval:
        paths.append(lambda r: pairs(r, "held-out pairs (--eval)", a.eval))
    return run("train-rm", a, cfg, argv, seq_length=cfg.train.seq_length,
               global_batch_size=cfg.train.global_batch_size, paths=paths, needs_vllm=False)


def pretrain(a: argparse.Namespace, cfg: Config, argv: list[str]) -> int:
    return run("pretrain", a, cfg, argv, seq_length=cfg.train.seq_length,
               global_batch_size=cfg.train.global_batch_size, paths=_lm_paths(a, cfg, (".bin", ".idx")),
               needs_vllm=False)


def rejection(a: argparse.Namespace, cfg: Config, argv: list[str]) -> int:
    def out_dir(r: Report) -> None:
        d = os.path.dirname(os.path.abspath(a.out))
        r.line(f"  output    {a.out}" + ("" if os.path.isdir(d) else " (its directory will be created)"))

    tok = cfg.data.tokenizer
    paths = [lambda r: _check_hf_dir(r, "policy (--init-hf)", a.init_hf, cfg, need_tokenizer=not tok),
             lambda r: _check_prompts(r, "prompts (--data / data.train_path)", a.data or cfg.data.train_path, cfg,
                                      tok or a.init_hf, cfg.rollout.max_model_len - 1), out_dir]
    return run("rejection-sample", a, cfg, argv, seq_length=None, global_batch_size=None, paths=paths,
               needs_vllm=True)
