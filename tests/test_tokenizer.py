"""Tokenizers: OpenLLaMA's SentencePiece model, an HF tokenizer directory, the byte-level vocabulary."""

import shutil

import numpy as np
import sentencepiece as spm

from fot import load_model
from fot.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PROMPT = "\n".join([
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.",
    " ".join([FILLER] * 5),
    "The pass key is 31415. Remember it. 31415 is the pass key.",
    " ".join([FILLER] * 3),
    "What is the pass key? The pass key is",
])
TRICKY = ["  two leading spaces", " one", "\n\nnewlines\n", "héllo 😀 wörld", "tabs\tand\ttabs", "12345 67890"]


def test_v2_sentencepiece_matches_sentencepiece(v2_tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=str(v2_tokenizer_path))
    for tok in (SentencePieceTokenizer(v2_tokenizer_path), load_tokenizer(str(v2_tokenizer_path))):
        assert isinstance(tok, SentencePieceTokenizer)
        assert tok.encode(PROMPT) == [1] + sp.encode(PROMPT)
        assert tok.encode(PROMPT, bos=False, eos=True) == sp.encode(PROMPT) + [2]
        assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
        assert tok.decode(tok.encode(PROMPT)) == PROMPT


def test_hf_tokenizer_dir_agrees_with_sentencepiece(v2_tokenizer_path, tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "sp").mkdir()
    shutil.copy(v2_tokenizer_path, tmp_path / "sp" / "tokenizer.model")
    AutoTokenizer.from_pretrained(str(tmp_path / "sp")).save_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    tok = load_tokenizer(str(tmp_path / "hf"))
    assert isinstance(tok, HFTokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(v2_tokenizer_path))
    for text in [PROMPT, *TRICKY]:
        assert tok.encode(text) == [1] + sp.encode(text), text


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    for text in [PROMPT, *TRICKY, ""]:
        ids = tok.encode(text, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and len(ids) == len(text.encode()) + 2
        assert min(ids[1:-1], default=3) >= 3 and max(ids) < 259
        assert tok.decode(ids) == text
    assert load_tokenizer("byte").encode("A", bos=False) == [ord("A") + 3]


def test_tokenizer_travels_with_the_model(v2_tokenizer_path, tmp_path):
    """HF dir with tokenizer.model -> load_model -> fot checkpoint -> export: the tokenizer follows."""
    from hf_tiny import make_hf

    make_hf(tmp_path / "hf", vocab_size=32000)  # the tokenizer's ids all need embedding rows
    shutil.copy(v2_tokenizer_path, tmp_path / "hf" / "tokenizer.model")
    want = SentencePieceTokenizer(v2_tokenizer_path).encode(PROMPT)
    model = load_model(tmp_path / "hf")
    assert isinstance(model.tokenizer, SentencePieceTokenizer) and model.tokenizer.encode(PROMPT) == want
    model.save(tmp_path / "ckpt")
    back = load_model(tmp_path / "ckpt")
    assert back.tokenizer.encode(PROMPT) == want
    from fot.convert import export_hf

    export_hf(back, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.model").is_file()
    assert load_model(tmp_path / "out").tokenizer.encode(PROMPT) == want
    ids = np.array([[5, 6, 7]])
    assert np.array_equal(np.asarray(model.logits(ids)), np.asarray(back.logits(ids)))
