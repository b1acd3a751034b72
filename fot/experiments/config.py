"""Experiment config files: the usual fot sections plus an `experiment:` block (and a `sweep:` block
for ablation grids), validated like fot configs: an unknown key, a wrong type or an impossible value is
a `ConfigError` naming the dotted key and the file.

    model: ... memory: ... data: ... train: ...   # the model trained (fot.config)
    experiment:
      name: passkey_tiny          # results go to experiments/results/<name>/ (default: file name)
      lengths: [256, 1k, 4k, 16k] # passkey prompt lengths in tokens (1k = 1024)
      trials: 10                  # per length (per length and depth for a depth grid)
      depths: uniform             # or a list of fractions in [0, 1]
      seed: 0
      methods: [fot-dense, baseline+yarn, ...]  # passkey_retrieval only (experiments/methods.py)
      baseline_overrides: ["train.learning_rate=1e-3"]  # passkey_retrieval only
      seeds: [0, 1, 2]            # training seeds (train.seed = data.seed); empty: the config's own
      finetune: {steps: 200, factor: 4, learning_rate: 3e-4, warmup_steps: 20}  # ft-* and fot-ft
      distractors: [0, 8, 64]     # the named-key multi-document task (empty: not run)
      named_methods: [fot-dense]  # which methods run it (default: every method with memory)
      suite: [niah_multikey, vt]  # RULER-style tasks (fot.eval.suite) at the same lengths and trials
      suite_threshold: 0.85       # accuracy that defines a task's effective length
    sweep:                        # fot.experiments.sweep only
      axes: {train.cross_batch_range: [0, 1, 3]}  # or cells: [{key: value, ...}, ...]

`key=value` overrides from the command line apply to the whole file (`experiment.trials=2` too).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from fot.config import Config, ConfigError, apply_overrides, build, config_from_dict, read_yaml


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuned opponents: the baseline continued at `factor` x its context with PI (ft-pi) or
    YaRN (ft-yarn), the same tokens per step; FoT continued for the same steps (fot-ft)."""

    steps: int = 200
    factor: int = 4
    learning_rate: float = 3e-4
    warmup_steps: int = 20


@dataclass(frozen=True)
class ExperimentConfig:
    name: str | None = None
    lengths: tuple[int | str, ...] = ("1k", "4k", "16k")
    trials: int = 10
    depths: str | tuple[float, ...] = "uniform"
    seed: int = 0
    methods: tuple[str, ...] = ()  # empty: the runner's default set
    baseline_overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distractors: tuple[int, ...] = ()
    named_methods: tuple[str, ...] = ()  # methods that also run the named-key task (empty: all with memory)
    suite: tuple[str, ...] = ()  # fot.data.tasks specs, run by every method besides passkey
    suite_threshold: float = 0.85

    def suite_tasks(self) -> list:
        from fot.data.tasks import parse_task

        return [parse_task(spec) for spec in self.suite]

    def token_lengths(self) -> list[int]:
        from fot.eval.report import parse_length

        return sorted({parse_length(str(n)) for n in self.lengths})


@dataclass(frozen=True)
class SweepConfig:
    # dotted config key -> values; or a label -> list of {dotted key: value} bundles varied together
    axes: dict[str, Any] = field(default_factory=dict)
    cells: tuple[dict[str, Any], ...] = ()  # an explicit list of cells instead of a product of axes


