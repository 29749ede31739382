"""Tokenizers: sentencepiece training, HF export with identical ids, and vLLM reading the export."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_r1.data import arith
from megatron_r1.data.tokenizer import THINK_TAGS, load_tokenizer, train_sentencepiece

TEMPLATE = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
            "The assistant first thinks about the reasoning process in the mind and then provides the user with "
            "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
            "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
            "</answer>. User: {prompt}. Assistant:")
ODD_TEXTS = ["  two  spaces ", "line\nbreak\ttab", "unseen: é × 😀", " leading space", "trailing space ",
             "<think>glued</think><answer>7</answer>", "", "What is 23 * 7?"]


@pytest.fixture(scope="module")
def corpus():
    return arith.build_corpus(2000, TEMPLATE, 0, arith.DIFFICULTY[3])


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_sentencepiece(corpus, out, vocab_size=1024)
    return out


def test_ids_and_files(tok_dir):
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in tok_dir.iterdir()}
    for tok in (load_tokenizer(tok_dir / "tokenizer.model"), load_tokenizer(tok_dir)):
        assert (tok.backend is not None, tok.bos_id, tok.eos_id, tok.pad_id) == (True, 1, 2, 3)
        assert 400 < tok.vocab_size <= 1024  # soft limit: this corpus has fewer merges to offer
    assert load_tokenizer(tok_dir).vocab_size == load_tokenizer(tok_dir / "tokenizer.model").vocab_size


def test_tags_are_single_tokens_and_digits_split(tok_dir):
    tok = load_tokenizer(tok_dir)
    for tag in THINK_TAGS:
        assert len(tok.encode(tag)) == 1
        assert tok.encode(f"x {tag} y")[2:3] == tok.encode(tag)
    # Every digit is a token of its own, wherever it stands.
    pieces = [tok.decode([i]) for i in tok.encode("12345 + 67890 = 80235")]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("123456789080235")


def test_round_trip_and_hf_ids_equal_sentencepiece(tok_dir, corpus):
    sp, hf = load_tokenizer(tok_dir / "tokenizer.model"), load_tokenizer(tok_dir)
    for text in corpus + ODD_TEXTS:
        ids = sp.encode(text)
        assert hf.encode(text) == ids, text
        assert sp.decode(ids) == text and hf.decode(ids) == text
    assert hf.encode("7", bos=True, eos=True) == [1] + sp.encode("7") + [2]


def test_prompt_tokens_are_a_prefix_of_the_document_tokens(tok_dir, corpus):
    # RL samples continuations of encode(prompt); pretraining saw encode(prompt + completion).
    # Only if the first is a prefix of the second does the policy see what it was trained on.
    tok = load_tokenizer(tok_dir)
    for doc in corpus[:500]:
        if "Assistant:" in doc:
            prompt = doc[: doc.index("Assistant:") + len("Assistant:")]
            assert tok.encode(doc)[: len(tok.encode(prompt))] == tok.encode(prompt)


def test_hf_tokenizer_adds_bos_like_vllm_expects(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert hf("What is 1 + 2?")["input_ids"][0] == hf.bos_token_id == 1
    assert hf.decode(hf.encode("<think> 3 </think>"), skip_special_tokens=True) == "<think> 3 </think>"
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys, time
    t0 = time.time()
    from vllm import LLM, SamplingParams
    from megatron_r1.data.tokenizer import load_tokenizer
    model, tokenizer, prompt = sys.argv[1:4]
    tok = load_tokenizer(tokenizer)
    llm = LLM(model=model, tokenizer=tokenizer, dtype="float32", max_model_len=256, max_num_seqs=8, enforce_eager=True, seed=0)
    # Random weights happily sample byte-fallback pieces that form invalid UTF-8, which vLLM's
    # streaming detokenizer renders differently from a one-shot decode; a trained model does not.
    allowed = [i for i in range(tok.vocab_size) if not tok.decode([i]).startswith(("\\ufffd", "<0x")) and i > 3]
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=0, detokenize=True, allowed_token_ids=allowed)
    out = llm.generate([prompt], params)[0]
    print(json.dumps({"prompt_ids": list(out.prompt_token_ids), "ids": list(out.outputs[0].token_ids),
                      "text": out.outputs[0].text, "seconds": time.time() - t0}))
""")


@pytest.mark.parametrize("model_type", ["deepseek_v3", "llama", pytest.param("qwen2", marks=pytest.mark.xfail(
    strict=True, reason="transformers 5 builds Qwen2Tokenizer for a qwen2 config.json in the same directory and "
    "replaces our pre-tokenizer and decoder with byte-level ones: keep the tokenizer in its own directory"))])
