"""Rotary position embeddings in Hugging Face's half-split layout, and the RoPE-scaling baselines.

`rope_frequencies(cfg, seq_len)` returns (inv_freq [head_dim/2], attention_factor), matching
transformers' `ROPE_INIT_FUNCTIONS` (float32 where transformers computes in float32, Python floats
where it uses Python floats). The attention factor multiplies cos and sin.

Types: default, linear (Position Interpolation), ntk (static NTK-aware: base * s^(d/(d-2))),
dynamic (dynamic NTK; the base grows with the current length like transformers' dynamic update),
yarn, llama3, longrope. The dict may be Hugging Face's old `rope_scaling` or new `rope_parameters`
style (`rope_type` or `type`; a `rope_theta` inside it overrides model.rope_theta).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from fot.model.rope_scaling import rope_type

def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    # float32 like transformers: exponents in float32, base rounded to float32.
    return (1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(
        np.float32)


def _yarn(scaling: dict[str, Any], base: float, dim: int, max_pos: int) -> tuple[np.ndarray, float]:
    factor = float(scaling["factor"])
    original = scaling.get("original_max_position_embeddings") or max_pos

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero, as transformers does
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(scaling: dict[str, Any], base: float, dim: int, max_pos: int) -> np.ndarray:
    inv_freq = _default_inv_freq(base, dim)
    factor = np.float32(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = scaling.get("original_max_position_embeddings") or max_pos
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    # Between the two wavelengths: interpolate smoothly between scaled and unscaled.
    smooth = ((np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _longrope(scaling: dict[str, Any], base: float, dim: int, max_pos: int,
              seq_len: int | None) -> tuple[np.ndarray, float]:
    original = scaling.get("original_max_position_embeddings") or max_pos
    factor = scaling.get("factor")
    if factor is None:
        factor = max_pos / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    # transformers switches to the long factors once max(position) + 1 exceeds the original length.
    ext = scaling["long_factor"] if seq_len and seq_len > original else scaling["short_factor"]
    ext = np.asarray(ext, np.float32)
    shape = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (1.0 / (ext * np.float32(base) ** shape)).astype(np.float32), float(attention_factor)


def rope_frequencies(cfg, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies and attention factor for `cfg` (a ModelConfig).

    seq_len is the current length, max(position) + 1 (None: at most max_position_embeddings); only
    `dynamic` and `longrope` depend on it.
    """
    dim = cfg.dim_per_head
    scaling = cfg.rope_scaling or {}
    kind = rope_type(scaling)
    base = float(scaling.get("rope_theta") or cfg.rope_theta)
    max_pos = cfg.max_position_embeddings
    if kind == "default":
        return _default_inv_freq(base, dim), 1.0
    if kind == "linear":
        return _default_inv_freq(base, dim) / np.float32(scaling["factor"]), 1.0
    if kind == "ntk":
        return _default_inv_freq(base * float(scaling["factor"]) ** (dim / (dim - 2)), dim), 1.0
    if kind == "dynamic":
        # As transformers: below max_position_embeddings the base is unchanged.
        factor = float(scaling["factor"])
        length = max(seq_len or max_pos, max_pos)
        scaled = base * (factor * length / max_pos - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(scaled, dim), 1.0
    if kind == "yarn":
        return _yarn(scaling, base, dim, max_pos)
    if kind == "llama3":
        return _llama3(scaling, base, dim, max_pos), 1.0
    if kind == "longrope":
        return _longrope(scaling, base, dim, max_pos, seq_len)
    raise ValueError(f"model.rope_scaling.rope_type = {kind!r} is not supported")


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
