"""Doc-aware k-packing (the FoT/LongLLaMA crossbatch batch layout).

A batch of B rows holds B/k packs. Pack slot s owns an endless token stream: its documents one after
the other, each [BOS] text [EOS], so a document's EOS is followed by the next one's BOS. Each step
takes the next k*T tokens of every slot's stream and cuts them into k consecutive windows (rows
s*k .. s*k+k-1); the next step resumes exactly where the k-th window ended, so documents continue
across steps. A slot fetches a new document only when its stream runs short, slots in order 0..B/k-1.
The training pipeline (fot/data/pipeline.py) runs one single-slot Packer per pack slot, each on that
slot's own document stream, so a host packs only the slots it builds.
"""

from __future__ import annotations

import base64
import zlib
from collections import deque
from typing import Callable

import numpy as np


class Packer:
    """`next_doc()` returns an object with `doc_id`, `tokens` (int32 array) and `addr` (or None);
    `refetch(addr)` returns a document's tokens again, so resume state can store addresses only."""

    def __init__(self, next_doc: Callable, n_slots: int, k: int, window: int,
                 refetch: Callable | None = None):
        if n_slots <= 0 or k <= 0 or window <= 0:
            raise ValueError(f"packer needs positive slots/k/window, got {n_slots}/{k}/{window}")
        self.next_doc, self.refetch = next_doc, refetch
        self.n_slots, self.k, self.window = n_slots, k, window
        # per slot: deque of [doc_id, tokens, offset of the first unconsumed token, addr]
        self.slots: list[deque] = [deque() for _ in range(n_slots)]

    def _fill(self, slot: deque, need: int) -> None:
        have = sum(len(t) - off for _, t, off, _ in slot)
        while have < need:
            doc = self.next_doc()
            if len(doc.tokens) == 0:
                raise ValueError(f"document {doc.doc_id} has no tokens")
            slot.append([doc.doc_id, np.asarray(doc.tokens, dtype=np.int32), 0, doc.addr])
            have += len(doc.tokens)

    def _take(self, slot: deque, need: int, consume: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `need` tokens and their doc ids; then drop the first `consume` of them."""
        toks, ids, left = [], [], need
        for doc_id, t, off, _ in slot:
            piece = t[off:off + left]
            toks.append(piece)
            ids.append(np.full(len(piece), doc_id, dtype=np.int32))
            left -= len(piece)
            if not left:
                break
        while consume:
            entry = slot[0]
            step = min(consume, len(entry[1]) - entry[2])
            entry[2] += step
            consume -= step
            if entry[2] == len(entry[1]):
                slot.popleft()
        return np.concatenate(toks), np.concatenate(ids)

    def step(self) -> dict[str, np.ndarray]:
        k, T = self.k, self.window
        rows = self.n_slots * k
        out = {"inputs": np.empty((rows, T), np.int32), "targets": np.empty((rows, T), np.int32),
               "loss_mask": np.empty((rows, T), np.float32), "doc_ids": np.empty((rows, T), np.int32)}
        for s, slot in enumerate(self.slots):
            self._fill(slot, k * T + 1)  # +1: the last target is the next window's first token
            toks, ids = self._take(slot, k * T + 1, k * T)
            for j in range(k):
                r, a = s * k + j, j * T
                out["inputs"][r] = toks[a:a + T]
                out["targets"][r] = toks[a + 1:a + T + 1]
                out["doc_ids"][r] = ids[a:a + T]
                # EOS -> next document's BOS is not a prediction to learn.
                out["loss_mask"][r] = ids[a + 1:a + T + 1] == ids[a:a + T]
        return out

    def state(self) -> list[list[dict]]:
        """JSON-able: per slot, its pending documents as (id, offset, address or compressed tokens)."""
        out = []
        for slot in self.slots:
            entries = []
            for doc_id, t, off, addr in slot:
                e = {"doc_id": int(doc_id), "offset": int(off)}
                if addr is not None and self.refetch is not None:
                    e["addr"] = [int(a) for a in addr]
                else:
                    e["tokens"] = base64.b64encode(zlib.compress(t.astype("<i4").tobytes())).decode()
                entries.append(e)
            out.append(entries)
        return out

    def restore(self, state: list[list[dict]]) -> None:
        if len(state) != self.n_slots:
            raise ValueError(f"packer state has {len(state)} slots, this packer {self.n_slots}")
        self.slots = []
        for entries in state:
            slot = deque()
            for e in entries:
                if "addr" in e:
                    addr = tuple(e["addr"])
                    tokens = np.asarray(self.refetch(addr), dtype=np.int32)
                else:
                    addr = None
                    tokens = np.frombuffer(zlib.decompress(base64.b64decode(e["tokens"])), "<i4")
                    tokens = tokens.astype(np.int32)
                slot.append([e["doc_id"], tokens, e["offset"], addr])
            self.slots.append(slot)
