"""Typed, frozen configuration: base values, then a YAML file, then `key=value` overrides.

Every section is a frozen dataclass. `load_config(path, overrides)` builds them from plain dicts and
rejects an unknown key, a wrong type or an impossible value with a `ConfigError` whose message names
the dotted key and the file it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fot.data.tasks import TaskError, parse_task
from fot.errors import ConfigError
from fot.model.rope_scaling import validate_rope_scaling

_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


DType = Literal["float32", "bfloat16", "float16"]


class HashableDict(dict):
    """A dict that hashes by content: a config travels in jit's static arguments (the module's
    graphdef holds it), so its dict-valued fields (rope_scaling) must hash."""

    def __hash__(self) -> int:
        return hash(json.dumps(self, sort_keys=True, default=str))


def check_range(where: str, section: str, obj: Any, positive: tuple[str, ...] = (),
                nonnegative: tuple[str, ...] = (), beta: tuple[str, ...] = (),
                ratio: tuple[str, ...] = ()) -> None:
    """Each named number of obj must be finite and > 0 (positive), >= 0 (nonnegative), in [0, 1)
    (beta: Adam's decay rates) or in [0, 1] (ratio); the error names the key."""
    rules = [(n, "positive", lambda v: v > 0) for n in positive] + \
            [(n, ">= 0", lambda v: v >= 0) for n in nonnegative] + \
            [(n, "in [0, 1)", lambda v: 0 <= v < 1) for n in beta] + \
            [(n, "in [0, 1]", lambda v: 0 <= v <= 1) for n in ratio]
    for name, what, ok in rules:
        value = getattr(obj, name)
        if not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"{where}: {section}.{name} must be a finite number {what}, got {value}")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections `<name>_proj`


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (fot/model/lora.py): W x + (alpha / rank) B A x on the `targets` projections
    of every layer, with only the adapters trained (and, LongLoRA's "LoRA+", the embeddings and
    RMSNorm weights when asked). rank 0 = no adapters, every parameter trained."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input, in training only
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    train_embeddings: bool = False
    train_norms: bool = False

    def validate(self, where: str, model: "ModelConfig") -> None:
        if self.rank < 0:
            raise ConfigError(f"{where}: model.lora.rank must be >= 0 (0 = no LoRA), got {self.rank}")
        for t in self.targets:
            if t not in LORA_TARGETS:
                raise ConfigError(f"{where}: model.lora.targets has {t!r}, not one of {list(LORA_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"{where}: model.lora.targets has duplicates: {list(self.targets)}")
        if not self.rank:
            for name in ("train_embeddings", "train_norms"):
                if getattr(self, name):
                    raise ConfigError(f"{where}: model.lora.{name} needs model.lora.rank > 0 "
                                      f"(without LoRA every parameter is trained)")
            return
        check_range(where, "model.lora", self, positive=("alpha",), beta=("dropout",))
        if not self.targets:
            raise ConfigError(f"{where}: model.lora.targets is empty")
        e, f = model.hidden_size, model.intermediate_size
        q, kv = model.num_attention_heads * model.dim_per_head, model.kv_heads * model.dim_per_head
        sizes = {"q": (e, q), "k": (e, kv), "v": (e, kv), "o": (q, e), "gate": (e, f), "up": (e, f),
                 "down": (f, e)}
        for t in self.targets:
            if self.rank > min(sizes[t]):
                raise ConfigError(f"{where}: model.lora.rank={self.rank} exceeds the {t}_proj matrix "
                                  f"{sizes[t][0]}x{sizes[t][1]}")


@dataclass(frozen=True)
class ModelConfig:
    """The LLaMA decoder (names follow Hugging Face's LlamaConfig)."""

    vocab_size: int = 32000
    hidden_size: int = 3200
    intermediate_size: int = 8640
    num_hidden_layers: int = 26
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02  # std of every weight at random initialisation
    rope_theta: float = 10000.0
    # Hugging Face's rope dict (`rope_type` or `type`, `factor`, ...); None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    param_dtype: DType = "float32"
    dtype: DType = "float32"  # compute dtype
    scan_layers: bool = True
    # jax.checkpoint policy name for each scanned layer: none (no remat), full (save nothing),
    # dots (save matmul outputs), dots_no_batch (save matmuls without batch dims). On a CPU a train
    # step under remat is also compiled in XLA's memory-optimised op order (fot.train.MEMORY_SCHEDULE).
    remat_policy: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # Attention kernel: auto picks blockwise where a layer's scores (queries x keys) outnumber a
    # `blockwise_threshold`-token window's, else plain (a decoding step over a long cache stays
    # plain); s2: LongLoRA's shifted sparse attention in training steps (groups of s2_group_size
    # tokens), auto everywhere else.
    attention: Literal["auto", "plain", "blockwise", "cudnn", "s2"] = "auto"
    s2_group_size: int | None = None
    blockwise_threshold: int = 4096
    attention_block_size: int = 512
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict) and not isinstance(self.rope_scaling, HashableDict):
            object.__setattr__(self, "rope_scaling", HashableDict(self.rope_scaling))

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self, where: str) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "attention_block_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: model.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{where}: model.num_attention_heads={self.num_attention_heads} does not divide "
                f"model.hidden_size={self.hidden_size}")
        if self.dim_per_head % 2:
            raise ConfigError(f"{where}: model.head_dim must be even for RoPE, got {self.dim_per_head}")
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(
                f"{where}: model.num_key_value_heads={self.kv_heads} does not divide "
                f"model.num_attention_heads={self.num_attention_heads}")
        check_range(where, "model", self, positive=("rms_norm_eps", "rope_theta", "initializer_range",
                                                    "blockwise_threshold"))
        if (self.attention == "s2") != (self.s2_group_size is not None):
            raise ConfigError(f"{where}: model.attention='s2' and model.s2_group_size go together (got "
                              f"attention={self.attention!r}, s2_group_size={self.s2_group_size})")
        if self.attention == "s2":
            if self.s2_group_size < 2 or self.s2_group_size % 2:
                raise ConfigError(f"{where}: model.s2_group_size must be even and >= 2 (half a group is "
                                  f"the shift), got {self.s2_group_size}")
            if self.num_attention_heads % 2:
                raise ConfigError(f"{where}: model.attention='s2' shifts half the heads: "
                                  f"model.num_attention_heads={self.num_attention_heads} is odd")
        if self.rope_scaling is not None:
            try:
                validate_rope_scaling(self.rope_scaling, self.dim_per_head, where)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.lora.validate(where, self)