def test_autotokenizer_beside_a_model_config(tok_dir, tmp_path, model_type):
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    shutil.copytree(tok_dir, tmp_path / "m")
    AutoConfig.for_model(model_type).save_pretrained(tmp_path / "m")
    text = "User: What is 23 + 48?. Assistant: <think> 3 + 8 = 11 </think>"
    assert AutoTokenizer.from_pretrained(str(tmp_path / "m")).encode(text) == load_tokenizer(tok_dir).encode(text, bos=True)


def test_vllm_loads_the_exported_tokenizer(tok_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("vllm")
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    # vLLM's CPU attention wants head sizes that are multiples of 32.
    config = transformers.Qwen2Config(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "model")

    prompt = TEMPLATE.replace("{prompt}", "What is 23 + 48?")
    # A subprocess: the in-process engine initialises torch.distributed, which would leak into
    # every later test in this pytest process.
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    run = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(tmp_path / "model"), str(tok_dir), prompt],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["prompt_ids"] == tok.encode(prompt, bos=True)
    assert len(result["ids"]) > 0 and result["text"] == tok.decode(result["ids"])


# ------------------------------------------------------------------ student tokenizers (Qwen2.5, Llama 3.1)


@pytest.fixture(scope="module")
def student_dirs(tok_dir, tmp_path_factory):
    from megatron_r1.data.tokenizer import write_student_tokenizer

    root = tmp_path_factory.mktemp("students")
    return {s: write_student_tokenizer(tok_dir / "tokenizer.model", root / s, s) for s in ("qwen2", "llama3")}


def test_qwen2_tokenizer_without_bos_encodes_sft_rows(student_dirs, tmp_path):
    from megatron_r1.sft.trainer import _sft_rows

    assert json.loads((student_dirs["qwen2"] / "tokenizer_config.json").read_text()).get("bos_token") is None
    tok = load_tokenizer(student_dirs["qwen2"])
    assert tok.bos_id is None and tok.encode("1+1", bos=True) == tok.encode("1+1")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 1?", "response": "<think>1+1=2</think> 2"}) + "\n")
    rows, _ = _sft_rows([str(data)], tok, 64, "prompt", "response")
    assert all(isinstance(i, int) for i in rows[0][0])  # was [None, ...]: SFT crashed on torch.tensor


@pytest.mark.parametrize("style, model_type", [("qwen2", "qwen2"), ("llama3", "llama")])
def test_student_tokenizer_beside_its_model_config_is_lossless(student_dirs, tmp_path, style, model_type):
    """A student's HF export holds its tokenizer beside a qwen2 / llama config.json (sft, eval, grpo load it from
    there): load_tokenizer must still be the tokenizer written, not the one transformers 5 builds for the model
    type (byte-level for qwen2: every space and CJK character vanished, and the distilled students learnt
    nothing)."""
    import shutil

    from transformers import AutoConfig
    shutil.copytree(student_dirs[style], tmp_path / "m")
    AutoConfig.for_model(model_type).save_pretrained(tmp_path / "m")
    text = "<think> 1 加 4 得 5。 So 1 + 24 = 25. </think> The answer is \\boxed{25}."
    alone, beside = load_tokenizer(student_dirs[style]), load_tokenizer(tmp_path / "m")
    assert beside.encode(text) == alone.encode(text)
    assert beside.decode(beside.encode(text)) == text
    assert (beside.bos_id, beside.eos_id, beside.pad_id) == (alone.bos_id, alone.eos_id, alone.pad_id)


def test_llama3_tokenizer_without_pad_pads_with_eos(student_dirs):
    import torch

    tok = load_tokenizer(student_dirs["llama3"])
    assert json.loads((student_dirs["llama3"] / "tokenizer_config.json").read_text()).get("pad_token") is None
    assert tok.pad_id == tok.eos_id is not None
    assert torch.full((2, 4), tok.pad_id).dtype == torch.long  # SFT's and GRPO's batch padding


def test_chat_template_reaches_the_prompt_and_bos_is_not_doubled(student_dirs):
    from megatron_r1.data.templates import render_prompt

    qwen, llama = load_tokenizer(student_dirs["qwen2"]), load_tokenizer(student_dirs["llama3"])
    text = render_prompt("r1_chat", "What is 3 + 4?", qwen)
    assert text.startswith("<|im_start|>user\nWhat is 3 + 4?\nPlease reason") and text.endswith(
        "<|im_start|>assistant\n")
    text = render_prompt("r1_chat", "What is 3 + 4?", llama)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    ids = llama.encode(text, bos=True)
    assert ids[0] == llama.bos_id and ids[1] != llama.bos_id  # the template's bos, once
    assert llama.encode("hi", bos=True)[0] == llama.bos_id
