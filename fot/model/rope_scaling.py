"""The `model.rope_scaling` dict: the keys each RoPE type reads and their validation (no JAX here:
the config checks it on load; fot/model/rope.py computes the frequencies)."""

from __future__ import annotations

from typing import Any

# Keys each type reads; `required` must be present (original_max_position_embeddings defaults to
# model.max_position_embeddings, as transformers' standardize_rope_params does).
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "ntk": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor"),
}
_OPTIONAL = {
    "default": (),
    "linear": (),
    "ntk": (),
    "dynamic": (),
    "yarn": ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
    "llama3": ("original_max_position_embeddings",),
    "longrope": ("original_max_position_embeddings", "attention_factor", "factor"),
}
_COMMON = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def validate_rope_scaling(scaling: dict[str, Any], head_dim: int, where: str) -> None:
    """ValueError naming the key if `scaling` is not a rope_scaling dict of a known type (the config
    raises it as its ConfigError)."""

    def fail(key: str, msg: str):
        raise ValueError(f"{where}: model.rope_scaling.{key} {msg}")

    if not isinstance(scaling, dict):
        raise ValueError(f"{where}: model.rope_scaling must be a mapping, got {type(scaling).__name__}")
    kind = rope_type(scaling)
    key = "rope_type" if "rope_type" in scaling else "type"
    if kind not in _REQUIRED:
        fail(key, f"= {kind!r} is not one of {sorted(_REQUIRED)}")
    if "rope_type" in scaling and "type" in scaling and scaling["rope_type"] != scaling["type"]:
        fail("type", f"= {scaling['type']!r} contradicts rope_type = {scaling['rope_type']!r}")
    for k in scaling:
        if k not in _REQUIRED[kind] + _OPTIONAL[kind] + _COMMON:
            known = sorted(_REQUIRED[kind] + _OPTIONAL[kind])
            fail(k, f"is not a key of rope type {kind!r} (known: {known})")
    for k in _REQUIRED[kind]:
        if scaling.get(k) is None:
            fail(k, f"is required for rope type {kind!r}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        fail("partial_rotary_factor", "must be 1.0 (LLaMA rotates the whole head)")

    def number(k: str) -> float | None:
        v = scaling.get(k)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            fail(k, f"must be a number, got {v!r}")
        return float(v)

    factor = number("factor")
    if factor is not None and factor < 1:
        fail("factor", f"must be >= 1, got {factor}")
    for k in ("rope_theta", "attention_factor", "original_max_position_embeddings"):
        v = number(k)
        if v is not None and v <= 0:
            fail(k, f"must be positive, got {v}")
    for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        number(k)
    if "truncate" in scaling and not isinstance(scaling["truncate"], bool):
        fail("truncate", f"must be true or false, got {scaling['truncate']!r}")
    if kind == "llama3" and number("high_freq_factor") <= number("low_freq_factor"):
        fail("high_freq_factor", f"must be > low_freq_factor, got {scaling['high_freq_factor']} <= "
                                 f"{scaling['low_freq_factor']}")
    for k in ("short_factor", "long_factor"):
        if k in scaling:
            v = scaling[k]
            if not isinstance(v, (list, tuple)) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v):
                fail(k, "must be a list of positive numbers")
            if len(v) != head_dim // 2:
                fail(k, f"must have head_dim/2 = {head_dim // 2} entries, got {len(v)}")
