"""What both memory sources (crossbatch in training, the session at inference) share: keys
encoded "as if first" in their context and the optional gate."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fot.model import rope


def as_if_first(module, ctx, k: jax.Array) -> jax.Array:
    """Keys [..., B, S, K, D] rotated at position 0 (scaled by RoPE's attention factor) when
    memory.positionals, else as they are (no RoPE in memory layers)."""
    if not module.mem.positionals:
        return k
    zeros = jnp.zeros(k.shape[-4:-2], jnp.int32)
    return rope.apply_rope(k, *rope.rope_tables(ctx.inv_freq, ctx.attention_factor, zeros))


def gate_of(module, slot: int) -> jax.Array | None:
    """Memory layer `slot`'s Memorizing-Transformer gate logits [H], or None without the gate."""
    return module.mem_gate[...][slot] if module.mem.gate else None
