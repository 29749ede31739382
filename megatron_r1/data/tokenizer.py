"""Tokenizers: train a sentencepiece BPE on our own corpus, export it as a Hugging Face tokenizer
directory (what vLLM and `AutoTokenizer` load), and load either form behind one small interface.

Notable choices:
- BPE with `split_digits=True`: every digit is its own token, so column arithmetic is learnable.
- `<think> </think> <answer> </answer>` are `user_defined_symbols`: always one token each. In the
  HF export they are *added tokens that are not special*: vLLM detokenizes with
  `skip_special_tokens=True` by default, which would otherwise delete them from the text that the
  format and accuracy rewards read.
- Fixed ids: unk=0, bos=1, eos=2, pad=3 (Llama's first three, plus a real pad so batches never
  pad with eos, which the loss must see).
- Exact round trip, decode(encode(x)) == x: no normalisation (`identity`), no dummy prefix
  (`add_dummy_prefix=False`; otherwise a leading "▁" is invented and stripped again, and the
  tokens of a prompt would depend on whether it starts the text), whitespace kept as is, and
  `byte_fallback` so characters never seen in training survive too.
- The HF side is built directly from the sentencepiece vocabulary with `tokenizers` (BPE merges
  in piece order, Metaspace with prepend_scheme "never", the Llama decoder), instead of
  transformers' slow->fast converters, whose flags (legacy, add_prefix_space) are what change
  leading-space behaviour between releases. Ids are checked equal to sentencepiece's in tests.
- transformers 5 rebuilds the pre-tokenizer and decoder for some model types when a config.json
  sits beside tokenizer.json (qwen2 and others in `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS` get
  Qwen2's byte-level ones; deepseek_v3, llama, mistral, qwen3 keep ours). Keep the tokenizer in
  its own directory and pass it as vLLM's `tokenizer=`; tests pin which model types are safe.
- Sequence boundaries: the HF tokenizer adds bos on `tokenizer(text)` (as Llama does, and as
  vLLM does for text prompts); `Tokenizer.encode` returns bare ids unless bos/eos are asked for.
  A tokenizer without a bos token (Qwen2/2.5: `bos_token: null`) gets none when bos is asked for,
  and `bos=True` never doubles a bos that the text (a rendered chat template) already starts with.
- A tokenizer without a pad token (Llama 3) pads with eos: padded positions are never targets
  (the loss mask is 0 there) and come after the row, so a causal model never attends to them.
- `Tokenizer` exposes the HF tokenizer's `chat_template` and `apply_chat_template`, so prompt
  templates (data/templates.py) render with the model's own chat format when it has one.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

THINK_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024, *,
                        user_symbols: tuple[str, ...] = THINK_TAGS, export_hf: bool = True) -> Path:
    """Trains `out_dir`/tokenizer.model and, by default, exports the HF files next to it.

    `vocab_size` is a soft limit (`hard_vocab_limit=False`): a small corpus may yield fewer pieces,
    so read the real size from the loaded tokenizer. 256 byte pieces + 4 controls + the user
    symbols come first, so anything below ~400 leaves almost no merges.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        split_digits=True,
        byte_fallback=True,
        user_defined_symbols=list(user_symbols),
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        max_sentence_length=1 << 16,
        num_threads=2,
        minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    if export_hf:
        export_hf_tokenizer(path, out_dir)
    return path


