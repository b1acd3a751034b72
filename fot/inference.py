"""Long inputs window by window with the FoT memory (LongLLaMA's semantics), generation, saved memory.

A `Session` holds what has been read: the memory (fot.model.memory.store.Memory) and the local cache
(keys/values of every layer, its positions being the slot indices, i.e. relative to the oldest
cached token as in LongLLaMA's `rel_pos_ids = pos - min(pos)`). A slot's position stays fixed while
the token is cached, so the cache holds keys rotated (a step rotates only its new ones), except in
the memory layers of a session with memory, whose cached keys go to memory unrotated
(`Llama.cache_rotated`).

Reading N fresh tokens (`logits_long`, LongLLaMA's `_handle_long_input`): the prefix
max(N - last_context_length, 0) is cut into windows; each window runs with local positions 0..T-1,
memory layers attending to [causal window | all memory] in one softmax, and only after the window's
attention are its memory-layer keys (rotated at position 0, or unrotated when
memory.positionals=False) and values written to memory. The last tokens run against an empty local
cache (positions from 0) and stay in it. Later tokens (generation, questions after a saved memory)
go through the local cache: when it would exceed the window, the whole cache moves into memory
(memory layers) or is dropped (other layers), as the reference does during generation.

Every call is one of two jitted steps of fixed shapes (a window [B, W]; a local piece [B, Lc] or one
token [B, 1], after an empty cache or not); ragged pieces are padded at the end, which cannot
change the real tokens' numbers (causal masking; padded keys are invalid and never written as
valid memory or past the cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from functools import partial
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fot.model import rope
from fot.model.llama import KV, DTYPES
from fot.model.memory import store as memlib
from fot.model.memory.session import session_memory, to_memory

log = logging.getLogger(__name__)

OUTS = ("logits", "logprobs", "last", "none")


# -- jitted steps --------------------------------------------------------------------------------


def _output(logits: jax.Array, targets: jax.Array, n_valid: jax.Array, out: str):
    if out == "logits":
        return logits
    if out == "logprobs":  # without materialising log_softmax: one pass fewer over [T, V]
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)
    if out == "last":
        return jax.lax.dynamic_index_in_dim(logits, n_valid - 1, axis=1, keepdims=False)
    return None


@partial(jax.jit, static_argnames=("graphdef", "retrieval", "out", "rope_len"))
def _window_step(graphdef, params, mem, index, ids, targets, n_valid, *, retrieval, out, rope_len):
    """One prefix window: positions 0..T-1, memory read only. Returns the output and the window's
    memory-layer keys/values, which `_write` appends after (a separate call: inside one program XLA
    copies the whole memory before updating it in place, because the retrieval loop also reads it)."""
    module = nnx.merge(graphdef, params)
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ctx = module.context(pos, pos, None, rope_len)
    x, kv = module.run_layers(module.embed(ids), ctx, memory=session_memory(module, retrieval, mem, index),
                              collect_kv=True)
    new = None if retrieval is None else to_memory(module, ctx, kv)
    return _output(module.head(x), targets, n_valid, out), new


@partial(jax.jit, donate_argnums=0)
def _write(mem, k, v, n_valid):
    return memlib.write(mem, k, v, n_valid)


@partial(jax.jit, static_argnames=("graphdef", "retrieval", "out", "rope_len", "fresh"),
         donate_argnames=("cache",))
def _local_step(graphdef, params, mem, index, ids, n_valid, targets, cache, cache_len, *, retrieval,
                out, rope_len, fresh):
    """Tokens after the local cache: queries at cache_len.., keys [cache | new], memory read only.
    `fresh`: the cache is empty (cache_len 0), so the keys are the tokens' own, as in a window
    (padding comes after them: causal masking hides it)."""
    module = nnx.merge(graphdef, params)
    b, s = ids.shape
    p = cache.k.shape[2]
    q_pos = jnp.broadcast_to(cache_len + jnp.arange(s, dtype=jnp.int32), (b, s))
    if fresh:
        ctx = dataclasses.replace(module.context(q_pos, q_pos, None, rope_len), by_index=True)
    else:
        k_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)), q_pos], 1)
        k_valid = jnp.concatenate([jnp.arange(p) < cache_len, jnp.arange(s) < n_valid])
        ctx = module.context(q_pos, k_pos, jnp.broadcast_to(k_valid, (b, p + s)), rope_len)
    x, kv = module.run_layers(module.embed(ids), ctx, past=None if fresh else cache,
                              memory=session_memory(module, retrieval, mem, index), collect_kv=True,
                              rotated_cache=True)
    # A piece's padding may reach past the cache (it holds max(window, piece) tokens): dropped.
    at = cache_len + jnp.arange(s)
    cache = KV(cache.k.at[:, :, at].set(kv.k.astype(cache.k.dtype), mode="drop"),
               cache.v.at[:, :, at].set(kv.v.astype(cache.v.dtype), mode="drop"))
    return _output(module.head(x), targets, n_valid, out), cache


@partial(jax.jit, static_argnames=("graphdef", "rope_len"), donate_argnames=("mem",))
def _cache_to_memory(graphdef, params, mem, cache, cache_len, *, rope_len):
    """Move the first cache_len cached tokens of the memory layers into memory."""
    module = nnx.merge(graphdef, params)
    zeros = jnp.zeros(cache.k.shape[1:3], jnp.int32)
    ctx = module.context(zeros, zeros, None, rope_len)
    return memlib.write(mem, *to_memory(module, ctx, cache), cache_len)


# -- sessions ------------------------------------------------------------------------------------


class Session:
    """What a model has read: memory + local cache. Not thread-safe; `copy()` before branching."""

    def __init__(self, model, batch: int, window: int | None = None,
                 last_context_length: int | None = None, *, memory: bool = True,
                 rope_len: int | None = None):
        """`memory=False`: memory layers read no memory and nothing is written to it (the memory-off
        baseline: with a window as long as the whole input, plain attention with a KV cache).
        `rope_len`: the length dynamic RoPE scaling sees (default model.max_position_embeddings)."""
        cfg = model.config
        self.model = model
        if cfg.memory != model.module.mem:
            raise ValueError(f"model.config.memory ({cfg.memory}) does not match the module's "
                             f"({model.module.mem})")
        # what this session stores and how it reads it; None: no memory is read or written
        self.retrieval = cfg.retrieval if memory and cfg.memory.layers else None
        self._rope_len = rope_len or cfg.model.max_position_embeddings
        self.window = window or cfg.model.max_position_embeddings
        self.last_context_length = (cfg.retrieval.last_context_length if last_context_length is None
                                    else last_context_length)
        if self.window <= 0 or self.last_context_length < 0:
            raise ValueError(f"window must be positive and last_context_length >= 0, got "
                             f"{self.window} and {self.last_context_length}")
        self.piece = max(self.last_context_length, 1)  # static length of a local-cache piece
        self.batch = batch
        self.graphdef, self.params = nnx.split(model.module)
        m = cfg.model
        # The cache never holds more than a window (it moves first), or one piece longer than that.
        size = max(self.window, self.piece)
        shape = (m.num_hidden_layers, batch, size, m.kv_heads, m.dim_per_head)
        self.cache = KV(jnp.zeros(shape, DTYPES[m.dtype]), jnp.zeros(shape, DTYPES[m.dtype]))
        self.cache_len = 0
        self.memory = memlib.Memory(m, self.memory_layers, cfg.retrieval, batch, max_write=size)
        self.tokens_read = 0

    @property
    def memory_layers(self) -> int:
        """How many memory layers this session stores (0 without memory)."""
        return len(self.model.config.memory.layers) if self.retrieval is not None else 0

    @property
    def rope_len(self) -> int:
        return self._rope_len

    def _cache_rotated(self) -> list[bool]:
        return self.model.module.cache_rotated(self.retrieval is not None)

    def _rotate_cache(self, k: np.ndarray, layers: list[bool]) -> jax.Array:
        """Cached keys k [L, B, C, K, D] of the chosen layers rotated at their slot positions."""
        pos = jnp.broadcast_to(jnp.arange(k.shape[2], dtype=jnp.int32), k.shape[1:3])
        tables = rope.rope_tables(*rope.rope_frequencies(self.model.config.model, self.rope_len), pos)
        k = jnp.asarray(k)
        return jnp.stack([rope.apply_rope(k[i], *tables) if r else k[i] for i, r in enumerate(layers)])

    def _mem_args(self):
        return self.memory.state, self.memory.index

    def _write_memory(self, n: int, do) -> None:
        """Apply the capacity policy, run `do()` (returns the new memory state), maybe reindex."""
        if self.retrieval is not None:
            self.memory.make_room(n, self.window)
            self.memory.filled += n
        self.memory.set_state(do())
        self.memory.maybe_rebuild_index()

    def _window(self, ids: np.ndarray, targets: np.ndarray, out: str):
        b, n = ids.shape
        padded = np.zeros((b, self.window), np.int32)
        padded[:, :n] = ids
        tgt = np.zeros((b, self.window), np.int32)
        tgt[:, :n] = targets
        result = {}

        def do():
            state, index = self._mem_args()
            result["y"], new = _window_step(self.graphdef, self.params, state, index, padded, tgt,
                                            jnp.int32(n), retrieval=self.retrieval, out=out,
                                            rope_len=self.rope_len)
            return state if new is None else _write(state, *new, jnp.int32(n))

        self._write_memory(n, do)
        self.tokens_read += n
        return _trim(result["y"], n, out)

    def _move_cache(self) -> None:
        n = self.cache_len
        if n and self.retrieval is not None:  # other layers' cached keys are dropped
            self._write_memory(n, lambda: _cache_to_memory(
                self.graphdef, self.params, self.memory.state, self.cache, jnp.int32(n),
                rope_len=self.rope_len))
        self.cache_len = 0

    def _local(self, ids: np.ndarray, targets: np.ndarray, out: str):
        b, n = ids.shape
        if self.cache_len + n > self.window:  # LongLLaMA: the whole cache leaves the local context
            self._move_cache()
        size = 1 if n == 1 else self.piece
        padded = np.zeros((b, size), np.int32)
        padded[:, :n] = ids
        tgt = np.zeros((b, size), np.int32)
        tgt[:, :n] = targets
        state, index = self._mem_args()
        y, self.cache = _local_step(self.graphdef, self.params, state, index, padded, jnp.int32(n),
                                    tgt, self.cache, jnp.int32(self.cache_len), retrieval=self.retrieval,
                                    out=out, rope_len=self.rope_len, fresh=self.cache_len == 0)
        self.cache_len += n
        self.tokens_read += n
        return _trim(y, n, out)

    def feed(self, ids, out: str = "logits", targets: np.ndarray | None = None):
        """Read ids [B, N]; returns per-token outputs concatenated over pieces (see OUTS).

        A fresh session follows `_handle_long_input`; a session that has read before sends all new
        tokens through the local cache in pieces of at most last_context_length tokens.
        """
        if out not in OUTS:
            raise ValueError(f"out must be one of {OUTS}, got {out!r}")
        ids = np.asarray(self.model.check_ids(ids))
        if ids.shape[0] != self.batch:
            raise ValueError(f"this session reads batches of {self.batch} rows, got {ids.shape[0]}")
        n_tok = ids.shape[1]
        if targets is None:
            targets = np.zeros_like(ids)
        fresh = self.tokens_read == 0
        prefix = max(n_tok - self.last_context_length, 0) if fresh else 0
        pieces = ([(self._window, i, min(i + self.window, prefix)) for i in range(0, prefix, self.window)]
                  + [(self._local, i, min(i + self.piece, n_tok)) for i in range(prefix, n_tok, self.piece)])
        outs = []
        for step, i, j in pieces:
            # "last" needs the final piece's output only: the others run as "none", where XLA also
            # drops the work nothing kept depends on (the last memory layer's retrieval in a window,
            # the head), so generating after a long prompt costs what build_memory does.
            keep = out != "last" or j == n_tok
            outs.append(step(ids[:, i:j], targets[:, i:j], out if keep else "none"))
        if out == "none":
            return None
        if out == "last":
            return outs[-1]
        return jnp.concatenate(outs, axis=1)

    def copy(self) -> "Session":
        """An independent session with the same content (steps donate their buffers)."""
        new = object.__new__(Session)
        new.__dict__.update(self.__dict__)
        new.cache = jax.tree.map(jnp.copy, self.cache)
        new.memory = memlib.Memory(self.model.config.model, self.memory_layers, self.model.config.retrieval,
                                   self.batch, self.memory.max_write)
        new.memory.set_state(jax.tree.map(jnp.copy, self.memory.state))
        new.memory.filled = self.memory.filled
        new.memory.index = self.memory.index
        return new

    # -- persistence --

    def save(self, path: str | Path) -> Path:
        """Write memory + local cache + the model's fingerprint to one .npz file."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz")
        s, f, c = self.memory.state, self.memory.filled, self.cache_len
        arrays = {"keys": memlib.decode(s.keys[:, :, :, :f]), "values": memlib.decode(s.values[:, :, :, :f]),
                  "valid": s.valid[:, :, :f],
                  "cache_k": self.cache.k[:, :, :c], "cache_v": self.cache.v[:, :, :c]}
        meta = {"fingerprint": fingerprint(self.model), "filled": f, "cache_len": c,
                "window": self.window, "last_context_length": self.last_context_length,
                "batch": self.batch, "tokens_read": self.tokens_read,
                "memory": self.retrieval is not None, "rope_len": self.rope_len,
                "cache_rotated": self._cache_rotated(),
                "dtypes": {k: str(v.dtype) for k, v in arrays.items()}}
        raw = {k: _to_storable(np.asarray(v)) for k, v in arrays.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **raw)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, model, path: str | Path) -> "Session":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no saved memory there")
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            arrays = {k: _from_storable(z[k], meta["dtypes"][k]) for k in meta["dtypes"]}
        mine = fingerprint(model)
        if meta["fingerprint"] != mine:
            raise ValueError(f"{path}: this memory was built by a different model or memory config "
                             f"(fingerprint {meta['fingerprint'][:16]}..., this model {mine[:16]}...)")
        s = cls(model, meta["batch"], meta["window"], meta["last_context_length"],
                memory=meta.get("memory", True), rope_len=meta.get("rope_len"))
        f, c = meta["filled"], meta["cache_len"]
        if f > s.memory.capacity:
            raise ValueError(f"{path}: holds {f} memory tokens, more than retrieval.capacity="
                             f"{s.memory.capacity}")
        st = s.memory.state
        put = lambda buf, a: jax.lax.dynamic_update_slice(buf, memlib.encode(jnp.asarray(a), buf.dtype),
                                                           (0,) * buf.ndim)
        s.memory.set_state(memlib.MemoryState(put(st.keys, arrays["keys"]), put(st.values, arrays["values"]),
                                              put(st.valid, arrays["valid"]), jnp.int32(f)))
        s.memory.filled = f
        s.memory.maybe_rebuild_index()
        # Files saved before the cache held rotated keys hold them all unrotated.
        old = meta.get("cache_rotated", [False] * len(arrays["cache_k"]))
        cache_k = s._rotate_cache(arrays["cache_k"], [r and not o for r, o in zip(s._cache_rotated(), old)])
        s.cache = KV(put(s.cache.k, cache_k), put(s.cache.v, arrays["cache_v"]))
        s.cache_len = c
        s.tokens_read = meta["tokens_read"]
        return s


