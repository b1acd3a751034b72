"""Device mesh and the ONE table that maps the model's logical axis names to mesh axes.

The model names the axes of its parameters (`out_sharding` metadata, e.g. ("embed", "q_heads"));
it never names devices. `LOGICAL_AXIS_RULES` below decides where every logical axis lives on the
mesh ("data", "fsdp", "tensor", "sequence"); parameters, optimizer state, batches and activations
are all sharded through it:

- data + fsdp split the batch rows (each device sees B / (data * fsdp) rows);
- fsdp also splits every parameter (and so every optimizer moment) along its `embed` axis; XLA
  all-gathers a layer's weights just before use (ZeRO-3 / FSDP);
- tensor splits attention heads, the MLP hidden axis and the vocabulary (Megatron-style);
- sequence splits the token axis of activations (for ring attention; 1 = off).

Everything here is checked before anything is compiled, and errors name the numbers.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fot.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")  # the mesh axes that split batch rows

# logical axis name -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters (names used by fot/model/llama.py)
    "layers": None,  # the stacked-layer axis: every device holds its share of every layer
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "lora_rank": None,  # LoRA A [in, rank] / B [rank, out]: in and out are named as in their kernel
    # activations and batches
    "batch": BATCH_AXES,
    "length": "sequence",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "head_dim": None,
}


class ShardingError(ValueError):
    """A mesh, batch or axis name that cannot work; the message names the numbers."""


# ------------------------------------------------------------------------------------------------
# Processes and mesh


def distributed_env() -> str | None:
    """Which multi-process launcher the environment shows, or None for a single process: a JAX
    coordinator (JAX_COORDINATOR_ADDRESS, with JAX_NUM_PROCESSES / JAX_PROCESS_ID), SLURM srun
    with several tasks, Open MPI mpirun with several ranks, or a multi-host TPU slice (several
    TPU_WORKER_HOSTNAMES, or MEGASCALE_COORDINATOR_ADDRESS for several slices)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1 or \
            env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU pod"
    return None


def initialize_distributed(mode: bool | str) -> str | None:
    """`jax.distributed.initialize` for mesh.distributed = True, or "auto" when `distributed_env`
    finds a launcher; must run before anything touches the devices. Returns what triggered it.
    jax reads the launcher's own variables (SLURM_*, OMPI_*, the TPU metadata); with a bare
    JAX_COORDINATOR_ADDRESS the process count and id come from JAX_NUM_PROCESSES/JAX_PROCESS_ID."""
    found = distributed_env()
    if mode is False or (mode == "auto" and found is None) or jax.distributed.is_initialized():
        return None
    kwargs = {}
    if found == "JAX_COORDINATOR_ADDRESS" and "JAX_NUM_PROCESSES" in os.environ:
        if "JAX_PROCESS_ID" not in os.environ:
            raise ShardingError("JAX_NUM_PROCESSES is set but JAX_PROCESS_ID is not: set this "
                                "process's id (0 .. JAX_NUM_PROCESSES-1) too")
        kwargs = {"num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
                  "process_id": int(os.environ["JAX_PROCESS_ID"])}
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise ShardingError(f"mesh.distributed={mode!r} ({found or 'no launcher found'}): "
                            f"jax.distributed.initialize failed: {e}") from None
    return found or "mesh.distributed=true"



