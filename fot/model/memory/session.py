"""The inference source of a memory layer: what a `fot.inference.Session` window reads (the
memory store's retrieval) and what it writes afterwards (its memory-layer keys "as if first")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fot.config import RetrievalConfig
from fot.model.llama import KV, Llama
from fot.model.memory import store
from fot.model.memory.keys import as_if_first, gate_of


def session_memory(module: Llama, retrieval: RetrievalConfig | None, mem: store.MemoryState, index):
    """A `memory` callback for `Llama.run_layers`: each memory layer reads the store (never the
    window itself: the window is written after its attention). None (no memory read) when
    `retrieval` is None: a model without memory layers or a session without memory."""
    if retrieval is None:
        return None

    def fn(slot, q, k_new, v_new, local=None):  # local: only crossbatch takes it
        return [store.retrieve(retrieval, q, mem, slot, index)], gate_of(module, slot)

    return fn


def to_memory(module: Llama, ctx, kv: KV) -> tuple[jax.Array, jax.Array]:
    """The memory layers' keys as if first and values [M, B, S, K, D]: what the store receives."""
    idx = jnp.asarray(module.mem.layers)
    return as_if_first(module, ctx, kv.k[idx]), kv.v[idx]
