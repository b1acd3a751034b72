"""The training batch stream: config -> sources -> seeded mixture -> doc-aware k-packing.

    stream = BatchStream(cfg)                # every pack slot: the global batch
    batch = next(stream)  # inputs/targets/doc_ids int32 [B, T], loss_mask float32 [B, T]
    saved = stream.state()  # JSON-able; BatchStream(cfg).restore(saved) continues exactly
    mine = BatchStream(cfg, slots=[2, 3])    # only pack slots 2 and 3: rows 2k .. 4k-1 of the above

Row r of a batch is window r % k of pack r // k (k = train.pack_size); T = train.window or
model.max_position_embeddings. targets[r, -1] is the first token of the next window of the same
stream. loss_mask is 0 only where a document's EOS would be trained to predict the next document's
BOS (there is no padding: slots are always refilled). Everything is deterministic given data.seed; a
restored state must come from the same sources, seed, tokenizer, batch size, k and window.

What each host reads: pack slot s of the n = B/k slots is an independent stream: its own mixture
generator (seeded from data.seed and s), its own share of every source (fot/data/sources.py: of a
random-access source of L documents those with index i % n == s (i % L == s % L when L < n), of
builtin:passkey the documents s, s+n, ..., of a streaming dataset every n-th file or row), its own
packer. A `BatchStream(cfg, slots=...)` opens the sources but reads and tokenizes only the documents
of its slots and returns only their rows (in slot order), and slot s's rows are the same whichever
other slots are built, so processes that each build the slots of their rows together produce the
one global batch, whatever their number. doc_ids are unique across slots (slot s's j-th document
has id j * n + s). The state holds the position of each built slot; `merge_states` joins the states
of processes that built different slots into one that any set of slots can be restored from.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from fot.config import Config
from fot.data.packing import Packer
from fot.data.sources import DataError, DocStream, open_source
from fot.data.tokenizer import check_vocab, load_tokenizer

STATE_VERSION = 3  # 2: one position per pack slot; 3: the window-length check per stream


class BatchStream:
    def __init__(self, cfg: Config, slots: Iterable[int] | None = None):
        data, train = cfg.data, cfg.train
        self.window = train.window or cfg.model.max_position_embeddings
        self.batch_size, self.k = train.batch_size, train.pack_size
        if self.batch_size % self.k:
            raise DataError(f"train.pack_size={self.k} does not divide train.batch_size={self.batch_size}")
        self.n_slots = self.batch_size // self.k
        self.slots = list(range(self.n_slots)) if slots is None else sorted({int(s) for s in slots})
        if any(not 0 <= s < self.n_slots for s in self.slots):
            raise DataError(f"pack slots {self.slots} are not all among the {self.n_slots} slots "
                            f"(train.batch_size / train.pack_size)")
        self.tokenizer = load_tokenizer(data.tokenizer)
        check_vocab(self.tokenizer, cfg.model.vocab_size, f"data.tokenizer={data.tokenizer!r}")
        # One seed per source from data.seed, so adding a source does not reshuffle the others.
        seeds = np.random.SeedSequence(data.seed).spawn(len(data.sources) + 1)
        sources = [open_source(s, int(seeds[i].generate_state(1)[0]), f"data.sources[{i}]")
                   for i, s in enumerate(data.sources)]
        mix = int(seeds[-1].generate_state(1)[0])
        weights = [s.weight for s in data.sources]
        # Per built slot: its document stream (its share of every source) and its packer.
        self.docs = {s: DocStream(sources, weights, self.tokenizer, [mix, s], self.window,
                                  data.min_doc_tokens, slot=s, n_slots=self.n_slots)
                     for s in self.slots}
        self.packers = {s: Packer(d.next, 1, self.k, self.window, refetch=d.refetch)
                        for s, d in self.docs.items()}
        self.step = 0
        # What a saved state must match to be restored here.
        self._signature = {"sources": [[s.path, s.weight] for s in data.sources], "seed": data.seed,
                           "tokenizer": data.tokenizer, "min_doc_tokens": data.min_doc_tokens,
                           "batch_size": self.batch_size, "k": self.k, "window": self.window}

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The rows of the built slots, slot by slot: [len(slots) * k, T] arrays."""
        parts = [self.packers[s].step() for s in self.slots]
        if parts:
            batch = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        else:
            empty = lambda dtype: np.empty((0, self.window), dtype)
            batch = {"inputs": empty(np.int32), "targets": empty(np.int32),
                     "loss_mask": empty(np.float32), "doc_ids": empty(np.int32)}
        self.step += 1
        return batch

    def state(self) -> dict:
        """JSON-able: the step and, per built slot, its document stream and pending documents."""
        return {"version": STATE_VERSION, "signature": self._signature, "step": self.step,
                "slots": {str(s): {"docs": self.docs[s].state(), "packer": self.packers[s].state()[0]}
                          for s in self.slots}}

    def restore(self, state: dict) -> None:
        """Continue from `state`, which must hold every slot built here (it may hold more)."""
        _check_state(state)
        if state["signature"] != self._signature:
            raise DataError(f"data state was saved for {state['signature']}, this config is "
                            f"{self._signature}")
        missing = [s for s in self.slots if str(s) not in state["slots"]]
        if missing:
            raise DataError(f"data state holds pack slots {sorted(map(int, state['slots']))}, not "
                            f"{missing}")
        for s in self.slots:
            self.docs[s].restore(state["slots"][str(s)]["docs"])
            self.packers[s].restore([state["slots"][str(s)]["packer"]])
        self.step = state["step"]


def _check_state(state: dict) -> None:
    if state.get("version") != STATE_VERSION:
        raise DataError(f"data state version {state.get('version')} is not {STATE_VERSION}")


def merge_states(states: list[dict]) -> dict:
    """One data state with the slots of all `states` (those of processes at the same step)."""
    if not states:
        raise DataError("no data states to merge")
    for st in states:
        _check_state(st)
        if st["signature"] != states[0]["signature"] or st["step"] != states[0]["step"]:
            raise DataError(f"data states of different runs or steps: {st['signature']} step "
                            f"{st['step']}, {states[0]['signature']} step {states[0]['step']}")
    slots = {}
    for st in states:
        slots.update(st["slots"])
    merged = dict(states[0], slots=dict(sorted(slots.items(), key=lambda kv: int(kv[0]))))
    return merged
