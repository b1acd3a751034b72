"""The memory buffers and retrieval functions against plain NumPy."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fot.api import FotModel
from fot.config import ModelConfig, RetrievalConfig, config_from_dict
from fot.model.memory import faiss_ivf
from fot.model.memory import store as M
from fot.model.partials import combine

B, T, H, K, D, A = 2, 5, 4, 2, 8, 40


def random_memory(count, seed=0):
    r = np.random.RandomState(seed)
    q = r.randn(B, T, H, D).astype(np.float32)
    keys = r.randn(B, K, A, D).astype(np.float32)  # the memory layout: kv-head major
    values = r.randn(B, K, A, D).astype(np.float32)
    valid = np.arange(A)[None] < count
    valid = np.repeat(valid, B, 0)
    valid[:, 3] = False  # a hole (a padded row of an earlier ragged write)
    return q, keys, values, valid


def np_attend(q, keys, values, valid, count, k=None):
    """Softmax over the valid slots < count (or their top-k per query and head), GQA, float64."""
    g = H // K
    out = np.zeros(q.shape)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                ok = np.flatnonzero(valid[b] & (np.arange(A) < count))
                s = keys[b, h // g, ok].astype(np.float64) @ q[b, t, h] / np.sqrt(D)
                if k is not None:
                    top = np.argsort(-s)[:k]
                    ok, s = ok[top], s[top]
                p = np.exp(s - s.max())
                out[b, t, h] = p @ values[b, h // g, ok] / p.sum()
    return out


@pytest.mark.parametrize("block", [8, 40])
def test_dense_matches_numpy(block):
    q, keys, values, valid = random_memory(count=29)
    part = M.dense(jnp.asarray(q), keys, values, valid, jnp.int32(29), block)
    got = np.asarray(combine([part], jnp.float32))
    assert np.abs(got - np_attend(q, keys, values, valid, 29)).max() <= 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_memory_reads_like_its_float32_values_and_is_widened_per_block(dtype):
    q, keys, values, valid = random_memory(count=29, seed=4)
    stored = [M.encode(jnp.asarray(a), M.BITS[jnp.dtype(dtype)]) for a in (keys, values)]
    rounded = [np.asarray(jnp.asarray(a, dtype), np.float32) for a in (keys, values)]
    dense = jax.jit(lambda q, k, v: M.dense(q, k, v, valid, jnp.int32(29), 8))
    got = np.asarray(combine([dense(jnp.asarray(q), *stored)], jnp.float32))
    assert np.abs(got - np_attend(q, *rounded, valid, 29)).max() <= 1e-5
    # XLA:CPU widens a bf16/f16 slice by converting the whole buffer: no float32 copy of it here
    hlo = dense.lower(jnp.asarray(q), *stored).compile().as_text()
    assert f"f32[{B},{K},{A},{D}]" not in hlo


@pytest.mark.parametrize("k,block", [(3, 8), (11, 8), (5, 40)])
def test_knn_matches_numpy_topk(k, block):
    q, keys, values, valid = random_memory(count=33, seed=1)
    part = M.knn(jnp.asarray(q), keys, values, valid, jnp.int32(33), k, block)
    got = np.asarray(combine([part], jnp.float32))
    assert np.abs(got - np_attend(q, keys, values, valid, 33, k)).max() <= 1e-5


def test_knn_with_k_at_least_memory_equals_dense():
    q, keys, values, valid = random_memory(count=37, seed=2)
    dense = combine([M.dense(jnp.asarray(q), keys, values, valid, jnp.int32(37), 8)], jnp.float32)
    knn = combine([M.knn(jnp.asarray(q), keys, values, valid, jnp.int32(37), 64, 8)], jnp.float32)
    assert np.abs(np.asarray(knn) - np.asarray(dense)).max() <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_writes_append_and_padding_is_invalid(dtype):
    mem = M.Memory(ModelConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=2),
                   2, RetrievalConfig(dtype=dtype, capacity=20), batch=1, max_write=6)
    assert mem.state.keys.shape[3] >= 26
    r = np.random.RandomState(3)
    chunks = [r.randn(2, 1, 6, 2, 8).astype(np.float32) for _ in range(3)]
    s = mem.state
    for c, n in zip(chunks, (6, 4, 6)):  # the second write is ragged: 2 padded rows
        s = M.write(s, jnp.asarray(c), jnp.asarray(-c), jnp.int32(n))
    want = np.concatenate([chunks[0], chunks[1][:, :, :4], chunks[2]], 2).swapaxes(2, 3)
    want = np.asarray(jnp.asarray(want, dtype), np.float32)  # the memory dtype's rounding, exactly
    assert int(s.count) == 16
    keys, values = (np.asarray(M.decode(a[:, :, :, :16]), np.float32) for a in (s.keys, s.values))
    assert M.decode(s.keys).dtype == jnp.dtype(dtype)
    assert np.abs(keys - want).max() == 0
    assert np.abs(values + want).max() == 0
    assert np.asarray(s.valid[:, :, :16]).all() and not np.asarray(s.valid[:, :, 16:]).any()


def test_memory_is_its_own_variable_type_not_a_param():
    cfg = config_from_dict({"model": dict(vocab_size=32, hidden_size=16, intermediate_size=16,
                                          num_hidden_layers=2, num_attention_heads=2),
                            "memory": dict(layers=[1])})
    mem = M.Memory(cfg.model, 1, cfg.retrieval, batch=1, max_write=8)
    assert len(jax.tree.leaves(nnx.state(mem, nnx.Param))) == 0
    assert len(jax.tree.leaves(nnx.state(mem, M.MemoryCache))) == 4
    assert M.decode(mem.state.keys).dtype == jnp.bfloat16  # retrieval.dtype default
    assert mem.state.keys.dtype == jnp.uint16  # stored as bit patterns (module docstring)
    assert mem.memory_bytes_per_token() == 2 * 2 * 8 * 2 + 1
    model = FotModel.random(cfg)
    assert not jax.tree.leaves(nnx.state(model.module, M.MemoryCache))


def clustered(n, d, centers, seed):
    r = np.random.RandomState(seed)
    c = r.randn(centers, d).astype(np.float32) * 2
    x = c[r.randint(0, centers, n)] + 0.5 * r.randn(n, d).astype(np.float32)
    return x, c


def exact_top(q, x, k):
    return np.argsort(-(q @ x.T), axis=1)[:, :k]


def recall(found, want):
    """Mean share of each query's true top-k (rows of want) among its found ids."""
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, want)])


