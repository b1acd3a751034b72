"""Ablation grids: train and evaluate every cell of a grid of config overrides.

    python -m fot.experiments.sweep configs/experiments/ablation_tiny.yaml [key=value ...] [--out DIR]
        [--task-index I --num-tasks N] [--gather]

The `sweep:` block of the config lists `axes` (dotted config key -> values; the grid is their
product) or an explicit list of `cells` (each a mapping of dotted keys to values). To vary several
keys together, an axis may list mappings instead of values:

    sweep:
      axes:
        train.cross_batch_range: [0, 1, 3]
        search:                             # a label: each value is a set of overrides
          - {retrieval.mode: dense}
          - {retrieval.mode: knn, retrieval.knn_k: 16}

Each cell is trained (OUT/runs/<training overrides>/) and evaluated on passkey retrieval at
experiment.lengths: with its memory (its retrieval.mode, knn_k, ...) when it has memory layers,
else with plain attention over the whole prompt. Keys that only matter at inference (the retrieval
section: retrieval.mode, retrieval.knn_k, ...) do not start another training: cells
that differ only in them share one trained model. A cell's result is OUT/cells/<cell>/result.json
(accuracy per length, every trial, the final training loss); a cell with a result is skipped on a
re-run.

`--task-index I --num-tasks N` (a SLURM array, a TPU pod's hosts) runs the I-th share: the cells are
grouped by their trained model and group g goes to task g % N, so a model is never trained by two
tasks at once and every cell is in exactly one task. When all cells have results (or with
`--gather`, which runs nothing), OUT/results.json, results.md (one row per cell) and accuracy.png
(accuracy vs length per cell) are built from the cells' result files.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fot.config import Config, ConfigError, apply_overrides, config_from_dict, inference_only

from fot.experiments.config import ExperimentFile, check_capacity, load_experiment
from fot.experiments.methods import write_reports
from fot.experiments.provenance import run_meta
from fot.experiments.training import check_same_run, ensure_trained, exit_status


@dataclass(frozen=True)
class Cell:
    index: int
    overrides: dict[str, Any]  # dotted key -> value
    config: Config  # the base config with the training overrides (run_dir set by the sweep)

    @property
    def name(self) -> str:
        return slug(self.overrides)

    @property
    def label(self) -> str:
        """Short name for plots: the last part of each key."""
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={_value_text(v)}" for k, v in self.overrides.items()) or "base"

    @property
    def train_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.overrides.items() if not inference_only(k)}

    @property
    def eval_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.overrides.items() if inference_only(k)}

    @property
    def train_name(self) -> str:
        return slug(self.train_overrides)


def _value_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def slug(overrides: dict[str, Any]) -> str:
    """A directory name for a set of overrides ('base' for none)."""
    text = ",".join(f"{k}={_value_text(v)}" for k, v in overrides.items()) or "base"
    return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in text)


def as_override_args(overrides: dict[str, Any]) -> list[str]:
    """key=value strings for fot.config.apply_overrides (JSON values are YAML, parsed back exactly)."""
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def expand(sweep, where: str) -> list[dict[str, Any]]:
    """The grid's cells as dicts of dotted key -> value: the product of the axes, or sweep.cells."""
    if sweep.axes and sweep.cells:
        raise ConfigError(f"{where}: give sweep.axes or sweep.cells, not both")
    if sweep.cells:
        grid = []
        for i, cell in enumerate(sweep.cells):
            if not cell:
                raise ConfigError(f"{where}: sweep.cells[{i}] is empty")
            grid.append(dict(cell))
    else:
        if not sweep.axes:
            raise ConfigError(f"{where}: the sweep block needs axes or cells")
        choices = []
        for axis, values in sweep.axes.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: sweep.axes.{axis} must be a non-empty list of values")
            bundles = [isinstance(v, dict) for v in values]
            if any(bundles) and not all(bundles):
                raise ConfigError(f"{where}: sweep.axes.{axis} mixes mappings and plain values; use "
                                  f"mappings of dotted keys for every value, or plain values only")
            choices.append([dict(v) if isinstance(v, dict) else {axis: v} for v in values])
        grid = []
        for combo in itertools.product(*choices):
            cell: dict[str, Any] = {}
            for part in combo:
                for k, v in part.items():
                    if k in cell:
                        raise ConfigError(f"{where}: key {k} is set by two sweep axes")
                    cell[k] = v
            grid.append(cell)
    names = [slug(c) for c in grid]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"{where}: sweep cells {names.index(n)} and {i} are the same cell ({n})")
    return grid


