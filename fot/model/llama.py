"""The LLaMA / OpenLLaMA decoder in Flax NNX, with hooks for FoT memory layers.

Parameter names mirror Hugging Face's `LlamaForCausalLM` so the weight mapping is a plain table
(fot/convert.py). Layers are stacked along a leading `layers` axis and run with `jax.lax.scan` over
the functional state (split/merge), one scan per run of consecutive layers of the same kind; memory
layers, which call out to a memory source, run one by one between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from fot import sharding
from fot.config import MemoryConfig, ModelConfig
from fot.model import attention, partials, ring, rope
from fot.model.lora import LoRAProjection

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The name of every projection's output (`_project`): the dot policies do not see products under a
# custom VJP, so they keep these by name.
PROJECTION = "projection"
_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    "full": _policies.nothing_saveable,
    "dots": _policies.save_from_both_policies(_policies.checkpoint_dots,
                                              _policies.save_only_these_names(PROJECTION)),
    "dots_no_batch": _policies.save_from_both_policies(_policies.checkpoint_dots_with_no_batch_dims,
                                                       _policies.save_only_these_names(PROJECTION)),
}


# What a memory source names so (jax.ad_checkpoint.checkpoint_name) is kept under remat instead of
# recomputed: the crossbatch halo, whose recomputation would be one more collective per layer.
MEMORY_FETCH = "memory_fetch"


def _init(std: float, axes: tuple[str | None, ...]):
    # Logical axis names only; fot/sharding.py maps them to a mesh when there is one.
    return nnx.with_partitioning(nnx.initializers.normal(std), axes, eager_sharding=False)


class KV(NamedTuple):
    """Unrotated keys and values of some tokens: [B, S, K, D] each (stacked: [L, B, S, K, D])."""

    k: jax.Array
    v: jax.Array


@dataclass(frozen=True)
class LocalContext:
    """What every layer needs about the local window of one call.

    q_pos: [B, T] positions of the queries (RoPE and causal mask); k_pos / k_valid: [B, S] for the
    keys the layer sees locally, which are the `past` keys (if any) followed by the T new ones.
    segments: [B, T] document ids of a packed training window (no past), or None: a token then sees
    only its own document's tokens, locally and in crossbatch positives (train.document_mask).
    """

    q_pos: jax.Array
    k_pos: jax.Array
    k_valid: jax.Array | None
    inv_freq: jax.Array
    attention_factor: float
    impl: str
    block_size: int
    segments: jax.Array | None = None
    s2_group: int = 0  # impl "s2": LongLoRA's group size
    # The memory source takes the local window into its own pass (crossbatch in training, plain
    # attention, no gate): a memory layer then attends through the memory's partials alone.
    local_in_memory: bool = False
    # The keys are the queries' own tokens at increasing positions, no past (training windows):
    # plain attention skips the keys after each block of queries (attention.local_partial).
    by_index: bool = False


# A memory source: (memory-layer slot, rotated queries, new unrotated keys, new values, and with
# ctx.local_in_memory the local window as (rotated keys, values, causal mask), else None)
#   -> (extra partials, which then include the local window, optional gate logits [H]).
MemoryFn = Callable[[int, jax.Array, jax.Array, jax.Array, tuple | None],
                    tuple[list[partials.Partial], jax.Array | None]]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, cfg: ModelConfig):
        self.eps = eps
        self.dtype = DTYPES[cfg.dtype]
        self.weight = nnx.Param(jnp.ones((dim,), DTYPES[cfg.param_dtype]), out_sharding=("embed",),
                               eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        # As Hugging Face: normalise in float32, cast back, then scale.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * xf.astype(self.dtype)


@jax.custom_vjp
def _project(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.einsum("...e,ef->...f", x, kernel)


def _project_bwd(res, dy):
    # The kernel's gradient as [E, F] = x^T dy over all leading axes: XLA:CPU then reads the big
    # [tokens, F] cotangents as they are. Autodiff's orientation made it write the MLP's transposed,
    # ~15% of a step (docs/performance.md).
    x, kernel = res
    return jnp.einsum("...f,ef->...e", dy, kernel), jnp.einsum("...e,...f->ef", x, dy)


_project.defvjp(lambda x, kernel: (_project(x, kernel), (x, kernel)), _project_bwd)


def _dot_general(x, kernel, dimension_numbers, precision=None, **kw):
    """nnx.Linear's product (x's last axis with the kernel's first) through `_project`."""
    if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or precision is not None or any(kw.values()):
        raise ValueError(f"a projection of {x.shape} by {kernel.shape} as {dimension_numbers}, {kw}")
    return checkpoint_name(_project(x, kernel), PROJECTION)


