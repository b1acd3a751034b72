"""Doc-aware k-packing on synthetic documents of known lengths."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from fot.data.packing import Packer

BOS, EOS = 1, 2


def make_docs(lengths, first=10, stride=20):
    """Document i = BOS, distinct ids first + i*stride + 0..len-1, EOS (as DocStream tokenizes)."""
    return [np.array([BOS] + list(range(first + i * stride, first + i * stride + n)) + [EOS], np.int32)
            for i, n in enumerate(lengths)]


class Feeder:
    def __init__(self, docs, with_addr=True):
        self.docs, self.i, self.with_addr = docs, 0, with_addr

    def next(self):
        d = SimpleNamespace(doc_id=self.i, tokens=self.docs[self.i], addr=(0, 0, self.i) if self.with_addr else None)
        self.i += 1
        return d

    def refetch(self, addr):
        return self.docs[addr[2]]


def test_hand_written_case():
    # B=4 rows, k=2 -> 2 pack slots, T=5; text lengths 3, 12, 7, 4, 9, 10 (ids 10.., 30.., 50.., ...).
    docs = make_docs([3, 12, 7, 4, 9, 10])
    f = Feeder(docs)
    p = Packer(f.next, n_slots=2, k=2, window=5)

    b = p.step()
    # slot 0 takes doc0 then doc1; slot 1 takes doc2 then doc3.
    np.testing.assert_array_equal(b["inputs"], [[1, 10, 11, 12, 2],
                                                [1, 30, 31, 32, 33],
                                                [1, 50, 51, 52, 53],
                                                [54, 55, 56, 2, 1]])
    np.testing.assert_array_equal(b["targets"], [[10, 11, 12, 2, 1],
                                                 [30, 31, 32, 33, 34],
                                                 [50, 51, 52, 53, 54],
                                                 [55, 56, 2, 1, 70]])
    np.testing.assert_array_equal(b["doc_ids"], [[0, 0, 0, 0, 0],
                                                 [1, 1, 1, 1, 1],
                                                 [2, 2, 2, 2, 2],
                                                 [2, 2, 2, 2, 3]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 1, 1, 0],
                                                   [1, 1, 1, 1, 1],
                                                   [1, 1, 1, 1, 1],
                                                   [1, 1, 1, 0, 1]])

    b = p.step()
    # slot 0 continues doc1 where window 2 ended, then doc4; slot 1 continues doc3, then doc5.
    np.testing.assert_array_equal(b["inputs"], [[34, 35, 36, 37, 38],
                                                [39, 40, 41, 2, 1],
                                                [70, 71, 72, 73, 2],
                                                [1, 110, 111, 112, 113]])
    np.testing.assert_array_equal(b["targets"], [[35, 36, 37, 38, 39],
                                                 [40, 41, 2, 1, 90],
                                                 [71, 72, 73, 2, 1],
                                                 [110, 111, 112, 113, 114]])
    np.testing.assert_array_equal(b["doc_ids"], [[1, 1, 1, 1, 1],
                                                 [1, 1, 1, 1, 4],
                                                 [3, 3, 3, 3, 3],
                                                 [5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 1, 1, 1],
                                                   [1, 1, 1, 0, 1],
                                                   [1, 1, 1, 1, 0],
                                                   [1, 1, 1, 1, 1]])
    assert {k: v.dtype for k, v in b.items()} == {"inputs": np.int32, "targets": np.int32,
                                                 "doc_ids": np.int32, "loss_mask": np.float32}


def run(lengths, n_slots, k, T, steps):
    docs = make_docs(lengths)
    f = Feeder(docs)
    p = Packer(f.next, n_slots, k, T)
    return docs, [p.step() for _ in range(steps)], f.i


def test_streams_reassemble_documents_without_leaks():
    # Random lengths, several steps: per slot, the rows of all steps laid end to end are exactly that
    # slot's documents in fetch order, each token tagged with its own document's id; the mask is 0
    # exactly where the target belongs to another document than the input.
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=200).tolist()
    n_slots, k, T, steps = 3, 4, 7, 6
    docs, batches, used = run(lengths, n_slots, k, T, steps)
    owner = {}
    for s in range(n_slots):
        stream, ids, targets, mask = (
            np.concatenate([b[key][s * k:(s + 1) * k].reshape(-1) for b in batches])
            for key in ("inputs", "doc_ids", "targets", "loss_mask"))
        assert len(stream) == steps * k * T
        np.testing.assert_array_equal(targets[:-1], stream[1:])  # windows are contiguous across steps
        order = list(dict.fromkeys(ids.tolist()))
        assert ids.tolist() == sorted(ids.tolist())  # a slot's documents follow each other
        for d in order:
            owner.setdefault(d, s)
            assert owner[d] == s
            got = stream[ids == d]
            full = docs[d]
            # every document but the slot's last is complete; the last one is a prefix
            if d != order[-1]:
                np.testing.assert_array_equal(got, full)
            else:
                np.testing.assert_array_equal(got, full[:len(got)])
        expected_mask = np.concatenate([ids[1:] == ids[:-1], [True]]).astype(np.float32)
        np.testing.assert_array_equal(mask[:-1], expected_mask[:-1])
        eos_pos = np.flatnonzero(stream[:-1] == EOS)
        assert np.all(mask[eos_pos] == 0)
    # documents were fetched in id order and each went to exactly one slot
    assert sorted(owner) == list(range(len(owner)))
    assert len(owner) <= used


def test_state_restore_is_exact():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 30, size=300).tolist()
    docs = make_docs(lengths)
    for with_addr in (True, False):  # addresses re-fetched, or tokens stored in the state
        f = Feeder(docs, with_addr)
        p = Packer(f.next, 2, 3, 6, refetch=f.refetch)
        for _ in range(4):
            p.step()
        state = json.loads(json.dumps(p.state()))
        cursor = f.i
        after = [p.step() for _ in range(5)]
        g = Feeder(docs, with_addr)
        g.i = cursor
        q = Packer(g.next, 2, 3, 6, refetch=g.refetch)
        q.restore(state)
        again = [q.step() for _ in range(5)]
        for a, b in zip(after, again):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
        assert any("tokens" in e for slot in state for e in slot) != with_addr


def test_bad_packer_arguments():
    with pytest.raises(ValueError, match="positive"):
        Packer(lambda: None, 0, 2, 5)
    p = Packer(lambda: SimpleNamespace(doc_id=0, tokens=np.zeros(0, np.int32), addr=None), 1, 1, 4)
    with pytest.raises(ValueError, match="no tokens"):
        p.step()