def plan(ef: ExperimentFile, out: Path) -> list[Cell]:
    """Every cell with its validated training config; input errors raise here, before training."""
    where = ef.where
    if ef.sweep is None:
        raise ConfigError(f"{where}: no sweep block; a single comparison runs with "
                          f"python -m fot.experiments.passkey_retrieval")
    if ef.experiment.methods or ef.experiment.baseline_overrides:
        raise ConfigError(f"{where}: experiment.methods and experiment.baseline_overrides do not apply to "
                          f"a sweep; vary retrieval.mode / retrieval.knn_k as sweep axes instead")
    base = ef.config.to_dict()
    cells = []
    for i, overrides in enumerate(expand(ef.sweep, where)):
        cell_where = f"{where}, sweep cell {i} ({slug(overrides)})"
        full = config_from_dict(apply_overrides(base, as_override_args(overrides)), cell_where)
        if full.memory.layers:
            check_capacity(full, ef.experiment.token_lengths(), cell_where)
        trained = {k: v for k, v in overrides.items() if not inference_only(k)}
        tree = apply_overrides(base, as_override_args(trained))
        tree["train"]["run_dir"] = str(out / "runs" / slug(trained))
        cells.append(Cell(i, overrides, config_from_dict(tree, cell_where)))
    return cells


def assign(cells: list[Cell], task_index: int, num_tasks: int) -> list[Cell]:
    """The cells of task `task_index`: groups of cells sharing a trained model, dealt round-robin."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"--task-index {task_index} must lie in 0..--num-tasks-1 (--num-tasks {num_tasks})")
    groups = list(dict.fromkeys(c.train_name for c in cells))
    mine = {g for i, g in enumerate(groups) if i % num_tasks == task_index}
    return [c for c in cells if c.train_name in mine]


def result_path(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.name / "result.json"


def evaluate_cell(cell: Cell, final: str, ef: ExperimentFile, progress: bool) -> tuple[str, dict, list[dict]]:
    """Passkey trials of a cell's trained model with its eval-only overrides applied (with memory:
    also the named-key task at experiment.distractors): the method's name, the evaluated model's
    config and the trials, each with the cell's training seed."""
    from fot.convert import load_model
    from fot.eval import passkey, suite

    model = load_model(final, **cell.eval_overrides)
    memory = bool(model.config.memory.layers)
    window = cell.config.train.window or cell.config.model.max_position_embeddings
    gen, method = passkey.prepare(model, memory=memory, window=window if memory else None)
    ex = ef.experiment
    trials = passkey.run_passkey(gen, ex.token_lengths(), ex.trials, ex.depths, ex.seed, cell.name, progress,
                                 until_wrong=True)
    if ex.suite:
        trials += suite.run_suite(gen, ex.suite_tasks(), ex.token_lengths(), ex.trials, ex.depths, ex.seed,
                                  cell.name, progress=progress)
    if memory and ex.distractors:
        trials += passkey.run_multidoc(gen, ex.distractors, ex.trials, ex.seed, passkey.prompts.named_tail(window),
                                       cell.name, progress)
    return method, model.config.to_dict(), [{**t, "seed": cell.config.train.seed} for t in trials]