@dataclass(frozen=True)
class MemoryConfig:
    """The FoT memory layers' architecture (LongLLaMA's `mem_layers`, `mem_positionals`): what is
    baked into a module's parameters and graph. How a session stores and reads the memory is the
    `retrieval` section, so changing that never rebuilds or re-validates a module."""

    layers: tuple[int, ...] = ()  # 0-based indices of memory layers; empty = plain LLaMA
    positionals: bool = True  # keys stored rotated at position 0; False = no RoPE in memory layers
    gate: bool = False  # Memorizing-Transformer sigmoid gate (ablation only)

    def validate(self, where: str, model: ModelConfig) -> None:
        for i in self.layers:
            if not 0 <= i < model.num_hidden_layers:
                raise ConfigError(
                    f"{where}: memory.layers contains {i}, outside 0..{model.num_hidden_layers - 1}")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"{where}: memory.layers has duplicates: {list(self.layers)}")


@dataclass(frozen=True)
class RetrievalConfig:
    """How an inference session (fot.inference.Session) stores and reads the memory (LongLLaMA's
    `mem_dtype`, `last_context_length`, ...). Training never reads it: crossbatch attends densely."""

    mode: Literal["dense", "knn", "ivf"] = "dense"
    knn_k: int = 128  # knn and ivf: keys per query and head
    ivf_clusters: int = 64  # ivf: clusters per head ...
    ivf_probe: int = 8  # ... and inverted lists searched (a big cluster spans several lists of mean size)
    # ivf's search: faiss (on the host, fot/model/memory/faiss_ivf.py) or JAX; auto = faiss when JAX
    # runs on the CPU and faiss-cpu is installed (faster there: BENCHMARKS.md), JAX otherwise
    ivf_library: Literal["auto", "jax", "faiss"] = "auto"
    dtype: DType = "bfloat16"  # storage dtype of memory keys/values
    capacity: int = 65536  # tokens per sequence per memory layer
    on_full: Literal["error", "drop_oldest"] = "error"
    last_context_length: int = 1024  # tokens that go through the local cache in logits_long

    def validate(self, where: str) -> None:
        check_range(where, "retrieval", self, positive=("capacity", "knn_k", "ivf_clusters", "ivf_probe"),
                    nonnegative=("last_context_length",))


