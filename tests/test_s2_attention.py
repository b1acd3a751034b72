"""S2-Attn (LongLoRA, arXiv:2309.12307, Algorithm 1) against a loop-by-loop reference written from
the definition in PyTorch float64 (forward and, by autograd, the gradient), and its place in the
model: training steps use it, inference is full attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fot.config import Config, ConfigError, config_from_dict
from fot.model import attention, partials

ATOL, RTOL = 2e-5, 1e-4  # float32 against float64


def s2_reference(q, k, v, group, seg=None):
    """Per row and head: the second half of the heads reads the sequence rolled by -group/2
    (position t holds token t + group/2 mod T); causal softmax attention inside each group of
    `group` consecutive (rolled) tokens, by index, and only within a document if `seg`; the output
    written back to the tokens' own places."""
    b, t, h, d = q.shape
    per_kv = h // k.shape[2]
    out = torch.zeros_like(q)
    for r in range(b):
        for head in range(h):
            shift = group // 2 if head >= h // 2 else 0
            idx = (torch.arange(t) + shift) % t
            qq, kk, vv = q[r, idx, head], k[r, idx, head // per_kv], v[r, idx, head // per_kv]
            for g in range(t // group):
                sl = slice(g * group, (g + 1) * group)
                s = qq[sl] @ kk[sl].T / d ** 0.5
                mask = torch.tril(torch.ones(group, group, dtype=torch.bool))
                if seg is not None:
                    sg = seg[r, idx][sl]
                    mask = mask & (sg[:, None] == sg[None, :])
                p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
                out[r, idx[sl], head] = p @ vv[sl]
    return out


def s2_jax(q, k, v, group, seg=None, impl="plain"):
    part = attention.s2_partial(q, k, v, group, None, seg, seg, impl=impl, block_size=8)
    return partials.combine([part], jnp.float32)


@pytest.mark.parametrize("heads, kv_heads, t, group, segments, impl", [
    (4, 4, 32, 8, False, "plain"),
    (4, 2, 32, 16, False, "plain"),  # GQA: the halves split the kv heads
    (6, 3, 24, 8, False, "plain"),  # odd kv heads: repeated to the query heads first
    (4, 4, 32, 32, False, "plain"),  # one group
    (4, 2, 48, 12, True, "plain"),  # packed documents
    (4, 2, 64, 32, True, "blockwise"),  # long groups: blockwise inside each (blocks of 8)
])
def test_s2_equals_the_definition_forward_and_gradient(heads, kv_heads, t, group, segments, impl):
    rng = np.random.default_rng(heads * 100 + t)
    q = rng.standard_normal((2, t, heads, 8))
    k = rng.standard_normal((2, t, kv_heads, 8))
    v = rng.standard_normal((2, t, kv_heads, 8))
    seg = np.cumsum(rng.random((2, t)) < 0.1, axis=1).astype(np.int32) if segments else None
    cot = rng.standard_normal((2, t, heads, 8))

    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    ref = s2_reference(tq, tk, tv, group, None if seg is None else torch.tensor(seg))
    (ref * torch.tensor(cot)).sum().backward()

    jseg = None if seg is None else jnp.asarray(seg)
    f = lambda q, k, v: (s2_jax(q, k, v, group, jseg, impl) * jnp.asarray(cot, jnp.float32)).sum()  # noqa: E731
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    out = s2_jax(*args, group, jseg, impl)
    grads = jax.grad(f, argnums=(0, 1, 2))(*args)
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), atol=ATOL, rtol=RTOL)
    for got, want in zip(grads, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=ATOL, rtol=RTOL)


def test_s2_is_not_full_attention():
    """The test above could pass with a full causal softmax only if the groups did nothing."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 32, 4, 8)), jnp.float32) for _ in range(3))
    pos = jnp.arange(32)[None]
    full = attention.attend(q, k, v, pos, pos)
    assert float(jnp.abs(s2_jax(q, k, v, 8) - full).max()) > 0.1


def tiny(**model) -> Config:
    return config_from_dict({
        "model": {"vocab_size": 259, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "max_position_embeddings": 64, "param_dtype": "float32",
                  "dtype": "float32", **model},
        "train": {"window": 32, "batch_size": 4, "pack_size": 1, "cross_batch_range": 0}})


def test_training_uses_s2_and_inference_full_attention():
    from flax import nnx

    from fot.model.llama import Llama
    from fot.train import forward

    ids = jnp.asarray(np.random.default_rng(1).integers(3, 259, (4, 32)), jnp.int32)
    s2, full = tiny(attention="s2", s2_group_size=8), tiny()
    m_s2 = Llama(s2.model, s2.memory, rngs=nnx.Rngs(0))
    m_full = Llama(full.model, full.memory, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(m_s2(ids)), np.asarray(m_full(ids)))  # inference: full
    train_s2, train_full = (np.asarray(forward(m, ids, 0, 1, False)) for m in (m_s2, m_full))
    np.testing.assert_array_equal(train_full, np.asarray(m_full(ids)))
    assert np.abs(train_s2 - train_full).max() > 1e-3  # training: S2-Attn


@pytest.mark.parametrize("model, message", [
    ({"attention": "s2", "s2_group_size": 12}, "model.s2_group_size=12 does not divide the training window of 32"),
    ({"attention": "s2", "s2_group_size": 7}, "model.s2_group_size must be even"),
    ({"attention": "s2"}, "model.attention='s2' and model.s2_group_size go together"),
    ({"s2_group_size": 8}, "model.attention='s2' and model.s2_group_size go together"),
    ({"attention": "s2", "s2_group_size": 8, "num_attention_heads": 1, "hidden_size": 16},
     "num_attention_heads=1 is odd"),
])
def test_bad_s2_config(model, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny(**model)