def run_task(ef: ExperimentFile, out: Path, task_index: int = 0, num_tasks: int = 1,
             progress: bool = True, argv: list[str] | None = None) -> list[Cell]:
    """Train and evaluate this task's unfinished cells; returns the cells it ran."""
    from tqdm.auto import tqdm

    from fot.eval import report

    cells = plan(ef, out)
    todo = [c for c in assign(cells, task_index, num_tasks) if not result_path(out, c).is_file()]
    print(f"sweep {ef.name}: {len(cells)} cells, task {task_index}/{num_tasks}: {len(todo)} to run", flush=True)
    for cell in todo:  # a stale run dir fails now, not after hours of other cells
        check_same_run(cell.config, Path(cell.config.train.run_dir))
    trained: dict[str, dict] = {}
    for cell in tqdm(todo, desc="sweep cells", unit="cell", disable=not progress):
        print(f"== cell {cell.index}: {cell.name}", flush=True)
        if cell.train_name not in trained:
            trained[cell.train_name] = ensure_trained(cell.config, progress)
        training = trained[cell.train_name]
        method, config, trials = evaluate_cell(cell, training["final"], ef, progress)
        acc = report.accuracy_by([t for t in trials if t.get("task", "passkey") == "passkey"], "length")
        report.write_json(result_path(out, cell), {
            "cell": cell.name, "index": cell.index, "overrides": cell.overrides,
            "train_run": cell.train_name, "training": training, "method": method,
            "accuracy": {str(n): a for (n,), a in acc.items()}, **run_meta("fot.experiments.sweep", argv),
            "config": config, "trials": trials})
    return todo


SEED_KEYS = ("train.seed", "data.seed")  # cells differing only in these are replicates: pooled


def gather(ef: ExperimentFile, out: Path, argv: list[str] | None = None) -> dict[str, Path]:
    """From the cells' result files: results.md (per cell without its seed keys, trials of all its
    training seeds pooled, Wilson 95% intervals, per-seed counts, the named-key task) with a table
    of final losses, results.json and the plots (missing cells are listed)."""
    from fot.eval import report

    cells = plan(ef, out)
    results = {c.name: report.read_json(result_path(out, c)) for c in cells if result_path(out, c).is_file()}

    def group(c: Cell) -> str:
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={_value_text(v)}" for k, v in c.overrides.items()
                         if k not in SEED_KEYS) or "base"

    trials = [{**t, "method": group(c)} for c in cells if c.name in results for t in results[c.name]["trials"]]
    missing = [c.name for c in cells if c.name not in results]
    meta = {"experiment": ef.name, **run_meta("fot.experiments.sweep", argv), "config_file": ef.path,
            "overrides": list(ef.overrides), "experiment_config": dataclasses.asdict(ef.experiment),
            "sweep": dataclasses.asdict(ef.sweep), "base_config": ef.config.to_dict(), "missing": missing,
            "cells": [{k: v for k, v in results[c.name].items() if k != "trials"} for c in cells
                      if c.name in results]}
    if not trials:
        raise ConfigError(f"{out}: no cell has a result yet")
    paths = write_reports(out, trials, meta, f"sweep {ef.name}", ef.experiment.suite_threshold)
    losses = [[c.name, results[c.name]["training"]["final_loss"] if c.name in results else float("nan")]
              for c in cells]
    note = f"\n{len(missing)} of {len(cells)} cells have no result yet: {', '.join(missing)}\n" if missing else ""
    with paths["md"].open("a") as f:
        f.write("\n## Final training loss per cell\n\n" + report.markdown_table(["cell", "final loss"], losses)
                + note)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fot.experiments.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="experiment config with a sweep block (configs/experiments/ablation_tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every cell")
    ap.add_argument("--out", default=None, help="output directory (default experiments/results/<name>)")
    ap.add_argument("--task-index", type=int, default=0)
    ap.add_argument("--num-tasks", type=int, default=1)
    ap.add_argument("--gather", action="store_true", help="only build the table from the cells' results")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_intermixed_args(argv)

    def body() -> int:
        ef = load_experiment(args.config, args.overrides)
        out = Path(args.out or Path("experiments") / "results" / ef.name)
        if not args.gather:
            run_task(ef, out, args.task_index, args.num_tasks, progress=not args.no_progress, argv=argv)
            if not all(result_path(out, c).is_file() for c in plan(ef, out)):
                print("some cells have no result yet (other tasks); build the table later with --gather")
                return 0
        paths = gather(ef, out, argv)
        print(paths["md"].read_text())
        print("wrote", ", ".join(str(p) for p in paths.values()))
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