# The retrieval settings' names before they left the memory section (saved run configs, the
# ablation sweeps' axes): read as their new names.
MOVED_KEYS = {f"memory.{k}": f"retrieval.{k}" for k in
              ("knn_k", "ivf_clusters", "ivf_probe", "dtype", "capacity", "on_full", "last_context_length")}
MOVED_KEYS["memory.retrieval"] = "retrieval.mode"


@dataclass(frozen=True)
class SourceConfig:
    """One data source: `builtin:stdlib`, `builtin:passkey`, `builtin:task:SPEC` (a suite task,
    fot/data/tasks.py), a hub name or a local file."""

    path: str = "builtin:stdlib"
    name: str | None = None  # HF dataset config name
    split: str = "train"
    streaming: bool = False
    text_column: str = "text"
    weight: float = 1.0  # relative probability that this source gives the next document
    # Local text files: one document per "document" (whole file), "paragraph" or "line".
    sample_by: Literal["document", "paragraph", "line"] = "document"
    # Built-in sources only. builtin:stdlib keeps files of min_chars..max_chars bytes (None: no upper
    # bound); builtin:passkey documents have a length uniform in min_chars..max_chars characters
    # (None: 4 * min_chars).
    min_chars: int = 2000
    max_chars: int | None = None
    # builtin:passkey only: the fraction of documents whose filler interleaves stdlib text with the
    # evaluation filler (so that the key is not the only non-repetitive line).
    mixed_filler: float = 0.5
    # builtin:passkey only: start documents with the prompt's task description (False: short
    # documents of filler, key line and question, dense in keys to copy).
    intro: bool = True
    # builtin:passkey only: None draws keys as the evaluation does (uniform in 1..49999, so 80% have
    # five digits); N draws the number of digits uniformly in 1..N first, so that short keys are
    # as common as long ones.
    key_digits: int | None = None
    # builtin:passkey only: the fraction of documents whose key is named ("the pass key of QXZ is").
    named: float = 0.0

    def validate(self, where: str, key: str) -> None:
        if not self.path:
            raise ConfigError(f"{where}: {key}.path is empty")
        if self.path.startswith("builtin:task:"):
            try:
                parse_task(self.path.removeprefix("builtin:task:"))
            except TaskError as e:
                raise ConfigError(f"{where}: {key}.path = {self.path!r}: {e}") from None
        elif self.path.startswith("builtin:") and self.path not in ("builtin:stdlib", "builtin:passkey"):
            raise ConfigError(f"{where}: {key}.path = {self.path!r} is not a built-in source "
                              f"(builtin:stdlib, builtin:passkey, builtin:task:TASK)")
        if not self.weight > 0:
            raise ConfigError(f"{where}: {key}.weight must be positive, got {self.weight}")
        if self.min_chars < 0:
            raise ConfigError(f"{where}: {key}.min_chars must be >= 0, got {self.min_chars}")
        if self.max_chars is not None and self.max_chars < max(self.min_chars, 1):
            raise ConfigError(f"{where}: {key}.max_chars={self.max_chars} is below "
                              f"{key}.min_chars={self.min_chars}")
        for name in ("mixed_filler", "named"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{where}: {key}.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.path == "builtin:passkey" and self.min_chars < 1:
            raise ConfigError(f"{where}: {key}.min_chars must be >= 1 for builtin:passkey")
        if self.key_digits is not None and not 1 <= self.key_digits <= 18:
            raise ConfigError(f"{where}: {key}.key_digits must be in 1..18, got {self.key_digits}")


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...] = (SourceConfig(),)
    tokenizer: str = "byte"  # "byte", a SentencePiece .model file, or an HF tokenizer dir/name
    min_doc_tokens: int = 0  # documents with fewer tokens (BOS/EOS not counted) are skipped
    seed: int = 0

    def validate(self, where: str) -> None:
        if not self.sources:
            raise ConfigError(f"{where}: data.sources is empty")
        for i, src in enumerate(self.sources):
            src.validate(where, f"data.sources[{i}]")
        if self.min_doc_tokens < 0:
            raise ConfigError(f"{where}: data.min_doc_tokens must be >= 0, got {self.min_doc_tokens}")


