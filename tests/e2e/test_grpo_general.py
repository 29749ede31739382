"""The general-RL stage's loop in one fast GRPO run: reasoning prompts (no task field) go to the rule rewards,
general prompts (`task: general`) to a helpfulness and a harmlessness reward model served through the registry;
the metrics show each route; the reference policy is refreshed every 2 steps."""
import json

import torch

from megatron_r1.parallel.spawn import run_ranks


def _tiny_rms(root, tokenizer_dir):
    """Two tiny Qwen2-shaped reward models (random weights: this test is about routing and serving; training
    is tests/parallel/test_train_rm.py's)."""
    from megatron_r1.ckpt.hf import hf_tensors, model_state, save_hf
    from megatron_r1.config import load_config
    from megatron_r1.model import CausalLM
    from megatron_r1.training import copy_tokenizer
    cfg = load_config("tiny-qwen2", ["model.num_hidden_layers=1"]).model
    torch.manual_seed(1)
    out = {}
    for kind in ("helpful", "harmless"):
        d = root / f"rm_{kind}"
        save_hf(hf_tensors(model_state(CausalLM(cfg)), cfg), cfg, str(d), dtype=torch.float32)
        copy_tokenizer(tokenizer_dir, str(d))
        (d / "rm.json").write_text(json.dumps({"kind": kind, "score_token_id": 2, "max_length": 128}))
        out[kind] = str(d)
    return out


def _run(hf_dir, train_path, run_dir, rms):
    from megatron_r1.config import load_config
    from megatron_r1.rl.reward_model import load_reward_model
    from megatron_r1.rl.trainer import GRPOTrainer
    routes = {"general": {"rm_helpful": {"weight": 1.0, "path": rms["helpful"]},
                          f"rm_harmless:{rms['harmless']}": 0.5}}
    cfg = load_config("examples/r1_zero_tiny.yaml", [
        "model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
        "model.moe_intermediate_size=32", "train.train_steps=2", "rl.prompts_per_step=4", "rl.group_size=2",
        "rl.max_response_len=16", "rl.max_prompt_len=200", "rl.beta=0.01", "rl.ref_refresh_interval=2",
        f"rl.routes={json.dumps(routes)}", f"data.train_path={train_path}", f"run_dir={run_dir}",
        "rollout.max_model_len=256", "train.micro_batch_size=8", "train.lr=3e-3"])
    trainer = GRPOTrainer(cfg, hf_dir)

    def ref_equals_policy():
        return all(torch.equal(a, b) for r, p in zip(trainer.ref_chunks, trainer.session.chunks)
                   for a, b in zip(r.parameters(), p.parameters()))

    seen = []  # what the router was given each step (the trainer's own call, recorded, not replaced)
    router = trainer.rewards

    def recording(texts, refs, tasks=None, prompts=None):
        res = router(texts, refs, tasks=tasks, prompts=prompts)
        seen.append((texts, tasks, prompts, res))
        return res
    trainer.rewards = recording
    out = []
    for step in range(2):
        seen.clear()
        m = trainer.train_step(step)
        ((texts, tasks, prompts, res),) = seen
        general = [i for i, t in enumerate(tasks) if t == "general"]
        # the routed scores are the reward model's own scores of (prompt, response)
        offline = load_reward_model(rms["helpful"]).score([prompts[i] for i in general],
                                                          [texts[i] for i in general]) if general else []
        out.append({"metrics": m, "ref_equals_policy": ref_equals_policy(), "general": len(general),
                    "routed_helpful": [res.components["general/rm_helpful"][i] for i in general], "offline": offline,
                    "accuracy_on_general": [res.components["accuracy"][i] for i in general],
                    "route_general": [v is not None for v in res.components["route/general"]],
                    "is_general": [t == "general" for t in tasks], "n": len(texts)})
    trainer.session.close()
    return out


def test_mixed_prompts_are_routed_and_the_reference_refreshes(tiny_policy, tmp_path):
    from megatron_r1.recipes.general_tasks import general_prompts
    hf_dir, info = tiny_policy
    reasoning = [json.loads(line) for line in open(info["train"])][:4]
    rows = reasoning + [{"prompt": g["prompt"], "answer": g["answer"], "task": "general"}
                        for g in general_prompts(4, seed=0)]
    train = tmp_path / "mixed.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rms = _tiny_rms(tmp_path, info["tokenizer"])
    (hist,) = run_ranks(_run, 1, hf_dir, str(train), str(tmp_path / "run"), rms, timeout=900, start_method="spawn")
    # one epoch of 8 prompts over the 2 steps: 4 general prompts × 2 samples went to the reward models
    assert sum(h["general"] for h in hist) == 8
    for h in hist:
        m = h["metrics"]
        assert h["route_general"] == h["is_general"]
        if h["general"]:
            assert h["routed_helpful"] == h["offline"]  # served in the loop = scored offline
            assert all(a is None for a in h["accuracy_on_general"])  # no rule reward on general prompts
            assert "reward/route/general" in m and "reward/general/rm_harmless" in m
        if h["general"] < h["n"]:
            assert 0.0 <= m["reward/accuracy"] <= 1.0 and "reward/route/default" in m
    # the reference is the initial policy after step 1 and the step-2 policy after the refresh at step 2
    assert not hist[0]["ref_equals_policy"] and "ref_refreshed" not in hist[0]["metrics"]
    assert hist[1]["ref_equals_policy"] and hist[1]["metrics"]["ref_refreshed"] == 1.0
