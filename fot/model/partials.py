"""Attention as combinable softmax partials.

Every source of keys (the causal local window, the FoT memory, crossbatch contexts, kNN-retrieved
keys, a ring neighbour's block) produces a `Partial`: the running max `m`, the sum of exponentials
`l` and the unnormalised output `o`, all float32. `merge` joins two partials of disjoint key sets;
`combine` merges any number into the normalised output of ONE softmax over all their keys, which is
exactly what FoT prescribes, and lets blockwise kernels and memory lookups stay independent.

Shapes: queries [B, T, H, D]; keys/values [B, S, K, D] with K kv heads (GQA: H = K * G).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked rows give zeros instead of NaNs


class Partial(NamedTuple):
    o: jax.Array  # [B, T, H, D] float32, sum_j exp(s_j - m) v_j
    m: jax.Array  # [B, T, H] float32, max score (NEG_INF if nothing visible)
    l: jax.Array  # [B, T, H] float32, sum_j exp(s_j - m)


def empty(shape: tuple[int, ...]) -> Partial:
    """The partial of no keys for queries of `shape` [..., D]: merging it changes nothing."""
    return Partial(jnp.zeros(shape, jnp.float32), jnp.full(shape[:-1], NEG_INF, jnp.float32),
                   jnp.zeros(shape[:-1], jnp.float32))


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, H, D] -> [B, T, K, G, D]."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d)


def head_major(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, H, D], k / v [B, S, K, D] -> float32 [B, K, G, T, D] and [B, K, S, D]: kv-head major,
    batch axes leading, the layout in which XLA:CPU runs attention's products as batched GEMMs and
    the masks and exponentials on their output without transposing it."""
    qh = jnp.transpose(group_queries(q, k.shape[2]).astype(jnp.float32), (0, 2, 3, 1, 4))
    return qh, jnp.swapaxes(k.astype(jnp.float32), 1, 2), jnp.swapaxes(v.astype(jnp.float32), 1, 2)


def token_major(a: jax.Array) -> jax.Array:
    """[B, K, G, T, ...] -> [B, T, H, ...] (head_major's inverse for queries' results)."""
    b, kv, g, t = a.shape[:4]
    return jnp.moveaxis(a, 3, 1).reshape(b, t, kv * g, *a.shape[4:])


def dense_partial(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                  query_block: int | None = None) -> Partial:
    """All-pairs partial. mask: bool broadcastable to [B, T, K, G, S] (usually [B, T, 1, 1, S]).

    Computed kv-head major ([B, K, G, T, S] scores, batch axes leading): XLA:CPU then runs each
    product as one batched GEMM instead of transposing around it (3x faster on the tiny model).
    Its gradient is FlashAttention's backward in one dense pass (`_dense`): no [T, S] array is kept
    for it, and `m` counts as a constant, which is exact for what `combine` normalises.

    `query_block`: the keys are the queries' own tokens in order (S = T) and none after a query is
    visible to it: each block of that many queries reads only the keys up to its end, and the
    masked-out scores beyond are never computed (forward and backward).
    """
    t = q.shape[1]
    own_keys = k.shape[1] == t and mask is not None and mask.shape[1] == mask.shape[-1] == t
    if query_block is not None and not own_keys:
        raise ValueError(f"query_block needs the queries' own keys and a causal mask [B, T, 1, 1, T]: "
                         f"{t} queries, {k.shape[1]} keys, mask {None if mask is None else mask.shape}")
    qh, kh, vh = head_major(q, k, v)
    mask = None if mask is None else jnp.moveaxis(mask, 1, 3)  # -> [B, K|1, G|1, T, S]
    o, m, l = _dense(qh, kh, vh, mask, query_block)
    return Partial(token_major(o), token_major(m), token_major(l))


# The masked-out fill below is computed from the scores (min(s, NEG_INF) is NEG_INF for any finite
# s), not written as a constant: constant fills ended up outside the layer scans as two score-sized
# broadcasts that lived through the backward pass (0.36 GiB of the ~110M step's plan; not XLA's
# loop-invariant code motion, whose pass off changed nothing; docs/scaling.md).
def _probs(qh, kh, mask):
    """Scores [B, K, G, T, S] (masked to NEG_INF) and their row max."""
    s = jnp.einsum("bkgtd,bksd->bkgts", qh, kh) * qh.shape[-1] ** -0.5
    if mask is not None:
        s = jnp.where(mask, s, jnp.minimum(s, NEG_INF))
    return s, jnp.max(s, axis=-1)


def masked_exp(s, m):
    """exp(s - m) for scores masked to NEG_INF and their row max m: masked scores give 0, also in
    rows with nothing visible (m NEG_INF), whose max is floored at NEG_INF / 10 here (exponents
    of -0.9e30), so no second select over the scores is needed."""
    return jnp.exp(s - jnp.maximum(m, NEG_INF / 10)[..., None])


