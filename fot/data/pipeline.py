"""The training batch stream: config -> sources -> seeded mixture -> doc-aware k-packing.

    stream = BatchStream(cfg)
    batch = next(stream)  # inputs/targets/doc_ids int32 [B, T], loss_mask float32 [B, T]
    saved = stream.state()  # JSON-able; BatchStream(cfg).restore(saved) continues exactly

Row r of a batch is window r % k of pack r // k (k = train.pack_size); T = train.window or
model.max_position_embeddings. targets[r, -1] is the first token of the next window of the same
stream. doc_ids numbers documents globally in the order they were fetched; loss_mask is 0 only where
a document's EOS would be trained to predict the next document's BOS (there is no padding: slots are
always refilled). Everything is deterministic given data.seed; a restored state must come from the
same sources, seed, tokenizer, batch size, k and window.
"""

from __future__ import annotations

import numpy as np

from fot.config import Config
from fot.data.packing import Packer
from fot.data.sources import DataError, DocStream, open_source
from fot.data.tokenizer import load_tokenizer

STATE_VERSION = 1


class BatchStream:
    def __init__(self, cfg: Config):
        data, train = cfg.data, cfg.train
        self.window = train.window or cfg.model.max_position_embeddings
        self.batch_size, self.k = train.batch_size, train.pack_size
        if self.batch_size % self.k:
            raise DataError(f"train.pack_size={self.k} does not divide train.batch_size={self.batch_size}")
        self.tokenizer = load_tokenizer(data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise DataError(f"data.tokenizer={data.tokenizer!r} has {self.tokenizer.vocab_size} ids but "
                            f"model.vocab_size={cfg.model.vocab_size}")
        # One seed per source from data.seed, so adding a source does not reshuffle the others.
        seeds = np.random.SeedSequence(data.seed).spawn(len(data.sources) + 1)
        sources = [open_source(s, int(seeds[i].generate_state(1)[0]), f"data.sources[{i}]")
                   for i, s in enumerate(data.sources)]
        self.docs = DocStream(sources, [s.weight for s in data.sources], self.tokenizer,
                              int(seeds[-1].generate_state(1)[0]), self.window, data.min_doc_tokens)
        self.packer = Packer(self.docs.next, self.batch_size // self.k, self.k, self.window,
                             refetch=self.docs.refetch)
        self.step = 0
        # What a saved state must match to be restored here.
        self._signature = {"sources": [[s.path, s.weight] for s in data.sources], "seed": data.seed,
                           "tokenizer": data.tokenizer, "min_doc_tokens": data.min_doc_tokens,
                           "batch_size": self.batch_size, "k": self.k, "window": self.window}

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.packer.step()
        self.step += 1
        return batch

    def state(self) -> dict:
        return {"version": STATE_VERSION, "signature": self._signature, "step": self.step,
                "docs": self.docs.state(), "packer": self.packer.state()}

    def restore(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        if state["signature"] != self._signature:
            raise DataError(f"data state was saved for {state['signature']}, this config is "
                            f"{self._signature}")
        self.docs.restore(state["docs"])
        self.packer.restore(state["packer"])
        self.step = state["step"]