def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """Axis sizes (data, fsdp, tensor, sequence) with the one -1 filled in from `n_devices`."""
    sizes = [getattr(mesh_cfg, a) for a in MESH_AXES]
    desc = " ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    bad = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
    if bad:
        raise ShardingError(f"{', '.join(bad)}: mesh sizes must be positive or -1")
    if sizes.count(-1) > 1:
        raise ShardingError(f"{desc}: at most one mesh axis may be -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise ShardingError(f"{desc}: the fixed axes (product {fixed}) do not divide the "
                                f"{n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // fixed
    elif fixed != n_devices:
        raise ShardingError(f"{desc}: the mesh has {fixed} devices but there are {n_devices}")
    return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes MESH_AXES, devices laid out by jax's topology-aware mesh_utils. The data
    axis is outermost: across several TPU slices (devices' `slice_index`) it spans the slices, and
    with GPU hosts (devices in process order) it spans the hosts, so only the data-parallel
    gradient reduction crosses the slow network while fsdp/tensor stay inside a slice or host."""
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if n_slices > 1:
        if shape[0] % n_slices:
            raise ShardingError(f"mesh.data={shape[0]} must be a multiple of the {n_slices} "
                                f"slices")
        per_slice = (shape[0] // n_slices,) + shape[1:]
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, (n_slices, 1, 1, 1), devices)
    else:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


# ------------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec / NamedSharding


def logical_to_mesh_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                         mesh: Mesh | None = None) -> P:
    """PartitionSpec for an array whose axes have these logical names (None = replicated).

    With `shape` and `mesh`, an axis whose size the mesh axes do not divide stays replicated
    (e.g. a 259-token byte vocabulary on tensor=2): jax cannot split it evenly, and a small axis
    gains nothing from being split. A mesh axis is used at most once per array.
    """
    if names is None:
        return P()
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in LOGICAL_AXIS_RULES:
            raise ShardingError(f"logical axis '{name}' is not in fot.sharding.LOGICAL_AXIS_RULES "
                                f"(known: {', '.join(LOGICAL_AXIS_RULES)})")
        axes = LOGICAL_AXIS_RULES[name]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used)
        if shape is not None and mesh is not None and shape[i] % _axis_size(mesh, axes):
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def param_shardings(module_or_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for every array of an NNX module or state (parameters, optimizer state,
    abstract `nnx.eval_shape` states too), with the same tree structure as `nnx.state(...)`.

    Logical names come from each Variable's sharding metadata (`out_sharding`); arrays without
    any (step counters, RNG keys) are replicated.
    """
    state = module_or_state
    if not isinstance(state, nnx.State):
        state = nnx.state(state)
    specs = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(tuple(spec), x.shape, mesh)),
        specs, state, is_leaf=_is_spec)


def shard_state(state: Any, mesh: Mesh) -> Any:
    """Place an NNX state on the mesh according to `param_shardings`."""
    return jax.device_put(state, param_shardings(state, mesh))


def abstract_state(state_fn: Callable[[], Any], mesh: Mesh) -> Any:
    """The state `state_fn()` would build, as ShapeDtypeStructs carrying their shardings: enough to
    lower and compile for a mesh (a dry run) without allocating anything."""
    abstract = nnx.eval_shape(state_fn)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, param_shardings(abstract, mesh))


