"""One tokenizer interface over a byte-level vocabulary, SentencePiece models and HF tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from fot.errors import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: 0 = PAD, 1 = BOS, 2 = EOS (LLaMA's BOS/EOS ids), 259 ids in all."""

    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) + self.offset).tolist()
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return bytes(int(i) - self.offset for i in ids if int(i) >= self.offset).decode("utf-8", "replace")


class SentencePieceTokenizer:
    """A SentencePiece `.model` file (OpenLLaMA's: BOS 1, EOS 2)."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = max(self.sp.pad_id(), 0)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face tokenizer directory or hub name (needs `transformers`)."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(name)
        self.vocab_size = len(self.tok)
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else 1
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else 2
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte", a SentencePiece .model file, a directory holding tokenizer.model or an HF tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    p = Path(spec)
    if p.is_file() and p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.is_dir() and (p / "tokenizer.model").is_file() and not (p / "tokenizer.json").is_file():
        return SentencePieceTokenizer(p / "tokenizer.model")
    return HFTokenizer(spec)


def check_vocab(tokenizer: Tokenizer | None, vocab_size: int, where: str) -> None:
    """Every id the tokenizer can produce needs an embedding row; a mismatch is an error now rather
    than an out-of-range id deep in the model. (Fewer ids than rows is fine: vocabularies are often
    padded, e.g. 32016 rows for 32000 ids.)"""
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
                          f"{vocab_size}: not this model's tokenizer")
