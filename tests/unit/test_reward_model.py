"""Reward models (rl/reward_model.py, rl/rewards/model.py), routing (rl/rewards/registry.py RewardRouter) and
the general task family (recipes/general_tasks.py)."""
import json
import math

import pytest
import torch

from megatron_r1.config import ConfigError
from megatron_r1.recipes import general_tasks as gt
from megatron_r1.rl import reward_model as rm
from megatron_r1.rl.rewards import RewardCombiner, RewardRouter, register_reward
from megatron_r1.rl.rewards.registry import split_name


def test_bradley_terry_loss_matches_a_hand_computation():
    chosen = torch.tensor([2.0, 0.5, 3.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.5, 3.0], requires_grad=True)
    loss, met = rm.bradley_terry_loss(chosen, rejected, normalizer=4.0)
    # margins 1, -1, 0: -log σ(1) = log(1 + e^-1), -log σ(-1) = log(1 + e), -log σ(0) = log 2
    nll = [math.log(1 + math.exp(-1)), math.log(1 + math.e), math.log(2)]
    assert loss.item() == pytest.approx(sum(nll) / 4.0, rel=1e-6)
    assert met["bt_loss_sum"].item() == pytest.approx(sum(nll), rel=1e-6)
    assert met["correct"].item() == 1 and met["pairs"].item() == 3  # a tie is not a win
    loss.backward()
    # d/dr_c of -log σ(m) / n = -σ(-m) / n; d/dr_r = +σ(-m) / n
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert chosen.grad.tolist() == pytest.approx([-sig(-m) / 4 for m in (1, -1, 0)], rel=1e-6)
    assert rejected.grad.tolist() == pytest.approx([sig(-m) / 4 for m in (1, -1, 0)], rel=1e-6)


def test_sequence_scores_read_the_token_logit_at_each_rows_last_position():
    from megatron_r1.config import load_config
    from megatron_r1.model import CausalLM
    cfg = load_config("tiny-qwen2", ["model.num_hidden_layers=1"]).model
    torch.manual_seed(0)
    model = CausalLM(cfg)
    ids, last = rm.pad_rows([[1, 5, 6, 7, 2], [1, 9, 2]], pad_id=3, multiple=4)
    assert ids.shape == (2, 8) and last.tolist() == [4, 2]
    with torch.no_grad():
        out = model(ids, with_mtp=False)
        full = model.full_logits(ids)
    scores = rm.sequence_scores(out, last, 2, model.mesh)
    assert scores.tolist() == pytest.approx([full[0, 4, 2].item(), full[1, 2, 2].item()], rel=1e-6)


def test_what_each_kind_judges():
    resp = "<think>\nidiot, but fine: 2 + 2 = 4\n</think>\n<answer>4</answer>"
    assert rm.summary_of(resp) == "4"
    assert rm.summary_of("no reasoning at all") == "no reasoning at all"
    assert rm.rm_text("Q?", resp, "helpful") == "Q?\n\n4"  # the summary only
    assert rm.rm_text("Q?", resp, "harmless") == "Q?\n\n" + resp.strip()  # the whole response, CoT included
    assert rm.prompt_text([{"role": "user", "content": "Hi"}]) == "Hi"
    with pytest.raises(ConfigError, match="expected one of helpful, harmless"):
        rm.rm_text("Q", "A", "honest")


def test_rm_ids_keep_the_scored_eos_when_cut():
    class Tok:
        bos_id, eos_id = 1, 2

        def encode(self, text, bos=False, eos=False):
            return [1] * bos + [7] * len(text) + [2] * eos
    assert rm.rm_ids(Tok(), "abc", 10) == [1, 7, 7, 7, 2]
    assert rm.rm_ids(Tok(), "abcdefghij", 6) == [1, 7, 7, 7, 7, 2]


def test_general_task_family_is_deterministic_and_well_formed():
    a, b = gt.general_prompts(50, seed=1), gt.general_prompts(50, seed=1)
    assert a == b and a != gt.general_prompts(50, seed=2)
    assert {r["category"] for r in a} == {"qa", "translation", "writing"}
    assert all(r["task"] == "general" and r["answer"] and r["prompt"] for r in a)
    assert gt.reference_response(a[0]).startswith("<think>\n") and a[0]["reference"] in gt.reference_response(a[0])
    helpful = gt.preference_pairs("helpful", 60, seed=0)
    for p in helpful:  # same reasoning, different summary: only the summary decides
        assert p["chosen"] != p["rejected"]
        assert p["chosen"].split("</think>")[0] == p["rejected"].split("</think>")[0]
    harmless = gt.preference_pairs("harmless", 60, seed=0)
    cot_only = [p for p in harmless if rm.summary_of(p["chosen"]) == rm.summary_of(p["rejected"])]
    assert 10 < len(cot_only) < 50  # a harmful aside only in the CoT: invisible to a summary-only judge
    train, held = gt.split_pairs(helpful, 0.2)
    assert held and train and not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    with pytest.raises(ValueError, match="expected 'helpful' or 'harmless'"):
        gt.preference_pairs("honest", 1)


def test_write_general_data(tmp_path):
    out = gt.write_general_data(str(tmp_path), prompts=20, pairs=40)
    rows = [json.loads(line) for line in open(out["harmless_heldout"])]
    assert rows and all(r["kind"] == "harmless" for r in rows)
    assert len(open(out["prompts"]).read().splitlines()) == 20
    sft = [json.loads(line) for line in open(out["sft"])]  # rejection-sample --extra rows (r1_tiny.sh stage 5)
    assert len(sft) == 20 and all(r["response"].startswith("<think>\n") and "prompt" not in r for r in sft)


