"""Hugging Face <-> fot checkpoints, driven by one declarative weight table (fot/weights.py).

`load_model(path, dtype=None, **overrides)` reads a Hugging Face LLaMA / LongLLaMA directory (or hub
name) or a fot checkpoint directory (fot/checkpoint.py). `export_hf` writes a directory that
`transformers.LlamaForCausalLM.from_pretrained` loads with the same logits. CLI:

    python -m fot.convert import-hf SRC DST [--dtype D] [--overwrite] [key=value ...]
    python -m fot.convert export-hf SRC DST [--format llama|longllama] [--overwrite]
    python -m fot.convert export-peft SRC DST [--overwrite]           # LoRA adapters -> PEFT directory
    python -m fot.convert import-peft BASE ADAPTER DST [--overwrite]  # base + PEFT adapter -> fot
    python -m fot.convert merge-lora SRC DST [--overwrite]            # adapters folded into the weights
    python -m fot.convert extract-lora TUNED BASE DST --rank R [--targets q,k,v,o] [--alpha A]

Every failure caused by the input (missing files, unsupported model, a shape or key that disagrees)
is a one-line `ConfigError` / `CheckpointError` naming the file and the key or tensor; the CLI prints
just that line and exits with status 1.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's bfloat16 so safetensors.numpy can read bf16 files)
import numpy as np
from flax import nnx

from fot import lora
from fot.api import FotModel
from fot.checkpoint import (CONFIG_FILE, CheckpointError, atomic_dir, params_dict, read_checkpoint,
                            save_model, save_tokenizer)
from fot.config import Config, ConfigError, apply_overrides, config_from_dict, parse_override, read_yaml
from fot.data.tokenizer import ByteTokenizer, load_tokenizer
from fot.model.llama import abstract_model
from fot.model.rope_scaling import rope_type
from fot.weights import WEIGHTS

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
_HF_MEMORY_KEYS = {"mem_layers": "memory.layers", "mem_positionals": "memory.positionals",
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
    memory_keys = _HF_MEMORY_KEYS if model_type == "longllama" else {}
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
        for k, f in _HF_MEMORY_KEYS.items():
            section, name = f.split(".")
            out[k] = getattr(getattr(cfg, section), name)
        out["mem_layers"] = list(cfg.memory.layers)
    return out


# ------------------------------------------------------------------------------------------------
# Overrides


_SECTIONS = tuple(f.name for f in fields(Config))


def dotted_overrides(overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """`load_model`'s keyword overrides as dotted config keys (for fot.config.apply_overrides).
    One rule per key form:

    - a section name with a dict (`memory={"layers": [6]}`): each of its keys in that section;
    - a dotted key (`**{"model.rope_theta": 5e5}`): exactly that entry;
    - a LongLLaMA name (`mem_layers`, `mem_positionals`, `mem_dtype`, `last_context_length`): its
      fot key (`memory.layers`, ..., `retrieval.dtype`, `retrieval.last_context_length`);
    - any other bare key (`rope_scaling={...}`): the field of that name in the one section that has it
      (a name found in several sections, e.g. `seed`, must be written dotted).
    """
    owners: dict[str, list[str]] = {}
    for section, cls in typing.get_type_hints(Config).items():
        for f in fields(cls):
            owners.setdefault(f.name, []).append(section)
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in _SECTIONS and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif "." in key:
            out[key] = value
        elif key in _HF_MEMORY_KEYS:
            out[_HF_MEMORY_KEYS[key]] = value
        elif len(owners.get(key, ())) == 1:
            out[f"{owners[key][0]}.{key}"] = value
        elif key in owners:
            raise ConfigError(f"{where}: override '{key}' is ambiguous; write one of "
                              + ", ".join(f"{s}.{key}" for s in owners[key]))
        else:
            raise ConfigError(f"{where}: unknown override key '{key}'")
    return out


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


# ------------------------------------------------------------------------------------------------
# Public API


def _local_dir(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: not a directory")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):  # looks like a hub name
        try:
            from huggingface_hub import snapshot_download

            got = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.model", "*.safetensors"]))
            if not any(got.glob("*.safetensors")):
                got = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.model", "*.bin"]))
            return got
        except Exception as e:  # offline, unknown repo, no access: all one message
            raise CheckpointError(f"{path}: no such directory, and not found on the Hugging Face hub "
                                  f"({type(e).__name__})") from None
    raise CheckpointError(f"{p}: no such directory")


def _hf_tokenizer(src: Path):
    if (src / "tokenizer.model").is_file() or (src / "tokenizer.json").is_file():
        return load_tokenizer(str(src))
    return None


def load_model(path: str | Path, dtype: str | None = None, **overrides: Any):
    """Load a `fot.api.FotModel` from a Hugging Face directory / hub name or a fot checkpoint dir.

    HF: config.json (model_type `llama`, or `longllama` whose mem_* fields fill `memory`) plus
    model.safetensors / pytorch_model.bin, single or sharded with an index; the tokenizer
    (tokenizer.model or tokenizer.json) when present. fot: config.yaml + params/ (fot/checkpoint.py).
    `dtype` sets the compute dtype (model.dtype). `overrides` change the config before the weights are
    read; see `dotted_overrides` for the rule (e.g. `rope_scaling={"rope_type": "linear", "factor": 2.0}`,
    `mem_layers=[1]`, `retrieval={"mode": "knn"}`, `**{"model.param_dtype": "bfloat16"}`).
    """
    src = _local_dir(path)
    if dtype is not None:
        overrides = {"model.dtype": dtype, **overrides}
    with_overrides = " (with overrides " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()) + ")"
    if (src / CONFIG_FILE).is_file():  # fot checkpoint
        where = str(src / CONFIG_FILE)
        values = apply_overrides(read_yaml(src / CONFIG_FILE), dotted_overrides(overrides, where), where)
        return FotModel(*read_checkpoint(src, config_from_dict(values, where + with_overrides if overrides else where)))
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (neither a Hugging Face model nor a fot checkpoint, "
                              f"which has {CONFIG_FILE})")
    try:
        hf = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ConfigError(f"{cfg_file}: not valid JSON: {e}") from None
    where = str(cfg_file)
    values = hf_config_to_dict(hf, where)
    tokenizer = _hf_tokenizer(src)
    if tokenizer is not None:
        values["data"] = {"tokenizer": str(src)}
    values = apply_overrides(values, dotted_overrides(overrides, where), where)
    cfg = config_from_dict(values, where + with_overrides if overrides else where)
    files = TensorFiles(src)
    graphdef, params, rest = nnx.split(abstract_model(cfg.model, cfg.memory), nnx.Param, ...)
    pure = params.to_pure_dict()
    arrays = hf_to_params(files, pure, cfg.model.num_hidden_layers)
    if "mem_gate" in pure:  # the gate ablation has no HF counterpart; it starts closed as at init
        arrays["mem_gate"] = jnp.zeros(pure["mem_gate"].shape, pure["mem_gate"].dtype)
    nnx.replace_by_pure_dict(params, arrays)
    return FotModel(cfg, nnx.merge(graphdef, params, rest), tokenizer)


def _write_safetensors(dst: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
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


def export_hf(model, dst: str | Path, fmt: str | None = None, overwrite: bool = False,
              max_shard_bytes: int = 2 << 30) -> Path:
    """Write `model` as a Hugging Face directory, atomically. fmt: "llama" or "longllama"
    (default: longllama when the config has memory layers). Both load in LlamaForCausalLM."""
    cfg = model.config
    fmt = fmt or ("longllama" if cfg.memory.layers else "llama")
    if fmt not in MODEL_TYPES:
        raise ConfigError(f"export format {fmt!r} is not one of {list(MODEL_TYPES)}")
    if cfg.memory.gate:
        raise ConfigError("memory.gate = true: the gate ablation has no Hugging Face counterpart")
    hf_cfg = hf_config_from(cfg, fmt)
    tensors = params_to_hf(params_dict(model.module), cfg.model.num_hidden_layers)
    dst = Path(dst)
    with atomic_dir(dst, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        _write_safetensors(tmp, tensors, max_shard_bytes)
        if model.tokenizer is not None and not isinstance(model.tokenizer, ByteTokenizer):
            save_tokenizer(model.tokenizer, tmp / "tokenizer")
            for f in (tmp / "tokenizer").iterdir():  # HF keeps tokenizer files next to the weights
                shutil.move(str(f), tmp / f.name)
            (tmp / "tokenizer").rmdir()
    return dst


# ------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fot.convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-hf", help="Hugging Face directory or hub name -> fot checkpoint")
    imp.add_argument("src")
    imp.add_argument("dst")
    imp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    imp.add_argument("--overwrite", action="store_true")
    imp.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. memory.layers=[6,12,18])")
    exp = sub.add_parser("export-hf", help="fot checkpoint (or HF directory) -> Hugging Face directory")
    exp.add_argument("src")
    exp.add_argument("dst")
    exp.add_argument("--format", choices=list(MODEL_TYPES), default=None,
                     help="default: longllama when the model has memory layers, else llama")
    exp.add_argument("--overwrite", action="store_true")
    lora_cmds = {"export-peft": "fot checkpoint with LoRA adapters -> PEFT adapter directory",
                 "import-peft": "base model (HF or fot) + PEFT LoRA adapter directory -> fot checkpoint",
                 "merge-lora": "fot checkpoint with LoRA adapters -> plain fot checkpoint, adapters merged",
                 "extract-lora": "fine-tuned + base model -> base with the rank-R adapter closest to "
                                 "their difference (truncated SVD); prints the error per matrix"}
    for name, text in lora_cmds.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("src", help="the fine-tuned model" if name == "extract-lora" else
                       "the base model" if name == "import-peft" else "the model")
        if name in ("import-peft", "extract-lora"):
            p.add_argument("other", help="the PEFT adapter directory" if name == "import-peft" else "the base model")
        p.add_argument("dst")
        if name == "extract-lora":
            p.add_argument("--rank", type=int, required=True)
            p.add_argument("--targets", default="q,k,v,o", help="comma-separated projections (default q,k,v,o)")
            p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
        p.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "import-hf":
            model = load_model(args.src, args.dtype, **dict(map(parse_override, args.overrides)))
            save_model(model, args.dst, overwrite=args.overwrite)
        elif args.cmd == "export-hf":
            export_hf(load_model(args.src), args.dst, args.format, overwrite=args.overwrite)
        elif args.cmd == "export-peft":
            lora.export_peft(load_model(args.src), args.dst, overwrite=args.overwrite)
        elif args.cmd == "import-peft":
            save_model(lora.import_peft(load_model(args.src), args.other), args.dst, overwrite=args.overwrite)
        elif args.cmd == "merge-lora":
            save_model(lora.merge(load_model(args.src)), args.dst, overwrite=args.overwrite)
        else:
            model, errors = lora.extract(load_model(args.src), load_model(args.other), args.rank,
                                         tuple(args.targets.split(",")), args.alpha)
            for name, err in errors.items():
                print(f"{name}: relative error {err:.3g}")
            save_model(model, args.dst, overwrite=args.overwrite)
    except (ConfigError, CheckpointError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always exactly one line
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
