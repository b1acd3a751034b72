"""Text sources (built-in corpora, local files, Hugging Face hub datasets) and their seeded mixture.

A source is read through a cursor at (epoch, position): finite random-access sources are visited in a
fresh permutation each epoch, unbounded ones (builtin:passkey) by index, streaming datasets through
`datasets`' seeded shuffle buffer. `DocStream` samples which source gives the next document with a
seeded generator, tokenizes it as [BOS] text [EOS], skips documents shorter than `min_doc_tokens`, and
fails (instead of looping) when none of the first WINDOW_CHECK documents it reads, or of a whole epoch
of each of its sources, is as long as the training window: crossbatch then has no earlier window of
a document to read (short documents are fine in a mixture that has long ones).

Sharding: the training pipeline gives each pack slot s of n its own `DocStream(..., slot=s,
n_slots=n)`, which reads only slot s's share of every source (`share`): of a random-access source of
L documents, documents i with i % m == s % m (m = min(n, L)), reshuffled each epoch; of an unbounded
one, documents s, s+n, s+2n, ...; of a streaming dataset with at least n files (shards), every n-th
file from file s (`IterableDataset.shard`), else rows i with i % n == s of the shuffled stream (every
row is read, only the share's rows are converted and tokenized). So a host tokenizes only the
documents of the slots it builds, and the shares partition each epoch of every source.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fot.config import SourceConfig
from fot.data.builtin import PasskeyCorpus, StdlibCorpus
from fot.data.tasks import TaskCorpus, TaskError


class DataError(ValueError):
    """Bad data input; the message names the source, file or column."""


_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text",
             ".csv": "csv"}
WINDOW_CHECK = 1000  # a document stream must give a window-long document among its first N reads
TASK_PREFIX = "builtin:task:"  # builtin:task:vt:hops=2 = fot.data.tasks.TaskCorpus("vt:hops=2")


def describe(cfg: SourceConfig) -> str:
    extra = "".join(f", {k}={v!r}" for k, v in (("name", cfg.name), ("split", cfg.split)) if v)
    return f"data source {cfg.path!r}{extra}"


class Source:
    """Random access: `length` documents per epoch (None = unbounded) read by `text(epoch, pos)`."""

    random_access = True

    def __init__(self, label: str, corpus: Any, length: int | None, seed: int):
        self.label, self.corpus, self.length, self.seed = label, corpus, length, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def text(self, epoch: int, pos: int) -> str:
        if self.length is None:
            return self.corpus[pos]
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.length))
        return self.corpus[int(self._perm[1][pos])]

    def share(self, slot: int, n: int) -> "Source | Share":
        """Pack slot `slot` of `n`'s share of this source (itself when n == 1)."""
        return self if n == 1 else Share(self, slot, n)


class Share:
    """A random-access source's share for pack slot `slot` of `n`: of L documents, documents i with
    i % m == slot % m (m = min(n, L)) in a fresh permutation each epoch; unbounded, i = slot + pos*n."""

    random_access = True

    def __init__(self, source: Source, slot: int, n: int):
        self.source, self.slot = source, slot
        self.stride = n if not source.length else min(n, source.length)
        self.first = slot % self.stride
        self.length = None if source.length is None else len(range(self.first, source.length,
                                                                     self.stride))
        self.label = (f"{source.label}, pack slot {slot}'s share (documents i with i % {self.stride} "
                      f"== {self.first})")
        self._perm: tuple[int, np.ndarray] | None = None

    def index(self, epoch: int, pos: int) -> int:
        """The source's document index at (epoch, pos) of this share."""
        if self.length is None:
            return self.first + pos * self.stride
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.source.seed, epoch, self.slot])
            self._perm = (epoch, rng.permutation(self.length))
        return self.first + int(self._perm[1][pos]) * self.stride

    def text(self, epoch: int, pos: int) -> str:
        return self.source.corpus[self.index(epoch, pos)]


