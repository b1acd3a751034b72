"""Ring attention (Liu et al., "Ring Attention with Blockwise Transformers"): causal attention over a
sequence sharded along one mesh axis.

Each of the n devices holds one contiguous block of queries, keys and values. For n steps it attends
its queries to the key/value block it currently holds (blockwise, masked by global positions) and
passes that block to the next device with `ppermute`; the partial softmaxes are merged online, so no
device ever holds more than one remote block and no T x T scores exist anywhere. Blocks entirely in
a device's future are skipped inside `blockwise_partial`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fot.model.attention import combine
from fot.model.blockwise import blockwise_partial, merge


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, mesh: Mesh, axis: str = "sequence",
                   block_size: int = 512) -> jax.Array:
    """Causal attention, normalised: q [B, T, H, D], k/v [B, T, K, D] -> [B, T, H, D].

    T must be divisible by the size of mesh axis `axis`; token i sits at position i.
    """
    n = mesh.shape[axis]
    if q.shape[1] % n:
        raise ValueError(f"ring_attention: sequence length {q.shape[1]} is not divisible by the "
                         f"{n} devices of mesh axis {axis!r}")
    spec = P(None, axis, None, None)
    perm = [(i, (i + 1) % n) for i in range(n)]

    def local(q, k, v):
        b, t = q.shape[:2]
        me = jax.lax.axis_index(axis)
        offsets = jnp.arange(t, dtype=jnp.int32)
        q_pos = jnp.broadcast_to(me * t + offsets, (b, t))

        def attend(k, v, src):
            k_pos = jnp.broadcast_to(src * t + offsets, (b, t))
            return blockwise_partial(q, k, v, q_pos, k_pos, None, block_size=block_size)

        def step(carry, j):
            acc, k, v = carry
            k, v = jax.lax.ppermute(k, axis, perm), jax.lax.ppermute(v, axis, perm)
            # After j hops this device holds the block that started on device me - j.
            acc = merge(acc, attend(k, v, (me - j) % n))
            return (acc, k, v), None

        acc = attend(k, v, me)
        (acc, _, _), _ = jax.lax.scan(step, (acc, k, v), jnp.arange(1, n, dtype=jnp.int32))
        return combine([acc], q.dtype)

    if dict(zip(mesh.axis_names, mesh.axis_types))[axis] == AxisType.Explicit:
        # Explicit meshes do not reshard implicitly: place the inputs on the ring first.
        q, k, v = (jax.sharding.reshard(x, NamedSharding(mesh, spec)) for x in (q, k, v))
    # check_vma off: blockwise_partial's scan carries start as replicated constants.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)
