"""Hugging Face <-> fot checkpoints, on the formats of fot/hf.py (config.json fields, weight table, files).

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
from flax import nnx

from fot import lora
from fot.api import FotModel
from fot.checkpoint import (CONFIG_FILE, CheckpointError, atomic_dir, params_dict, read_checkpoint,
                            save_model, save_tokenizer)
from fot.config import Config, ConfigError, apply_overrides, config_from_dict, parse_override, read_yaml
from fot.data.tokenizer import ByteTokenizer, load_tokenizer
from fot.hf import (LONGLLAMA_KEYS, MODEL_TYPES, TensorFiles, hf_config_from, hf_config_to_dict, hf_to_params,
                    params_to_hf, write_safetensors)
from fot.model.llama import abstract_model

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
        elif key in LONGLLAMA_KEYS:
            out[LONGLLAMA_KEYS[key]] = value
        elif len(owners.get(key, ())) == 1:
            out[f"{owners[key][0]}.{key}"] = value
        elif key in owners:
            raise ConfigError(f"{where}: override '{key}' is ambiguous; write one of "
                              + ", ".join(f"{s}.{key}" for s in owners[key]))
        else:
            raise ConfigError(f"{where}: unknown override key '{key}'")
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
        write_safetensors(tmp, tensors, max_shard_bytes)
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