class StreamSource:
    """A streaming `datasets.IterableDataset`: sequential only, reshuffled (buffer) each epoch."""

    random_access = False
    length = None  # unknown until the epoch ends

    def __init__(self, label: str, dataset: Any, column: str, seed: int, buffer_size: int = 10_000,
                 slot: int = 0, n: int = 1):
        self.label, self.dataset, self.column = label, dataset, column
        self.seed, self.buffer_size = seed, buffer_size
        self.slot, self.n = slot, n  # this stream gives rows i with i % n == slot (see `share`)

    def share(self, slot: int, n: int) -> "StreamSource":
        """Pack slot `slot` of `n`'s share: every n-th file (shard) of the dataset from file `slot`
        when it has at least n files, else rows i with i % n == slot of the shuffled stream."""
        if n == 1:
            return self
        files = getattr(self.dataset, "num_shards", None) or 1
        if files >= n:
            ds = self.dataset.shard(num_shards=n, index=slot, contiguous=False)
            return StreamSource(f"{self.label}, pack slot {slot}'s share (files f with f % {n} == "
                                f"{slot})", ds, self.column, self.seed, self.buffer_size)
        return StreamSource(f"{self.label}, pack slot {slot}'s share (rows i with i % {n} == {slot})",
                            self.dataset, self.column, self.seed, self.buffer_size, slot, n)

    def texts(self, epoch: int, start: int) -> Iterator[str]:
        ds = self.dataset.shuffle(seed=self.seed, buffer_size=self.buffer_size)
        ds.set_epoch(epoch)
        for i, row in enumerate(ds):
            if i == 0 and self.column not in row:
                raise _missing_column(self.label, self.column, list(row))
            if i % self.n == self.slot and i // self.n >= start:
                yield _as_text(row[self.column], self.label, self.column)


def _missing_column(label: str, column: str, columns: list[str]) -> DataError:
    return DataError(f"{label} has no text column {column!r} (its columns: {', '.join(columns)}); "
                     f"set text_column")


def open_source(cfg: SourceConfig, seed: int, where: str = "data.sources") -> Source | StreamSource:
    """Build the source of `cfg`; `seed` fixes its shuffles (pass one per source)."""
    label = f"{where} ({describe(cfg)})"
    if cfg.path == "builtin:stdlib":
        corpus = StdlibCorpus(cfg.min_chars, cfg.max_chars)
        return Source(label, corpus, len(corpus), seed)
    if cfg.path == "builtin:passkey":
        return Source(label, PasskeyCorpus(seed, cfg.min_chars, cfg.max_chars, cfg.mixed_filler,
                                                  cfg.intro, cfg.key_digits, cfg.named), None, seed)
    if cfg.path.startswith(TASK_PREFIX):
        try:
            return Source(label, TaskCorpus(cfg.path[len(TASK_PREFIX):], seed, cfg.min_chars, cfg.max_chars),
                          None, seed)
        except TaskError as e:
            raise DataError(f"{label}: {e}") from None
    if cfg.path.startswith("builtin:"):
        raise DataError(f"{label}: unknown built-in source (builtin:stdlib, builtin:passkey, "
                        f"{TASK_PREFIX}NAME[:OPTION=VALUE...] with a task of fot.data.tasks)")

    import datasets

    suffix = Path(cfg.path).suffix.lower()
    if suffix in _BUILDERS or Path(cfg.path).is_file():
        if not glob.glob(cfg.path):
            raise DataError(f"{label}: file not found: {cfg.path}")
        builder = _BUILDERS.get(suffix, "text")
        args = (builder,)
        kwargs = {"data_files": cfg.path, "split": "train"}  # local files have one split
        if builder == "text":
            kwargs["sample_by"] = cfg.sample_by
    else:  # a hub name or a dataset directory
        args, kwargs = (cfg.path, cfg.name), {"split": cfg.split}
    try:
        ds = datasets.load_dataset(*args, streaming=cfg.streaming, **kwargs)
    except Exception as e:  # datasets raises many types (offline, not found, bad file)
        raise DataError(f"{label}: could not be loaded ({type(e).__name__}: {e}). Without network, "
                        f"point {where}.path at a local json/jsonl/parquet/text file or dataset "
                        f"directory") from e
    columns = ds.column_names
    if columns is not None and cfg.text_column not in columns:
        raise _missing_column(label, cfg.text_column, list(columns))
    if cfg.streaming:
        return StreamSource(label, ds, cfg.text_column, seed)
    ds = ds.select_columns([cfg.text_column])
    return Source(label, _Column(ds, cfg.text_column, label), len(ds), seed)


class _Column:
    def __init__(self, ds: Any, column: str, label: str):
        self.ds, self.column, self.label = ds, column, label

    def __getitem__(self, i: int) -> str:
        return _as_text(self.ds[i][self.column], self.label, self.column)


def _as_text(value: Any, label: str, column: str) -> str:
    if value is None:  # a null cell is an empty document (dropped by the length checks)
        return ""
    if not isinstance(value, str):
        raise DataError(f"{label}: column {column!r} holds {type(value).__name__}, not text")
    return value


