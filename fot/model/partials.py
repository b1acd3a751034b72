"""Attention as combinable softmax partials.

Every source of keys (the causal local window, the FoT memory, crossbatch contexts, kNN-retrieved
keys, a ring neighbour's block) produces a `Partial`: the running max `m`, the sum of exponentials
`l` and the unnormalised output `o`, all float32. `merge` joins two partials of disjoint key sets;
`combine` merges any number into the normalised output of ONE softmax over all their keys, which is
exactly what FoT prescribes, and lets blockwise kernels and memory lookups stay independent.

Shapes: queries [B, T, H, D]; keys/values [B, S, K, D] with K kv heads (GQA: H = K * G).
"""

from __future__ import annotations

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


def dense_partial(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> Partial:
    """All-pairs partial. mask: bool broadcastable to [B, T, K, G, S] (usually [B, T, 1, 1, S]).

    Computed kv-head major ([B, K, G, T, S] scores, batch axes leading): XLA:CPU then runs each
    product as one batched GEMM instead of transposing around it (3x faster on the tiny model).
    Its gradient is FlashAttention's backward in one dense pass (`_dense`): no [T, S] array is kept
    for it, and `m` counts as a constant, which is exact for what `combine` normalises.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qh = jnp.transpose(group_queries(q, kv_heads).astype(jnp.float32), (0, 2, 3, 1, 4))
    kh = jnp.swapaxes(k.astype(jnp.float32), 1, 2)  # [B, K, S, D]
    vh = jnp.swapaxes(v.astype(jnp.float32), 1, 2)
    mask = None if mask is None else jnp.moveaxis(mask, 1, 3)  # -> [B, K|1, G|1, T, S]
    o, m, l = _dense(qh, kh, vh, mask)
    back = lambda a: jnp.moveaxis(a, 3, 1).reshape(b, t, h, *a.shape[4:])
    return Partial(back(o), back(m), back(l))


# The masked-out fills below are computed from the scores (min(s, NEG_INF) is NEG_INF and p * 0 is
# 0 for any finite s and p), not written as constants: constant fills ended up outside the layer
# scans as two score-sized broadcasts that lived through the backward pass (0.36 GiB of the ~110M
# step's plan; not XLA's loop-invariant code motion, whose pass off changed nothing; docs/scaling.md).
def _probs(qh, kh, mask):
    """Scores [B, K, G, T, S] (masked to NEG_INF) and their row max."""
    s = jnp.einsum("bkgtd,bksd->bkgts", qh, kh) * qh.shape[-1] ** -0.5
    if mask is not None:
        s = jnp.where(mask, s, jnp.minimum(s, NEG_INF))
    return s, jnp.max(s, axis=-1)


def _exp(s, m, mask):
    p = jnp.exp(s - m[..., None])
    return p if mask is None else jnp.where(mask, p, p * 0.0)  # rows with nothing visible: zeros


@jax.custom_vjp
def _dense(qh, kh, vh, mask):
    s, m = _probs(qh, kh, mask)
    p = _exp(s, m, mask)
    return jnp.einsum("bkgts,bksd->bkgtd", p, vh), m, jnp.sum(p, axis=-1)


def _dense_fwd(qh, kh, vh, mask):
    out = _dense(qh, kh, vh, mask)
    return out, (qh, kh, vh, mask, out[1])


def _dense_bwd(res, cts):
    # p = exp(s - m): o = p v, l = sum p. With m held constant (a normalised consumer does not
    # depend on it: its cotangent and m's effect on o and l cancel), ds = p * (do v^T + dl).
    qh, kh, vh, mask, m = res
    do, _, dl = cts
    s, _ = _probs(qh, kh, mask)
    p = _exp(s, m, mask)
    ds = p * (jnp.einsum("bkgtd,bksd->bkgts", do, vh) + dl[..., None]) * qh.shape[-1] ** -0.5
    dq = jnp.einsum("bkgts,bksd->bkgtd", ds, kh)
    # [T, S] on the right, contracted over its rows: XLA:CPU then transposes the small [T, D]
    # operand and result, not the [T, S] one (which it copies at a fraction of memory speed)
    dk = jnp.swapaxes(jnp.einsum("bkgtd,bkgts->bkds", qh, ds), 2, 3)
    dv = jnp.swapaxes(jnp.einsum("bkgtd,bkgts->bkds", do, p), 2, 3)
    return dq, dk, dv, None


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