def _linear(cfg: ModelConfig, n_in: int, n_out: int, axes, rngs: nnx.Rngs, target: str | None = None):
    """A bias-free projection; with LoRA on `target` (model.lora.targets), an adapted one."""
    kw = dict(use_bias=False, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
              kernel_init=_init(cfg.initializer_range, axes), dot_general=_dot_general, rngs=rngs)
    if cfg.lora.rank and target in cfg.lora.targets:
        return LoRAProjection(n_in, n_out, cfg.lora, axes, **kw)
    return nnx.Linear(n_in, n_out, **kw)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, h, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head
        self.heads, self.kv_heads, self.head_dim = h, k, d
        self.q_proj = _linear(cfg, e, h * d, ("embed", "q_heads"), rngs, "q")
        self.k_proj = _linear(cfg, e, k * d, ("embed", "kv_heads"), rngs, "k")
        self.v_proj = _linear(cfg, e, k * d, ("embed", "kv_heads"), rngs, "v")
        self.o_proj = _linear(cfg, h * d, e, ("q_heads", "embed"), rngs, "o")

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        return q, k, v


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(cfg, e, f, ("embed", "mlp"), rngs, "gate")
        self.up_proj = _linear(cfg, e, f, ("embed", "mlp"), rngs, "up")
        self.down_proj = _linear(cfg, f, e, ("mlp", "embed"), rngs, "down")

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array, ctx: LocalContext, past: KV | None = None, *,
                 use_rope: bool = True, memory: Callable | None = None,
                 rotated_cache: bool = False) -> tuple[jax.Array, KV]:
        """One decoder layer. Returns the new hidden states and this call's keys/values in the form
        `past` holds them: unrotated, or with `rotated_cache` (a cache no memory reads; no `memory`)
        rotated at their positions, so that a decoding step rotates its new keys only."""
        x = sharding.constrain(x, ("batch", "length", "act_embed"))  # no-op without a mesh
        q, k_new, v_new = self.self_attn.project(self.input_layernorm(x))
        tables = lambda pos: rope.rope_tables(ctx.inv_freq, ctx.attention_factor, pos)  # noqa: E731
        k_out = k_new
        if use_rope and rotated_cache:  # the new keys are the last of the local keys
            k_out = rope.apply_rope(k_new, *tables(ctx.k_pos[:, -k_new.shape[1]:]))
        k, v = k_out, v_new
        if past is not None:
            k = jnp.concatenate([past.k.astype(k.dtype), k], axis=1)
            v = jnp.concatenate([past.v.astype(v.dtype), v], axis=1)
        if use_rope:
            q = rope.apply_rope(q, *tables(ctx.q_pos))
            if not rotated_cache:
                k = rope.apply_rope(k, *tables(ctx.k_pos))
        local = None
        if memory is not None and ctx.local_in_memory:
            local = (k, v, partials.causal_mask(ctx.q_pos, ctx.k_pos, ctx.k_valid, ctx.segments, ctx.segments))
        extra, gate = memory(q, k_new, v_new, local) if memory is not None else ((), None)
        if local is not None:
            out = partials.combine(list(extra), q.dtype)
        else:
            out = attention.attend(q, k, v, ctx.q_pos, ctx.k_pos, ctx.k_valid, extra=list(extra),
                                   gate=gate, impl=ctx.impl, block_size=ctx.block_size,
                                   q_seg=ctx.segments, k_seg=ctx.segments, s2_group=ctx.s2_group,
                                   by_index=ctx.by_index)
        b, t = x.shape[:2]
        x = x + self.self_attn.o_proj(out.reshape(b, t, -1))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return sharding.constrain(x, ("batch", "length", "act_embed")), KV(k_out, v_new)


