"""Blockwise (flash-style) attention gives plain attention's numbers, forward and backward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot.config import ModelConfig
from fot.model import attention, partials
from fot.model.blockwise import blockwise_partial
from fot.model.llama import init_model

TOL = 1e-5


def inputs(b, t, s, h, kv, d, seed=0):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(b, t, h, d), jnp.float32)
    k = jnp.asarray(r.randn(b, s, kv, d), jnp.float32)
    v = jnp.asarray(r.randn(b, s, kv, d), jnp.float32)
    # Queries are the last t of s tokens (a local cache before them); some keys invalid (padding).
    q_pos = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (b, t))
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    k_valid = jnp.asarray(r.rand(b, s) > 0.2).at[0, :].set(True).at[1, : s - t + 1].set(False)
    extra = partials.dense_partial(q, k[:, :5] * 2, v[:, :5], None)  # a memory-like extra source
    return q, k, v, q_pos, k_pos, k_valid, extra


CASES = [  # b, t, s, heads, kv heads, head dim, block size
    (2, 37, 37, 4, 2, 8, 8),  # odd length, GQA, partial last block
    (2, 37, 37, 4, 4, 8, 5),  # MHA, block size not dividing anything
    (2, 50, 73, 6, 3, 16, 16),  # past keys before the queries, GQA 2
    (2, 33, 33, 4, 1, 8, 64),  # block larger than the sequence, MQA
    (2, 9, 9, 2, 1, 4, 1),  # one key per block
]


@pytest.mark.parametrize("b,t,s,h,kv,d,block", CASES)
def test_blockwise_equals_plain_forward_and_gradient(b, t, s, h, kv, d, block):
    q, k, v, q_pos, k_pos, k_valid, extra = inputs(b, t, s, h, kv, d)
    probe = jnp.asarray(np.random.RandomState(1).randn(b, t, h, d), jnp.float32)

    def run(impl, q, k, v):
        local = attention.local_partial(q, k, v, q_pos, k_pos, k_valid, impl=impl, block_size=block)
        # With an extra source the local partial's m and l matter, not only its normalised output.
        return partials.combine([local], jnp.float32), partials.combine([local, extra], jnp.float32)

    def loss(impl):
        return lambda q, k, v: sum(jnp.sum(o * probe) for o in run(impl, q, k, v))

    plain, blocked = run("plain", q, k, v), jax.jit(lambda *a: run("blockwise", *a))(q, k, v)
    for a, c in zip(plain, blocked):
        assert np.abs(np.asarray(a) - np.asarray(c)).max() <= TOL
    g_plain = jax.grad(loss("plain"), argnums=(0, 1, 2))(q, k, v)
    g_block = jax.jit(jax.grad(loss("blockwise"), argnums=(0, 1, 2)))(q, k, v)
    for a, c in zip(g_plain, g_block):
        assert np.abs(np.asarray(a) - np.asarray(c)).max() <= TOL
    assert np.abs(np.asarray(g_plain[1])).max() > 1e-2  # the gradient is not trivially zero


def test_blockwise_document_segments_equal_plain():
    """Packed documents (segment ids): blockwise gives plain attention's masked numbers."""
    b, t, h, kv, d, block = 2, 37, 4, 2, 8, 8
    q, k, v, q_pos, k_pos, _, _ = inputs(b, t, t, h, kv, d)
    seg = jnp.asarray(np.sort(np.random.RandomState(2).randint(0, 5, (b, t)), axis=1), jnp.int32)

    def run(impl, q, k, v):
        p = attention.local_partial(q, k, v, q_pos, k_pos, impl=impl, block_size=block,
                                    q_seg=seg, k_seg=seg)
        return partials.combine([p], jnp.float32)

    plain, blocked = run("plain", q, k, v), jax.jit(lambda *a: run("blockwise", *a))(q, k, v)
    assert np.abs(np.asarray(plain) - np.asarray(blocked)).max() <= TOL
    unmasked = partials.combine([attention.local_partial(q, k, v, q_pos, k_pos)], jnp.float32)
    assert np.abs(np.asarray(plain) - np.asarray(unmasked)).max() > 1e-2
    g = [jax.grad(lambda k, i=i: jnp.sum(run(i, q, k, v) ** 2))(k) for i in ("plain", "blockwise")]
    assert np.abs(np.asarray(g[0]) - np.asarray(g[1])).max() <= TOL


def test_fully_masked_rows_give_empty_partial():
    q, k, v, q_pos, k_pos, _, _ = inputs(1, 6, 6, 2, 1, 4)
    k_valid = jnp.zeros((1, 6), bool)
    p = blockwise_partial(q, k, v, q_pos, k_pos, k_valid, block_size=4)
    assert not np.any(np.asarray(p.l)) and not np.any(np.asarray(p.o))
    np.testing.assert_array_equal(np.asarray(partials.combine([p], jnp.float32)), 0.0)


def test_model_switches_to_blockwise_above_threshold():
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention="plain")
    plain = init_model(cfg)
    auto = init_model(dataclasses.replace(cfg, attention="auto", blockwise_threshold=32,
                                          attention_block_size=8))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 61, (2, 45)))
    positions = jnp.broadcast_to(jnp.arange(45), (2, 45))
    assert auto.context(positions, positions, None).impl == "blockwise"
    assert auto.context(positions[:, :32], positions[:, :32], None).impl == "plain"
    # by the scores' size: one query (a decoding step) over 45 keys stays plain, 23 do not (> 32 * 32)
    assert auto.context(positions[:, -1:], positions, None).impl == "plain"
    assert auto.context(positions[:, -23:], positions, None).impl == "blockwise"
    assert np.abs(np.asarray(plain(ids)) - np.asarray(auto(ids))).max() <= 1e-5


def test_cudnn_off_gpu_is_a_clear_error():
    if jax.default_backend() == "gpu":
        pytest.skip("has a GPU")
    q, k, v, q_pos, k_pos, _, _ = inputs(1, 6, 6, 2, 1, 4)
    with pytest.raises(ValueError, match="model.attention='cudnn' needs a CUDA GPU"):
        attention.attend(q, k, v, k_pos, k_pos, impl="cudnn")
