"""Crossbatch attention against a plain NumPy reference of the LongLLaMA algorithm."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot.config import MemoryConfig, load_config
from fot.model import attention, partials
from fot.model.memory import crossbatch
from fot.model.memory.crossbatch import crossbatch_memory, extra_contexts
from fot.model.llama import init_model


def ref_visible_rows(b: int, k: int, r: int, stepping: bool) -> list[int]:
    """Rows whose keys row b reads besides its own, written out as the reference loop does."""
    if stepping and k > 1:
        step = -(-(r + 1) // (k - 1))
        n = min((b % k) * step + 1, r + 1)
    else:
        n = r + 1
    n = min(n, b + 1)
    return [b - c for c in range(1, n)]


def ref_crossbatch(q, k, k_unrot, v, r, pack, stepping, af, docs=None):
    """q, k [B, T, H, D] already rotated for the local window, keys of other rows = k_unrot * af
    (RoPE at position 0); one softmax over [causal local | other rows]. With document ids docs
    [B, T]: a query sees only its own document's tokens, locally and in rows of its pack; rows of
    the previous pack wholly."""
    q, k, k_unrot, v = (np.asarray(x, np.float64) for x in (q, k, k_unrot, v))
    b_, t_, h_, d_ = q.shape
    out = np.zeros_like(q)
    for b in range(b_):
        rows = ref_visible_rows(b, pack, r, stepping)
        for t in range(t_):
            def seen(o, upto):  # which tokens of row o (up to `upto`) this query may read
                keep = np.ones(upto, bool)
                if docs is not None and o // pack == b // pack:
                    keep = docs[o, :upto] == docs[b, t]
                return keep
            keys = [k[b, : t + 1][seen(b, t + 1)]] + [k_unrot[o][seen(o, t_)] * af for o in rows]
            vals = [v[b, : t + 1][seen(b, t + 1)]] + [v[o][seen(o, t_)] for o in rows]
            keys, vals = np.concatenate(keys), np.concatenate(vals)
            for h in range(h_):
                s = keys[:, h] @ q[b, t, h] / np.sqrt(d_)
                p = np.exp(s - s.max())
                out[b, t, h] = p @ vals[:, h] / p.sum()
    return out


@pytest.fixture(params=["unrolled", "scan"])
def reading(request, monkeypatch):
    """Both ways a memory layer reads its sources: unrolled with rows skipped (small layers) and
    one source at a time in a scan (crossbatch.UNROLL_BYTES)."""
    if request.param == "scan":
        monkeypatch.setattr(crossbatch, "UNROLL_BYTES", 0)
    return request.param


def run_crossbatch(q, k_rot, k_unrot, v, r, pack, stepping, af, positionals=True, docs=None,
                   local_in_memory=False):
    """local_in_memory: the crossbatch scan takes the local window too (what training does with
    plain attention), instead of `attend` joining the two."""
    b, t = q.shape[:2]
    module = SimpleNamespace(mem=MemoryConfig(layers=(0,), positionals=positionals))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    segments = None if docs is None else jnp.asarray(docs)
    ctx = SimpleNamespace(inv_freq=np.ones(q.shape[-1] // 2, np.float32), attention_factor=af,
                          q_pos=pos, segments=segments)
    fn = crossbatch_memory(module, ctx, r, pack, stepping)
    if fn is not None and local_in_memory:
        local = (k_rot, v, partials.causal_mask(pos, pos, None, segments, segments))
        extra, _ = fn(0, q, k_unrot, v, local)
        return partials.combine(extra, q.dtype)
    extra, _ = fn(0, q, k_unrot, v) if fn is not None else ([], None)
    return attention.attend(q, k_rot, v, pos, pos, extra=list(extra), q_seg=segments, k_seg=segments)


@pytest.mark.parametrize("local_in_memory", [False, True])
@pytest.mark.parametrize("r,pack,stepping,batch", [(3, 4, True, 8), (3, 4, False, 8), (2, 2, True, 6),
                                                   (1, 1, True, 3), (0, 4, True, 4), (5, 3, True, 9)])
def test_matches_numpy_reference(r, pack, stepping, batch, local_in_memory, reading):
    rng = np.random.default_rng(0)
    t, h, d = 5, 2, 4
    q, k_rot, k_unrot, v = (rng.standard_normal((batch, t, h, d)).astype(np.float32) for _ in range(4))
    af = 1.3
    got = run_crossbatch(jnp.asarray(q), jnp.asarray(k_rot), jnp.asarray(k_unrot), jnp.asarray(v),
                         r, pack, stepping, af, local_in_memory=local_in_memory)
    want = ref_crossbatch(q, k_rot, k_unrot, v, r, pack, stepping, af)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("local_in_memory", [False, True])
@pytest.mark.parametrize("r,pack,stepping,batch", [(3, 4, True, 8), (3, 4, False, 8), (2, 2, True, 6)])
def test_document_mask_matches_numpy_reference(r, pack, stepping, batch, local_in_memory, reading):
    """Short documents packed several to a pack slot: each query reads its own document only, in
    its row and in the rows of its pack, plus the previous pack's rows (negatives)."""
    rng = np.random.default_rng(4)
    t, h, d = 6, 2, 4
    q, k_rot, k_unrot, v = (rng.standard_normal((batch, t, h, d)).astype(np.float32) for _ in range(4))
    # each pack's stream: documents of 1..5 tokens, so they start mid-row and span rows
    docs = np.concatenate([np.repeat(np.arange(50) + 100 * s, rng.integers(1, 6, 50))[:pack * t]
                           .reshape(pack, t) for s in range(batch // pack)])
    got = run_crossbatch(*(jnp.asarray(x) for x in (q, k_rot, k_unrot, v)), r, pack, stepping, 1.3,
                         docs=docs, local_in_memory=local_in_memory)
    want = ref_crossbatch(q, k_rot, k_unrot, v, r, pack, stepping, 1.3, docs=docs)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    # and it differs from the unmasked attention (the mask is not a no-op on this layout)
    plain = ref_crossbatch(q, k_rot, k_unrot, v, r, pack, stepping, 1.3)
    assert np.abs(plain - want).max() > 1e-2


def test_context_counts_k4_r3_stepping():
    # First pack: also capped by b + 1 (no row before 0); later packs: 0, 2, 3, 3.
    assert extra_contexts(12, 4, 3, True).tolist() == [0, 1, 2, 3, 0, 2, 3, 3, 0, 2, 3, 3]
    assert extra_contexts(8, 4, 3, False).tolist() == [0, 1, 2, 3, 3, 3, 3, 3]
    assert extra_contexts(8, 4, 0, True).tolist() == [0] * 8
    for b in range(12):
        assert extra_contexts(12, 4, 3, True)[b] == len(ref_visible_rows(b, 4, 3, True))


def test_positionals_false_uses_unrotated_keys():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((4, 3, 2, 4)).astype(np.float32) for _ in range(3))
    got = run_crossbatch(*(jnp.asarray(x) for x in (q, k, k, v)), 2, 2, True, 1.7, positionals=False)
    want = ref_crossbatch(q, k, k, v, 2, 2, True, 1.0)  # no RoPE: the attention factor is not applied
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("local_in_memory", [False, True])
def test_gradients_flow_into_previous_rows_only(local_in_memory, reading):
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((8, 3, 2, 4)), jnp.float32) for _ in range(3))

    def out_row(k_in, v_in, row):
        return run_crossbatch(q, k_in, k_in, v_in, 3, 4, True, 1.0, local_in_memory=local_in_memory)[row].sum()

    gk, gv = jax.grad(out_row, argnums=(0, 1))(k, v, 6)  # row 6 reads rows 5, 4 (same pack), 3
    for other in (3, 4, 5):
        assert float(jnp.abs(gk[other]).sum()) > 1e-6 and float(jnp.abs(gv[other]).sum()) > 1e-6
    for other in (0, 1, 2, 7):
        assert float(jnp.abs(gk[other]).sum()) == 0.0 and float(jnp.abs(gv[other]).sum()) == 0.0


