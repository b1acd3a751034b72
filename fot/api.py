"""`FotModel`: one object bundling config, parameters and tokenizer, with the user-facing methods."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fot.config import Config
from fot.data.tokenizer import Tokenizer, check_vocab
from fot import inference
from fot.checkpoint import save_model
from fot.model.llama import Llama, abstract_model, init_model


@nnx.jit
def _forward(module: Llama, ids: jax.Array) -> jax.Array:
    return module(ids)


@dataclass
class FotModel:
    config: Config
    module: Llama
    tokenizer: Tokenizer | None = None

    def __post_init__(self):
        check_vocab(self.tokenizer, self.config.model.vocab_size, "FotModel")

    @classmethod
    def random(cls, config: Config, seed: int = 0, tokenizer: Tokenizer | None = None) -> "FotModel":
        return cls(config, init_model(config.model, config.memory, seed), tokenizer)

    @classmethod
    def from_params(cls, config: Config, params: dict, tokenizer: Tokenizer | None = None) -> "FotModel":
        """The model of `config` with these parameters (a nested dict in the checkpoint layout)."""
        graphdef, state, rest = nnx.split(abstract_model(config.model, config.memory), nnx.Param, ...)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda a, x: jnp.asarray(x, a.dtype),
                                                     state.to_pure_dict(), params))
        return cls(config, nnx.merge(graphdef, state, rest), tokenizer)

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

    # -- long inputs with the FoT memory (fot/inference.py) --

    def encode(self, text: str, bos: bool = True) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids instead of text")
        return np.asarray(self.tokenizer.encode(text, bos=bos), np.int32)[None]

    def logits_long(self, input_ids, window: int | None = None,
                    last_context_length: int | None = None) -> jax.Array:
        """Logits [B, N, V] of a long input read window by window with the memory."""
        return inference.logits_long(self, input_ids, window, last_context_length)

    def build_memory(self, document, window: int | None = None, last_context_length: int | None = None):
        """Read a document (text or ids) once into a `fot.inference.Session` to question later."""
        ids = self.encode(document) if isinstance(document, str) else document
        return inference.build_memory(self, ids, window, last_context_length)

    def save_memory(self, session, path):
        return session.save(path)

    def load_memory(self, path):
        return inference.Session.load(self, path)

    def stream(self, prompt, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, memory=None, **kw):
        """Yield new tokens as they come: ids [B] for id prompts, text pieces for a text prompt.
        `memory`: a session from build_memory/load_memory, read before the prompt (not changed)."""
        if not isinstance(prompt, str):
            yield from inference.stream(self, prompt, max_new_tokens, temperature, top_p, seed, session=memory, **kw)
            return
        ids, text = [], ""
        for tok in inference.stream(self, self.encode(prompt, bos=memory is None), max_new_tokens, temperature,
                          top_p, seed, session=memory, **kw):
            if int(tok[0]) == self.config.model.eos_token_id:
                return
            ids.append(int(tok[0]))
            new = self.tokenizer.decode(ids)
            yield new[len(text):]
            text = new

    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, memory=None, **kw):
        """Generated ids [B, n] for id prompts, or the generated text for a text prompt."""
        if isinstance(prompt, str):
            return "".join(self.stream(prompt, max_new_tokens, temperature, top_p, seed, memory, **kw))
        return inference.generate(self, prompt, max_new_tokens, temperature, top_p, seed, session=memory, **kw)

    def save(self, path, overwrite: bool = False):
        """Write a fot checkpoint directory (config.yaml, orbax params/, tokenizer/), atomically."""
        return save_model(self, path, overwrite)
