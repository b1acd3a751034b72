"""The chunked, fused LM-head cross-entropy against torch's cross_entropy and autograd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fot.model.loss import linear_cross_entropy


@pytest.mark.parametrize("chunk", [16, 64])  # 37 tokens: a ragged last chunk, and one chunk
def test_loss_and_gradients_match_torch(chunk):
    r = np.random.RandomState(0)
    b, t, e, v = 3, 37, 24, 50
    x, w = r.randn(b, t, e).astype(np.float32), r.randn(e, v).astype(np.float32) * 0.3
    targets = r.randint(0, v, (b, t))
    weights = (r.rand(b, t) < 0.8).astype(np.float32)

    fn = lambda x, w, wt: linear_cross_entropy(x, w, jnp.asarray(targets), wt, chunk)  # noqa: E731
    loss, (gx, gw, gwt) = jax.value_and_grad(fn, argnums=(0, 1, 2))(x, w, weights)

    tx, tw, twt = (torch.tensor(a, requires_grad=True) for a in (x, w, weights))
    ce = torch.nn.functional.cross_entropy((tx @ tw).reshape(-1, v), torch.tensor(targets).reshape(-1),
                                           reduction="none")
    want = (ce * twt.reshape(-1)).sum()
    want.backward()
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-5)
    for got, ref in ((gx, tx), (gw, tw), (gwt, twt)):
        np.testing.assert_allclose(np.asarray(got), ref.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_no_gradient_pass_is_the_same_loss_and_bf16_rounds_the_logits():
    r = np.random.RandomState(1)
    x, w = r.randn(2, 9, 8).astype(np.float32), r.randn(8, 11).astype(np.float32)
    targets, weights = r.randint(0, 11, (2, 9)), np.ones((2, 9), np.float32)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    got = float(jax.jit(linear_cross_entropy, static_argnums=4)(xb, wb, targets, weights, 4))
    logits = np.asarray((xb @ wb).astype(jnp.float32))  # what Llama.head returns
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = (lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]).sum()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(float(jax.value_and_grad(linear_cross_entropy)(xb, wb, targets, weights, 4)[0]),
                               want, rtol=1e-5)
