"""Built-in offline corpora: the interpreter's standard library and synthetic passkey documents.

Both are random access by index and deterministic, so the pipeline can re-read a document from its
address when it resumes instead of storing its tokens.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import numpy as np

from fot.data import passkey

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@functools.lru_cache(maxsize=8)
def stdlib_files(min_bytes: int, max_bytes: int | None) -> tuple[Path, ...]:
    """The stdlib's .py files of min_bytes..max_bytes bytes, sorted by path (the same on every run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(f.relative_to(root).parts) or not f.is_file():
            continue
        size = f.stat().st_size
        if size >= min_bytes and (max_bytes is None or size <= max_bytes):
            files.append(f)
    if not files:
        raise FileNotFoundError(f"builtin:stdlib: no .py files of {min_bytes}..{max_bytes} bytes "
                                f"under {root}")
    return tuple(files)


@functools.lru_cache(maxsize=64)
def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


class StdlibCorpus:
    """Document i = the i-th standard-library source file (sorted order)."""

    def __init__(self, min_chars: int = 2000, max_chars: int | None = None):
        self.files = stdlib_files(min_chars, max_chars)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str:
        return read_text(self.files[i])


class PasskeyCorpus:
    """Document i = a passkey document drawn from a generator seeded with (seed, i); unbounded.

    Length uniform in min_chars..max_chars characters, key uniform in 1..49999 at a uniform depth of
    the filler, ending with the question and its answer: "... The pass key is {K}." A fraction
    `mixed_filler` of the documents interleave the evaluation's filler with chunks of stdlib text, so
    the model must retrieve the key rather than spot the only non-repetitive line; the others use
    the evaluation's filler exactly. `intro=False` leaves out the task description (148 characters),
    so that short documents are mostly filler, key and question. `key_digits`: see
    `passkey.sample_key`. A fraction `named` of the documents name their key ("the pass key of QXZ
    is ..."), so that a key read from another document (a crossbatch negative) looks like the answer
    and only the name tells them apart.
    """

    def __init__(self, seed: int, min_chars: int = 2000, max_chars: int | None = None,
                 mixed_filler: float = 0.5, intro: bool = True, key_digits: int | None = None,
                 named: float = 0.0):
        self.seed = seed
        self.named = named
        self.key_digits = key_digits
        self.mixed_filler = mixed_filler
        self.intro = intro
        self.min_chars = min_chars
        self.max_chars = max_chars if max_chars is not None else 4 * min_chars
        self._real = None  # stdlib files for the mixed filler, listed on first use

    def __getitem__(self, i: int) -> str:
        rng = np.random.default_rng([self.seed, i])
        n_chars = int(rng.integers(self.min_chars, self.max_chars + 1))
        key = passkey.sample_key(rng, self.key_digits)
        depth = float(rng.random())
        real_fraction = 0.5 if rng.random() < self.mixed_filler else 0.0
        # No draw when named == 0: the documents of configs written before `named` stay the same.
        name = passkey.sample_name(rng) if self.named and rng.random() < self.named else None
        answer = f" {key}."
        n = max(n_chars - len(passkey.assemble("", "", key, self.intro, name)) - len(answer), 0)
        cut = int(round(depth * n))
        if real_fraction == 0.0:  # the evaluation's filler
            body = passkey.filler(cut) + passkey.filler(n - cut)
        else:
            body = self._mixed_filler(rng, n, real_fraction)
        return passkey.assemble(body[:cut], body[cut:], key, self.intro, name) + answer

    def _mixed_filler(self, rng: np.random.Generator, n: int, real_fraction: float) -> str:
        if self._real is None:
            self._real = stdlib_files(2000, None)
        parts, size = [], 0
        while size < n:
            if rng.random() < real_fraction:
                text = read_text(self._real[int(rng.integers(len(self._real)))])
                start = text.find("\n", int(rng.integers(len(text)))) + 1  # from a line start
                part = text[start:start + int(rng.integers(200, 1000))].strip()
            else:
                part = passkey.filler(int(rng.integers(1, 8)) * (len(passkey.FILLER) + 1) - 1)
            if part:
                parts.append(part)
                size += len(part) + 1
        return " ".join(parts)[:n]
