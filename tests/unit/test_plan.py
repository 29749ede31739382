"""megatron_r1.parallel.plan and tools/plan_parallel.py: DeepSeek's 671B layout fits 80 GB, impossible
layouts are refused with the reason, a too-small layout says it does not fit, and the arithmetic
(parameter totals, bubble, in-flight micro-batches, all-to-all) matches the stated formulas."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1.config import ConfigError, ParallelConfig, load_config
from megatron_r1.parallel.plan import GB, PlanOptions, format_plan, make_plan, plan_to_dict

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "plan_parallel.py"
V3 = load_config("deepseek-v3-671b").model

# DeepSeek-V3 (tech report §3.2): 2048 H800, PP16, EP64 (over 8 nodes), ZeRO-1 DP, no TP; sequence 4096;
# the batch ramps to 15360 sequences. dp = 2048 / 16 = 128 and 15360 = 128 · 120 micro-batches of 1.
# The runtime applies full recompute here; see the module docstring for selective (DeepSeek's own recipe).
V3_LAYOUT = dict(gpus=2048, parallel=ParallelConfig(tp=1, pp=16, ep=64), seq_length=4096, micro_batch_size=1,
                 global_batch_size=15360, recompute="full")
V3_ARGS = ["--model", "deepseek-v3-671b", "--gpus", "2048", "--tp", "1", "--pp", "16", "--ep", "64",
           "--seq-length", "4096", "--micro-batch-size", "1", "--global-batch-size", "15360", "--recompute", "full"]


def run_tool(*args):
    """The tool as a user runs it (a fresh interpreter: imports torch, so a few seconds)."""
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def _load_tool():
    spec = importlib.util.spec_from_file_location("plan_parallel", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cli(capsys, *args):
    """The tool's `main` in this process (same argument parsing, no interpreter start-up)."""
    rc = _load_tool().main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def plan(model="deepseek-v3-671b", **kw):
    return make_plan(load_config(model).model, PlanOptions(**kw), model_name=model)


