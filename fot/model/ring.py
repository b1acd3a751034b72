"""Ring attention (Liu et al., "Ring Attention with Blockwise Transformers"): the local causal
attention of a training window whose tokens are split over the `sequence` mesh axis.

Each of the n devices of the axis holds one contiguous block of the window's queries, keys and
values (with their positions, validity and document ids). For n steps it attends its queries to
the key block it currently holds (blockwise, masked by the keys' own positions and documents) and
passes that block on with `ppermute`; the partial softmaxes merge online, so no device holds more
than one remote block and no T x T scores exist anywhere. Blocks entirely in a device's future are
skipped inside `blockwise_partial`. The result is a `Partial`, so memory and crossbatch sources
join it in the same softmax (`partials.combine`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fot import sharding
from fot.model.blockwise import blockwise_partial
from fot.model.partials import Partial, merge

AXIS = "sequence"


def sequence_shards() -> int:
    """Devices on the `sequence` axis of the mesh set with `jax.set_mesh` (1 without one)."""
    mesh = sharding.ambient_mesh()
    return 1 if mesh is None else mesh.shape[AXIS]


def ring_partial(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                 k_valid: jax.Array | None = None, *, block_size: int = 512,
                 q_seg: jax.Array | None = None, k_seg: jax.Array | None = None) -> Partial:
    """Same Partial as blockwise_partial (q [B, T, H, D], k/v [B, T, K, D], positions, validity and
    segments [B, T]) with T split over the ambient mesh's `sequence` axis."""
    mesh = sharding.ambient_mesh()
    n = mesh.shape[AXIS]
    b, t = q.shape[:2]
    if t % n or k.shape[1] != t:
        raise ValueError(f"ring attention: the window of {t} tokens (keys: {k.shape[1]}) does not "
                         f"split over mesh.sequence={n}")
    if k_valid is None:
        k_valid = jnp.ones((b, t), bool)
    if q_seg is None:
        q_seg, k_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, t), jnp.int32)
    # Heads split over tensor only when the kv heads divide too: GQA groups stay whole.
    split = sharding.logical_to_mesh_spec(("act_kv_heads",), k.shape[2:3], mesh)[0] is not None
    heads, kv_heads = ("act_heads", "act_kv_heads") if split else (None, None)
    spec = lambda *names, shape: sharding.logical_to_mesh_spec(names, shape, mesh)  # noqa: E731
    q_spec = spec("batch", "length", heads, None, shape=q.shape)
    kv_spec = spec("batch", "length", kv_heads, None, shape=k.shape)
    stat_spec = spec("batch", "length", heads, shape=q.shape[:3])  # m and l
    tok_spec = spec("batch", "length", shape=(b, t))
    perm = [(i, (i + 1) % n) for i in range(n)]

    def local(q, q_pos, q_seg, keys):
        attend = lambda keys: blockwise_partial(q, keys[0], keys[1], q_pos, keys[2], keys[3],  # noqa: E731
                                                block_size=block_size, q_seg=q_seg, k_seg=keys[4])

        def step(carry, _):
            acc, keys = carry
            keys = jax.lax.ppermute(keys, AXIS, perm)
            return (merge(acc, attend(keys)), keys), None

        (acc, _), _ = jax.lax.scan(step, (attend(keys), keys), None, length=n - 1)
        return acc

    keys = (k, v, k_pos, k_valid, k_seg)
    key_specs = (kv_spec, kv_spec, tok_spec, tok_spec, tok_spec)
    # check_vma off: blockwise_partial's scan carries start as replicated constants.
    ring = jax.shard_map(local, in_specs=(q_spec, tok_spec, tok_spec, key_specs),
                         out_specs=Partial(q_spec, stat_spec, stat_spec), check_vma=False)
    return ring(q, q_pos, q_seg, keys)
