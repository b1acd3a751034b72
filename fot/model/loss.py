"""The training loss: the LM head's product and the token cross-entropy, a chunk of tokens at a time.

The whole [B, T, V] logits never exist: each chunk's logits, softmax and cotangent live only inside
one scan step. The gradient is formed in the same pass as the loss (as Liger-Kernel's fused linear
cross-entropy does): dlogits = w * (softmax - onehot), dx = dlogits W^T, dW += x^T dlogits, so the
backward pass only scales them by the incoming cotangent and nothing is recomputed. At the ~110M
shape (4 x 1024 tokens, vocab 32000) the head's logits, their cotangent and its transpose were
0.5 GiB each (docs/scaling.md).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 256  # tokens of each row per scan step: [B, 256, V] float32 logits at a time


def _split(a: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [n, B, chunk, ...], T zero padded to a multiple of chunk."""
    b, t = a.shape[:2]
    n = -(-t // chunk)
    a = jnp.pad(a, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (a.ndim - 2))
    return a.reshape(b, n, chunk, *a.shape[2:]).swapaxes(0, 1)


def _join(a: jax.Array, t: int) -> jax.Array:
    """The inverse of _split: [n, B, chunk, ...] -> [B, T, ...]."""
    a = a.swapaxes(0, 1)
    return a.reshape(a.shape[0], -1, *a.shape[3:])[:, :t]


def _scan(x, w, targets, weights, chunk: int, grads: bool):
    """sum(weights * CE); with grads also (dx, dW, per-token CE) of that sum."""
    def body(carry, xs):
        total, dw = carry
        xc, tc, wc = xs
        logits = jnp.einsum("bce,ev->bcv", xc, w).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        ce = lse - jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        total = total + jnp.sum(wc * ce)
        if not grads:
            return (total, dw), None
        hit = jnp.arange(logits.shape[-1]) == tc[..., None]
        dlogits = ((jnp.exp(logits - lse[..., None]) - hit) * wc[..., None]).astype(x.dtype)
        dw = dw + jnp.einsum("bce,bcv->ev", xc, dlogits, preferred_element_type=jnp.float32)
        return (total, dw), (jnp.einsum("bcv,ev->bce", dlogits, w), ce)

    t = x.shape[1]
    dw0 = jnp.zeros(w.shape, jnp.float32) if grads else None
    (total, dw), out = jax.lax.scan(body, (jnp.float32(0), dw0), tuple(
        _split(a, chunk) for a in (x, targets, weights.astype(jnp.float32))))
    if not grads:
        return total
    dx, ce = out
    return total, (_join(dx, t), dw.astype(w.dtype), _join(ce, t))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def linear_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array,
                         chunk: int = CHUNK) -> jax.Array:
    """sum over tokens of weights * cross-entropy(x @ w, targets): x [B, T, E] (the normed hidden
    states, compute dtype), w [E, V] (same dtype), targets [B, T] int, weights [B, T]. The logits
    are rounded to x's dtype and then taken in float32, as the model's `head` does."""
    return _scan(x, w, targets, weights, chunk, grads=False)


def _fwd(x, w, targets, weights, chunk):
    total, (dx, dw, ce) = _scan(x, w, targets, weights, chunk, grads=True)
    return total, (dx, dw, ce.astype(weights.dtype), targets.shape)


def _bwd(chunk, res, g):
    dx, dw, ce, t_shape = res
    return ((g * dx).astype(dx.dtype), (g * dw).astype(dw.dtype), np.zeros(t_shape, jax.dtypes.float0),
            (g * ce).astype(ce.dtype))


linear_cross_entropy.defvjp(_fwd, _bwd)