@dataclass(frozen=True)
class ExperimentFile:
    """One loaded experiment config: the fot config, the experiment block, the sweep block (or None)."""

    config: Config
    experiment: ExperimentConfig
    sweep: SweepConfig | None
    path: str
    overrides: tuple[str, ...]
    where: str  # the file (and overrides) for error messages

    @property
    def name(self) -> str:
        return self.experiment.name or Path(self.path).stem


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentFile:
    """Read and validate an experiment config (the fot sections, experiment and sweep blocks)."""
    where = str(path)
    values = read_yaml(path)
    if overrides:
        values = apply_overrides(values, list(overrides))
        where += " (with overrides " + " ".join(overrides) + ")"
    sections = {f.name for f in dataclasses.fields(Config)} | {"experiment", "sweep"}
    for key in values:
        if key not in sections:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(sections))})")
    ex_values, sweep_values = values.pop("experiment", None) or {}, values.pop("sweep", None)
    for key, block in (("experiment", ex_values), ("sweep", sweep_values)):
        if block is not None and not isinstance(block, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {block!r}")
    ex = build(ExperimentConfig, ex_values, where, "experiment")
    sweep = None if sweep_values is None else build(SweepConfig, sweep_values, where, "sweep")
    cfg = config_from_dict(values, where)
    _validate(ex, cfg, where)
    return ExperimentFile(cfg, ex, sweep, str(path), tuple(overrides), where)


def _validate(ex: ExperimentConfig, cfg: Config, where: str) -> None:
    from fot.data.tokenizer import load_tokenizer
    from fot.eval import passkey
    from fot.eval.report import parse_length

    if not ex.lengths:
        raise ConfigError(f"{where}: experiment.lengths is empty")
    for i, n in enumerate(ex.lengths):
        try:
            parse_length(str(n))
        except ValueError as e:
            raise ConfigError(f"{where}: experiment.lengths[{i}]: {e}") from None
    if ex.trials <= 0:
        raise ConfigError(f"{where}: experiment.trials must be positive, got {ex.trials}")
    if len(set(ex.seeds)) != len(ex.seeds) or any(s < 0 for s in ex.seeds):
        raise ConfigError(f"{where}: experiment.seeds must be distinct and >= 0, got {list(ex.seeds)}")
    if any(d < 0 for d in ex.distractors):
        raise ConfigError(f"{where}: experiment.distractors must be >= 0, got {list(ex.distractors)}")
    ft = ex.finetune
    for name in ("steps", "factor", "warmup_steps"):
        if getattr(ft, name) < (0 if name == "warmup_steps" else 1):
            raise ConfigError(f"{where}: experiment.finetune.{name} must be positive, got {getattr(ft, name)}")
    if not (ft.learning_rate > 0 and math.isfinite(ft.learning_rate)):
        raise ConfigError(f"{where}: experiment.finetune.learning_rate must be a positive number, "
                          f"got {ft.learning_rate}")
    try:
        passkey.parse_depths(ex.depths)
    except ValueError as e:
        raise ConfigError(f"{where}: experiment.depths: {e}") from None
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except Exception as e:  # noqa: BLE001 - any loader failure: the prompt lengths cannot be checked
        raise ConfigError(f"{where}: data.tokenizer={cfg.data.tokenizer!r}: {e}") from None
    try:
        passkey.check_lengths(tokenizer, ex.token_lengths())
    except ValueError as e:
        raise ConfigError(f"{where}: experiment.lengths: {e}") from None
    from fot.eval import suite

    try:
        suite.check_lengths(tokenizer, ex.suite_tasks(), ex.token_lengths())
    except ValueError as e:  # TaskError too: an unknown task or option
        raise ConfigError(f"{where}: experiment.suite: {e}") from None
    if not 0 < ex.suite_threshold <= 1:
        raise ConfigError(f"{where}: experiment.suite_threshold must be in (0, 1], got {ex.suite_threshold}")


def check_capacity(cfg: Config, lengths: list[int], where: str, what: str = "experiment.lengths") -> None:
    """Memory on reads whole prompts into the memory: the longest must fit in retrieval.capacity."""
    if max(lengths) > cfg.retrieval.capacity:
        raise ConfigError(f"{where}: {what} reaches {max(lengths)} tokens, more than "
                          f"retrieval.capacity={cfg.retrieval.capacity}; raise retrieval.capacity")


def named_prompt_tokens(cfg: Config, distractors: int) -> int:
    """Tokens of a named-key prompt with `distractors` other documents (5-digit keys: the longest)."""
    from fot.data import passkey
    from fot.data.tokenizer import load_tokenizer

    docs = [(f"N{i:05d}"[-3:], passkey.KEY_HIGH - 1 - i) for i in range(distractors + 1)]
    window = cfg.train.window or cfg.model.max_position_embeddings
    tail = passkey.named_tail(window)
    return len(load_tokenizer(cfg.data.tokenizer).encode(passkey.multidoc_text(docs, tail), bos=True))