# ------------------------------------------------------------------------------- DeepSeek's layout
def test_deepseek_published_layout_fits_80gb():
    assert 15360 % (1 * 2048 // 16) == 0
    p = plan(**V3_LAYOUT)
    assert (p.dp, p.edp, p.microbatches) == (128, 2, 120)
    assert sum(p.split) == 61 and len(p.split) == 16
    assert p.worst.total_bytes < 80 * GB and p.fits
    # the worst stage is every stage's upper bound, and its parts add up
    assert all(s.total_bytes <= p.worst.total_bytes for s in p.stages)
    assert p.worst.total_bytes == pytest.approx(sum(p.worst.memory.values()))
    assert "FITS: yes" in format_plan(p)


def test_deepseek_published_layout_via_tool_json(capsys):
    r = run_tool(*V3_ARGS, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["fits"] is True and d["memory_gb"]["total"] < 80
    assert d["layout"] == {"tp": 1, "cp": 1, "ep": 64, "pp": 16, "vpp": 1, "dp": 128, "edp": 2, "sp": False,
                                "zero1": True, "schedule": "1f1b"}
    assert d["batch"]["microbatches"] == 120 and sum(d["layers_per_stage"]) == 61
    r = cli(capsys, *V3_ARGS, "--require-fit")
    assert r.returncode == 0 and "FITS: yes" in r.stdout


def test_too_small_layout_does_not_fit(capsys):
    p = plan(gpus=8, parallel=ParallelConfig(pp=8))
    assert not p.fits and p.worst.total_bytes > 80 * GB
    r = run_tool("--model", "deepseek-v3-671b", "--gpus", "8", "--pp", "8")
    assert r.returncode == 0 and "FITS: no" in r.stdout
    assert cli(capsys, "--model", "deepseek-v3-671b", "--gpus", "8", "--pp", "8", "--require-fit").returncode == 1


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("args,reason", [
    (["--gpus", "2048", "--pp", "16", "--ep", "7"], "ep=7 does not divide"),
    (["--gpus", "2048", "--tp", "3", "--pp", "16"], "not divisible by tp·cp·pp = 3·1·16 = 48"),
    (["--gpus", "48", "--tp", "3", "--pp", "16"], "tp=3 does not divide num_attention_heads=128"),
    (["--gpus", "2048", "--pp", "16", "--ep", "64", "--global-batch-size", "1000"], "global_batch_size=1000"),
    (["--gpus", "2048", "--pp", "16", "--ep", "64", "--first-stage-layers", "3", "--last-stage-layers", "4"],
     "share 54 layers evenly"),
    (["--gpus", "2048", "--pp", "16", "--ep", "64", "--vpp", "2", "--global-batch-size", "15360"],
     "multiple of pp=16"),
])
def test_impossible_layouts_are_refused(capsys, args, reason):
    r = cli(capsys, "--model", "deepseek-v3-671b", *args)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], r.stderr


def test_ep7_refused():
    r = run_tool("--model", "deepseek-v3-671b", "--gpus", "2048", "--pp", "16", "--ep", "7")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("error: parallel.ep=7 does not divide the ranks of a pipeline stage "
                        "(tp·cp·dp = 1·1·128 = 128)\n")
    with pytest.raises(ConfigError, match="ep=7"):
        plan(gpus=2048, parallel=ParallelConfig(pp=16, ep=7))
    # ep dividing the stage ranks but not the 256 experts
    with pytest.raises(ConfigError, match="ep=3 does not divide n_routed_experts=256"):
        plan(gpus=48, parallel=ParallelConfig(pp=16, ep=3))


def test_dense_model_refuses_ep():
    with pytest.raises(ConfigError, match="needs a MoE model"):
        plan("qwen2-1.5b", gpus=8, parallel=ParallelConfig(ep=2))


# ------------------------------------------------------------------------------- layer splits
def test_uneven_split_explicit_and_auto():
    p = plan(gpus=2048, parallel=ParallelConfig(pp=16, ep=64), first_stage_layers=3, last_stage_layers=2)
    assert p.split == [3] + [4] * 14 + [2] and p.split_mode == "explicit" and p.notes
    p = plan(gpus=2048, parallel=ParallelConfig(pp=16, ep=64))
    assert sum(p.split) == 61 and p.split[1:-1] == [4] * 14 and p.split[0] <= 4 and p.split[-1] <= 4
    assert [list(s.layers) for s in p.stages] == [list(range(sum(p.split[:i]), sum(p.split[:i + 1])))
                                                  for i in range(16)]
    p = plan("llama-8b", gpus=64, parallel=ParallelConfig(tp=2, sp=True, pp=4))
    assert p.split == [8, 8, 8, 8] and p.split_mode == "even" and not p.notes


# ----------------------------------------------------------------------------- parameter totals
@pytest.mark.parametrize("model,kw", [
    ("deepseek-v3-671b", dict(gpus=2048, parallel=ParallelConfig(pp=16, ep=64))),
    ("deepseek-v3-671b", dict(gpus=1024, parallel=ParallelConfig(tp=8, sp=True, pp=8, ep=32))),
    ("deepseek-v3-671b", dict(gpus=8, parallel=ParallelConfig(pp=1, ep=8))),
    ("tiny-moe", dict(gpus=8, parallel=ParallelConfig(tp=2, pp=2, ep=4), seq_length=64)),
    ("qwen2-1.5b", dict(gpus=8, parallel=ParallelConfig(tp=2, sp=True))),
    ("llama-8b", dict(gpus=64, parallel=ParallelConfig(tp=2, pp=4, vpp=2), global_batch_size=256)),
])
def test_unique_parameters_equal_num_parameters(model, kw):
    p = plan(model, **kw)
    n = load_config(model).model.num_parameters()
    assert sum(s.unique_params for s in p.stages) == pytest.approx(n["total"] + n["mtp"], rel=1e-12)
    assert plan_to_dict(p)["parameters"]["unique_over_stages"] == pytest.approx(n["total"] + n["mtp"], rel=1e-12)


def test_state_bytes_follow_dtypes_and_sharding():
    base = dict(gpus=2048, parallel=ParallelConfig(pp=16, ep=64), recompute="full")
    w = plan(**base).stages[5]
    pgpu = w.params.total
    assert w.memory["weights"] == pytest.approx(2 * pgpu) and w.memory["grads"] == pytest.approx(4 * pgpu)
    # ZeRO-1: 12 B/param of optimizer state, dense / (dp·cp) = /128, experts / edp = /2
    assert w.memory["master"] + w.memory["adam_mv"] == pytest.approx(12 * (w.params.dense / 128 + w.params.expert / 2))
    assert plan(**base, grad_dtype="bf16").stages[5].memory["grads"] == pytest.approx(2 * pgpu)
    nz = plan(**dict(base, parallel=ParallelConfig(pp=16, ep=64, zero1=False))).stages[5]
    assert nz.memory["master"] + nz.memory["adam_mv"] == pytest.approx(12 * pgpu)
    assert plan(**base, param_dtype="fp32").stages[5].memory["master"] == 0  # the weights are the master copy


# ----------------------------------------------------------------------------- schedule and a2a
def test_bubble_formulas():
    p = plan(gpus=2048, parallel=ParallelConfig(pp=16, ep=64), global_batch_size=15360)
    assert p.bubble == pytest.approx(15 / (120 + 15))
    p = plan("llama-8b", gpus=64, parallel=ParallelConfig(tp=2, pp=4, vpp=2), global_batch_size=256)  # m = 32
    assert p.schedule == "interleaved" and p.bubble == pytest.approx(1.5 / (32 + 1.5))
    assert plan("qwen2-1.5b", gpus=8, parallel=ParallelConfig()).bubble == 0


def test_inflight_microbatches():
    p = plan(gpus=2048, parallel=ParallelConfig(pp=16, ep=64), global_batch_size=15360)
    assert [s.inflight for s in p.stages] == [16 - s for s in range(16)]
    p = plan(gpus=2048, parallel=ParallelConfig(pp=16, ep=64), global_batch_size=128 * 4)  # m = 4 < pp
    assert [s.inflight for s in p.stages] == [min(16 - s, 4) for s in range(16)]
    p = plan("llama-8b", gpus=64, parallel=ParallelConfig(tp=2, pp=4, vpp=2), global_batch_size=256)
    assert p.stages[0].inflight == pytest.approx(4 * (1 + 3 / 8))  # Megatron: pp·(1 + (pp−1)/(pp·vpp))


@pytest.mark.parametrize("pp,vpp,m", [(4, 1, 8), (4, 1, 2), (16, 1, 120), (4, 2, 8), (4, 2, 4), (4, 3, 12),
                                      (2, 2, 6)])
def test_inflight_matches_runtime_schedules(pp, vpp, m):
    """In-flight micro-batches = the peak of forwards not yet backwarded in pipeline.py's own schedules."""
    from megatron_r1.parallel.pipeline import schedule_1f1b, schedule_interleaved

    def peak(ops):
        live = top = 0
        for kind, _, _ in ops:
            live += 1 if kind == "F" else -1
            top = max(top, live)
        return top

    model = dataclasses.replace(load_config("llama-8b").model, num_hidden_layers=2 * pp * vpp)
    p = make_plan(model, PlanOptions(gpus=pp, parallel=ParallelConfig(pp=pp, vpp=vpp), global_batch_size=m))
    for r in range(pp):
        ops = schedule_interleaved(pp, vpp, r, m) if vpp > 1 else schedule_1f1b(pp, r, m)
        assert p.stages[r].inflight * vpp == peak(ops), r


def test_recompute_ordering_and_full_recompute_keeps_layer_inputs():
    acts = {rc: plan(gpus=2048, parallel=ParallelConfig(pp=16, ep=64), first_stage_layers=3, last_stage_layers=2,
                     recompute=rc).stages[5].act_per_microbatch for rc in ("none", "selective", "full")}
    assert acts["none"] > acts["selective"] > acts["full"]
    assert acts["full"] == 4 * 2 * 7168 * 4096  # 4 layers × the bf16 layer input


def test_all_to_all_volume():
    p = plan(gpus=2048, parallel=ParallelConfig(pp=16, ep=64), global_batch_size=15360)
    k, h = 8, 7168
    assert p.a2a_per_token_layer["dispatch"] == pytest.approx(k * h * 2 * 63 / 64)
    assert p.a2a_per_token_layer["combine"] == pytest.approx(k * h * 2 * 63 / 64)
    st = p.a2a_per_step
    assert st["tokens"] == 4096 * 120 * st["moe_layers"]
    assert st["total"] == pytest.approx(st["tokens"] * 4 * k * h * 2 * 63 / 64)  # fwd + bwd, 2 directions each
    fp8 = plan(gpus=2048, parallel=ParallelConfig(pp=16, ep=64), dispatch_dtype="fp8")
    assert fp8.a2a_per_token_layer["dispatch"] == pytest.approx(k * (h + 4 * h / 128) * 63 / 64)  # codes + scales
    assert plan(gpus=16, parallel=ParallelConfig(pp=16, ep=1)).a2a_per_token_layer["dispatch"] == 0


# ---------------------------------------------------------------------------------- dense student
def test_dense_student_plan(capsys):
    p = plan("qwen2-1.5b", gpus=8, parallel=ParallelConfig(tp=2, sp=True), global_batch_size=64, seq_length=8192)
    assert (p.dp, p.microbatches, p.split) == (4, 16, [28]) and p.fits
    assert p.a2a_per_step["total"] == 0 and p.stages[0].params.expert == 0
    r = cli(capsys, "--model", "qwen2-1.5b", "--gpus", "8", "--tp", "2", "--global-batch-size", "64", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["fits"] and d["layout"]["dp"] == 4 and d["layout"]["sp"] is True


def test_recompute_terms_follow_the_runtime_module_list():
    """Each selective module drops its own terms; the default list is the runtime's default; full with a
    layer count sits between full and none."""
    from megatron_r1.config import DEFAULT_RECOMPUTE_MODULES, RECOMPUTE_MODULES

    def act(stage=5, **kw):  # stage 5: MoE layers; stage 0: the dense ones
        return make_plan(load_config("deepseek-v3-671b").model, PlanOptions(
            gpus=2048, parallel=ParallelConfig(pp=16, ep=64), **kw)).stages[stage].act_per_microbatch

    none = act(recompute="none")
    for mod in RECOMPUTE_MODULES:
        stage = 0 if mod == "mlp" else 5
        assert act(stage, recompute="selective", recompute_modules=(mod,)) < act(stage, recompute="none"), mod
    assert act(recompute="selective") == act(recompute="selective", recompute_modules=DEFAULT_RECOMPUTE_MODULES)
    assert act(recompute="selective", recompute_modules=("moe",)) < act(recompute="selective",
                                                                         recompute_modules=("moe_act",))
    assert act(recompute="full") < act(recompute="full", recompute_num_layers=2) < none
    with pytest.raises(ConfigError, match="recompute modules attn"):
        act(recompute="selective", recompute_modules=("attn",))


# ---------------------------------------------------------------------------- co-located rollout memory
def test_rollout_memory_671b_fits_with_sleep_and_says_what_fixes_it_otherwise():
    from megatron_r1.config import RolloutConfig, validate_rollout_layout
    from megatron_r1.parallel.plan import rollout_memory

    p = plan(**V3_LAYOUT)
    kw = dict(gpu_memory_utilization=0.45, sleep_level=1, beta=0.001, max_model_len=33792)
    ok = rollout_memory(p, V3, tp=64, ep=1, dp=1, sleeps=True, **kw)
    # vLLM serves the main model (no MTP) in bf16: 671.0 B params / 64 GPUs
    assert ok.vllm_weights == pytest.approx(V3.num_parameters()["total"] * 2 / 64 / GB)
    assert ok.reference > 0 and ok.kv_cache == pytest.approx(0.45 * 80 - ok.vllm_weights)
    assert ok.fits and ok.rollout_phase <= 80 and ok.training_phase <= 80
    assert any("sleep_level=2" in a for a in ok.advice)  # level 1 works but pays PCIe both ways
    # beta = 0: no frozen reference copy
    assert rollout_memory(p, V3, tp=64, ep=1, dp=1, sleeps=True, **{**kw, "beta": 0.0}).reference == 0
    # awake during training and a quarter of the rollout GPUs: neither phase fits, and the advice says why
    bad = rollout_memory(p, V3, tp=16, ep=1, dp=1, sleeps=False, **kw)
    assert not bad.fits
    assert any("sleep_between_steps=true" in a for a in bad.advice)
    assert any("no KV fraction fits" in a or "gpu_memory_utilization <=" in a for a in bad.advice)
    # a KV fraction that is too large is answered with the one that fits
    big_kv = rollout_memory(p, V3, tp=64, ep=1, dp=1, sleeps=True, **{**kw, "gpu_memory_utilization": 0.9})
    assert not big_kv.fits and any("gpu_memory_utilization <=" in a for a in big_kv.advice)
    # rollout.ep: vLLM's EP spans the engine, so it is 1 or tp·dp
    validate_rollout_layout(RolloutConfig(tp=8, ep=8), 2048)
    with pytest.raises(ConfigError, match=r"ep must be 1 or tp·dp = 8·1 = 8"):
        validate_rollout_layout(RolloutConfig(tp=8, ep=4), 2048)
    with pytest.raises(ConfigError, match="must span the whole world"):
        validate_rollout_layout(RolloutConfig(tp=8, dp=2, ep=16), 2048)


def test_671b_dry_run_prints_rollout_layout_and_memory(capsys, tmp_path):
    """The GRPO dry run of examples/r1_zero_671b.yaml (64 × 8 GPUs) prints the rollout engine layout and its
    memory per GPU beside the training state, says it fits, and names the setting that fixes a layout
    that does not."""
    from megatron_r1.cli import main

    base = ["grpo", "--config", str(REPO / "examples" / "r1_zero_671b.yaml"), "--init-hf", str(tmp_path / "none"),
            "--dry-run", "--nodes", "64", "--gpus-per-node", "8", f"run_dir={tmp_path / 'run'}"]
    main(base)  # exit 1: the checkpoint and prompts are missing; the plan is printed all the same
    out = capsys.readouterr().out
    assert "rollout   vLLM co-located, tp=64 dp=1 ep=1 (engine of 64 GPUs, experts TP-sharded); 8 replicas" in out
    assert "(incl. frozen reference" in out  # beta = 0.001
    line = next(x for x in out.splitlines() if "rollout phase" in x)
    assert line.endswith("of 80 GB: FITS"), line
    main(base + ["rollout.tp=16", "rollout.sleep_between_steps=false"])
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "warning: rollout: co-located memory does not fit 80 GB" in out
    assert "raise rollout.tp (or rollout.ep)" in out and "set rollout.sleep_between_steps=true" in out