class Llama(nnx.Module):
    """Decoder-only LLaMA. `memory` config decides which layers are FoT memory layers."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig | None = None, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.mem = mem or MemoryConfig()
        pd = DTYPES[cfg.param_dtype]
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=DTYPES[cfg.dtype], param_dtype=pd,
            embedding_init=_init(cfg.initializer_range, ("vocab", "embed")), rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r: nnx.Rngs) -> Block:
            return Block(cfg, r)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.lm_head = None if cfg.tie_word_embeddings else _linear(
            cfg, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs)
        if self.mem.gate and self.mem.layers:
            self.mem_gate = nnx.Param(jnp.zeros((len(self.mem.layers), cfg.num_attention_heads), pd))

    # -- pieces -------------------------------------------------------------------------------

    def segments(self, with_memory: bool) -> list[tuple[int, int, int | None]]:
        """Runs of layers as (start, stop, memory slot or None); memory layers stand alone when
        they behave differently from plain ones (a memory source is given, or no RoPE)."""
        special = {i: s for s, i in enumerate(self.mem.layers)} if (
            with_memory or not self.mem.positionals) else {}
        segs, start = [], 0
        for i in range(self.cfg.num_hidden_layers + 1):
            if i == self.cfg.num_hidden_layers or i in special:
                if i > start:
                    segs.append((start, i, None))
                if i in special:
                    segs.append((i, i + 1, special[i]))
                start = i + 1
        return segs

    def cache_rotated(self, with_memory: bool) -> list[bool]:
        """Per layer: whether a local cache (`run_layers`' past) holds its keys rotated, i.e. the
        layer is in a run of plain layers; a memory layer standing alone keeps them unrotated."""
        return [slot is None for start, stop, slot in self.segments(with_memory) for _ in range(start, stop)]

    def context(self, q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array | None,
                rope_len: int | None = None, segments: jax.Array | None = None,
                training: bool = False) -> LocalContext:
        """`training`: the training step's windows, where model.attention='s2' applies (LongLoRA
        trains with S2-Attn and infers with full attention: everywhere else it is 'auto'), and
        where plain or blockwise attention becomes ring attention when the mesh splits the tokens
        (mesh.sequence > 1)."""
        s = k_pos.shape[1]
        inv_freq, af = rope.rope_frequencies(self.cfg, rope_len or s)
        impl = self.cfg.attention
        if impl == "auto" or impl == "s2" and not training:
            # By the scores' size: a window of more than blockwise_threshold tokens, but not a
            # decoding step's few queries over a long cache (one dense row is cheaper than a block loop).
            impl = "blockwise" if q_pos.shape[1] * s > self.cfg.blockwise_threshold ** 2 else "plain"
        if training and impl in ("plain", "blockwise") and ring.sequence_shards() > 1:
            impl = "ring"
        return LocalContext(q_pos, k_pos, k_valid, jnp.asarray(inv_freq), af, impl,
                            self.cfg.attention_block_size, segments, self.cfg.s2_group_size or 0)

    def embed(self, ids: jax.Array) -> jax.Array:
        # On a mesh: gather the sharded table whole first, like any FSDP weight (a lookup into a
        # vocab-sharded table makes XLA replicate the looked-up activations instead).
        table = sharding.constrain(self.embed_tokens.embedding[...], (None, None))
        x = jnp.take(table, ids, axis=0).astype(DTYPES[self.cfg.dtype])
        return sharding.constrain(x, ("batch", "length", "act_embed"))

    def head_weight(self) -> jax.Array:
        """The head's [E, V] matrix in the compute dtype (the embedding's transpose when tied)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].astype(DTYPES[self.cfg.dtype]).T
        return self.lm_head.kernel[...].astype(DTYPES[self.cfg.dtype])

    def head(self, x: jax.Array) -> jax.Array:
        """Float32 logits of the final hidden states (rounded to the compute dtype first)."""
        return _project(self.norm(x), self.head_weight()).astype(jnp.float32)

    def run_layers(self, x: jax.Array, ctx: LocalContext, past: KV | None = None,
                   memory: MemoryFn | None = None, collect_kv: bool = False, rotated_cache: bool = False
                   ) -> tuple[jax.Array, KV | None]:
        """All decoder layers. past: stacked [L, B, P, K, D] local cache or None.

        Returns hidden states and, if collect_kv, this call's keys/values per layer [L, ...]. Keys
        are unrotated; with `rotated_cache` (`past`, if given, holds them so) the runs of plain
        layers' are rotated at their positions (`cache_rotated`).
        """
        # Each layer casts its kernels to the compute dtype at use. Cast here, before the runs take
        # their slices, XLA held a compute-dtype copy of every frozen kernel through the step: LoRA
        # at the 3B shape on one device planned 14.4 GiB of temporaries instead of 1.7 (docs/scaling.md).
        graphdef, state = nnx.split(self.layers)
        policy = REMAT_POLICIES.get(self.cfg.remat_policy)
        kvs = []

        def run_one(layer_state, h, p, use_rope=True, mem_fn=None, rotated=False):
            block = nnx.merge(graphdef, layer_state)
            return block(h, ctx, p, use_rope=use_rope, memory=mem_fn, rotated_cache=rotated)

        for start, stop, slot in self.segments(memory is not None):
            seg_state = jax.tree.map(lambda a: a[start:stop], state)
            seg_past = None if past is None else jax.tree.map(lambda a: a[start:stop], past)
            if slot is not None:
                one = jax.tree.map(lambda a: a[0], seg_state)
                p = None if seg_past is None else jax.tree.map(lambda a: a[0], seg_past)
                mem_fn = None if memory is None else (lambda q, k, v, loc, s=slot: memory(s, q, k, v, loc))
                layer = lambda ls, h, lp, fn=mem_fn: run_one(ls, h, lp, self.mem.positionals, fn)
                if policy is not None:  # the memory layers are rematerialised like the others
                    keep = jax.checkpoint_policies.save_only_these_names(MEMORY_FETCH)
                    layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.save_from_both_policies(
                        policy, keep), prevent_cse=False)
                x, kv = layer(one, x, p)
                kvs.append(jax.tree.map(lambda a: a[None], kv))
                continue

            def body(h, xs):
                layer_state, p = xs
                h, kv = run_one(layer_state, h, p, rotated=rotated_cache)
                return h, (kv if collect_kv else None)

            if policy is not None:
                body = jax.checkpoint(body, policy=policy, prevent_cse=False)
            if self.cfg.scan_layers:
                x, seg_kv = jax.lax.scan(body, x, (seg_state, seg_past))
            else:
                outs = []
                for i in range(stop - start):
                    xs = jax.tree.map(lambda a: a[i], (seg_state, seg_past))
                    x, kv = body(x, xs)
                    outs.append(kv)
                seg_kv = None if not collect_kv else jax.tree.map(lambda *a: jnp.stack(a), *outs)
            kvs.append(seg_kv)
        if not collect_kv:
            return x, None
        return x, jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *kvs)

    def __call__(self, ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Full causal forward: logits [B, T, V] (float32)."""
        b, t = ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        ctx = self.context(positions, positions, None)
        x, _ = self.run_layers(self.embed(ids), ctx)
        return self.head(x)


def init_model(cfg: ModelConfig, mem: MemoryConfig | None = None, seed: int = 0) -> Llama:
    return Llama(cfg, mem, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, mem: MemoryConfig | None = None) -> Llama:
    """The model's structure with abstract arrays (shapes, dtypes, sharding names): nothing is
    allocated. Split it and fill its parameters from a checkpoint or another module."""
    return nnx.eval_shape(lambda: Llama(cfg, mem, rngs=nnx.Rngs(0)))
