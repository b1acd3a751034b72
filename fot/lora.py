"""LoRA adapters outside training: merge, Hugging Face PEFT adapter directories, extraction.

- `merge(model)`: W + (alpha / r) A B folded into every adapted kernel; a plain model (no adapters).
- `export_peft(model, dst)`: `adapter_config.json` + `adapter_model.safetensors` in PEFT's layout
  (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` [r, in], `lora_B.weight`
  [out, r]; LoRA+'s embeddings and norms as `modules_to_save`), which `peft.PeftModel` loads onto
  the model `export_hf` writes for the base; `import_peft(base, src)` reads one back onto a base.
- `extract(tuned, base, rank)`: the rank-r adapter whose A B best approximates each targeted
  weight difference (truncated SVD, Eckart-Young), with the relative error of every matrix.

CLI: `python -m fot.convert export-peft | import-peft | merge-lora | extract-lora` (fot/convert.py).
Errors are one-line ConfigErrors / CheckpointErrors naming the file and the key or tensor.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import traverse_util

from fot.api import FotModel
from fot.checkpoint import CheckpointError, atomic_dir, params_dict
from fot.config import LORA_TARGETS, Config, ConfigError, LoraConfig
from fot.hf import WEIGHTS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# target -> the kernel's entry in the weight table ("q" -> layers/self_attn/q_proj/kernel)
KERNELS = {w.fot[-2].removesuffix("_proj"): w for w in WEIGHTS if w.fot[-2].removesuffix("_proj") in LORA_TARGETS}


def _with_lora(cfg: Config, lora: LoraConfig) -> Config:
    return cfg.replace(model=dataclasses.replace(cfg.model, lora=lora))


def _flat(model: FotModel) -> dict[tuple[str, ...], np.ndarray]:
    return {p: np.asarray(v) for p, v in traverse_util.flatten_dict(params_dict(model.module)).items()}


def _adapted(model: FotModel, what: str) -> LoraConfig:
    lora = model.config.model.lora
    if not lora.rank:
        raise ConfigError(f"{what}: the model has no LoRA adapters (model.lora.rank is 0)")
    return lora


def merge(model: FotModel) -> FotModel:
    """The model with every adapter folded into its kernel: kernel + (alpha / r) lora_a @ lora_b,
    computed in float64 and stored in the parameter dtype."""
    lora = _adapted(model, "merge")
    flat = _flat(model)
    for t in lora.targets:
        at = KERNELS[t].fot[:-1]
        a, b = flat.pop(at + ("lora", "lora_a")), flat.pop(at + ("lora", "lora_b"))
        k = flat[at + ("kernel",)]
        ab = np.einsum("lir,lro->lio", a.astype(np.float64), b.astype(np.float64))
        flat[at + ("kernel",)] = (k + lora.alpha / lora.rank * ab).astype(k.dtype)
    return FotModel.from_params(_with_lora(model.config, LoraConfig()), traverse_util.unflatten_dict(flat),
                                model.tokenizer)


def _modules_to_save(lora: LoraConfig) -> list[str]:
    # PEFT matches these as suffixes of module names: "norm" covers every RMSNorm of a LLaMA.
    return ["embed_tokens"] * lora.train_embeddings + ["norm"] * lora.train_norms


def _saved_weights(saved: list[str], n_layers: int):
    """(fot path, layer or None, PEFT tensor name) of every weight of the modules_to_save (the
    embeddings and norms, stored as they are: no transposes)."""
    for w in WEIGHTS:
        for i in range(n_layers) if w.stacked else [None]:
            hf = w.hf.format(i=i)
            if any(hf.removesuffix(".weight").endswith(m) for m in saved):
                yield w.fot, i, PEFT_PREFIX + hf


def export_peft(model: FotModel, dst: str | Path, overwrite: bool = False) -> Path:
    """Write the adapters of `model` as a PEFT LoRA adapter directory, atomically."""
    lora = _adapted(model, "export-peft")
    cfg = model.config
    if lora.train_embeddings and cfg.model.tie_word_embeddings:
        raise ConfigError("export-peft: model.lora.train_embeddings with tie_word_embeddings has no PEFT "
                          "counterpart (modules_to_save copies embed_tokens apart from the tied lm_head)")
    flat = _flat(model)
    tensors = {}
    for t in lora.targets:
        w = KERNELS[t]
        a, b = flat[w.fot[:-1] + ("lora", "lora_a")], flat[w.fot[:-1] + ("lora", "lora_b")]
        for i in range(cfg.model.num_hidden_layers):
            name = PEFT_PREFIX + w.hf.format(i=i).removesuffix(".weight")
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    saved = _modules_to_save(lora)
    for path, i, name in _saved_weights(saved, cfg.model.num_hidden_layers):
        tensors[name] = flat[path] if i is None else flat[path][i]
    adapter = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
               "lora_dropout": lora.dropout, "target_modules": [f"{t}_proj" for t in lora.targets],
               "modules_to_save": saved or None, "bias": "none", "fan_in_fan_out": False,
               "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
               "base_model_name_or_path": None}
    from safetensors.numpy import save_file

    with atomic_dir(dst, overwrite) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(dst)


# adapter_config.json keys whose value must be this (anything else is another kind of adapter)
_PEFT_FIXED = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False,
               "use_dora": False, "layers_to_transform": None, "layer_replication": None,
               "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None,
               "trainable_token_indices": None, "lora_bias": False}


def import_peft(base: FotModel, src: str | Path) -> FotModel:
    """`base` with the PEFT LoRA adapter in directory `src` (from peft's `save_pretrained` or
    `export_peft`) on it: a fot model with adapters (model.lora from adapter_config.json)."""
    src = Path(src)
    cfg_file, weights = src / ADAPTER_CONFIG, src / ADAPTER_WEIGHTS
    for f in (cfg_file, weights):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (not a PEFT adapter directory)")
    try:
        peft = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ConfigError(f"{cfg_file}: not valid JSON: {e}") from None
    if peft.get("peft_type") != "LORA":
        raise ConfigError(f"{cfg_file}: peft_type = {peft.get('peft_type')!r}, fot reads LoRA adapters (LORA)")
    for k, v in _PEFT_FIXED.items():
        got = peft.get(k, v)
        if got != v and (got or v):  # an empty pattern or a null reads as the default
            raise ConfigError(f"{cfg_file}: unsupported {k} = {got!r} (fot reads {k} = {v!r})")
    modules = peft.get("target_modules")
    if not isinstance(modules, list):
        raise ConfigError(f"{cfg_file}: target_modules = {modules!r}: fot reads a list of projection names")
    targets = []
    for m in modules:
        t = m.removesuffix("_proj") if isinstance(m, str) else None
        if t not in LORA_TARGETS or m != f"{t}_proj":
            raise ConfigError(f"{cfg_file}: target_modules has {m!r}, not a LLaMA projection "
                              f"({', '.join(f'{t}_proj' for t in LORA_TARGETS)}): an adapter for another architecture")
        targets.append(t)
    saved = peft.get("modules_to_save") or []
    if any(m not in ("embed_tokens", "norm") for m in saved):
        raise ConfigError(f"{cfg_file}: modules_to_save = {saved!r}: fot reads embed_tokens and norm")
    try:
        lora = LoraConfig(rank=int(peft["r"]), alpha=float(peft["lora_alpha"]),
                          dropout=float(peft.get("lora_dropout", 0.0)),
                          targets=tuple(sorted(targets, key=LORA_TARGETS.index)),  # (peft saves a set)
                          train_embeddings="embed_tokens" in saved, train_norms="norm" in saved)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{cfg_file}: r / lora_alpha / lora_dropout missing or not numbers ({e!r})") from None
    if base.config.model.lora.rank:
        raise ConfigError("import-peft: the base model already has LoRA adapters: merge them first")
    lora.validate(str(cfg_file), base.config.model)
    cfg = _with_lora(base.config, lora)

    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    flat = _flat(base)
    n_layers = cfg.model.num_hidden_layers
    used = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"{weights}: missing tensor '{name}'")
        if tensors[name].shape != shape:
            raise CheckpointError(f"{weights}: tensor '{name}' has shape {tensors[name].shape}, the base "
                                  f"model implies {shape}")
        used.add(name)
        return tensors[name]

    for t in targets:
        w = KERNELS[t]
        n_in, n_out = flat[w.fot].shape[1:]
        names = [PEFT_PREFIX + w.hf.format(i=i).removesuffix(".weight") for i in range(n_layers)]
        flat[w.fot[:-1] + ("lora", "lora_a")] = np.stack([take(f"{n}.lora_A.weight", (lora.rank, n_in)).T
                                                          for n in names])
        flat[w.fot[:-1] + ("lora", "lora_b")] = np.stack([take(f"{n}.lora_B.weight", (n_out, lora.rank)).T
                                                          for n in names])
    for path, i, name in _saved_weights(saved, n_layers):  # LoRA+: they replace the base's
        if name in tensors and path in flat:
            if i is None:
                flat[path] = take(name, flat[path].shape)
            else:
                flat[path] = flat[path].copy()
                flat[path][i] = take(name, flat[path].shape[1:])
    leftover = sorted(tensors.keys() - used)
    if leftover:
        raise CheckpointError(f"{weights}: unexpected tensor '{leftover[0]}' (not a LoRA weight of this "
                              f"LLaMA's targets {modules} or its modules_to_save)")
    return FotModel.from_params(cfg, traverse_util.unflatten_dict(flat), base.tokenizer)


def extract(tuned: FotModel, base: FotModel, rank: int, targets: tuple[str, ...] = ("q", "k", "v", "o"),
            alpha: float | None = None) -> tuple[FotModel, dict[str, float]]:
    """`base` with the rank-`rank` adapter closest (Frobenius) to tuned - base on each target matrix.

    alpha defaults to rank (scale 1). Returns the model and, per matrix ("layers.3.q_proj") and for
    every other parameter that differs, the relative error ||D - (alpha/r) A B|| / ||D|| (0 where D = 0;
    1 for parameters outside the targets, which the adapter cannot carry)."""
    if rank < 1:
        raise ConfigError(f"extract-lora: --rank must be positive, got {rank}")
    if base.config.model.lora.rank or tuned.config.model.lora.rank:
        raise ConfigError("extract-lora: merge the adapters of the models first (python -m fot.convert merge-lora)")
    lora = LoraConfig(rank=rank, alpha=float(alpha if alpha is not None else rank), targets=tuple(targets))
    lora.validate("extract-lora", base.config.model)
    ft, fb = _flat(tuned), _flat(base)
    if ft.keys() != fb.keys() or any(ft[p].shape != fb[p].shape for p in ft):
        raise ConfigError("extract-lora: the tuned and base models have different parameters (another architecture)")
    scale = lora.alpha / rank
    errors, flat = {}, dict(fb)
    for t in targets:
        w = KERNELS[t]
        d = ft[w.fot].astype(np.float64) - fb[w.fot].astype(np.float64)  # [L, in, out]
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        a = u[:, :, :rank] * np.sqrt(s[:, None, :rank])
        b = np.sqrt(s[:, :rank, None]) * vt[:, :rank] / scale
        rest = np.sqrt(np.sum(s[:, rank:] ** 2, axis=1))
        total = np.sqrt(np.sum(s ** 2, axis=1))
        for i in range(len(d)):
            errors[f"layers.{i}.{t}_proj"] = float(rest[i] / total[i]) if total[i] > 0 else 0.0
        dtype = fb[w.fot].dtype
        flat[w.fot[:-1] + ("lora", "lora_a")] = a.astype(dtype)
        flat[w.fot[:-1] + ("lora", "lora_b")] = b.astype(dtype)
    kernels = {KERNELS[t].fot for t in targets}
    for p in ft:
        if p not in kernels and not np.array_equal(ft[p], fb[p]):
            errors["/".join(p)] = 1.0
    model = FotModel.from_params(_with_lora(base.config, lora), traverse_util.unflatten_dict(flat), base.tokenizer)
    return model, errors