def init_sharded(state_fn: Callable[[], Any], mesh: Mesh) -> Any:
    """Run `state_fn()` (e.g. `lambda: nnx.state(init_model(cfg))`) jitted with every array created
    directly in its shard: a model larger than one device's memory never exists whole."""
    shardings = param_shardings(nnx.eval_shape(state_fn), mesh)
    return jax.jit(state_fn, out_shardings=shardings)()


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None = None) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op without a mesh (neither
    given nor set with `jax.set_mesh`), so model code can call it unconditionally."""
    mesh = mesh or ambient_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_to_mesh_spec(names, x.shape, mesh)))


def ambient_mesh():
    """The mesh set with `jax.set_mesh`, unless absent, foreign, or inside a shard_map (where
    arrays are already per-device and constraints do not apply)."""
    m = jax.sharding.get_abstract_mesh()
    if m.empty or not set(MESH_AXES) <= set(m.axis_names) or m.manual_axes:
        return None
    return m


# ------------------------------------------------------------------------------------------------
# Batches


def batch_shards(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def validate_batch(batch_size: int, mesh: Mesh, cross_batch_range: int = 0,
                   name: str = "train.batch_size") -> None:
    """Errors, before any compile, for a batch the data axes cannot split (see CROSSBATCH LAYOUT
    for why each shard needs at least `cross_batch_range` rows). `name` says what the rows are."""
    n = batch_shards(mesh)
    if batch_size % n:
        raise ShardingError(
            f"{name}={batch_size} is not divisible by the data axes: mesh data="
            f"{mesh.shape['data']} x fsdp={mesh.shape['fsdp']} = {n} batch shards")
    if batch_size // n < cross_batch_range:
        raise ShardingError(
            f"{name}={batch_size} over {n} batch shards leaves {batch_size // n} rows "
            f"per shard, fewer than train.cross_batch_range={cross_batch_range}: crossbatch "
            f"reads its negatives only from the neighbouring shard")


def batch_sharding(mesh: Mesh, ndim: int = 2, micro: bool = False) -> NamedSharding:
    """Rows over (data, fsdp), tokens over sequence, anything further replicated. With `micro` the
    arrays are [micro-batches, rows, tokens, ...]: every micro-batch is split over all shards."""
    names = ((None,) if micro else ()) + ("batch", "length") + (None,) * ndim
    return NamedSharding(mesh, logical_to_mesh_spec(names[:ndim]))


def local_batch_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of the global batch this process must load (its devices' shards): with several
    hosts, each host reads only its share of the data."""
    validate_batch(batch_size, mesh)
    idx = batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,))
    spans = {(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
             for s in idx.values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise ShardingError(f"process {jax.process_index()} holds non-contiguous batch rows "
                            f"{sorted(spans)}")
    return slice(lo, hi)


def shard_batch(batch: Any, mesh: Mesh, micro: bool = False) -> Any:
    """Put a batch (a pytree of [B, T, ...] arrays, or [micro-batches, B, T, ...] with `micro`) on
    the mesh. Single process: the arrays are the global batch. Several processes: each passes only
    its `local_batch_rows` rows (of every micro-batch)."""
    multi = jax.process_count() > 1

    def put(x):
        x = np.asarray(x)
        s = batch_sharding(mesh, x.ndim, micro)
        if multi:
            return jax.make_array_from_process_local_data(s, x)
        validate_batch(x.shape[int(micro)], mesh)
        return jax.device_put(x, s)

    return jax.tree.map(put, batch)


def optimizer_shardings(tx: Any, abstract_opt_state: Any, param_shardings_tree: Any,
                        mesh: Mesh) -> Any:
    """NamedShardings for an optax state (`jax.eval_shape(tx.init, params)`): every per-parameter
    leaf (Adam's moments, ...) sharded like its parameter, the rest (step counts) replicated."""
    import optax

    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt_state, param_shardings_tree,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, NamedSharding)))


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collective_counts(hlo_text: str, scope: str | None = None) -> dict[str, int]:
    """How many of each collective a compiled HLO module (`compiled.as_text()`) contains, counting
    async start/done pairs once. Ops in a scanned layer's loop body count once, not per layer.
    With `scope`, only ops traced under `jax.named_scope(scope)` (forward or backward) count."""
    lines = hlo_text.splitlines()
    if scope is not None:
        lines = [ln for ln in lines if re.search(rf'op_name="[^"]*\b{re.escape(scope)}\b', ln)]
    text = "\n".join(lines)
    return {op: len(re.findall(rf" {op}(?:-start)?\(", text)) for op in COLLECTIVES}