@dataclass(frozen=True)
class StageConfig:
    """One stage of progressive context training (train.stages); an unset field keeps the config's."""

    steps: int = 0
    window: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # rows per step (each row is one window)
    window: int | None = None  # tokens per row; None = model.max_position_embeddings
    pack_size: int = 4  # k: consecutive windows of one document per pack
    cross_batch_range: int = 3  # R: 0 = no crossbatch
    stepping: bool = True
    # Packed documents do not see each other: a token attends to its own document's tokens (in its
    # window and in crossbatch rows of its pack) and to the negatives (rows of the previous pack).
    document_mask: bool = False
    grad_accum: int = 1
    learning_rate: float = 2e-5
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float = 1.0  # 0: no clipping
    init_from: str | None = None  # HF dir/hub name or fot checkpoint; None = random init
    seed: int = 0
    run_dir: str = "runs/default"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    # Progressive context: runs of their own, each from the previous one's model (Config.stages).
    stages: tuple[StageConfig, ...] = ()

    def validate(self, where: str) -> None:
        for name in ("steps", "batch_size", "pack_size", "grad_accum", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: train.{name} must be positive, got {getattr(self, name)}")
        check_range(where, "train", self, positive=("learning_rate", "eps"),
                    nonnegative=("warmup_steps", "weight_decay", "clip_norm"), beta=("b1", "b2"),
                    ratio=("min_lr_ratio",))
        if self.window is not None and self.window <= 0:
            raise ConfigError(f"{where}: train.window must be positive, got {self.window}")
        if self.cross_batch_range < 0:
            raise ConfigError(f"{where}: train.cross_batch_range must be >= 0")
        if self.batch_size % self.pack_size:
            raise ConfigError(f"{where}: train.pack_size={self.pack_size} does not divide "
                              f"train.batch_size={self.batch_size}")
        if self.batch_size % self.grad_accum or (self.batch_size // self.grad_accum) % self.pack_size:
            raise ConfigError(f"{where}: train.grad_accum={self.grad_accum} must split train.batch_size="
                              f"{self.batch_size} into micro-batches of whole packs of train.pack_size="
                              f"{self.pack_size} rows")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh (fot/sharding.py): axis sizes, one of them may be -1 (= all remaining devices).
    `distributed`: call `jax.distributed.initialize` first; "auto" = when the environment is a
    multi-process launch (fot.sharding.distributed_env)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    distributed: bool | Literal["auto"] = "auto"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def validate(self, where: str = "<config>") -> "Config":
        self.model.validate(where)
        self.memory.validate(where, self.model)
        self.retrieval.validate(where)
        self.train.validate(where)
        self.data.validate(where)
        window = self.train.window or self.model.max_position_embeddings
        if self.model.s2_group_size is not None and window % self.model.s2_group_size:
            raise ConfigError(f"{where}: model.s2_group_size={self.model.s2_group_size} does not divide the "
                              f"training window of {window} tokens (train.window)")
        for i, st in enumerate(self.train.stages):
            if st.steps <= 0:
                raise ConfigError(f"{where}: train.stages[{i}].steps must be positive, got {st.steps}")
            if (st.window or window) < window:
                raise ConfigError(f"{where}: train.stages[{i}].window={st.window} is shorter than the "
                                  f"stage before it ({window}): stages go from short to long context")
            window = st.window or window
        if self.train.stages:
            self.stages(where)  # each stage's own config is checked too
        return self

    def validate_training(self, where: str = "<config>") -> "Config":
        """What only a training run needs besides validate(): a model loaded for inference may
        have no memory layers under the default train section."""
        if self.train.cross_batch_range and not self.memory.layers:
            raise ConfigError(f"{where}: train.cross_batch_range > 0 needs memory layers (memory.layers is "
                              f"empty); set train.cross_batch_range=0 to train a plain model")
        return self

    def stages(self, where: str = "<config>") -> list["Config"]:
        """The runs of train.stages, in order: stage i trains in RUN_DIR/stage<i> for its steps,
        with its window, batch size, learning rate and RoPE theta or scaling (unset: the config's
        or the stage before it's), from the model of stage i-1 (stage 0: train.init_from), on the
        data stream of seed data.seed + i (not the previous stage's documents again)."""
        tree, run_dir = self.to_dict(), Path(self.train.run_dir)
        tree["train"]["stages"] = []
        out = []
        for i, st in enumerate(self.train.stages):
            tree["train"].update({k: v for k in ("steps", "window", "batch_size", "learning_rate")
                                  if (v := getattr(st, k)) is not None},
                                 run_dir=str(run_dir / f"stage{i}"),
                                 init_from=self.train.init_from if i == 0 else str(run_dir / f"stage{i - 1}" / "final"))
            tree["model"].update({k: v for k in ("rope_theta", "rope_scaling") if (v := getattr(st, k)) is not None})
            tree["data"]["seed"] = self.data.seed + i
            out.append(config_from_dict(tree, f"{where}, train.stages[{i}]"))
        return out

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections).validate()


# ------------------------------------------------------------------------------------------------
# Building dataclasses from dicts, with type checks that name the key.


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp` and convert lists to tuples / dicts to dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{where}: {key} = {value!r} is not a valid {_type_name(tp)}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, where)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build(tp, value, where, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        item = args[0]
        return tuple(_coerce(item, v, f"{key}[{i}]", where) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-3 and 1e30 as strings; YAML 1.2 does not
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise bad
        return value
    raise bad


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build(cls: type, values: dict[str, Any], where: str = "<config>", prefix: str = "") -> Any:
    """Make dataclass `cls` from `values`; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(hints[k], v, key, where)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' from a command line -> (dotted key, value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(tree: dict[str, Any], overrides: list[str] | dict[str, Any],
                    where: str = "") -> dict[str, Any]:
    """Set overrides in a nested dict of config values, copying it: `key=value` strings (values
    parsed as YAML) or a {dotted key: value} mapping. The one place overrides are applied."""
    tree = moved_keys_renamed(tree)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    prefix = f"{where}: " if where else ""
    for key, value in items:
        parts = MOVED_KEYS.get(key, key).split(".")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{prefix}override '{key}': '{p}' is not a section")
        node[parts[-1]] = value
    return tree


def moved_keys_renamed(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with the MOVED_KEYS under their new names (a new name set too wins)."""
    tree = copy.deepcopy(tree)
    memory = tree.get("memory")
    if isinstance(memory, dict):
        for old, new in MOVED_KEYS.items():
            if (name := old.split(".")[1]) in memory:
                section = tree.setdefault("retrieval", {})
                if isinstance(section, dict):
                    section.setdefault(new.split(".")[1], memory.pop(name))
    return tree


def config_from_dict(values: dict[str, Any], where: str = "<dict>") -> Config:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: top level must be a mapping of sections")
    return build(Config, moved_keys_renamed(values), where).validate(where)


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a nested dict. A top-level `base: OTHER.yaml` (relative to this file) starts
    from that file's values; this file's keys replace the base's, section by section."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    if "base" not in values:
        return values
    base = values.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a file name, got {base!r}")
    base_path = (p.parent / base).resolve()
    if base_path in _seen:
        raise ConfigError(f"{path}: base {base!r} includes itself")
    merged = read_yaml(base_path, (*_seen, p.resolve()))
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (and its `base`) <- `key=value` overrides; validated and frozen."""
    values = read_yaml(path) if path is not None else {}
    where = str(path) if path else "<defaults>"
    if overrides:
        values = apply_overrides(values, overrides)
        where += " (with overrides " + " ".join(overrides) + ")"
    return config_from_dict(values, where)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ------------------------------------------------------------------------------------------------
# What a run's trajectory depends on (resuming a run, reusing an experiment's run directory).

# Keys that never change the weights a run has at a given step: bookkeeping (more train.steps
# continue the same run), the retrieval section (inference only: crossbatch training attends
# densely) and the mesh (a run resumes on any mesh).
BOOKKEEPING_KEYS = ("train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                    "train.run_dir")


def inference_only(key: str) -> bool:
    """Whether a dotted key (new or moved name) is a retrieval setting, read only at inference."""
    return MOVED_KEYS.get(key, key).startswith("retrieval.")


def flat_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config dict as {dotted key: value}, a list of sections by index (data.sources[0].weight);
    rope_scaling, a dict-valued setting, stays one value."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "rope_scaling":
            out.update(flat_keys(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flat_keys(x, f"{key}[{i}]."))
        else:
            out[key] = v
    return out


def trajectory_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every setting that differs and changes what is
    trained (all but BOOKKEEPING_KEYS, retrieval.* and mesh.*)."""
    a, b = flat_keys(old.to_dict()), flat_keys(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if k not in BOOKKEEPING_KEYS and not inference_only(k) and not k.startswith("mesh.")
            and a.get(k) != b.get(k)}
