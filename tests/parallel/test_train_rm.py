"""`train-rm` on the runtime: a tiny reward model learns an easy preference (held-out pairwise accuracy well
above chance, and above the untrained model's) and its export, served as GRPO serves it, ranks the held-out
pairs alike; dp2, tp2 and pp2 give dp1's losses and scores; a run resumed from its checkpoint ends where an
uninterrupted one does."""
import json

import pytest

from megatron_r1.parallel.spawn import run_ranks

BASE = ["model.num_hidden_layers=2", "train.seq_length=96", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.params_dtype=float32", "train.lr=1e-3", "train.lr_warmup_steps=0",
        "train.lr_decay_style=constant"]


@pytest.fixture(scope="module")
def rm_data(tmp_path_factory):
    """Helpfulness pairs of the general task family, a tokenizer trained on them, a held-out split by prompt."""
    from megatron_r1.data.tokenizer import train_sentencepiece
    from megatron_r1.recipes.general_tasks import preference_pairs, split_pairs
    root = tmp_path_factory.mktemp("rm")
    train, held = split_pairs(preference_pairs("helpful", 300, seed=3), 0.15, seed=3)
    tok = train_sentencepiece([r["prompt"] + "\n" + r["chosen"] + "\n" + r["rejected"] for r in train],
                              root / "tok", vocab_size=400)
    return str(tok), train, held


def _train(tok_dir, train_rows, held_rows, run_dir, overrides):
    from megatron_r1.config import load_config
    from megatron_r1.data.tokenizer import load_tokenizer
    from megatron_r1.engine.runtime import gather_full_state
    from megatron_r1.rl.train_rm import train
    from megatron_r1.training import TrainSession
    cfg = load_config("tiny-qwen2", BASE + [f"run_dir={run_dir}"] + overrides)
    session = TrainSession(cfg, desc="train-rm")
    as_pairs = lambda rows: [("x", r["prompt"], r["chosen"], r["rejected"]) for r in rows]  # noqa: E731
    res = train(session, load_tokenizer(tok_dir), "helpful", as_pairs(train_rows), as_pairs(held_rows))
    session.close()
    weight_sum = sum(float(t.double().abs().sum()) for t in gather_full_state(session.chunks, session.mesh).values())
    return dict(res, weight_sum=weight_sum)


def _losses(run_dir):
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return [r["loss"] for r in rows if "loss" in r]


def _cli(argv):
    from megatron_r1.rl.train_rm import main
    return main(argv)


def test_tiny_rm_learns_an_easy_preference_and_its_export_serves(rm_data, tmp_path):
    from megatron_r1.recipes.general_tasks import write_jsonl
    from megatron_r1.rl.reward_model import RewardModel
    tok, train, held = rm_data
    data, heldout = write_jsonl(str(tmp_path / "train.jsonl"), train), write_jsonl(str(tmp_path / "held.jsonl"), held)
    run = tmp_path / "run"
    (rc,) = run_ranks(_cli, 1, ["--config", "tiny-qwen2", "--kind", "helpful", "--data", data, "--eval", heldout,
                                "--tokenizer", tok, f"run_dir={run}"] + BASE
                    + ["train.train_steps=14", "train.global_batch_size=16"])
    assert rc == 0 and (run / "DONE").exists()
    evals = [r for r in map(json.loads, open(run / "metrics.jsonl")) if "eval/accuracy" in r]
    before, after = evals[0], evals[-1]
    meta = json.load(open(run / "hf" / "rm.json"))
    assert meta["kind"] == "helpful" and meta["heldout_pairs"] == len(held) > 20
    # an unhelpful or wrong summary loses to the reference answer on unseen prompts
    assert meta["heldout_accuracy"] == after["eval/accuracy"] >= 0.8, (before, after)
    assert after["eval/loss"] < before["eval/loss"] - 0.2 and after["eval/loss"] < 0.6, (before, after)
    # the export, served as GRPO serves it, ranks the held-out pairs as training measured
    served = RewardModel(str(run / "hf"))
    c = served.score([r["prompt"] for r in held], [r["chosen"] for r in held])
    r = served.score([r["prompt"] for r in held], [r["rejected"] for r in held])
    assert sum(a > b for a, b in zip(c, r)) / len(held) == pytest.approx(meta["heldout_accuracy"])


@pytest.fixture(scope="module")
def dp1(rm_data, tmp_path_factory):
    tok, train, held = rm_data
    run = tmp_path_factory.mktemp("dp1")
    (res,) = run_ranks(_train, 1, tok, train, held, str(run), ["train.train_steps=3"])
    return res, _losses(run)


@pytest.mark.parametrize("layout", [["parallel.tp=1"], ["parallel.tp=2"], ["parallel.pp=2"]], ids=["dp2", "tp2", "pp2"])
def test_layouts_equal_one_rank(rm_data, dp1, layout, tmp_path):
    tok, train, held = rm_data
    ref, ref_losses = dp1
    res = run_ranks(_train, 2, tok, train, held, str(tmp_path / "run"), ["train.train_steps=3"] + layout)
    assert _losses(tmp_path / "run") == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    for r in res:  # every rank reports the same held-out result and weights
        assert r["heldout"]["loss"] == pytest.approx(ref["heldout"]["loss"], rel=1e-5)
        assert r["heldout"]["accuracy"] == ref["heldout"]["accuracy"]
        assert r["weight_sum"] == pytest.approx(ref["weight_sum"], rel=1e-6)


def test_resume_ends_where_an_uninterrupted_run_does(rm_data, dp1, tmp_path):
    tok, train, held = rm_data
    ref, ref_losses = dp1
    run = str(tmp_path / "run")
    run_ranks(_train, 1, tok, train, held, run, ["train.train_steps=2"])  # saves at its end (step 2)
    (res,) = run_ranks(_train, 1, tok, train, held, run, ["train.train_steps=3"])
    assert res["initial"] == {}  # resumed, not started over
    assert _losses(run) == pytest.approx(ref_losses, rel=1e-6)
    assert res["weight_sum"] == pytest.approx(ref["weight_sum"], rel=1e-7)