def _blocks(t: int, query_block: int | None):
    """(query rows, keys) of each block: all keys for all queries (None), or `query_block`'s
    triangle of queries [a, b) with keys [0, b)."""
    if query_block is None:
        return [(None, None)]
    return [(slice(a, min(a + query_block, t)), slice(0, min(a + query_block, t)))
            for a in range(0, t, query_block)]


def _at(a, sl, axis: int):
    """a[sl] along `axis` (negative: from the end); None (all) and a None array stay as they are."""
    if a is None or sl is None:
        return a
    return a[(slice(None),) * (a.ndim + axis if axis < 0 else axis) + (sl,)]


def _joined(parts: list, axis: int):
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dense(qh, kh, vh, mask, query_block):
    out = []
    for rows, keys in _blocks(qh.shape[3], query_block):
        mk = _at(_at(mask, rows, -2), keys, -1)
        s, m = _probs(_at(qh, rows, 3), _at(kh, keys, 2), mk)
        p = masked_exp(s, m)
        out.append((jnp.einsum("bkgts,bksd->bkgtd", p, _at(vh, keys, 2)), m, jnp.sum(p, axis=-1)))
    return tuple(_joined(list(a), 3) for a in zip(*out))


def _dense_fwd(qh, kh, vh, mask, query_block):
    out = _dense(qh, kh, vh, mask, query_block)
    return out, (qh, kh, vh, mask, out[1])


def _dense_bwd(query_block, res, cts):
    # p = exp(s - m): o = p v, l = sum p. With m held constant (a normalised consumer does not
    # depend on it: its cotangent and m's effect on o and l cancel), ds = p * (do v^T + dl).
    qh, kh, vh, mask, m = res
    do, _, dl = cts
    dq, dk, dv = [], [], []
    for rows, keys in _blocks(qh.shape[3], query_block):
        mk, q_b, do_b = _at(_at(mask, rows, -2), keys, -1), _at(qh, rows, 3), _at(do, rows, 3)
        k_b, v_b = _at(kh, keys, 2), _at(vh, keys, 2)
        p = masked_exp(_probs(q_b, k_b, mk)[0], _at(m, rows, 3))
        dp = jnp.einsum("bkgtd,bksd->bkgts", do_b, v_b)
        ds = p * (dp + _at(dl, rows, 3)[..., None]) * qh.shape[-1] ** -0.5
        dq.append(jnp.einsum("bkgts,bksd->bkgtd", ds, k_b))
        # [T, S] on the right, contracted over its rows: XLA:CPU then transposes the small [T, D]
        # operand and result, not the [T, S] one (which it copies at a fraction of memory speed)
        dk.append(jnp.swapaxes(jnp.einsum("bkgtd,bkgts->bkds", q_b, ds), 2, 3))
        dv.append(jnp.swapaxes(jnp.einsum("bkgtd,bkgts->bkds", do_b, p), 2, 3))
    # A block's keys are a prefix of all S: its gradients padded to S and summed.
    pad = lambda g: jnp.pad(g, [(0, 0), (0, 0), (0, kh.shape[2] - g.shape[2]), (0, 0)])  # noqa: E731
    total = lambda gs: gs[0] if len(gs) == 1 else sum(pad(g) for g in gs)  # noqa: E731
    return _joined(dq, 3), total(dk), total(dv), None


_dense.defvjp(_dense_fwd, _dense_bwd)


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array | None = None,
                q_seg: jax.Array | None = None, k_seg: jax.Array | None = None) -> jax.Array:
    """[B, T, 1, 1, S]: key visible iff its position <= the query's (and it is valid, and, given
    segment ids [B, T] / [B, S], of the query's segment: packed documents do not see each other)."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    if q_seg is not None:
        mask = mask & (k_seg[:, None, :] == q_seg[:, :, None])
    return mask[:, :, None, None, :]


def combine(parts: list[Partial], dtype) -> jax.Array:
    """Merge partials into the normalised output of one softmax over all their keys."""
    m = parts[0].m
    for p in parts[1:]:
        m = jnp.maximum(m, p.m)
    o = jnp.zeros_like(parts[0].o)
    l = jnp.zeros_like(parts[0].l)
    for p in parts:
        c = jnp.exp(p.m - m)
        o = o + p.o * c[..., None]
        l = l + p.l * c
    l = jnp.where(l == 0.0, 1.0, l)
    return (o / l[..., None]).astype(dtype)



def merge(a: Partial, b: Partial) -> Partial:
    """Partial of the union of two disjoint key sets (unnormalised, unlike `combine`)."""
    m = jnp.maximum(a.m, b.m)
    ca, cb = jnp.exp(a.m - m), jnp.exp(b.m - m)
    return Partial(a.o * ca[..., None] + b.o * cb[..., None], m, a.l * ca + b.l * cb)