def _hf_backend(sp_model_path: str | Path):
    """A `tokenizers.Tokenizer` producing the same ids as the sentencepiece model."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    user = _user_symbols(sp)
    control = [p for i, p in enumerate(pieces) if sp.is_control(i) or sp.is_unknown(i)]
    skip = user | set(control) | {p for i, p in enumerate(pieces) if sp.is_byte(i)}
    # Sentencepiece BPE merges the pair whose result has the best score; piece ids are sorted by
    # score, so merge rank = id of the merged piece, which is what generate_merges computes.
    merges = generate_merges(vocab, skip_tokens=skip)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in pieces if p in user])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in control])
    bos = pieces[sp.bos_id()]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    return tok


def _user_symbols(sp) -> set[str]:
    # The python wrapper exposes is_control/is_unknown/is_byte but not the USER_DEFINED type.
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(sp.serialized_model_proto())
    return {p.piece for p in m.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED}


def export_hf_tokenizer(sp_model_path: str | Path, out_dir: str | Path) -> Path:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=_hf_backend(sp_model_path),
        unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False,  # it would rewrite " ." and " ?" and break the round trip
        model_max_length=1 << 20,
    )
    hf.save_pretrained(str(out_dir))
    # transformers 5 names its own class ("TokenizersBackend") and drops special_tokens_map.json;
    # the generic fast class and the map keep the directory loadable by transformers 4 images too.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    special = {"unk_token": UNK, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out_dir


@dataclass
class Tokenizer:
    """The interface the rest of the code uses, whatever file the tokenizer came from."""

    backend: object  # a sentencepiece.SentencePieceProcessor or a transformers tokenizer
    bos_id: int | None  # None: the model has no bos (Qwen2)
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        if hasattr(self.backend, "encode_as_ids"):
            ids = self.backend.encode_as_ids(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False)
        add_bos = bos and self.bos_id is not None and ids[:1] != [self.bos_id]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if eos else [])

    @property
    def chat_template(self) -> str | None:
        return getattr(self.backend, "chat_template", None)

    def apply_chat_template(self, messages: list[dict], **kwargs):
        return self.backend.apply_chat_template(messages, **kwargs)

    def decode(self, ids: list[int]) -> str:
        # Control ids (bos/eos/pad) are dropped by sentencepiece; do the same on the HF side.
        if hasattr(self.backend, "decode_ids"):
            return self.backend.decode_ids(list(ids))
        return self.backend.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


# Student tokenizers in the two families R1 was distilled into, built from our vocabulary (no
# download): the special tokens, bos/pad conventions and chat format of the real ones.
# ChatML as in Qwen2.5 (without its default system message); Llama 3.1's headers (without tools).
QWEN2_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
STUDENT_STYLES = {
    # bos_token null and a pad token, as Qwen2.5's tokenizer_config.json
    "qwen2": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                  pad="<|endoftext|>", chat_template=QWEN2_CHAT_TEMPLATE),
    # a bos and no pad token, as Llama 3.1's
    "llama3": dict(specials=["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, chat_template=LLAMA3_CHAT_TEMPLATE),
}


def write_student_tokenizer(sp_model_path: str | Path, out_dir: str | Path, style: str) -> Path:
    """A HF tokenizer directory with our vocabulary plus the special tokens, bos/pad conventions and
    chat template of a Qwen2.5 (``"qwen2"``) or Llama 3.1 (``"llama3"``) tokenizer."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    if style not in STUDENT_STYLES:
        raise ValueError(f"unknown student tokenizer style {style!r}; choose from {sorted(STUDENT_STYLES)}")
    st = STUDENT_STYLES[style]
    backend = _hf_backend(sp_model_path)
    backend.post_processor = None  # our bos template; these families add theirs in the chat template
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in st["specials"]])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=st["bos"], eos_token=st["eos"],
                                 pad_token=st["pad"], unk_token=None, clean_up_tokenization_spaces=False,
                                 model_max_length=1 << 20)
    hf.chat_template = st["chat_template"]
    out_dir = Path(out_dir)
    hf.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", bos_token=st["bos"], pad_token=st["pad"])
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def write_word_tokenizer(vocab_size: int, out_dir: str | Path) -> None:
    """A HF tokenizer with one id per word ("<unk>", "<s>", "</s>", then "t3", "t4", ...), exactly
    `vocab_size` ids: what vLLM needs beside the weights of a model that is fed token ids directly."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(out_dir))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A HF tokenizer directory (with tokenizer.json) or a sentencepiece .model file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
        return Tokenizer(sp, sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.get_piece_size())
    if path.is_dir() and (path / "tokenizer.json").exists():
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        try:
            cls = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
        except (OSError, ValueError):
            cls = None
        # Our tokenizers (export_hf_tokenizer, write_student_tokenizer) say PreTrainedTokenizerFast: load exactly
        # that. AutoTokenizer would follow a config.json beside it instead (a student's qwen2 export) and rebuild
        # the pre-tokenizer and decoder as byte-level ones, which drop our spaces and CJK characters.
        loader = PreTrainedTokenizerFast if cls == "PreTrainedTokenizerFast" else AutoTokenizer
        hf = loader.from_pretrained(str(path))
        if hf.eos_token_id is None:
            from megatron_r1.config import ConfigError
            raise ConfigError(f"{path}: the tokenizer has no eos token; set eos_token in tokenizer_config.json")
        pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
        return Tokenizer(hf, hf.bos_token_id, hf.eos_token_id, pad, len(hf))
    raise FileNotFoundError(f"{path}: expected a sentencepiece .model file or a directory with tokenizer.json")


__all__ = ["THINK_TAGS", "Tokenizer", "export_hf_tokenizer", "load_tokenizer",
           "train_sentencepiece", "write_student_tokenizer"]
