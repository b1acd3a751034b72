"""LoRA adapters on the decoder's projections (`model.lora`), built on Flax NNX's `nnx.LoRALinear`.

A targeted projection computes W x + (alpha / rank) B A dropout(x) (PEFT's definition). It keeps
nnx.Linear's `kernel`, so base weights load and save under the same names as without LoRA; the
adapter adds `lora/lora_a` [in, r] (PEFT's lora_A transposed) and `lora/lora_b` [r, out] (lora_B
transposed), stacked over layers like every layer parameter. B starts at zero: a new adapter leaves
the base model's function unchanged.

What a LoRA run trains (`is_trainable`): the adapters, plus the embeddings and RMSNorm weights with
`train_embeddings` / `train_norms` (LongLoRA's "LoRA+"); everything else stays frozen and carries no
optimizer state (fot/train.py). Dropout draws its masks from keys the train step sets
(`set_dropout_keys`); without them (inference, evaluation) the adapter sees its input unchanged.
"""

from __future__ import annotations

import jax
from flax import nnx, traverse_util

from fot.config import LoraConfig

# PEFT's kaiming_uniform(a=sqrt(5)) for lora_A: U(+-1/sqrt(fan_in)), a third of the variance of
# nnx.LoRA's default he_uniform, so that fot and PEFT adapters start alike.
A_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class DropoutKey(nnx.Variable):
    """Raw key data [layers, 2] of one projection's dropout in one training step: not a parameter."""


class LoRAProjection(nnx.LoRALinear):
    def __init__(self, n_in: int, n_out: int, lora: LoraConfig, axes: tuple[str, str], *,
                 rngs: nnx.Rngs, **linear):
        meta = lambda names: {"out_sharding": names, "eager_sharding": False}
        super().__init__(n_in, n_out, lora_rank=lora.rank, lora_dtype=linear["dtype"],
                         lora_param_dtype=linear["param_dtype"], a_initializer=A_INIT,
                         a_metadata=meta((axes[0], "lora_rank")), b_metadata=meta(("lora_rank", axes[1])),
                         rngs=rngs, **linear)
        self.scale = lora.alpha / lora.rank
        self.dropout = nnx.Dropout(lora.dropout)
        self.dropout_key = nnx.data(None)  # a DropoutKey during a training step

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.Linear.__call__(self, x)
        if self.dropout_key is not None:
            x = self.dropout(x, rngs=jax.random.wrap_key_data(self.dropout_key[...]))
        return y + self.scale * self.lora(x)


def set_dropout_keys(module, key: jax.Array) -> None:
    """Give every adapter of `module` (a Llama, inside the train step) its own dropout key per layer,
    all drawn from `key`; a no-op when model.lora.dropout is 0."""
    lora = module.cfg.lora
    if not (lora.rank and lora.dropout):
        return
    projections = [m for _, m in nnx.iter_modules(module) if isinstance(m, LoRAProjection)]
    for i, m in enumerate(projections):
        keys = jax.random.split(jax.random.fold_in(key, i), module.cfg.num_hidden_layers)
        m.dropout_key = DropoutKey(jax.random.key_data(keys))


def is_lora(path: tuple[str, ...]) -> bool:
    return "lora" in path


def is_trainable(lora: LoraConfig, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (keys into the pure-dict params) is trained."""
    if not lora.rank:
        return True
    return (is_lora(path) or (lora.train_embeddings and path[0] == "embed_tokens")
            or (lora.train_norms and path[-2].endswith("norm")))


def partition(params: dict, keep) -> tuple[dict, dict]:
    """Nested params -> (the leaves whose path satisfies `keep`, the others), both nested dicts."""
    flat = traverse_util.flatten_dict(params)
    yes = {p: v for p, v in flat.items() if keep(p)}
    no = {p: v for p, v in flat.items() if not keep(p)}
    return traverse_util.unflatten_dict(yes), traverse_util.unflatten_dict(no)


def join(*trees: dict) -> dict:
    """The union of disjoint nested param dicts (the inverse of `partition`)."""
    flat = {}
    for t in trees:
        flat.update(traverse_util.flatten_dict(t))
    return traverse_util.unflatten_dict(flat)