def _echo_len(response, reference=None):
    return float(len(response))


def _prompt_len(response, reference=None, prompt=""):
    return float(len(prompt))


def test_router_sends_each_task_to_its_rewards():
    register_reward("test_echo_len")(_echo_len)
    register_reward("test_prompt_len", needs_prompt=True)(_prompt_len)
    router = RewardRouter({"test_echo_len": 1.0}, {"general": {"test_prompt_len": 2.0}})
    out = router(["aa", "bbbb", "c"], ["", "", ""], tasks=[None, "general", "reasoning"],
                 prompts=["p", "pppp", "q"])
    assert out.total == [2.0, 8.0, 1.0]  # reasoning and task-less rows: rl.rewards; general: its route
    assert out.components["test_echo_len"] == [2.0, None, 1.0]
    assert out.components["general/test_prompt_len"] == [None, 4.0, None]
    assert out.components["route/general"] == [None, 8.0, None]
    m = out.metrics()
    assert m["reward/test_echo_len"] == 1.5 and m["reward/route/general"] == 8.0 and m["reward/route/default"] == 1.5
    # no routes: the combiner as before, no route keys
    plain = RewardRouter({"test_echo_len": 1.0})(["aa"], [""])
    assert plain.components == {"test_echo_len": [2.0]}


def test_reward_model_names_and_paths(tmp_path):
    assert split_name("rm_helpful:/a/b") == ("rm_helpful", {"path": "/a/b"})
    with pytest.raises(KeyError, match="takes no ':' argument"):
        split_name("accuracy:x")
    with pytest.raises(ConfigError, match="needs the reward model's directory"):
        RewardCombiner({"rm_helpful": 1.0})
    with pytest.raises(ConfigError, match="not a reward model"):
        RewardCombiner({f"rm_harmless:{tmp_path}": 1.0})
    (tmp_path / "rm.json").write_text(json.dumps({"kind": "helpful"}))
    with pytest.raises(ConfigError, match="is a 'helpful' reward model"):
        RewardCombiner({"rm_harmless": {"weight": 1.0, "path": str(tmp_path)}})
    from megatron_r1.ckpt.hf import CheckpointError
    with pytest.raises(CheckpointError, match="no config.json"):  # loaded at construction: fails before step 1
        RewardCombiner({f"rm_helpful:{tmp_path}": 0.5})


def test_train_rm_bad_inputs_are_one_line_errors(tmp_path, capsys):
    from megatron_r1.cli import main
    good = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "Q", "chosen": "A"}) + "\n")
    tok = tmp_path / "tok"
    from megatron_r1.data.tokenizer import train_sentencepiece
    train_sentencepiece(["Q A B " * 20, "question answer"] * 20, tok, vocab_size=300)
    args = ["train-rm", "--config", "tiny-qwen2", "--kind", "helpful", "--tokenizer", str(tok)]
    run = f"run_dir={tmp_path / 'run'}"
    assert main(args + ["--data", str(bad), run]) == 2
    assert f"error: {bad}:2: expected an object with string fields 'prompt', 'chosen', 'rejected'" in \
        capsys.readouterr().err
    assert main(args + ["--data", str(tmp_path / "none.jsonl"), run]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(args + ["--data", str(bad), run, "parallel.cp=2"]) == 2
    assert "parallel.cp=2 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started


def test_score_serves_reward_models_on_what_each_judges(tmp_path, capsys):
    """`megatron-r1 score --reward rm_helpful:DIR,rm_harmless:DIR`: the helpful RM sees only the summary (two
    responses that differ only in the reasoning score the same), the harmless RM the whole response."""
    from megatron_r1.ckpt.hf import hf_tensors, model_state, save_hf
    from megatron_r1.cli import main
    from megatron_r1.config import load_config
    from megatron_r1.data.tokenizer import train_sentencepiece
    from megatron_r1.model import CausalLM
    from megatron_r1.training import copy_tokenizer
    pairs = gt.preference_pairs("harmless", 40, seed=0)
    tok = train_sentencepiece([p["prompt"] + p["chosen"] + p["rejected"] for p in pairs], tmp_path / "tok",
                              vocab_size=400)
    cfg = load_config("tiny-qwen2", ["model.num_hidden_layers=1"]).model
    torch.manual_seed(0)
    state = dict(hf_tensors(model_state(CausalLM(cfg)), cfg))
    for kind in ("helpful", "harmless"):  # one random model, two kinds: only what they read differs
        d = tmp_path / kind
        save_hf(iter(state.items()), cfg, str(d), dtype=torch.float32)
        copy_tokenizer(str(tok), str(d))
        (d / "rm.json").write_text(json.dumps({"kind": kind, "score_token_id": 2, "max_length": 128}))
    cot_only = next(p for p in pairs if rm.summary_of(p["chosen"]) == rm.summary_of(p["rejected"]))
    rows = [{"prompt": cot_only["prompt"], "response": cot_only[k], "answer": ""} for k in ("chosen", "rejected")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--reward", f"rm_helpful:{tmp_path / 'helpful'},rm_harmless:{tmp_path / 'harmless'}",
                 "--input", str(tmp_path / "rows.jsonl"), "--output", str(out), "--no-progress"]) == 0
    a, b = [json.loads(line)["rewards"] for line in open(out)]
    assert a["rm_helpful"] == b["rm_helpful"]  # same summary
    assert a["rm_harmless"] != b["rm_harmless"]  # the harmful aside in the reasoning is read
    # and the prompt is part of what is judged
    served = rm.load_reward_model(str(tmp_path / "helpful"))
    assert served.score(["Q?"], [rows[0]["response"]]) != served.score(["other?"], [rows[0]["response"]])