@pytest.mark.parametrize("loop", [True, False])  # CPU's per-slice loop, GPU/TPU's batched gather
def test_ivf_recall_and_full_probe_is_exact(loop):
    n, d, k, c = 4096, 16, 32, 32
    x, centers = clustered(n, d, 64, seed=4)
    q = centers[np.random.RandomState(5).randint(0, 64, 64)] + np.random.RandomState(6).randn(64, d)
    q = q.astype(np.float32)
    cap = M.list_size(n, c)
    cent, starts, sizes, order = M.build_ivf(jnp.asarray(x), jnp.int32(n), c, jax.random.key(0), cap)
    assert int(sizes.sum()) == n and int(sizes.max()) <= cap
    lists = int((sizes > 0).sum())
    sk, so = M.sorted_layout(jnp.asarray(x), order, cap)
    want = exact_top(q, x, k)
    for probe, min_recall in ((lists, 1.0), (8, 0.9)):
        s, i = M.ivf_search(jnp.asarray(q), cent, starts, sizes, sk, so, k, probe, cap, loop=loop)
        i = np.asarray(i)
        r = recall(i, want)
        assert r >= min_recall, (probe, r)
        if probe == lists:  # every list searched: the exact best scores
            np.testing.assert_allclose(np.asarray(s)[:, 0], (q @ x.T).max(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,dtype", [(5, "float32"), (40, "float32"), (5, "bfloat16"), (5, "float16")])
def test_faiss_ivf_probing_every_list_is_exact_knn(k, dtype):  # k=40: more than the 32 valid keys
    q, keys, values, valid = random_memory(count=33, seed=1)
    keys, values = (np.asarray(jnp.asarray(a, dtype), np.float32) for a in (keys, values))  # what it stores
    cfg = RetrievalConfig(mode="ivf", knn_k=k, ivf_clusters=4, ivf_probe=4, dtype=dtype, ivf_library="faiss")
    stored = M.BITS.get(jnp.dtype(dtype), jnp.dtype(dtype))
    s = M.MemoryState(*(M.encode(jnp.asarray(a), stored)[None] for a in (keys, values)), jnp.asarray(valid)[None],
                      jnp.int32(33))
    index = faiss_ivf.build(keys[None, :, :, :33], valid[None, :, :33], 4, 4, M.IVF_ITERS, M.IVF_TRAIN_PER_CLUSTER,
                            dtype)
    part = jax.jit(lambda q, s: M.retrieve(cfg, q, s, 0, index))(jnp.asarray(q), s)
    got = np.asarray(combine([part], jnp.float32))
    assert np.abs(got - np_attend(q, keys, values, valid, 33, k)).max() <= 1e-5


def test_faiss_ivf_recall_and_index_lifetime():
    n, d, k, c = 4096, 16, 32, 32
    x, centers = clustered(n, d, 64, seed=4)
    q = centers[np.random.RandomState(5).randint(0, 64, 64)] + np.random.RandomState(6).randn(64, d)
    index = faiss_ivf.build(x[None, None, None], np.ones((1, 1, n), bool), c, 8, M.IVF_ITERS,
                            M.IVF_TRAIN_PER_CLUSTER)
    _, i = faiss_ivf.search(index, jnp.asarray(q, jnp.float32)[None, None], 0, k)
    want = exact_top(q, x, k)
    assert recall(np.asarray(i)[0, 0], want) >= 0.9
    handle = int(index.handle)
    assert handle in faiss_ivf._LIVE
    del index, i
    gc.collect()
    assert handle not in faiss_ivf._LIVE  # the host indexes go with the last object holding them


def test_ivf_library_resolution(monkeypatch):
    assert M.ivf_library(RetrievalConfig(mode="ivf")) == "faiss"  # CPU with faiss-cpu installed
    assert M.ivf_library(RetrievalConfig(mode="ivf", ivf_library="jax")) == "jax"
    monkeypatch.setattr(faiss_ivf, "available", lambda: False)
    assert M.ivf_library(RetrievalConfig(mode="ivf")) == "jax"
    with pytest.raises(ImportError, match="ivf_library=faiss needs faiss-cpu"):
        M.ivf_library(RetrievalConfig(mode="ivf", ivf_library="faiss"))


@pytest.mark.parametrize("library", ["jax", "faiss"])
def test_model_ivf_with_full_probe_equals_dense(library):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    ret = dict(dtype="float32", last_context_length=8, capacity=512)
    dense = FotModel.random(config_from_dict({"model": base, "memory": dict(layers=[1]), "retrieval": ret}))
    ivf = FotModel(config_from_dict({"model": base, "memory": dict(layers=[1]), "retrieval": dict(
        ret, mode="ivf", knn_k=512, ivf_clusters=4, ivf_probe=512, ivf_library=library)}), dense.module)
    ids = np.random.RandomState(7).randint(0, 64, (1, 20 * 16))
    s = ivf.build_memory(ids[:, :-1])
    assert isinstance(s.memory.index, faiss_ivf.FaissIndex if library == "faiss" else M.IVFIndex)
    assert s.memory.index is not None and 0 < int(s.memory.index.indexed) <= s.memory.filled
    assert np.abs(np.asarray(ivf.logits_long(ids)) - np.asarray(dense.logits_long(ids))).max() <= 1e-5
