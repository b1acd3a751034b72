"""Crossbatch attention: the FoT training procedure (LongLLaMA `cross_batch.py` semantics).

In a memory layer, batch row b attends to its own causal window (the block's local partial) plus all
keys/values of rows b-1 ... b-R (R = train.cross_batch_range), those keys encoded as if first in the
context (RoPE at position 0, i.e. scaled by the attention factor, when memory.positionals; no RoPE
otherwise), fully visible, in ONE softmax with the local keys. Gradients flow into the other rows.

Which rows are visible: row b of the batch, at index i = b % k inside its pack (k = train.pack_size),
sees n(b) contexts counting its own:
    n(b) = min(i * step + 1, R + 1)  with stepping (k > 1),  step = ceil((R + 1) / max(k - 1, 1))
    n(b) = R + 1                     otherwise,
and never more than b + 1 (the reference's guard against wrapping to later rows). The extra contexts
are always the immediately preceding rows b-1 ... b-(n(b)-1), regardless of pack boundaries: rows of
the same pack are earlier windows of the same document (positives), rows of the previous pack are
other documents (negatives). E.g. k=4, R=3, stepping: step 2, extra contexts 0, 2, 3, 3 per pack row.

With document ids (`ctx.segments`, train.document_mask), a row of the same pack shows a query only
the tokens of the query's own document: when short documents share a pack, the ones before it are
neither its past nor negatives. Rows of the previous pack stay wholly visible (the negatives).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fot import sharding
from fot.model import partials
from fot.model.llama import MEMORY_FETCH
from fot.model.memory.keys import as_if_first, gate_of


def extra_contexts(batch_size: int, pack_size: int, cross_batch_range: int, stepping: bool) -> np.ndarray:
    """[B] int: how many previous rows each row reads (n(b) - 1 in the module docstring)."""
    r = cross_batch_range
    step = math.ceil((r + 1) / max(pack_size - 1, 1))
    b = np.arange(batch_size)
    n = np.minimum((b % pack_size) * step + 1, r + 1) if stepping and pack_size > 1 else np.full_like(b, r + 1)
    return np.minimum(n, b + 1) - 1


# A layer whose one source's scores for the whole batch take at most this many bytes reads its
# sources unrolled: each its own partial, the rows that do not read it skipped, and nothing
# recomputed (attention's backward recomputes its scores anyway), so XLA:CPU runs the small
# products side by side. Larger ones read one source at a time (below). The tiny model's
# crossbatch: 4 MiB sources, ~29% -> ~12% of its step (docs/performance.md item 9).
UNROLL_BYTES = 32 * 2**20

row_partial = jax.checkpoint(partials.dense_partial)


def _unrolls(batch: int, heads: int, window: int) -> bool:
    """Whether a memory layer of these sizes reads its sources unrolled (`UNROLL_BYTES`)."""
    return batch * heads * window * window * 4 <= UNROLL_BYTES


def _whole_packs(batch: int, pack_size: int, batch_shards: int) -> bool:
    """Whether every batch shard holds whole packs (see `crossbatch_memory`)."""
    return batch % (pack_size * batch_shards) == 0


def _in_pack(first: list[int]) -> list[bool]:
    """Per source r = 1..R (`first_readers`): whether every row that reads row b - r reads a row of
    its own pack (its pack row is at least r)."""
    return [c >= i for i, c in enumerate(first, start=1)]


def reads_previous_shard(batch: int, heads: int, window: int, pack_size: int, cross_batch_range: int,
                         stepping: bool, batch_shards: int) -> bool:
    """Whether a memory layer's crossbatch takes rows from the previous batch shard (the one halo
    collective permute each way of fot/sharding.py CROSSBATCH LAYOUT): not on one shard, and not
    in an unrolled layer whose rows all read rows of their own pack, each shard holding whole packs."""
    if cross_batch_range == 0 or batch_shards == 1:
        return False
    if not (_whole_packs(batch, pack_size, batch_shards) and _unrolls(batch, heads, window)):
        return True
    return not all(_in_pack(first_readers(pack_size, cross_batch_range, stepping)))


def crossbatch_memory(module, ctx, cross_batch_range: int, pack_size: int, stepping: bool):
    """A `memory` callback for `Llama.run_layers` (see fot/model/llama.py MemoryFn), or None for R=0
    (plain windows, the "no crossbatch" ablation)."""
    r = cross_batch_range
    if r == 0:
        return None
    b, t = ctx.q_pos.shape
    extra = jnp.asarray(extra_contexts(b, pack_size, r, stepping))
    visible = ((jnp.arange(r * t) // t)[None, :] < extra[:, None])[:, None, :]  # [B, 1, R*T]
    if ctx.segments is not None:
        # Document ids of rows b-1 .. b-R, once for all memory layers; the mask becomes per query.
        prev = sharding.previous_rows(ctx.segments, r).reshape(b, 1, r * t)
        same_pack = (np.arange(b)[:, None] % pack_size) >= np.arange(1, r + 1)[None, :]  # [B, R]
        same_pack = jnp.asarray(np.repeat(same_pack, t, axis=1))[:, None, :]
        visible = visible & (~same_pack | (prev == ctx.segments[:, :, None]))  # [B, T, R*T]
    # Row b - r is read only by the rows of each pack from first[r-1] on; the others are skipped,
    # not masked, when every batch shard holds whole packs (else the packs' rows would be resharded).
    mesh = sharding.ambient_mesh()
    whole_packs = _whole_packs(b, pack_size, 1 if mesh is None else sharding.batch_shards(mesh))
    first = first_readers(pack_size, r, stepping) if whole_packs else [0] * r

    def fn(slot, q, k_new, v_new, local=None):
        k = as_if_first(module, ctx, k_new)
        vis = jnp.moveaxis(visible.reshape(*visible.shape[:2], r, t), 2, 0)[:, :, :, None, None, :]
        if _unrolls(b, q.shape[2], t):
            # A source read only within packs (`_in_pack`) is sliced from k and v (whole rows, as
            # `_previous` gives them), not from previous_rows' shifted copies: no copy, nor its
            # backward pad and sum, nor a halo from the previous batch shard (the tiny model: all
            # its sources: ~1.5 ms less per step, docs/performance.md item 14).
            own = _in_pack(first)
            kw, vw = (sharding.constrain(a, ("batch", None, "act_kv_heads", "head_dim")) for a in (k, v_new))
            pk, pv = (None, None) if all(own) else _previous(kw, vw, r)
            sources = [(kw, vw, vis[i], c, i + 1) if own[i] else (pk[:, i], pv[:, i], vis[i], c, 0)
                       for i, c in enumerate(first)]
            if local is not None:  # ctx.local_in_memory: the local window is a source too
                sources.insert(0, (local[0].astype(k.dtype), local[1].astype(v_new.dtype), local[2], 0, 0))
            return [_skipping(q, *s, pack_size) for s in sources], gate_of(module, slot)
        pk, pv = _previous(k, v_new, r)
        # One source at a time (a scan, each source's scores recomputed in the backward pass): the
        # layer never holds [B, H, T, R*T] scores, the 110M step's largest temporaries. Given the
        # local window (ctx.local_in_memory), it is the scan's first source, so the backward pass
        # holds one source's [T, T] buffers at a time (XLA:CPU otherwise kept the local
        # attention's alive through the rows': 0.79 GiB of the ~110M step, docs/scaling.md).
        # Unrolled, the ~110M step planned 0.27-0.42 GiB more. With whole packs, each pack row j
        # has its own scan over the rows j of all packs and only the sources they read.
        groups = [(j, sum(c <= j for c in first)) for j in range(pack_size)] if whole_packs else [(None, r)]
        parts = []
        for j, n in groups:
            rows = lambda a, axis=0, j=j: _pack_row(a, j, pack_size, axis)  # noqa: E731
            qj = rows(q)
            if n == 0 and local is None:  # a pack's first row reads no other row
                parts.append(partials.empty(qj.shape))
                continue
            ks, vs = (jnp.moveaxis(rows(a[:, :n]), 1, 0) for a in (pk, pv))
            masks = rows(vis[:n], 1)
            if local is not None:
                k_loc, v_loc, mask = (rows(a) for a in local)
                ks = jnp.concatenate([k_loc[None].astype(ks.dtype), ks])
                vs = jnp.concatenate([v_loc[None].astype(vs.dtype), vs])
                masks = jnp.concatenate([mask[None], jnp.broadcast_to(masks, (n, *mask.shape))])

            def add_row(acc, row, qj=qj):
                return partials.merge(acc, row_partial(qj, *row)), None

            parts.append(jax.lax.scan(add_row, partials.empty(qj.shape), (ks, vs, masks))[0])
        if len(parts) > 1:  # the pack rows' partials back in batch order
            parts = [partials.Partial(*(jnp.stack(a, axis=1).reshape(b, *a[0].shape[1:]) for a in zip(*parts)))]
        return parts, gate_of(module, slot)

    return fn


def _previous(k, v, r: int):
    """Keys and values [B, R, T, K, D] with [:, r-1] = row b-r (zeros before row 0, hidden by the
    mask); on a mesh this is one collective permute of R rows (fot/sharding.py CROSSBATCH LAYOUT).
    Every query reads whole rows: with mesh.sequence > 1 they are all-gathered here, once (the row
    scan would otherwise gather each row again when it is recomputed)."""
    whole = [sharding.constrain(a, ("batch", None, None, "act_kv_heads", "head_dim"))
             for a in sharding.previous_rows((k, v), r)]
    return checkpoint_name(whole, MEMORY_FETCH)


def first_readers(pack_size: int, cross_batch_range: int, stepping: bool) -> list[int]:
    """[R]: the first row of a pack that reads row b - r (r = 1..R), from `extra_contexts` of a
    pack far enough into the batch (with stepping, a pack's first rows read fewer rows)."""
    r = cross_batch_range
    extra = extra_contexts((r + 1) * pack_size, pack_size, r, stepping)[-pack_size:]
    return [int(np.argmax(extra >= i)) for i in range(1, r + 1)]


def _pack_row(a, j: int | None, pack_size: int, axis: int = 0):
    """Along `axis` (the batch), row j of every pack; all rows for j None."""
    if j is None:
        return a
    packs = a.shape[axis] // pack_size
    return jnp.take(a.reshape(*a.shape[:axis], packs, pack_size, *a.shape[axis + 1:]), j, axis=axis + 1)


def _skipping(q, k, v, mask, c: int, shift: int, pack_size: int) -> partials.Partial:
    """The dense partial of the rows c.. of each pack, which read the keys and values of the rows
    `shift` before them (c >= shift); rows 0..c-1 see nothing."""
    if c == 0:
        return partials.dense_partial(q, k, v, mask)

    def read(a, s=0):
        return a.reshape(-1, pack_size, *a.shape[1:])[:, c - s:pack_size - s].reshape(-1, *a.shape[1:])
    got = partials.dense_partial(read(q), read(k, shift), read(v, shift), read(mask))

    def pad(a, fill):
        a = a.reshape(-1, pack_size - c, *a.shape[1:])
        a = jnp.pad(a, [(0, 0), (c, 0)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
        return a.reshape(-1, *a.shape[2:])
    return partials.Partial(pad(got.o, 0.0), pad(got.m, partials.NEG_INF), pad(got.l, 0.0))