def torch_crossbatch(q, k, k_unrot, v, r, pack, stepping, af):
    """ref_crossbatch in float64 PyTorch, differentiable: one softmax per query over its causal
    window and the keys of the rows it reads (ref_visible_rows)."""
    import torch

    rows = []
    for b in range(q.shape[0]):
        other = ref_visible_rows(b, pack, r, stepping)
        outs = []
        for t in range(q.shape[1]):
            keys = torch.cat([k[b, : t + 1]] + [k_unrot[o] * af for o in other])
            vals = torch.cat([v[b, : t + 1]] + [v[o] for o in other])
            s = torch.einsum("shd,hd->hs", keys, q[b, t]) / q.shape[-1] ** 0.5
            outs.append(torch.einsum("hs,shd->hd", torch.softmax(s, dim=-1), vals))
        rows.append(torch.stack(outs))
    return torch.stack(rows)


@pytest.mark.parametrize("local_in_memory", [False, True])
@pytest.mark.parametrize("r,pack,batch", [(3, 4, 8), (2, 2, 6)])
def test_gradients_match_torch_autograd(r, pack, batch, local_in_memory, reading):
    """Gradients of a weighted sum of the outputs for queries, local keys, other rows' keys and
    values against PyTorch autograd through the definition (with stepping, so rows are skipped)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((batch, 5, 2, 4)) for _ in range(4)]
    w = rng.standard_normal((batch, 5, 2, 4))

    def loss(q, k_rot, k_unrot, v):
        out = run_crossbatch(q, k_rot, k_unrot, v, r, pack, True, 1.3, local_in_memory=local_in_memory)
        return jnp.sum(out * w)

    got = jax.grad(loss, argnums=(0, 1, 2, 3))(*(jnp.asarray(x, jnp.float32) for x in xs))
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
    (torch_crossbatch(*ts, r, pack, True, 1.3) * torch.tensor(w)).sum().backward()
    for g, t in zip(got, ts):
        np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), atol=2e-5, rtol=2e-5)


def test_reading_skips_the_rows_that_read_nothing(monkeypatch, reading):
    """k = 4, R = 3, stepping: a pack's rows read 0, 2, 3, 3 other rows, so with the local window
    12 of 16 (row, source) products are needed; the compiled FLOPs are that share of reading
    every source for every row. (XLA counts a loop's body once: the scans run as Python loops.)"""
    def python_scan(f, carry, xs):
        for i in range(jax.tree.leaves(xs)[0].shape[0]):
            carry, _ = f(carry, jax.tree.map(lambda a: a[i], xs))
        return carry, None

    monkeypatch.setattr(jax.lax, "scan", python_scan)
    b, t, h, d = 8, 32, 2, 16
    q, k, v = (jnp.ones((b, t, h, d), jnp.float32) for _ in range(3))
    module = SimpleNamespace(mem=MemoryConfig(layers=(0,), positionals=False))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    ctx = SimpleNamespace(inv_freq=None, attention_factor=1.0, q_pos=pos, segments=None)
    local = (k, v, partials.causal_mask(pos, pos))

    def flops():
        fn = crossbatch_memory(module, ctx, 3, 4, True)
        f = lambda q, k, v: partials.combine(fn(0, q, k, v, local)[0], jnp.float32)  # noqa: E731
        return jax.jit(f).lower(q, k, v).compile().cost_analysis()["flops"]

    skipping = flops()
    monkeypatch.setattr(crossbatch, "first_readers", lambda k, r, stepping: [0] * r)
    assert skipping / flops() == pytest.approx(12 / 16, abs=0.05)


def test_model_rows_never_see_later_rows():
    """Through the whole model: changing row 5's tokens changes rows 6, 7 (which read it) and
    leaves rows 0..4 exactly as they were; with R = 0 it changes nothing else."""
    from fot.train import forward

    cfg = load_config("configs/tiny_model.yaml", ["memory.layers=[1]", "train.batch_size=8",
                                                  "train.pack_size=4", "train.cross_batch_range=3"])
    module = init_model(cfg.model, cfg.memory, seed=0)
    ids = np.random.default_rng(3).integers(3, 200, size=(8, 16)).astype(np.int32)
    ids2 = ids.copy()
    ids2[5, 3] += 1
    for r, changed in ((3, {5, 6, 7}), (0, {5})):
        outs = [np.asarray(forward(module, jnp.asarray(x), r, 4, True)) for x in (ids, ids2)]
        diff = {int(b) for b in np.nonzero(np.abs(outs[0] - outs[1]).max(axis=(1, 2)) > 0)[0]}
        assert diff == changed


def test_document_mask_through_the_model():
    """train.document_mask: a change inside one document reaches only that document's later tokens
    and the rows that read its row as a negative (the next pack's rows 1 and 2 read row 3)."""
    from fot.train import forward

    cfg = load_config("configs/tiny_model.yaml", ["memory.layers=[1]"])
    module = init_model(cfg.model, cfg.memory, seed=0)
    t = 16
    ids = np.random.default_rng(5).integers(3, 200, size=(8, t)).astype(np.int32)
    # pack 0: document 1 = row 0 and the first 6 tokens of row 1, document 2 = the rest of the pack;
    # pack 1: one document
    docs = np.full((8, t), 2, np.int32)
    docs[0], docs[1, :6], docs[4:] = 1, 1, 3
    docs = jnp.asarray(docs)

    def changed(row, col):
        ids2 = ids.copy()
        ids2[row, col] += 1
        outs = [np.asarray(forward(module, jnp.asarray(x), 3, 4, True, docs)) for x in (ids, ids2)]
        return {tuple(map(int, p)) for p in np.argwhere(np.abs(outs[0] - outs[1]).max(axis=-1) > 0)}

    # document 1 (rows 0-1 of pack 0): its own later tokens only, never document 2's
    got = changed(0, 3)
    assert got == {(0, c) for c in range(3, t)} | {(1, c) for c in range(6)}
    # document 2 in row 3: its later tokens in row 3, and all of pack 1's rows 1 and 2 (negatives)
    got = changed(3, 10)
    assert got == {(3, c) for c in range(10, t)} | {(r, c) for r in (5, 6) for c in range(t)}


@pytest.mark.parametrize("pack,r,stepping", [(4, 2, True), (4, 3, True), (4, 3, False), (2, 1, True),
                                             (3, 5, True), (4, 1, False)])
def test_the_previous_shard_is_read_when_a_row_reads_across_shards(pack, r, stepping):
    """`reads_previous_shard` for a small (unrolled) layer, 2 shards of 2 whole packs each, against
    the rows each row reads by the module docstring's definition (b-1 .. b-n(b)+1)."""
    b, shards = 4 * pack, 2
    per = b // shards
    extra = extra_contexts(b, pack, r, stepping)
    crosses = any((row - j) // per != row // per for row in range(b) for j in range(1, extra[row] + 1))
    assert crossbatch.reads_previous_shard(b, 2, 8, pack, r, stepping, shards) == crosses
    assert not crossbatch.reads_previous_shard(b, 2, 8, pack, r, stepping, 1)
    assert crossbatch.reads_previous_shard(b, 2, 4096, pack, r, stepping, shards)  # a scanned layer: always
