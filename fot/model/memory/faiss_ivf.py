"""IVF retrieval on the CPU through faiss (`retrieval.ivf_library`): one faiss IVF index per memory
layer, row and kv head (`_ivf`), searched from inside the jitted steps by `jax.pure_callback`.

XLA:CPU reads each probed list with its own slice in a loop and runs a slow `top_k` (~12 ms and
~8 ms of the JAX search at 262k keys, BENCHMARKS.md); faiss scans the lists and keeps the top-k in
one pass. The index follows the JAX one's settings (clusters, probes, k-means iterations, training
sample per cluster) and the same rebuild policy; the densely attended tail stays in JAX (store.ivf).
The faiss indexes live on the host: the pytree passed to a jitted step carries only their handle.
"""

from __future__ import annotations

import itertools
import weakref
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fot.model.partials import NEG_INF


def available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class _Host:
    """The faiss indexes of one build, [memory layer][row][kv head]."""

    def __init__(self, indexes):
        self.indexes = indexes


_LIVE: weakref.WeakValueDictionary[int, _Host] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@jax.tree_util.register_pytree_node_class
class FaissIndex:
    """What a jitted step receives: the handle of the host indexes and how many slots they cover.
    `host` keeps the indexes alive while a Memory (or a copy of its Session) holds this object; a
    step's traced copy has none."""

    def __init__(self, handle: jax.Array, indexed: jax.Array, host: _Host | None = None):
        self.handle, self.indexed, self.host = handle, indexed, host

    def tree_flatten(self):
        return (self.handle, self.indexed), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


def _ivf(faiss, d: int, clusters: int, dtype: str):
    """An empty IVF index that stores keys as the memory does: a 16-bit memory's keys in 16 bits,
    exactly (a scalar quantizer of the keys themselves, not of their residuals): the same recall as
    float32 lists at half the bytes scanned (~10% faster at 262k keys, BENCHMARKS.md)."""
    quantizer = faiss.IndexFlatIP(d)
    if dtype == "float32":
        return faiss.IndexIVFFlat(quantizer, d, clusters, faiss.METRIC_INNER_PRODUCT)
    qt = {"bfloat16": faiss.ScalarQuantizer.QT_bf16, "float16": faiss.ScalarQuantizer.QT_fp16}[dtype]
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, clusters, qt, faiss.METRIC_INNER_PRODUCT)
    index.by_residual = False
    return index


def build(keys: np.ndarray, valid: np.ndarray, clusters: int, probe: int, iters: int, train_per_cluster: int,
          dtype: str = "float32", seed: int = 0) -> FaissIndex:
    """Index the valid slots of keys [M, B, K, n, D] (float32 values of a `dtype` memory; valid
    [M, B, n]) by their slot number."""
    import faiss

    m, b, kh, n, d = keys.shape
    slots = np.arange(n, dtype=np.int64)
    indexes = []
    for layer in range(m):
        rows = []
        for row in range(b):
            ok = valid[layer, row]
            heads = []
            for head in range(kh):
                x = np.ascontiguousarray(keys[layer, row, head][ok])
                index = _ivf(faiss, d, clusters, dtype)
                index.cp.niter, index.cp.seed = iters, seed
                index.cp.max_points_per_centroid = train_per_cluster
                index.cp.min_points_per_centroid = 1  # sparse rows: no warning, k-means copes
                index.train(x)
                index.add_with_ids(x, slots[ok])
                index.nprobe = min(probe, clusters)
                heads.append(index)
            rows.append(heads)
        indexes.append(rows)
    host = _Host(indexes)
    handle = next(_HANDLES)
    _LIVE[handle] = host
    return FaissIndex(jnp.int32(handle), jnp.int32(n), host)


def _search_host(handle, q, *, slot: int, k: int):
    """faiss's search of every row and kv head. pure_callback hands over jax Arrays: q is read as
    one NumPy array, not indexed by a JAX op per row and head."""
    indexes = _LIVE[int(handle)].indexes[slot]
    q = np.asarray(q)
    scores = np.empty(q.shape[:3] + (k,), np.float32)
    ids = np.empty(q.shape[:3] + (k,), np.int64)
    for row in range(q.shape[0]):
        for head in range(q.shape[1]):
            indexes[row][head].search(np.ascontiguousarray(q[row, head]), k, D=scores[row, head], I=ids[row, head])
    missing = ids < 0  # fewer than k keys in the probed lists
    if missing.any():
        scores[missing], ids[missing] = NEG_INF, 0
    return scores, ids.astype(np.int32)


def search(index: FaissIndex, qh: jax.Array, slot: int, k: int) -> tuple[jax.Array, jax.Array]:
    """Approximate top-k inner products of queries qh [B, K, Q, D] with memory layer `slot`'s keys:
    (scores, slots) [B, K, Q, k]; missing candidates score NEG_INF."""
    out = jax.ShapeDtypeStruct(qh.shape[:3] + (k,), jnp.float32), jax.ShapeDtypeStruct(qh.shape[:3] + (k,), jnp.int32)
    return jax.pure_callback(partial(_search_host, slot=slot, k=k), out, index.handle, qh.astype(jnp.float32))
