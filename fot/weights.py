"""The Hugging Face <-> fot weight table: each parameter's fot path (keys into
`nnx.state(model, nnx.Param).to_pure_dict()`), its Hugging Face name and layout. Read by
fot/convert.py (checkpoints) and fot/lora.py (adapter names)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Weight:
    fot: tuple[str, ...]
    hf: str  # "{i}" marks a per-layer tensor; fot stacks the layers on a leading axis
    transpose: bool  # Linear kernels: HF (torch) stores [out, in], flax [in, out]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


WEIGHTS: tuple[Weight, ...] = (
    Weight(("embed_tokens", "embedding"), "model.embed_tokens.weight", False),
    *(Weight(("layers", "self_attn", f"{p}_proj", "kernel"), f"model.layers.{{i}}.self_attn.{p}_proj.weight",
             True) for p in "qkvo"),
    *(Weight(("layers", "mlp", f"{p}_proj", "kernel"), f"model.layers.{{i}}.mlp.{p}_proj.weight", True)
      for p in ("gate", "up", "down")),
    *(Weight(("layers", n, "weight"), f"model.layers.{{i}}.{n}.weight", False)
      for n in ("input_layernorm", "post_attention_layernorm")),
    Weight(("norm", "weight"), "model.norm.weight", False),
    Weight(("lm_head", "kernel"), "lm_head.weight", True),  # absent in fot when embeddings are tied
)