def _trim(y, n: int, out: str):
    if y is None or out == "last":
        return y
    return y[:, :n]


def _to_storable(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype.name == "bfloat16" else a


def _from_storable(a: np.ndarray, dtype: str) -> np.ndarray:
    return a.view(jnp.bfloat16) if dtype == "bfloat16" else a


def fingerprint(model) -> str:
    """sha256 of the model/memory config and per-parameter sums: a saved memory only fits the model
    (and memory layout) that built it."""
    cfg = model.config
    mem = cfg.memory
    desc = {"model": dataclasses.asdict(cfg.model),
            "memory": [list(mem.layers), mem.positionals, cfg.retrieval.dtype]}
    params = nnx.state(model.module, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    sums = _param_sums([x for _, x in leaves])
    desc["params"] = [(jax.tree_util.keystr(p), list(x.shape), str(x.dtype), f"{a:.6e}", f"{b:.6e}")
                      for (p, x), (a, b) in zip(leaves, sums)]
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


@jax.jit
def _param_sums_jit(xs):
    return [(jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32)))) for x in xs]


def _param_sums(xs):
    return [(float(a), float(b)) for a, b in _param_sums_jit(xs)]


# -- public functions ----------------------------------------------------------------------------


def logits_long(model, input_ids, window: int | None = None,
                last_context_length: int | None = None) -> jax.Array:
    """Logits [B, N, V] (float32) of every token of a long input, read window by window."""
    ids = model.check_ids(input_ids)
    return Session(model, ids.shape[0], window, last_context_length).feed(ids)


