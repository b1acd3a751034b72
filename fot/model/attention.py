"""Attention as combinable softmax partials.

Every source of keys (the causal local window, the FoT memory, crossbatch contexts, kNN-retrieved
keys) produces a `Partial`: the running max `m`, the sum of exponentials `l` and the unnormalised
output `o`, all float32. `combine` merges them into ONE softmax over the concatenation of all keys,
which is exactly what FoT prescribes, and lets blockwise kernels and memory lookups stay independent.

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


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, H, D] -> [B, T, K, G, D]."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d)


def dense_partial(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> Partial:
    """All-pairs partial. mask: bool broadcastable to [B, T, K, G, S] (usually [B, T, 1, 1, S]).

    Computed kv-head major ([B, K, G, T, S] scores, batch axes leading): XLA:CPU then runs each
    product as one batched GEMM instead of transposing around it (3x faster on the tiny model).
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qh = jnp.transpose(group_queries(q, kv_heads).astype(jnp.float32), (0, 2, 3, 1, 4))
    kh = jnp.swapaxes(k.astype(jnp.float32), 1, 2)  # [B, K, S, D]
    vh = jnp.swapaxes(v.astype(jnp.float32), 1, 2)
    s = jnp.einsum("bkgtd,bksd->bkgts", qh, kh) * d ** -0.5
    if mask is not None:
        mask = jnp.moveaxis(mask, 1, 3)  # [B, T, K|1, G|1, S] -> [B, K|1, G|1, T, S]
        s = jnp.where(mask, s, NEG_INF)
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)  # rows with nothing visible: zeros, not exp(0)
    o = jnp.einsum("bkgts,bksd->bkgtd", p, vh)
    back = lambda a: jnp.moveaxis(a, 3, 1).reshape(b, t, h, *a.shape[4:])
    return Partial(back(o), back(m), back(jnp.sum(p, axis=-1)))


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


def local_partial(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                  k_valid: jax.Array | None = None, *, impl: str = "plain", block_size: int = 512,
                  q_seg: jax.Array | None = None, k_seg: jax.Array | None = None, s2_group: int = 0
                  ) -> Partial:
    """Causal attention of queries to local keys, masked by positions (and segments, if given)."""
    if impl == "s2":  # training only (Llama.context): full attention at inference
        inner = "blockwise" if s2_group > block_size else "plain"
        return s2_partial(q, k, v, s2_group, k_valid, q_seg, k_seg, impl=inner, block_size=block_size)
    if impl in ("blockwise", "cudnn"):  # the fused cuDNN kernel yields no partial: blockwise instead
        from fot.model.blockwise import blockwise_partial

        return blockwise_partial(q, k, v, q_pos, k_pos, k_valid, block_size=block_size,
                                 q_seg=q_seg, k_seg=k_seg)
    return dense_partial(q, k, v, causal_mask(q_pos, k_pos, k_valid, q_seg, k_seg))


def s2_partial(q: jax.Array, k: jax.Array, v: jax.Array, group: int, k_valid: jax.Array | None = None,
               q_seg: jax.Array | None = None, k_seg: jax.Array | None = None, *, impl: str = "plain",
               block_size: int = 512) -> Partial:
    """LongLoRA's shifted sparse attention (S2-Attn, arXiv:2309.12307, Algorithm 1) for training:
    the T tokens split into groups of `group`, causal attention inside each group (`impl`: plain
    or blockwise); the second half of the heads sees the tokens rolled by -group/2 (so its groups
    straddle the first half's), and its output is rolled back. Causality is by index inside a
    group, as in LongLoRA's code: in the wrapped last group of the shifted heads, the first
    group/2 tokens also see the last group/2. Keys are the queries' own tokens (no past); GQA kv
    heads are repeated when they do not split in halves."""
    b, t, h, d = q.shape
    if k.shape[1] != t:
        raise ValueError(f"model.attention='s2' is for training windows: {t} queries, {k.shape[1]} keys")
    if t % group:
        raise ValueError(f"model.s2_group_size={group} does not divide the sequence of {t} tokens")
    if k.shape[2] % 2:
        k, v = (jnp.repeat(a, h // a.shape[2], axis=2) for a in (k, v))
    n = t // group
    pos = jnp.broadcast_to(jnp.arange(group, dtype=jnp.int32), (b * n, group))
    grouped = lambda a: None if a is None else a.reshape(b * n, group, *a.shape[2:])  # noqa: E731
    halves = []
    for i, shift in enumerate((0, group // 2)):
        roll = lambda a, by=-shift: None if a is None else jnp.roll(a, by, axis=1)  # noqa: E731
        qh, kh, vh = (roll(a[:, :, i * (a.shape[2] // 2):(i + 1) * (a.shape[2] // 2)]) for a in (q, k, v))
        part = local_partial(grouped(qh), grouped(kh), grouped(vh), pos, pos, grouped(roll(k_valid)),
                             impl=impl, block_size=block_size, q_seg=grouped(roll(q_seg)),
                             k_seg=grouped(roll(k_seg)))
        halves.append([roll(a.reshape(b, t, *a.shape[2:]), shift) for a in part])
    return Partial(*(jnp.concatenate(pair, axis=2) for pair in zip(*halves)))


def fused_causal(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """cuDNN flash attention (GPU only, float16/bfloat16) for keys at the queries' own positions."""
    if jax.default_backend() != "gpu":
        raise ValueError(f"model.attention='cudnn' needs a CUDA GPU, but the JAX backend is "
                         f"{jax.default_backend()!r}; use 'auto' or 'blockwise'")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
           k_valid: jax.Array | None = None, *, extra: list[Partial] = (), gate: jax.Array | None = None,
           impl: str = "plain", block_size: int = 512, q_seg: jax.Array | None = None,
           k_seg: jax.Array | None = None, s2_group: int = 0) -> jax.Array:
    """Causal local attention plus any extra sources (memory), one softmax; returns [B, T, H, D].

    With `gate` ([H] logits, the Memorizing-Transformer ablation) local and extra sources get separate
    softmaxes mixed by sigmoid(gate) instead. q_seg / k_seg: segment ids (packed documents), see
    `causal_mask`.
    """
    if (impl == "cudnn" and not extra and k_valid is None and q_seg is None
            and q.shape[1] == k.shape[1]):
        return fused_causal(q, k, v)
    local = local_partial(q, k, v, q_pos, k_pos, k_valid, impl=impl, block_size=block_size,
                          q_seg=q_seg, k_seg=k_seg, s2_group=s2_group)
    if gate is None or not extra:
        return combine([local, *extra], q.dtype)
    g = jax.nn.sigmoid(gate.astype(jnp.float32))[:, None]
    mixed = (1.0 - g) * combine([local], jnp.float32) + g * combine(list(extra), jnp.float32)
    return mixed.astype(q.dtype)
