"""Blockwise (flash-style) causal attention: online softmax over key blocks, O(T * block) memory.

Queries are cut into blocks (an outer `lax.scan`), and each query block runs an inner scan over key
blocks that keeps the running max `m`, sum `l` and unnormalised output `o` of a `Partial`. Key blocks
entirely in the future of a query block (by positions) or entirely invalid are skipped with
`lax.cond`, which halves the work of causal attention. Both scan bodies are rematerialised
(`jax.checkpoint`), so the backward pass recomputes scores block by block instead of storing T x T
probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fot.model.partials import NEG_INF, Partial, empty, head_major, masked_exp, token_major


def _pad(x: jax.Array, axis: int, to: int, value=0) -> jax.Array:
    extra = to - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x: jax.Array, size: int, axis: int = 1) -> jax.Array:
    """Blocks of `size` along `axis` first: e.g. [B, N*size, ...] -> [N, B, size, ...] (the scan axis)."""
    n = x.shape[axis] // size
    return jnp.moveaxis(x.reshape(*x.shape[:axis], n, size, *x.shape[axis + 1:]), axis, 0)


def blockwise_partial(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                      k_valid: jax.Array | None = None, block_size: int = 512,
                      q_seg: jax.Array | None = None, k_seg: jax.Array | None = None) -> Partial:
    """Same Partial as partials.dense_partial(q, k, v, causal_mask(q_pos, k_pos, k_valid, q_seg, k_seg)).

    q [B, T, H, D], k/v [B, S, K, D], q_pos / q_seg [B, T], k_pos / k_valid / k_seg [B, S]. Any T
    and S: the last blocks are padded (padded keys are invalid, padded query rows are dropped).
    """
    b, t, _, d = q.shape
    s = k.shape[1]
    bq, bk = min(block_size, t), min(block_size, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    if k_valid is None:
        k_valid = jnp.ones((b, s), bool)
    if q_seg is None:  # one segment
        q_seg, k_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    scale = d ** -0.5

    # Kv-head major blocks ([B, K, G, bq, bk] scores), as partials.dense_partial (the tiny model's
    # 8k-token prompt read 2.4-2.7 -> 0.7-0.8 s against [B, bq, K, G, bk], BENCHMARKS.md).
    qh, kh, vh = head_major(q, k, v)
    qb = _blocks(_pad(qh, 3, tp), bq, axis=3)  # [nq, B, K, G, bq, D]
    qpb = _blocks(_pad(q_pos, 1, tp), bq)  # [nq, B, bq]
    qsb = _blocks(_pad(q_seg, 1, tp), bq)
    kb, vb = (_blocks(_pad(a, 2, sp), bk, axis=2) for a in (kh, vh))  # [nk, B, K, bk, D]
    kpb = _blocks(_pad(k_pos, 1, sp), bk)
    kvb = _blocks(_pad(k_valid, 1, sp, False), bk)
    ksb = _blocks(_pad(k_seg, 1, sp), bk)

    def key_step(carry, xs, qi, qpi, qsi):
        kj, vj, kpj, kvj, ksj = xs
        mask = ((kpj[:, None, :] <= qpi[:, :, None]) & kvj[:, None, :]
                & (ksj[:, None, :] == qsi[:, :, None]))  # [B, bq, bk]

        def visit(c):
            o, m, l = c
            sc = jnp.einsum("bkgtd,bksd->bkgts", qi, kj) * scale
            sc = jnp.where(mask[:, None, None], sc, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            p = masked_exp(sc, m_new)
            c_old = jnp.exp(m - m_new)
            l_new = l * c_old + jnp.sum(p, axis=-1)
            o_new = o * c_old[..., None] + jnp.einsum("bkgts,bksd->bkgtd", p, vj)
            return Partial(o_new, m_new, l_new)

        return jax.lax.cond(jnp.any(mask), visit, lambda c: c, carry), None

    def query_block(xs):
        qi, qpi, qsi = xs
        step = jax.checkpoint(lambda c, x: key_step(c, x, qi, qpi, qsi), prevent_cse=False)
        (o, m, l), _ = jax.lax.scan(step, empty(qi.shape), (kb, vb, kpb, kvb, ksb))
        return o, m, l

    _, (o, m, l) = jax.lax.scan(
        lambda c, xs: (c, jax.checkpoint(query_block, prevent_cse=False)(xs)), None, (qb, qpb, qsb))

    def unblock(x):  # [nq, B, K, G, bq, ...] -> [B, T, H, ...]
        x = jnp.moveaxis(x, 0, 3)  # [B, K, G, nq, bq, ...]
        return token_major(x.reshape(*x.shape[:3], tp, *x.shape[5:]))[:, :t]

    return Partial(unblock(o), unblock(m), unblock(l))
