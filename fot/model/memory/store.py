"""The FoT external key/value memory: fixed-capacity buffers and retrieval (dense, exact kNN, IVF).

Layout: keys/values [M, B, K, A, D] (memory layer, row, kv head, slot, dim: kv-head major so every
score block is one GEMM) in `retrieval.dtype`, validity [M, B, A], and one fill count shared by all
layers and rows (they all store the same tokens). A, the allocated slots, is the capacity plus room
for one write, rounded up to the retrieval blocks, so a write is always a `dynamic_update_slice` at
the fill count: the jitted steps never change shape and never recompile as the memory grows. Padded
rows of a ragged write are invalid and overwritten by the next write. A 16-bit float memory is stored
as its bit patterns (`encode`/`decode`, uint16 for bf16, int16 for f16): XLA:CPU runs a bf16/f16
slice, gather or update by converting the WHOLE buffer to float32 first, which made every generated
token and every window's write cost O(capacity); integer buffers are sliced as they are, and only
the block read is widened.

Retrieval returns a `partials.Partial` (float32; scores scaled by 1/sqrt(head_dim), masked by
validity) that `attention.attend` merges with the local window in ONE softmax. Dense and exact kNN
loop over the filled blocks only (a `fori_loop` whose trip count follows the fill count), so their
cost grows with what is stored, not with the capacity.

IVF (approximate kNN; `build_ivf`, `ivf_search`, `ivf`): per (row, kv head) the keys are clustered by
a few Lloyd iterations of k-means (trained on a random subsample, then every key assigned) and stored
sorted by cluster; each cluster is cut into inverted lists of a fixed size (its centroid shared), so a
probe always reads one static-size slice however unbalanced the clusters are. A query scores the list
centroids, reads the `ivf_probe` best lists (inner product) and keeps the exact top-k of their keys.
Cost per query ~ lists + probe * list size, fixed by the capacity, instead of the whole memory. Keys
written after the last build (the "tail") are attended densely; `Memory` rebuilds the index when the
tail outgrows 1/IVF_REBUILD_FRACTION of the indexed keys.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fot.config import ModelConfig, RetrievalConfig
from fot.model.memory import faiss_ivf
from fot.model.partials import NEG_INF, Partial, empty, group_queries, merge

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BITS = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16), jnp.dtype(jnp.float16): jnp.dtype(jnp.int16)}
FLOATS = {v: k for k, v in BITS.items()}  # storage dtype -> the float it holds
BLOCK = 1024  # memory keys per dense block (bounds the [H, T, block] score buffer)
TOPK_BLOCK = 16384  # exact top-k: XLA's CPU top_k costs ~10 ms a call plus ~1.5 ns a score, so big blocks
IVF_ITERS = 6  # Lloyd iterations
IVF_TRAIN_PER_CLUSTER = 64  # k-means trains on at most this many keys per cluster (as faiss does)
IVF_REBUILD_FRACTION = 4  # rebuild once the densely attended tail exceeds indexed / this
IVF_MIN_KEYS_PER_CLUSTER = 16  # no index below this fill (exact search is cheap there anyway)


class MemoryCapacityError(RuntimeError):
    """The memory is full and `retrieval.on_full` is `error`."""


class MemoryCache(nnx.Variable):
    """FoT memory buffers: not an nnx.Param, so never trained and never in an optimizer."""


class MemoryState(NamedTuple):
    """The pure arrays a jitted step reads and writes (M memory layers stacked first)."""

    keys: jax.Array  # [M, B, K, A, D] keys rotated at position 0 (or unrotated), stored (`encode`)
    values: jax.Array  # [M, B, K, A, D]
    valid: jax.Array  # [M, B, A] bool
    count: jax.Array  # [] int32, slots written


class IVFIndex(NamedTuple):
    """Per memory layer, row and kv head: keys sorted by cluster, in inverted lists of at most `cap`
    rows (cap, static, is the padding of sorted_keys)."""

    centroids: jax.Array  # [M, B, K, L, D] float32 centroid of each list's cluster
    starts: jax.Array  # [M, B, K, L] int32 first sorted slot of each list
    sizes: jax.Array  # [M, B, K, L] int32 (0: unused list)
    order: jax.Array  # [M, B, K, A + cap] int32 memory slot of each sorted slot (padded with 0)
    sorted_keys: jax.Array  # [M, B, K, A + cap, D] stored keys in sorted order (zero padded)
    indexed: jax.Array  # [] int32, slots [0, indexed) are in the index


def allocated_slots(capacity: int, max_write: int) -> int:
    """Slots for capacity + one write, a multiple of both retrieval blocks (see `blocks`)."""
    need = capacity + max_write
    unit = BLOCK if need <= TOPK_BLOCK else TOPK_BLOCK
    return -(-need // unit) * unit if need > BLOCK else need


def blocks(allocated: int) -> tuple[int, int]:
    """(dense block, top-k block) for a memory of `allocated` slots; both divide it."""
    return min(BLOCK, allocated), min(TOPK_BLOCK, allocated)


class Memory(nnx.Module):
    """The memory of one reading (a batch of documents). `filled` mirrors `count` on the host so the
    capacity policy is applied before any write, without waiting for the device."""

    def __init__(self, model: ModelConfig, layers: int, cfg: RetrievalConfig, batch: int, max_write: int):
        self.cfg = cfg
        self.capacity = cfg.capacity
        self.max_write = max_write
        a = allocated_slots(cfg.capacity, max_write)
        m, k, d = layers, model.kv_heads, model.dim_per_head
        dt = BITS.get(jnp.dtype(DTYPES[cfg.dtype]), DTYPES[cfg.dtype])
        self.keys = MemoryCache(jnp.zeros((m, batch, k, a, d), dt))
        self.values = MemoryCache(jnp.zeros((m, batch, k, a, d), dt))
        self.valid = MemoryCache(jnp.zeros((m, batch, a), bool))
        self.count = MemoryCache(jnp.zeros((), jnp.int32))
        self.filled = 0
        if cfg.mode == "ivf":
            ivf_library(cfg)  # a missing faiss fails here, not at the first build
        # derived from the keys; rebuilt, never saved
        self.index: IVFIndex | faiss_ivf.FaissIndex | None = nnx.data(None)

    @property
    def state(self) -> MemoryState:
        return MemoryState(*(v.get_value() for v in (self.keys, self.values, self.valid, self.count)))

    def set_state(self, s: MemoryState) -> None:
        for var, a in zip((self.keys, self.values, self.valid, self.count), s):
            var.set_value(a)

    def make_room(self, n: int, window: int) -> None:
        """Apply `on_full` before writing n tokens: raise, or drop the oldest whole windows."""
        over = self.filled + n - self.capacity
        if over <= 0:
            return
        if self.cfg.on_full == "error":
            raise MemoryCapacityError(
                f"retrieval.capacity={self.capacity} tokens exceeded: {self.filled} stored + {n} new; raise "
                f"retrieval.capacity or set retrieval.on_full=drop_oldest")
        drop = min(-(-over // window) * window, self.filled)
        log.warning("memory full (capacity %d): dropping the oldest %d tokens", self.capacity, drop)
        self.set_state(_drop_oldest(self.state, drop))
        self.filled -= drop
        self.index = None

    def maybe_rebuild_index(self, seed: int = 0) -> None:
        """IVF: (re)build when no index exists yet or the densely attended tail grew too large."""
        if self.cfg.mode != "ivf":
            return
        c = self.cfg.ivf_clusters
        if self.filled < c * IVF_MIN_KEYS_PER_CLUSTER:
            return
        indexed = 0 if self.index is None else int(self.index.indexed)
        if self.index is not None and self.filled - indexed <= indexed // IVF_REBUILD_FRACTION:
            return
        if ivf_library(self.cfg) == "faiss":
            n, s = self.filled, self.state
            # whole buffers to the host, cut there: a device slice would compile for every fill
            keys = np.asarray(decode(s.keys))[:, :, :, :n].astype(np.float32)
            self.index = faiss_ivf.build(keys, np.asarray(s.valid)[:, :, :n], c, self.cfg.ivf_probe, IVF_ITERS,
                                         IVF_TRAIN_PER_CLUSTER, self.cfg.dtype, seed)
        else:
            self.index = build_ivf_state(self.state, self.filled, c, list_size(self.capacity, c), seed)

    def memory_bytes_per_token(self) -> int:
        m, _, k, _, d = self.keys.get_value().shape
        return 2 * m * k * d * self.keys.get_value().dtype.itemsize + m  # keys + values + validity byte


def ivf_library(cfg: RetrievalConfig) -> str:
    """The IVF search `retrieval.ivf_library` resolves to: "faiss" or "jax"."""
    if cfg.ivf_library == "auto":
        return "faiss" if jax.default_backend() == "cpu" and faiss_ivf.available() else "jax"
    if cfg.ivf_library == "faiss" and not faiss_ivf.available():
        raise ImportError("retrieval.ivf_library=faiss needs faiss-cpu: pip install faiss-cpu "
                          "(or set retrieval.ivf_library=jax)")
    return cfg.ivf_library


@partial(jax.jit, static_argnums=1, donate_argnums=0)
def _drop_oldest(s: MemoryState, n: int) -> MemoryState:
    count = s.count - n
    valid = jnp.roll(s.valid, -n, axis=2) & (jnp.arange(s.valid.shape[2]) < count)
    return MemoryState(jnp.roll(s.keys, -n, axis=3), jnp.roll(s.values, -n, axis=3), valid, count)


def encode(x: jax.Array, stored: jnp.dtype) -> jax.Array:
    """x as the memory stores it in a buffer of dtype `stored` (see the module docstring)."""
    stored = jnp.dtype(stored)
    if stored in FLOATS:
        return jax.lax.bitcast_convert_type(x.astype(FLOATS[stored]), stored)
    return x.astype(stored)


def decode(a: jax.Array) -> jax.Array:
    """Stored memory -> its values in `retrieval.dtype`."""
    return jax.lax.bitcast_convert_type(a, FLOATS[a.dtype]) if a.dtype in FLOATS else a


def write(s: MemoryState, k: jax.Array, v: jax.Array, n_valid: jax.Array) -> MemoryState:
    """Append [M, B, S, K, D] keys/values (first n_valid of S real) at the fill count."""
    m, b, s_len = k.shape[:3]
    new_valid = jnp.broadcast_to(jnp.arange(s_len) < n_valid, (m, b, s_len))
    at = (0, 0, 0, s.count, 0)
    put = lambda buf, x: jax.lax.dynamic_update_slice(buf, encode(jnp.swapaxes(x, 2, 3), buf.dtype), at)
    return MemoryState(put(s.keys, k), put(s.values, v),
                       jax.lax.dynamic_update_slice(s.valid, new_valid, (0, 0, s.count)),
                       s.count + n_valid.astype(jnp.int32))


# -- retrieval ------------------------------------------------------------------------------------
# Inside, queries are kv-head major: [B, K, Q, D] with Q = G * T (the G query heads of each kv head),
# so every score block is one batched GEMM [Q, D] x [D, block] per (row, kv head).


def _heads_major(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, H, D] -> [B, K, G*T, D] float32."""
    b, t, h, d = q.shape
    qg = group_queries(q, kv_heads).astype(jnp.float32)  # [B, T, K, G, D]
    return jnp.transpose(qg, (0, 2, 3, 1, 4)).reshape(b, kv_heads, -1, d)


