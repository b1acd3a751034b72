"""Rotary position embeddings in Hugging Face's half-split layout, and the RoPE-scaling baselines.

`rope_frequencies(cfg, seq_len)` returns (inv_freq [head_dim/2], attention_factor), matching
transformers' `ROPE_INIT_FUNCTIONS`. The attention factor multiplies cos and sin.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))


def rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def validate_rope_scaling(scaling: dict[str, Any], head_dim: int, where: str) -> None:
    from fot.config import ConfigError

    kind = rope_type(scaling)
    if kind not in ("default", "linear"):
        raise ConfigError(f"{where}: model.rope_scaling.rope_type = {kind!r} is not supported")
    if kind == "linear" and float(scaling.get("factor", 0)) < 1:
        raise ConfigError(f"{where}: model.rope_scaling.factor must be >= 1")


def rope_frequencies(cfg, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies and attention factor for `cfg` (a ModelConfig) at sequence length seq_len."""
    dim = cfg.dim_per_head
    inv_freq = _default_inv_freq(cfg.rope_theta, dim)
    scaling = cfg.rope_scaling
    kind = rope_type(scaling)
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    return inv_freq, 1.0


def rope_tables(inv_freq: np.ndarray, attention_factor: float, positions: jnp.ndarray,
                dtype=jnp.float32) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape positions.shape + [head_dim], in the half-split layout."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * attention_factor).astype(dtype), (jnp.sin(emb) * attention_factor).astype(dtype)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, heads, D]; cos/sin: [B, T, D] (or broadcastable)."""
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin
