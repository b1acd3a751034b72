"""Hugging Face formats: how a fot checkpoint's pieces are named and stored there.

- config.json <-> Config (`hf_config_to_dict`, `hf_config_from`): LLaMA and LongLLaMA fields;
- the weight table (`WEIGHTS`): each parameter's fot path (keys into
  `nnx.state(model, nnx.Param).to_pure_dict()`), its Hugging Face name and layout, read by the
  checkpoint conversion and by fot/lora.py (adapter names);
- the weight files: reading safetensors / PyTorch .bin, single or sharded (`TensorFiles`,
  `hf_to_params`), and writing sharded safetensors (`params_to_hf`, `write_safetensors`).

fot/convert.py builds `load_model` / `export_hf` and the CLI on these.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's bfloat16 so safetensors.numpy can read bf16 files)
import numpy as np

from fot.checkpoint import CheckpointError
from fot.config import Config, ConfigError, apply_overrides
from fot.model.rope_scaling import rope_type


# Tensors some HF checkpoints carry that are not parameters (old transformers saved RoPE buffers).
_NON_PARAMS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# ------------------------------------------------------------------------------------------------
# config.json <-> Config

_HF_MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "initializer_range", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
# transformers' LlamaConfig defaults, for keys a hand-written config.json leaves out.
_HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                    initializer_range=0.02, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
# LongLLaMA's config.json fields -> fot's dotted keys.
LONGLLAMA_KEYS = {"mem_layers": "memory.layers", "mem_positionals": "memory.positionals",
                   "mem_dtype": "retrieval.dtype", "last_context_length": "retrieval.last_context_length"}
# Keys whose value must be this (anything else is a different architecture).
_HF_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
# Keys read separately (model_type, the RoPE dict) or with no effect on the forward pass
# (bookkeeping, training-time or memory-saving options).
_HF_IGNORED = {"model_type", "rope_scaling", "rope_parameters",
               "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
               "use_cache", "pretraining_tp", "attention_dropout", "torch_attention",
               "mem_attention_grouping", "gradient_checkpoint_every_ith", "output_attentions",
               "output_hidden_states", "return_dict", "tokenizer_class"}
MODEL_TYPES = ("llama", "longllama")
_HF_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def hf_config_to_dict(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """A Hugging Face config.json dict -> fot config sections (model, memory, retrieval), unvalidated."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{where}: unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
    memory_keys = LONGLLAMA_KEYS if model_type == "longllama" else {}
    for k, v in hf.items():
        if k in _HF_FIXED and v != _HF_FIXED[k]:
            raise ConfigError(f"{where}: unsupported {k} = {v!r} (fot implements {k} = {_HF_FIXED[k]!r})")
        if k not in _HF_FIXED and k not in _HF_IGNORED and k not in _HF_MODEL_KEYS and k not in memory_keys:
            raise ConfigError(f"{where}: unknown key '{k}' for model_type {model_type}")
    model = dict(_HF_DEFAULTS)
    model.update({k: hf[k] for k in _HF_MODEL_KEYS if hf.get(k) is not None})
    rope = hf.get("rope_parameters") or hf.get("rope_scaling")  # transformers 5 name, then the older one
    if rope is not None:
        if not isinstance(rope, dict):
            raise ConfigError(f"{where}: rope_scaling = {rope!r} is not a mapping")
        rope = dict(rope)
        theta = rope.pop("rope_theta", None)  # transformers 5 keeps the base inside the dict
        if theta is not None:
            model["rope_theta"] = theta
        if rope_type(rope) != "default":
            model["rope_scaling"] = rope
    h, n = model["hidden_size"], model["num_attention_heads"]
    if isinstance(h, int) and isinstance(n, int) and n > 0 and model.get("head_dim") == h // n:
        del model["head_dim"]  # the derived value: keep the fot config minimal
    return apply_overrides({"model": model}, {f: hf[k] for k, f in memory_keys.items() if k in hf})


def hf_config_from(cfg: Config, fmt: str) -> dict[str, Any]:
    """Config -> a config.json dict for `fmt` ("llama" or "longllama")."""
    m = cfg.model
    if m.rope_scaling is not None and rope_type(m.rope_scaling) not in _HF_ROPE_TYPES:
        raise ConfigError(f"model.rope_scaling = {m.rope_scaling!r} has no Hugging Face counterpart")
    out = {"architectures": ["LongLlamaForCausalLM" if fmt == "longllama" else "LlamaForCausalLM"],
           "model_type": fmt, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "torch_dtype": m.param_dtype}
    out.update({k: getattr(m, k) for k in _HF_MODEL_KEYS})
    out.update(num_key_value_heads=m.kv_heads, head_dim=m.dim_per_head, rope_scaling=m.rope_scaling)
    if fmt == "longllama":
        for k, f in LONGLLAMA_KEYS.items():
            section, name = f.split(".")
            out[k] = getattr(getattr(cfg, section), name)
        out["mem_layers"] = list(cfg.memory.layers)
    return out