def logprobs_long(model, input_ids, window: int | None = None,
                  last_context_length: int | None = None) -> jax.Array:
    """log p(token t+1 | tokens <= t) [B, N-1] read like `logits_long`, without the [N, V] logits."""
    ids = np.asarray(model.check_ids(input_ids))
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    s = Session(model, ids.shape[0], window, last_context_length)
    return s.feed(ids, out="logprobs", targets=targets)[:, :-1]


def build_memory(model, input_ids, window: int | None = None,
                 last_context_length: int | None = None) -> Session:
    """Read a (long) document once; the session can be saved, loaded and questioned many times."""
    ids = model.check_ids(input_ids)
    s = Session(model, ids.shape[0], window, last_context_length)
    s.feed(ids, out="none")
    return s


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """Greedy at temperature 0, else nucleus (top-p) sampling. logits [B, V] -> ids [B]."""
    logits = np.asarray(logits, np.float64)
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.empty(p.shape[0], np.int64)
    for b in range(p.shape[0]):
        order = np.argsort(-p[b], kind="stable")
        cum = np.cumsum(p[b, order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]  # smallest set with mass >= top_p
        q = p[b, keep] / p[b, keep].sum()
        out[b] = keep[rng.choice(len(keep), p=q)]
    return out


def stream(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
           seed: int = 0, session: Session | None = None, stop_at_eos: bool = True,
           window: int | None = None, last_context_length: int | None = None) -> Iterator[np.ndarray]:
    """Yield generated ids [B] one step at a time. `session` (e.g. a loaded memory) is copied, not
    changed; the prompt is read after it. Rows that produced EOS then yield EOS."""
    if max_new_tokens < 0 or not 0 < top_p <= 1 or temperature < 0:
        raise ValueError(f"need max_new_tokens >= 0, 0 < top_p <= 1, temperature >= 0; got "
                         f"{max_new_tokens}, {top_p}, {temperature}")
    ids = model.check_ids(prompt_ids)
    s = session.copy() if session is not None else Session(model, ids.shape[0], window,
                                                           last_context_length)
    last = s.feed(ids, out="last")
    rng = np.random.default_rng(seed)
    eos = model.config.model.eos_token_id
    done = np.zeros(ids.shape[0], bool)
    for step in range(max_new_tokens):
        tok = np.where(done, eos, sample(np.asarray(last), temperature, top_p, rng))
        yield tok
        done |= stop_at_eos & (tok == eos)
        if done.all() or step == max_new_tokens - 1:
            return
        last = s.feed(tok[:, None], out="last")


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, **kw) -> np.ndarray:
    """Generated ids [B, n] (n <= max_new_tokens; fewer when every row reached EOS)."""
    toks = list(stream(model, prompt_ids, max_new_tokens, temperature, top_p, seed, **kw))
    b = model.check_ids(prompt_ids).shape[0]
    return np.stack(toks, axis=1) if toks else np.zeros((b, 0), np.int64)
