"""FoT vs RoPE-scaling baselines on passkey retrieval, from one config:

    python -m experiments.passkey_retrieval configs/experiments/passkey_tiny.yaml [key=value ...] [--out DIR]

Trains (or reuses, when finished) two models with the same architecture, data and token budget:
  - FoT: the config as written (memory layers, crossbatch), in OUT/runs/fot;
  - the baseline, in OUT/runs/baseline: no memory layers and no crossbatch, full attention over the
    context FoT sees per document per step: window = pack_size x FoT window, batch rows = FoT rows /
    pack_size, pack_size 1 (same tokens per step, same steps); max_position_embeddings = its window,
    so RoPE scaling factors are (eval length / baseline training context). experiment.baseline_overrides
    apply on top.
Then evaluates every method of experiment.methods (grammar in experiments/methods.py; default: FoT
dense and knn memory, FoT dense + linear / yarn over a pack-sized local window, and the baseline with
none / linear / ntk / dynamic / yarn / llama3 scaling) on passkey retrieval at experiment.lengths.

Writes OUT (default experiments/results/<experiment.name>/): results.json (every trial, the command,
config file and overrides, both resolved configs, training summaries, machine, date, git commit),
results.md (method x length accuracy), accuracy.png (accuracy vs length per method) and a length x
depth heatmap per method. The report is rewritten after each method, so a long run shows its progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from fot.config import Config, ConfigError, apply_overrides, config_from_dict

from experiments.config import ExperimentFile, check_capacity, load_experiment
from experiments.methods import DEFAULT_METHODS, Method, evaluate, parse_method
from experiments.provenance import run_meta
from experiments.training import Interrupted, check_same_run, ensure_trained


def baseline_config(cfg: Config, overrides: tuple[str, ...] = (), where: str = "<baseline>") -> Config:
    """The baseline of a FoT config (see the module docstring), then `overrides` (key=value)."""
    tr = cfg.train
    k = tr.pack_size
    window = k * (tr.window or cfg.model.max_position_embeddings)
    # Whole numbers: pack_size divides batch_size, and (the trainer checks) grad_accum splits the
    # batch into whole packs, so it also divides the baseline's rows.
    rows = tr.batch_size // k
    tree = cfg.to_dict()
    tree["model"]["max_position_embeddings"] = window
    tree["memory"]["layers"] = []
    tree["train"].update(window=window, batch_size=rows, pack_size=1, cross_batch_range=0)
    return config_from_dict(apply_overrides(tree, list(overrides)), where)


def with_run_dir(cfg: Config, run_dir: Path) -> Config:
    return cfg.replace(train=dataclasses.replace(cfg.train, run_dir=str(run_dir)))


def plan(ef: ExperimentFile, out: Path) -> tuple[Config, Config, list[Method]]:
    """The FoT and baseline configs (run dirs under out/runs) and the methods; every input error is
    raised here, before any training."""
    where = ef.where
    if ef.sweep is not None:
        raise ConfigError(f"{where}: has a sweep block; run it with python -m experiments.sweep")
    cfg = ef.config
    specs = ef.experiment.methods or DEFAULT_METHODS
    methods = []
    for i, spec in enumerate(specs):
        if spec in specs[:i]:
            raise ConfigError(f"{where}: experiment.methods[{i}] = {spec!r} is listed twice")
        try:
            methods.append(parse_method(spec))
        except ValueError as e:
            raise ConfigError(f"{where}: experiment.methods[{i}]: {e}") from None
        if methods[-1].model == "fot" and not cfg.memory.layers:
            raise ConfigError(f"{where}: experiment.methods[{i}] = {spec!r} asks for memory retrieval, but "
                              f"the model has no memory layers (memory.layers is empty)")
    if any(m.model == "fot" for m in methods):
        check_capacity(cfg, ef.experiment.token_lengths(), where)
    base_where = f"{where}, baseline derived with experiment.baseline_overrides " \
                 f"{list(ef.experiment.baseline_overrides)}"
    base = baseline_config(cfg, ef.experiment.baseline_overrides, base_where)
    return with_run_dir(cfg, out / "runs" / "fot"), with_run_dir(base, out / "runs" / "baseline"), methods


def run(ef: ExperimentFile, out: Path, progress: bool = True, argv: list[str] | None = None) -> dict[str, Path]:
    from fot.convert import load_model
    from fot.eval import report

    fot_cfg, base_cfg, methods = plan(ef, out)
    ex = ef.experiment
    lengths = ex.token_lengths()
    meta = {"experiment": ef.name, **run_meta("experiments.passkey_retrieval", argv), "config_file": ef.path,
            "overrides": list(ef.overrides), "experiment_config": dataclasses.asdict(ex),
            "configs": {"fot": fot_cfg.to_dict(), "baseline": base_cfg.to_dict()}, "training": {},
            "methods": {}}
    needed = {m.model for m in methods}
    cfgs = {"fot": fot_cfg, "baseline": base_cfg}
    for name in needed:  # a stale run dir fails now, not after the other model's training
        check_same_run(cfgs[name], Path(cfgs[name].train.run_dir))
    for name in ("fot", "baseline"):
        if name in needed:
            print(f"== training {name} in {cfgs[name].train.run_dir}", flush=True)
            meta["training"][name] = ensure_trained(cfgs[name], progress)
    models = {name: load_model(meta["training"][name]["final"]) for name in needed}
    window = fot_cfg.train.window or fot_cfg.model.max_position_embeddings
    trials: list[dict] = []
    paths: dict[str, Path] = {}
    for i, m in enumerate(methods, 1):
        print(f"== [{i}/{len(methods)}] {m.spec}", flush=True)
        got, info = evaluate(m, models[m.model], lengths, window=window, pack_size=fot_cfg.train.pack_size,
                             trials=ex.trials, depths=ex.depths, seed=ex.seed, progress=progress)
        trials += got
        meta["methods"][m.spec] = info
        paths = report.write_accuracy_report(out, trials, meta, name=f"passkey retrieval: {ef.name}")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.passkey_retrieval",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="experiment config (e.g. configs/experiments/passkey_tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=5 experiment.trials=2")
    ap.add_argument("--out", default=None, help="output directory (default experiments/results/<name>)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_intermixed_args(argv)
    from fot.checkpoint import CheckpointError
    from fot.data.sources import DataError
    from fot.train import TrainError

    try:
        ef = load_experiment(args.config, args.overrides)
        out = Path(args.out or Path("experiments") / "results" / ef.name)
        paths = run(ef, out, progress=not args.no_progress, argv=argv)
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, TrainError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print(paths["md"].read_text())
    print("wrote", ", ".join(str(p) for k, p in paths.items() if not k.startswith("heatmap")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
