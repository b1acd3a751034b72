"""`FotModel`: one object bundling config, parameters and tokenizer, with the user-facing methods."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fot.config import Config
from fot.data.tokenizer import Tokenizer
from fot.model.llama import Llama, init_model


@nnx.jit
def _forward(module: Llama, ids: jax.Array) -> jax.Array:
    return module(ids)


@dataclass
class FotModel:
    config: Config
    module: Llama
    tokenizer: Tokenizer | None = None

    @classmethod
    def random(cls, config: Config, seed: int = 0, tokenizer: Tokenizer | None = None) -> "FotModel":
        return cls(config, init_model(config.model, config.memory, seed), tokenizer)

    def check_ids(self, input_ids) -> jax.Array:
        """[B, T] or [T] int array -> [B, T] int32, with a clear error for bad ids."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, seq] array, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers, got {ids.dtype}")
        vocab = self.config.model.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}), got range [{ids.min()}, {ids.max()}]")
        return jnp.asarray(ids, jnp.int32)

    def logits(self, input_ids) -> jax.Array:
        """Full causal forward: logits [batch, seq, vocab] in float32."""
        return _forward(self.module, self.check_ids(input_ids))
