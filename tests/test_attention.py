"""Plain attention over a training window read in query blocks (`by_index`), each block only the keys
up to its end, against the definition in PyTorch float64 (forward and, by autograd, the gradient)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fot.model import attention, partials

ATOL = 2e-5  # float32 against float64


def reference(q, k, v, ke, ve, seg):
    """Per row and head: softmax over the causal (by index), same-document local keys and the
    extra keys `ke`/`ve` [B, E, K, D] (all visible) together, times their values."""
    b, t, h, d = q.shape
    per_kv = h // k.shape[2]
    out = torch.zeros_like(q)
    for r in range(b):
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool)) & (seg[r][:, None] == seg[r][None, :])
        mask = torch.cat([mask, torch.ones(t, ke.shape[1], dtype=torch.bool)], dim=1)
        for head in range(h):
            kk = torch.cat([k[r, :, head // per_kv], ke[r, :, head // per_kv]])
            vv = torch.cat([v[r, :, head // per_kv], ve[r, :, head // per_kv]])
            s = (q[r, :, head] @ kk.T / d ** 0.5).masked_fill(~mask, float("-inf"))
            out[r, :, head] = torch.softmax(s, dim=-1) @ vv
    return out


@pytest.mark.parametrize("t, block, heads, kv_heads", [(37, 8, 4, 2), (32, 16, 4, 4), (9, 1, 2, 1)])
def test_query_blocks_equal_the_definition_forward_and_gradient(monkeypatch, t, block, heads, kv_heads):
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    rng = np.random.default_rng(t)
    b, d, e = 2, 8, 5
    arrays = [rng.standard_normal(s) for s in ((b, t, heads, d), (b, t, kv_heads, d), (b, t, kv_heads, d),
                                              (b, e, kv_heads, d), (b, e, kv_heads, d))]
    seg = np.sort(rng.integers(0, 3, (b, t)), axis=1)
    probe = rng.standard_normal((b, t, heads, d))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def fot(q, k, v, ke, ve):
        local = attention.local_partial(q, k, v, pos, pos, q_seg=jnp.asarray(seg), k_seg=jnp.asarray(seg),
                                        by_index=True)
        # With an extra source the local partial's m and l matter, not only its normalised output.
        return partials.combine([local, partials.dense_partial(q, ke, ve, None)], jnp.float32)

    x = [jnp.asarray(a, jnp.float32) for a in arrays]
    out, grads = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fot(*a) * probe), argnums=(0, 1, 2, 3, 4)))(*x)
    ref_in = [torch.tensor(a, requires_grad=True) for a in arrays]
    ref = reference(*ref_in, torch.tensor(seg))
    (ref * torch.tensor(probe)).sum().backward()
    np.testing.assert_allclose(np.asarray(jax.jit(fot)(*x)), ref.detach().numpy(), rtol=0, atol=ATOL)
    for g, r in zip(grads, ref_in):
        np.testing.assert_allclose(np.asarray(g), r.grad.numpy(), rtol=0, atol=ATOL)
    assert np.abs(np.asarray(grads[1])).max() > 1e-2  # the local keys' gradient is not trivially zero


def test_query_blocks_compute_only_the_scores_up_to_each_block(monkeypatch):
    """4 blocks of 16 of 64 tokens: 10/16 of the [T, T] scores (the causal triangle's blocks)."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    q = k = v = jnp.ones((1, 64, 2, 64), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (1, 64))

    def flops(by_index):
        f = lambda q, k, v: partials.combine(  # noqa: E731
            [attention.local_partial(q, k, v, pos, pos, by_index=by_index)], jnp.float32)
        return jax.jit(f).lower(q, k, v).compile().cost_analysis()["flops"]

    assert flops(True) / flops(False) == pytest.approx(10 / 16, abs=0.05)


def test_query_blocks_refuse_keys_that_are_not_the_queries_own():
    q = jnp.ones((1, 8, 2, 4), jnp.float32)
    with pytest.raises(ValueError, match="query_block needs the queries' own keys"):
        partials.dense_partial(q, q[:, :6], q[:, :6], jnp.ones((1, 8, 1, 1, 6), bool), query_block=4)
    with pytest.raises(ValueError, match="query_block needs"):
        partials.dense_partial(q, q, q, jnp.ones((1, 1, 1, 1, 8), bool), query_block=4)


def test_a_query_that_sees_no_key_of_a_source_takes_nothing_from_it():
    # Source A: a query sees A's key j iff mask[r, t, j]; queries 0 and 3 of row 0 see none of them.
    # Source B: all keys visible. The merged softmax against PyTorch float64 over the visible keys.
    rng = np.random.default_rng(7)
    b, t, h, d, s = 2, 5, 2, 4, 6
    arrays = [rng.standard_normal(shape) for shape in ((b, t, h, d), (b, s, h, d), (b, s, h, d),
                                                       (b, 3, h, d), (b, 3, h, d))]
    mask = rng.random((b, t, s)) < 0.5
    mask[0, [0, 3]] = False
    probe = rng.standard_normal((b, t, h, d))

    def source_a(q, ka, va):
        return partials.dense_partial(q, ka, va, jnp.asarray(mask)[:, :, None, None, :])

    def fot(q, ka, va, kb, vb):
        return partials.combine([source_a(q, ka, va), partials.dense_partial(q, kb, vb, None)], jnp.float32)

    x = [jnp.asarray(a, jnp.float32) for a in arrays]
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fot(*a) * probe), argnums=(0, 1, 2, 3, 4)))(*x)
    a = jax.jit(source_a)(*x[:3])
    assert np.all(np.asarray(a.o)[0, [0, 3]] == 0) and np.all(np.asarray(a.l)[0, [0, 3]] == 0)

    ref_in = [torch.tensor(v, requires_grad=True) for v in arrays]
    q, ka, va, kb, vb = ref_in
    keys, values = torch.cat([ka, kb], 1), torch.cat([va, vb], 1)
    visible = torch.cat([torch.tensor(mask), torch.ones(b, t, 3, dtype=torch.bool)], 2)  # [B, T, S + 3]
    scores = torch.einsum("bthd,bshd->bhts", q, keys) / d ** 0.5
    ref = torch.einsum("bhts,bshd->bthd",
                       torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), -1), values)
    (ref * torch.tensor(probe)).sum().backward()
    np.testing.assert_allclose(np.asarray(jax.jit(fot)(*x)), ref.detach().numpy(), rtol=0, atol=ATOL)
    for g, r in zip(grads, ref_in):
        np.testing.assert_allclose(np.asarray(g), r.grad.numpy(), rtol=0, atol=ATOL)
