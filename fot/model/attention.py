"""Local causal attention of a layer, plain, blockwise, ring (sequence-sharded), S2 or cuDNN, joined
with the extra sources (memory, crossbatch) in one softmax.

Shapes: queries [B, T, H, D]; keys/values [B, S, K, D] with K kv heads (GQA: H = K * G).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fot.model.blockwise import blockwise_partial
from fot.model.partials import Partial, causal_mask, combine, dense_partial
from fot.model.ring import ring_partial


# Plain attention over keys that are the queries' own tokens in order reads them in query blocks of
# this many tokens, each block only the keys up to its last query: at 1024 tokens 10/16 of the
# scores, and train steps 1.08-1.16x faster on the 2-core CPU (docs/performance.md item 8).
# Shorter windows gain little (the tiny model's 128 tokens in blocks of 32: 5%), so they stay whole.
QUERY_BLOCK = 256


def local_partial(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                  k_valid: jax.Array | None = None, *, impl: str = "plain", block_size: int = 512,
                  q_seg: jax.Array | None = None, k_seg: jax.Array | None = None, s2_group: int = 0,
                  by_index: bool = False) -> Partial:
    """Causal attention of queries to local keys, masked by positions (and segments, if given).
    `by_index`: the keys are the queries' own tokens at increasing positions (a training window),
    so no key after a query is visible to it, and plain attention skips those keys."""
    if impl == "s2":  # training only (Llama.context): full attention at inference
        inner = "blockwise" if s2_group > block_size else "plain"
        return s2_partial(q, k, v, s2_group, k_valid, q_seg, k_seg, impl=inner, block_size=block_size)
    if impl == "ring":  # training windows split over the sequence mesh axis (Llama.context)
        return ring_partial(q, k, v, q_pos, k_pos, k_valid, block_size=block_size, q_seg=q_seg, k_seg=k_seg)
    if impl in ("blockwise", "cudnn"):  # the fused cuDNN kernel yields no partial: blockwise instead
        return blockwise_partial(q, k, v, q_pos, k_pos, k_valid, block_size=block_size,
                                 q_seg=q_seg, k_seg=k_seg)
    block = QUERY_BLOCK if by_index and q.shape[1] == k.shape[1] > QUERY_BLOCK else None
    return dense_partial(q, k, v, causal_mask(q_pos, k_pos, k_valid, q_seg, k_seg), block)


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
                             k_seg=grouped(roll(k_seg)), by_index=True)
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
           k_seg: jax.Array | None = None, s2_group: int = 0, by_index: bool = False) -> jax.Array:
    """Causal local attention plus any extra sources (memory), one softmax; returns [B, T, H, D].

    With `gate` ([H] logits, the Memorizing-Transformer ablation) local and extra sources get separate
    softmaxes mixed by sigmoid(gate) instead. q_seg / k_seg: segment ids (packed documents), see
    `causal_mask`. by_index: see `local_partial`.
    """
    if (impl == "cudnn" and not extra and k_valid is None and q_seg is None
            and q.shape[1] == k.shape[1]):
        return fused_causal(q, k, v)
    local = local_partial(q, k, v, q_pos, k_pos, k_valid, impl=impl, block_size=block_size,
                          q_seg=q_seg, k_seg=k_seg, s2_group=s2_group, by_index=by_index)
    if gate is None or not extra:
        return combine([local, *extra], q.dtype)
    g = jax.nn.sigmoid(gate.astype(jnp.float32))[:, None]
    mixed = (1.0 - g) * combine([local], jnp.float32) + g * combine(list(extra), jnp.float32)
    return mixed.astype(q.dtype)