# ------------------------------------------------------------------------------------------------
# CROSSBATCH LAYOUT (decided here).
#
# In a memory layer, row b of the batch attends to the keys/values of rows b-1 ... b-R (R =
# train.cross_batch_range; rows of its own pack are positives, rows of the previous pack
# negatives). Batch rows are split over (data, fsdp) in contiguous blocks, so row b-r lives on the
# same device except for the first r rows of each shard, whose context is the last rows of the
# previous shard.
#
# Decision: keep exactly the single-device semantics and fetch that halo with ONE collective
# permute per memory layer (the last R rows of each shard's keys and values go to the next shard;
# the first shard gets zeros, which the crossbatch mask hides because b - r < 0 there). The
# backward pass sends the gradient back the same way: one more collective permute. No all-gather
# of keys/values across batch shards ever happens, the communicated volume is R rows per shard
# per memory layer (independent of the number of shards), and losses on any mesh equal the
# 1-device losses. Rolling within a shard instead (the first pack of a shard taking the last pack
# of the same shard as negatives) would save that one permute, but would make the negatives, and
# so the loss, depend on the mesh shape; the permute is small next to a layer's FSDP weight
# gathers, so it is not worth it.
#
# How: the crossbatch code calls `previous_rows((k, v), R)` while the trainer has set the mesh
# (`with jax.set_mesh(mesh):`); with kv heads split over tensor each device sends only its heads.
# A small memory layer (read unrolled) whose rows all read rows of their own pack, each shard
# holding whole packs, needs no halo and sends none (`crossbatch.reads_previous_shard`).
#
# With mesh.sequence > 1 the window's tokens are split too: the local attention runs as ring
# attention (fot/model/ring.py), and each query reads the whole windows of its context rows, so
# the memory layer all-gathers their keys and values over `sequence` (2 all-gathers per memory
# layer, the price of splitting tokens that every query of the next rows reads).
#
# Requirement (checked by `validate_batch`): each shard holds at least R rows, so the halo comes
# from the immediate neighbour. Whole packs per shard are NOT required for correctness; they are
# what a per-host data loader naturally produces when batch_size / (data*fsdp) is a multiple of k.


def previous_rows(x: Any, num: int, mesh: Mesh | None = None) -> Any:
    """[B, ...] -> [B, num, ...] with out[b, r-1] = x[b - r] (zeros where b - r < 0), for an array
    or a pytree of arrays of one shape and dtype (pass keys and values together: one permute).

    On a mesh whose batch axes are split (given, or set with `jax.set_mesh`), this is computed
    shard-locally plus one collective permute of `num` rows (see CROSSBATCH LAYOUT); otherwise by
    padding. Same values either way.
    """
    mesh = mesh or ambient_mesh()
    n = 1 if mesh is None else batch_shards(mesh)
    if n == 1 or num == 0:
        return jax.tree.map(lambda a: _stack_previous(jnp.zeros((num,) + a.shape[1:], a.dtype), a,
                                                      num), x)
    leaves, treedef = jax.tree.flatten(x)
    if len({(a.shape, a.dtype) for a in leaves}) != 1:
        raise ShardingError(f"previous_rows: the arrays must share shape and dtype, got "
                            f"{[(a.shape, str(a.dtype)) for a in leaves]}")
    rows = leaves[0].shape[0]
    if rows % n or rows // n < num:
        raise ShardingError(f"previous_rows: {rows} batch rows over {n} batch shards must divide "
                            f"evenly and leave at least num={num} rows per shard")

    def local(*xs):
        # shard i sends the last `num` rows of all arrays, stacked into one buffer along a new last
        # axis (no resharding of other axes), to shard i+1; shard 0 receives zeros
        tails = jnp.stack([a[-num:] for a in xs], axis=-1)
        halo = jax.lax.ppermute(tails, BATCH_AXES, [(i, i + 1) for i in range(n - 1)])
        return [_stack_previous(halo[..., j], a, num) for j, a in enumerate(xs)]

    out = jax.shard_map(local, mesh=mesh, in_specs=P(BATCH_AXES), out_specs=P(BATCH_AXES),
                        axis_names=set(BATCH_AXES))(*leaves)
    return jax.tree.unflatten(treedef, out)


def _stack_previous(halo: jax.Array, x: jax.Array, num: int) -> jax.Array:
    n = x.shape[0]
    if num == 0:
        return jnp.zeros((n, 0) + x.shape[1:], x.dtype)
    ext = jnp.concatenate([halo, x], axis=0)
    return jnp.stack([ext[num - r:num - r + n] for r in range(1, num + 1)], axis=1)