# ------------------------------------------------------------------------------------------------
# The weight table


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


# ------------------------------------------------------------------------------------------------
# Reading HF weight files


class TensorFiles:
    """Tensor name -> file for an HF directory (safetensors or pytorch .bin, single or sharded)."""

    _CANDIDATES = (("model.safetensors.index.json", "model.safetensors"),
                   ("pytorch_model.bin.index.json", "pytorch_model.bin"))

    def __init__(self, src: Path):
        self.files: dict[str, Path] = {}
        self._bins: dict[Path, dict] = {}
        for index, single in self._CANDIDATES:
            self.where = src / index if (src / index).is_file() else src / single
            if (src / index).is_file():
                try:
                    weight_map = json.loads((src / index).read_text())["weight_map"]
                except (ValueError, KeyError) as e:
                    raise CheckpointError(f"{src / index}: not a valid weight index ({e!r})") from None
                self.files = {name: src / f for name, f in weight_map.items()}
                break
            if (src / single).is_file():
                self.files = {name: src / single for name in self._names(src / single)}
                break
        else:
            raise CheckpointError(f"{src}: no weights (model.safetensors, pytorch_model.bin or a sharded index)")
        for f in sorted(set(self.files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f}: weight shard listed in the index is missing")

    def _names(self, f: Path) -> list[str]:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="numpy") as h:
                    return list(h.keys())
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        return list(self._bin(f))

    def _bin(self, f: Path) -> dict:
        if f not in self._bins:
            import torch  # only .bin checkpoints need torch

            try:
                self._bins[f] = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # pickle / zip / weights_only errors
                raise CheckpointError(f"{f}: not a readable PyTorch weight file ({e})") from None
        return self._bins[f]

    def get(self, name: str) -> np.ndarray:
        f = self.files[name]
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="numpy") as h:
                    return h.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read tensor '{name}' ({e})") from None
        import torch

        t = self._bin(f)[name]
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def hf_to_params(files: TensorFiles, abstract: dict, num_layers: int) -> dict:
    """Fill the pure-dict param tree `abstract` (leaves with .shape/.dtype) from HF tensors."""
    used = set()

    def fetch(name: str, want: tuple[int, ...], transpose: bool) -> np.ndarray:
        if name not in files.files:
            raise CheckpointError(f"{files.where}: missing tensor '{name}'")
        used.add(name)
        a = files.get(name)
        a = a.T if transpose else a
        if a.shape != want:
            shape = tuple(reversed(a.shape)) if transpose else a.shape
            hf_want = tuple(reversed(want)) if transpose else want
            raise CheckpointError(f"{files.files[name]}: tensor '{name}' has shape {tuple(shape)}, "
                                  f"the config implies {tuple(hf_want)}")
        return a

    out: dict = {}
    for w in WEIGHTS:
        node = abstract
        for k in w.fot:
            node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            continue  # e.g. lm_head with tied embeddings
        if w.stacked:
            value = np.stack([fetch(w.hf.format(i=i), tuple(node.shape[1:]), w.transpose) for i in range(num_layers)])
        else:
            value = fetch(w.hf, tuple(node.shape), w.transpose)
        tree = out
        for k in w.fot[:-1]:
            tree = tree.setdefault(k, {})
        tree[w.fot[-1]] = jnp.asarray(value, dtype=node.dtype)
    leftover = sorted(n for n in files.files if n not in used and not _NON_PARAMS.fullmatch(n)
                      and not (n == "lm_head.weight" and "lm_head" not in abstract))
    if leftover:
        raise CheckpointError(f"{files.files[leftover[0]]}: unexpected tensor '{leftover[0]}' "
                              f"(not a LLaMA parameter for this config)")
    return out


def params_to_hf(params: dict, num_layers: int) -> dict[str, np.ndarray]:
    """Pure-dict param tree -> {HF name: numpy array}."""
    out = {}
    for w in WEIGHTS:
        node = params
        for k in w.fot:
            node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            continue
        node = np.asarray(node)
        for i in range(num_layers) if w.stacked else [None]:
            a = node[i] if w.stacked else node
            out[w.hf.format(i=i)] = np.ascontiguousarray(a.T if w.transpose else a)
    return out


def write_safetensors(dst: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(dst / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