def _to_partial(p: Partial, t: int) -> Partial:
    """Partial in [B, K, G*T, ...] -> the [B, T, H, ...] layout of fot.model.attention."""
    b, k, gt = p.m.shape
    g = gt // t

    def back(a):  # [B, K, G*T, ...] -> [B, T, K*G, ...]
        rest = a.shape[3:]
        return jnp.moveaxis(a.reshape(b, k, g, t, *rest), 3, 1).reshape(b, t, k * g, *rest)

    return Partial(back(p.o), back(p.m), back(p.l))


def _block(a: jax.Array, i: jax.Array, size: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, i * size, size, axis)


def _f32(a: jax.Array) -> jax.Array:
    return decode(a).astype(jnp.float32)


def _block_scores(qh, keys, valid, i, size):
    """Scaled scores [B, K, Q, size] of block i and its validity [B, 1, 1, size]."""
    kb = _f32(_block(keys, i, size, 2))
    s = jnp.einsum("bkqd,bksd->bkqs", qh, kb) * qh.shape[-1] ** -0.5
    return s, _block(valid, i, size, 1)[:, None, None, :]


def _partial(s: jax.Array, mask: jax.Array, v: jax.Array, v_spec: str) -> Partial:
    s = jnp.where(mask, s, NEG_INF)
    m = jnp.max(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    return Partial(jnp.einsum(f"bkqs,{v_spec}->bkqd", p, _f32(v)), m, jnp.sum(p, -1))


def dense(q: jax.Array, keys: jax.Array, values: jax.Array, valid: jax.Array, count: jax.Array,
          block: int) -> Partial:
    """Attend to every valid memory key. q [B, T, H, D]; keys/values [B, K, A, D]; valid [B, A]."""
    b, t, h, d = q.shape
    qh = _heads_major(q, keys.shape[1])

    def body(i, acc):
        s, mask = _block_scores(qh, keys, valid, i, block)
        return merge(acc, _partial(s, mask, _block(values, i, block, 2), "bksd"))

    return _to_partial(jax.lax.fori_loop(0, (count + block - 1) // block, body, empty(qh.shape)), t)


def _topk_merge(best_s, best_i, s, idx, k):
    s = jnp.concatenate([best_s, s], axis=-1)
    idx = jnp.concatenate([best_i, idx], axis=-1)
    best_s, pos = jax.lax.top_k(s, k)
    return best_s, jnp.take_along_axis(idx, pos, axis=-1)


def exact_topk(qh: jax.Array, keys: jax.Array, valid: jax.Array, start: jax.Array, stop: jax.Array,
               k: int, block: int) -> tuple[jax.Array, jax.Array]:
    """Exact top-k scaled scores and slots [B, K, Q, k] among valid slots [start, stop)."""
    kb = min(k, block)
    slots = jnp.arange(block, dtype=jnp.int32)

    def body(i, acc):
        s, mask = _block_scores(qh, keys, valid, i, block)
        idx = i * block + slots
        s = jnp.where(mask & ((idx >= start) & (idx < stop)), s, NEG_INF)
        top_s, top_p = jax.lax.top_k(s, kb)
        return _topk_merge(*acc, top_s, idx[top_p], k)

    init = (jnp.full(qh.shape[:3] + (k,), NEG_INF, jnp.float32), jnp.zeros(qh.shape[:3] + (k,), jnp.int32))
    return jax.lax.fori_loop(start // block, (stop + block - 1) // block, body, init)


def _gathered_partial(top_s: jax.Array, top_i: jax.Array, values: jax.Array) -> Partial:
    """Partial over per-query selected slots [B, K, Q, k] of values [B, K, A, D]."""
    b, kh, q, k = top_i.shape
    vg = jnp.take_along_axis(values, top_i.reshape(b, kh, q * k, 1), axis=2).reshape(b, kh, q, k, -1)
    return _partial(top_s, top_s > NEG_INF / 2, vg, "bkqsd")


def knn(q: jax.Array, keys: jax.Array, values: jax.Array, valid: jax.Array, count: jax.Array, k: int,
        block: int) -> Partial:
    """Per head and per query: attend to the exact top-k memory keys by inner product."""
    qh = _heads_major(q, keys.shape[1])
    top_s, top_i = exact_topk(qh, keys, valid, jnp.int32(0), count, k, block)
    return _to_partial(_gathered_partial(top_s, top_i, values), q.shape[1])


# -- IVF ------------------------------------------------------------------------------------------


def kmeans(x: jax.Array, n: jax.Array, clusters: int, key: jax.Array, iters: int = IVF_ITERS,
           train: int | None = None) -> jax.Array:
    """Centroids [C, D] of the first n rows of x [A, D] (float32): Lloyd's algorithm on a random
    subsample of `train` rows, started from `clusters` distinct random rows."""
    a = x.shape[0]
    train = min(train or clusters * IVF_TRAIN_PER_CLUSTER, a)
    g = jnp.where(jnp.arange(a) < n, jax.random.gumbel(key, (a,)), -jnp.inf)
    _, pick = jax.lax.top_k(g, train)  # a uniform sample without replacement of valid rows
    xs = x[pick]
    ok = jnp.arange(train) < n
    c0 = xs[:clusters]

    def step(_, c):
        assign = nearest(xs, c)
        w = ok.astype(jnp.float32)
        sums = jax.ops.segment_sum(xs * w[:, None], assign, clusters)
        cnt = jax.ops.segment_sum(w, assign, clusters)
        return jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1.0)[:, None], c)

    return jax.lax.fori_loop(0, iters, step, c0)


def nearest(x: jax.Array, c: jax.Array) -> jax.Array:
    """Index of the L2-nearest centroid: argmax x.c - |c|^2 / 2."""
    return jnp.argmax(x @ c.T - 0.5 * jnp.sum(c * c, axis=-1), axis=-1).astype(jnp.int32)


def list_size(n: int, clusters: int) -> int:
    """Rows per inverted list: the mean cluster size rounded up to a power of two (static shape)."""
    return _pow2(max(1, -(-n // clusters)))


def build_ivf(x: jax.Array, n: jax.Array, clusters: int, key: jax.Array, size: int):
    """Index the first n rows of x [A, D]: rows sorted by cluster (rows >= n last), each cluster cut
    into lists of at most `size` rows that share its centroid, so a probe reads one fixed-size slice
    however unbalanced k-means came out. Returns (list centroids [L, D], starts [L], sizes [L],
    order [A]) with L = clusters + A // size lists (unused ones have size 0)."""
    a = x.shape[0]
    xf = _f32(x)
    c = kmeans(xf, n, clusters, key)
    # assigned 4096 rows at a time: the [A, C] distance matrix of a big memory would not fit
    near = jax.lax.map(lambda row: nearest(row[None], c)[0], xf, batch_size=4096)
    assign = jnp.where(jnp.arange(a) < n, near, clusters)
    order = jnp.argsort(assign, stable=True).astype(jnp.int32)
    sizes = jnp.bincount(assign, length=clusters + 1)[:clusters].astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    per = -(-sizes // size)  # lists of each cluster
    ends = jnp.cumsum(per)
    lists = jnp.arange(clusters + a // size, dtype=jnp.int32)
    owner = jnp.minimum(jnp.searchsorted(ends, lists, side="right"), clusters - 1)
    j = lists - (ends - per)[owner]
    l_sizes = jnp.where(lists < ends[-1], jnp.clip(sizes[owner] - j * size, 0, size), 0)
    return c[owner], (starts[owner] + j * size).astype(jnp.int32), l_sizes.astype(jnp.int32), order


@partial(jax.jit, static_argnums=(1, 4))
def _build_many(keys_t: jax.Array, clusters: int, n: jax.Array, seed: jax.Array, size: int):
    """vmap of build_ivf over leading axes of keys_t [..., A, D]."""
    lead = keys_t.shape[:-2]
    flat = keys_t.reshape(-1, *keys_t.shape[-2:])
    ks = jax.random.split(jax.random.key(seed), flat.shape[0])
    out = jax.vmap(lambda x, k: build_ivf(x, n, clusters, k, size))(flat, ks)
    return jax.tree.map(lambda a: a.reshape(*lead, *a.shape[1:]), out)


@partial(jax.jit, static_argnums=2)
def sorted_layout(keys_t: jax.Array, order: jax.Array, size: int):
    """Keys [..., A, D] in cluster order, zero padded by `size` rows so that a slice at any list
    start stays in bounds; order likewise."""
    sk = jnp.take_along_axis(keys_t, order[..., None], axis=-2)
    pad = [(0, 0)] * (sk.ndim - 2) + [(0, size), (0, 0)]
    return jnp.pad(sk, pad), jnp.pad(order, pad[:-1])


def build_ivf_state(s: MemoryState, n: int, clusters: int, size: int, seed: int = 0) -> IVFIndex:
    """IVF index of the first n memory slots of every memory layer, row and kv head, in lists of
    `size` rows. `Memory` sizes lists for the full capacity: the search shape (and its compiled
    step) then never changes as the memory fills, and each probe reads the same number of rows."""
    c, starts, sizes, order = _build_many(s.keys, clusters, jnp.int32(n), jnp.int32(seed), size)
    sk, so = sorted_layout(s.keys, order, size)
    return IVFIndex(c, starts, sizes, so, sk, jnp.int32(n))


def _pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def ivf_search(q: jax.Array, centroids: jax.Array, starts: jax.Array, sizes: jax.Array,
               sorted_keys: jax.Array, order: jax.Array, k: int, probe: int, cap: int,
               loop: bool | None = None, chunk: int = 32) -> tuple[jax.Array, jax.Array]:
    """Approximate top-k inner products of queries q [..., Q, D] (float32) with the keys of their
    index (leading axes shared by every argument, e.g. row and kv head): (scores, original slots)
    [..., Q, k]; missing candidates score NEG_INF.

    centroids/starts/sizes: per inverted list (see build_ivf); probe counts lists. sorted_keys
    [..., A + cap, D] / order [..., A + cap]: keys sorted by cluster, zero padded; each probed list
    is read as one contiguous slice of `cap` rows. `loop` (default: on CPU) reads each (query,
    list) slice in a loop: XLA:CPU's batched gather of the same rows was ~3x slower than this whole
    search (262k keys, bench_retrieval). Otherwise (GPU/TPU, where a loop would be thousands of
    kernel launches) one gather per `chunk` queries (lax.map), [chunk, probe, cap, D] at a time.
    """
    lead, (qn, d) = q.shape[:-2], q.shape[-2:]
    flat = lambda a, nd: a.reshape(-1, *a.shape[a.ndim - nd:])  # noqa: E731
    q, centroids, sorted_keys = flat(q, 2), flat(centroids, 2), flat(sorted_keys, 2)
    starts, sizes, order = flat(starts, 1), flat(sizes, 1), flat(order, 1)
    g = q.shape[0]
    probe = min(probe, centroids.shape[1])
    kk = min(k, probe * cap)
    cs = jnp.where(sizes[:, None] > 0, jnp.einsum("gqd,gld->gql", q, centroids), -jnp.inf)
    _, cl = jax.lax.top_k(cs, probe)  # [G, Q, P]
    pick = jax.vmap(lambda a, i: a[i])  # per leading index g: a[g][i[g]]
    st, sz = pick(starts, cl), pick(sizes, cl)
    if loop is None:
        loop = jax.default_backend() == "cpu"
    if loop:
        def body(j, s):
            h, i, p = j // (qn * probe), j // probe % qn, j % probe
            rows = jax.lax.dynamic_slice(sorted_keys, (h, st[h, i, p], 0), (1, cap, d))[0]
            return jax.lax.dynamic_update_slice(s, (_f32(rows) @ q[h, i])[None, None, None], (h, i, p, 0))

        s = jax.lax.fori_loop(0, g * qn * probe, body, jnp.zeros((g, qn, probe, cap), jnp.float32))
    else:
        def one(keys, qi, sti):  # one query [D], its lists' starts [P] -> [P, cap]
            rows = jax.vmap(lambda s0: jax.lax.dynamic_slice_in_dim(keys, s0, cap))(sti)
            return jnp.einsum("d,psd->ps", qi, _f32(rows))

        s = jax.vmap(lambda keys, qh, sth: jax.lax.map(lambda a: one(keys, *a), (qh, sth), batch_size=chunk)
                     )(sorted_keys, q, st)
    s = jnp.where(jnp.arange(cap) < sz[..., None], s, NEG_INF).reshape(g, qn, probe * cap)
    top_s, pos = jax.lax.top_k(s, kk)
    at = jnp.take_along_axis(st, pos // cap, axis=-1) + pos % cap
    top_i = pick(order, at)
    if kk < k:
        top_s = jnp.pad(top_s, ((0, 0), (0, 0), (0, k - kk)), constant_values=NEG_INF)
        top_i = jnp.pad(top_i, ((0, 0), (0, 0), (0, k - kk)))
    return top_s.reshape(*lead, qn, k), top_i.reshape(*lead, qn, k)


def ivf(q: jax.Array, keys: jax.Array, values: jax.Array, valid: jax.Array, count: jax.Array,
        found: tuple[jax.Array, jax.Array], indexed: jax.Array, block: int) -> Partial:
    """Approximate kNN attention for one memory layer: the top-k keys an IVF search found among the
    indexed slots (`found`: scores and slots [B, K, Q, k], from `ivf_search` or faiss), plus every key
    written since the index was built (the tail, at most 1/IVF_REBUILD_FRACTION of the indexed keys),
    in one softmax. The tail is attended densely because an exact top-k over it costs XLA:CPU more
    than the GEMM."""
    qh = _heads_major(q, keys.shape[1])

    def body(i, acc):
        s, mask = _block_scores(qh, keys, valid, i, block)
        mask = mask & (i * block + jnp.arange(block) >= indexed)
        return merge(acc, _partial(s, mask, _block(values, i, block, 2), "bksd"))

    tail = jax.lax.fori_loop(indexed // block, (count + block - 1) // block, body,
                             _gathered_partial(*found, values))
    return _to_partial(tail, q.shape[1])


def _ivf_found(cfg: RetrievalConfig, q: jax.Array, keys: jax.Array, slot: int, index) -> tuple[jax.Array, jax.Array]:
    """Top-k (scaled scores, slots) [B, K, Q, k] of memory layer `slot`'s IVF index, JAX or faiss."""
    qh = _heads_major(q, keys.shape[1]) * q.shape[-1] ** -0.5
    if isinstance(index, faiss_ivf.FaissIndex):
        return faiss_ivf.search(index, qh, slot, cfg.knn_k)
    one = IVFIndex(*(a if f == "indexed" else a[slot] for f, a in zip(IVFIndex._fields, index)))
    cap = one.sorted_keys.shape[-2] - keys.shape[2]
    return ivf_search(qh, one.centroids, one.starts, one.sizes, one.sorted_keys, one.order, k=cfg.knn_k,
                      probe=cfg.ivf_probe, cap=cap)


def retrieve(cfg: RetrievalConfig, q: jax.Array, s: MemoryState, slot: int,
             index: IVFIndex | faiss_ivf.FaissIndex | None) -> Partial:
    """The memory partial of memory layer `slot` for queries q [B, T, H, D] (already rotated)."""
    keys, values, valid = s.keys[slot], s.values[slot], s.valid[slot]
    dense_block, topk_block = blocks(keys.shape[2])
    if cfg.mode == "dense":
        return dense(q, keys, values, valid, s.count, dense_block)
    if cfg.mode == "ivf" and index is not None:
        found = _ivf_found(cfg, q, keys, slot, index)
        return ivf(q, keys, values, valid, s.count, found, index.indexed, dense_block)
    return knn(q, keys, values, valid, s.count, cfg.knn_k, topk_block)