class Cursor:
    """Where a source is read: (epoch, pos)."""

    def __init__(self, source: Source | Share | StreamSource):
        self.source = source
        self.epoch = self.pos = 0
        self._it: Iterator[str] | None = None

    def next(self) -> tuple[str, tuple[int, int]]:
        """The next text and its address (epoch, pos); rolls over to a new epoch at the end."""
        src = self.source
        if not src.random_access:
            text = self._next_streamed()
        else:
            if src.length is not None and self.pos >= src.length:
                self._end_epoch()
            text = src.text(self.epoch, self.pos)
        addr = (self.epoch, self.pos)
        self.pos += 1
        return text, addr

    def _next_streamed(self) -> str:
        if self._it is None:
            self._it = self.source.texts(self.epoch, self.pos)
        for _ in range(2):
            try:
                return next(self._it)
            except StopIteration:
                self._end_epoch()
                self._it = self.source.texts(self.epoch, 0)
        raise DataError(f"{self.source.label} is empty")

    def _end_epoch(self) -> None:
        if self.pos == 0:
            raise DataError(f"{self.source.label} is empty")
        self.epoch, self.pos = self.epoch + 1, 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._it = None


@dataclass
class Doc:
    doc_id: int
    tokens: np.ndarray  # int32 [BOS] text [EOS]
    addr: tuple[int, int, int] | None  # (source, epoch, pos) for random-access sources, else None


class DocStream:
    """The seeded mixture of sources as an endless stream of tokenized documents with global ids.

    With `n_slots` > 1 it is pack slot `slot`'s stream: it reads only that slot's share of each
    source (`share`), and its j-th document has id j * n_slots + slot, unique across all slots."""

    def __init__(self, sources: list, weights: list[float], tokenizer, seed, window: int,
                 min_doc_tokens: int = 0, slot: int = 0, n_slots: int = 1):
        if len(sources) != len(weights) or not sources:
            raise DataError("DocStream needs one weight per source and at least one source")
        if not 0 <= slot < n_slots:
            raise DataError(f"DocStream slot {slot} is not one of {n_slots} slots")
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.slot, self.n_slots = slot, n_slots
        self.cursors = [Cursor(s.share(slot, n_slots)) for s in sources]
        self.tokenizer, self.window, self.min_doc_tokens = tokenizer, window, min_doc_tokens
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.next_id = 0  # documents this stream has given
        self.reads_before_long = 0  # documents read before the first window-long one (-1: seen)

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, bos=True, eos=True), dtype=np.int32)

    def next(self) -> Doc:
        while True:
            i = int(self.rng.choice(len(self.cursors), p=self.p)) if len(self.cursors) > 1 else 0
            cursor = self.cursors[i]
            text, (epoch, pos) = cursor.next()
            tokens = self.tokenize(text)
            n = len(tokens) - 2  # BOS/EOS not counted
            self._watch_length(n)
            if n < self.min_doc_tokens:
                continue
            doc = Doc(self.next_id * self.n_slots + self.slot, tokens,
                      (i, epoch, pos) if cursor.source.random_access else None)
            self.next_id += 1
            return doc

    def _watch_length(self, n: int) -> None:
        if self.reads_before_long < 0:
            return
        if n >= max(self.window, self.min_doc_tokens):
            self.reads_before_long = -1
            return
        self.reads_before_long += 1
        # Finite sources: one whole epoch of each is enough to know.
        if self.reads_before_long >= WINDOW_CHECK or all(c.epoch > 0 for c in self.cursors):
            labels = "; ".join(c.source.label for c in self.cursors)
            raise DataError(f"none of the first {self.reads_before_long} documents read from {labels} "
                            f"has at least {self.window} tokens (the training window) after the "
                            f"min_doc_tokens filter; use longer documents, a smaller train.window or "
                            f"a smaller data.min_doc_tokens")

    def refetch(self, addr: tuple[int, int, int]) -> np.ndarray:
        """The tokens of the document at a random-access address (used on resume)."""
        i, epoch, pos = addr
        return self.tokenize(self.cursors[i].source.text(epoch, pos))

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "next_id": self.next_id,
                "reads_before_long": self.reads_before_long, "cursors": [c.state() for c in self.cursors]}

    def restore(self, state: dict) -> None:
        if len(state["cursors"]) != len(self.cursors):
            raise DataError(f"data state has {len(state['cursors'])} sources, the config "
                            f"{len(self.cursors)}")
        self.rng.bit_generator.state = state["rng"]
        self.next_id, self.reads_before_long = state["next_id"], state["reads_before_long"]
        for c, s in zip(self.cursors, state["cursors"]):
            c.restore(s)
