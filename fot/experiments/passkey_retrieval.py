"""FoT vs RoPE-scaling baselines on passkey retrieval, from one config:

    python -m fot.experiments.passkey_retrieval CONFIG [key=value ...] [--seed S] [--train-only M,...]
        [--gather] [--out DIR]

Trains (or reuses, when finished) the models the methods need, per training seed of
experiment.seeds (train.seed = data.seed = S, into OUT/seeds/S/; `--seed S` runs one):
  - fot: the config as written (memory layers, crossbatch), in runs/fot;
  - baseline: no memory layers and no crossbatch, full attention over the context FoT sees per
    document per step: window = pack_size x FoT window, batch rows = FoT rows / pack_size (same
    tokens per step, same steps, same data); experiment.baseline_overrides apply on top;
  - ft-pi, ft-yarn: the baseline continued at experiment.finetune.factor x its context with PI /
    YaRN; fot-ft: FoT continued for the same steps and tokens.
Then evaluates every method of experiment.methods (grammar in experiments/methods.py) on passkey
retrieval at experiment.lengths and, for the methods with memory (or experiment.named_methods), the
named-key multi-document task at experiment.distractors. docs/experiments.md has the details.

Writes OUT (default experiments/results/<experiment.name>/, or OUT/seeds/S): results.json (every
trial, the command, the resolved configs, training summaries, machine, date, git commit), results.md
(accuracy with Wilson 95% intervals, by where the key was, over-generation, per seed, named task),
accuracy.png, named.png and a length x depth heatmap per method; rewritten after each method, so a
long run shows its progress. `--gather` pools the finished seeds into OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from fot.config import Config, ConfigError, apply_overrides, config_from_dict

from fot.experiments.config import ExperimentFile, check_capacity, load_experiment, named_prompt_tokens
from fot.experiments.methods import DEFAULT_METHODS, Method, evaluate, parse_method, write_reports
from fot.experiments.provenance import run_meta
from fot.experiments.training import check_documents, check_same_run, ensure_trained, exit_status


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


def with_seed(cfg: Config, seed: int) -> Config:
    """One training run of the replication: the init and the data stream both follow the seed."""
    return cfg.replace(train=dataclasses.replace(cfg.train, seed=seed),
                       data=dataclasses.replace(cfg.data, seed=seed))


def continued(cfg: Config, parent: Config, ft, where: str, **train) -> Config:
    """`cfg` trained on from `parent`'s final weights for ft.steps at a constant ft.learning_rate (a
    fresh optimizer, as a fine-tune of a released checkpoint starts)."""
    tree = cfg.to_dict()
    tree["train"].update(init_from=str(Path(parent.train.run_dir) / "final"), steps=ft.steps,
                         learning_rate=ft.learning_rate, warmup_steps=ft.warmup_steps,
                         schedule="constant", **train)
    return config_from_dict(tree, where)


def finetuned_baseline(cfg: Config, base: Config, ft, rope_type: str, where: str) -> Config:
    """`cfg` (the baseline's config with its own run dir) continued from `base` at ft.factor x its
    context with PI (linear) or YaRN scaling of factor ft.factor (original context: the baseline's),
    the same tokens per step."""
    window = base.train.window or base.model.max_position_embeddings
    if base.train.batch_size % ft.factor:
        raise ConfigError(f"{where}: experiment.finetune.factor={ft.factor} does not divide the "
                          f"baseline's {base.train.batch_size} rows per step (the fine-tune keeps the "
                          f"tokens per step: rows / factor rows of factor x the window)")
    rope = {"rope_type": rope_type, "factor": float(ft.factor)}
    if rope_type == "yarn":
        rope["original_max_position_embeddings"] = window
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, rope_scaling=rope))
    return continued(cfg, base, ft, where, window=window * ft.factor,
                     batch_size=base.train.batch_size // ft.factor)


# Training order (a fine-tune after the model it starts from) and what each starts from.
MODELS = ("fot", "baseline", "fot-ft", "ft-pi", "ft-yarn")
PARENT = {"fot-ft": "fot", "ft-pi": "baseline", "ft-yarn": "baseline"}


def plan(ef: ExperimentFile, out: Path, seed: int | None = None) -> tuple[dict[str, Config], list[Method]]:
    """The configs of every model the methods need, by name (fot, baseline, fot-ft, ft-pi, ft-yarn;
    run dirs under out/runs), for training seed `seed` (None: the config's own seeds), and the
    methods; every input error is raised here, before any training."""
    where = ef.where
    if ef.sweep is not None:
        raise ConfigError(f"{where}: has a sweep block; run it with python -m fot.experiments.sweep")
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
        if methods[-1].memory and not cfg.memory.layers:
            raise ConfigError(f"{where}: experiment.methods[{i}] = {spec!r} asks for memory retrieval, but "
                              f"the model has no memory layers (memory.layers is empty)")
    for i, spec in enumerate(ef.experiment.named_methods):
        if spec not in specs or not parse_method(spec).memory:
            raise ConfigError(f"{where}: experiment.named_methods[{i}] = {spec!r} is not a method with memory "
                              f"of experiment.methods")
    if any(m.memory for m in methods):
        check_capacity(cfg, ef.experiment.token_lengths(), where)
        if ef.experiment.distractors:
            check_capacity(cfg, [named_prompt_tokens(cfg, max(ef.experiment.distractors))], where,
                           f"the named-key task with experiment.distractors={max(ef.experiment.distractors)}")
    if seed is not None:
        cfg = with_seed(cfg, seed)
    base_where = f"{where}, baseline derived with experiment.baseline_overrides " \
                 f"{list(ef.experiment.baseline_overrides)}"
    base = baseline_config(cfg, ef.experiment.baseline_overrides, base_where)
    runs = out / "runs"
    cfgs = {"fot": with_run_dir(cfg, runs / "fot"), "baseline": with_run_dir(base, runs / "baseline")}
    ft = ef.experiment.finetune
    used = {m.model for m in methods}
    if "fot-ft" in used:
        cfgs["fot-ft"] = continued(with_run_dir(cfg, runs / "fot-ft"), cfgs["fot"], ft, f"{where}, fot-ft")
    for rope, name in (("linear", "ft-pi"), ("yarn", "ft-yarn")):
        if name in used:
            cfgs[name] = finetuned_baseline(with_run_dir(base, runs / name), cfgs["baseline"], ft, rope,
                                            f"{where}, {name}")
    for name in ("baseline", "ft-pi", "ft-yarn"):
        if name in cfgs and (name in used or name == "baseline" and used & {"ft-pi", "ft-yarn"}):
            check_documents(cfgs[name], f"{where}, {name}")
    return cfgs, methods


def run(ef: ExperimentFile, out: Path, seed: int | None = None, train_only: list[str] | None = None,
        progress: bool = True, argv: list[str] | None = None) -> dict[str, Path]:
    """Train what the methods need (or only `train_only` and what they start from) for training seed
    `seed` in out/runs, then evaluate every method into out (nothing with train_only)."""
    from fot.convert import load_model

    cfgs, methods = plan(ef, out, seed)
    ex = ef.experiment
    lengths = ex.token_lengths()
    wanted = set(train_only) if train_only is not None else {m.model for m in methods}
    missing = sorted(wanted - set(cfgs))
    if missing:
        raise ConfigError(f"{ef.where}: --train-only {','.join(missing)}: no method of experiment.methods "
                          f"uses it")
    needed = [n for n in MODELS if n in wanted or any(PARENT.get(w) == n for w in wanted)]
    meta = {"experiment": ef.name, **run_meta("fot.experiments.passkey_retrieval", argv), "config_file": ef.path,
            "overrides": list(ef.overrides), "experiment_config": dataclasses.asdict(ex),
            "training_seed": seed, "configs": {n: cfgs[n].to_dict() for n in needed}, "training": {},
            "methods": {}}
    for name in needed:  # a stale run dir fails now, not after another model's training
        check_same_run(cfgs[name], Path(cfgs[name].train.run_dir))
    for name in needed:
        print(f"== training {name} in {cfgs[name].train.run_dir}", flush=True)
        meta["training"][name] = ensure_trained(cfgs[name], progress)
    if train_only is not None:
        return {}
    # Inference-time memory settings (capacity, last_context_length, ...) come from the experiment
    # config, not from the checkpoint: they never change the trained weights.
    evals = {"retrieval": dataclasses.asdict(cfgs["fot"].retrieval)}
    models = {name: load_model(meta["training"][name]["final"], **evals) for name in wanted}
    fot_cfg = cfgs["fot"]
    specs = [m.spec for m in methods]
    window = fot_cfg.train.window or fot_cfg.model.max_position_embeddings
    trials: list[dict] = []
    paths: dict[str, Path] = {}
    for i, m in enumerate(methods, 1):
        print(f"== [{i}/{len(methods)}] {m.spec}", flush=True)
        got, info = evaluate(m, models[m.model], lengths, window=window, pack_size=fot_cfg.train.pack_size,
                             trials=ex.trials, depths=ex.depths, seed=ex.seed,
                             distractors=ex.distractors if m.spec in (ex.named_methods or specs) else (),
                             suite_tasks=ex.suite_tasks(), training_seed=seed, progress=progress)
        trials += got
        meta["methods"][m.spec] = info
        paths = write_reports(out, trials, meta, f"passkey retrieval: {ef.name}", ex.suite_threshold)
    return paths


def gather(ef: ExperimentFile, out: Path, argv: list[str] | None = None) -> dict[str, Path]:
    """Pool the trials of every finished seed (out/seeds/S/results.json) into out: results.json (each
    seed's provenance under "seeds", every trial with its seed), results.md and the plots."""
    from fot.eval import report

    seeds, trials = {}, []
    for s in ef.experiment.seeds:
        path = out / "seeds" / str(s) / "results.json"
        if not path.is_file():
            print(f"seed {s}: no {path} yet, left out", flush=True)
            continue
        data = report.read_json(path)
        trials += data.pop("trials")
        seeds[str(s)] = {k: data[k] for k in ("command", "date", "machine", "git_commit", "git_dirty",
                                               "training", "methods") if k in data}
    if not seeds:
        raise ConfigError(f"{out}: no finished seed to gather (run --seed S first)")
    meta = {"experiment": ef.name, **run_meta("fot.experiments.passkey_retrieval", argv), "config_file": ef.path,
            "overrides": list(ef.overrides), "experiment_config": dataclasses.asdict(ef.experiment),
            "seeds": seeds}
    return write_reports(out, trials, meta, f"passkey retrieval: {ef.name}, training seeds {', '.join(seeds)}",
                         ef.experiment.suite_threshold)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fot.experiments.passkey_retrieval",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="experiment config (e.g. configs/experiments/passkey_tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=5 experiment.trials=2")
    ap.add_argument("--out", default=None, help="output directory (default experiments/results/<name>)")
    ap.add_argument("--seed", type=int, default=None,
                    help="run one training seed of experiment.seeds into OUT/seeds/SEED (default: all, in turn)")
    ap.add_argument("--train-only", default=None, metavar="MODELS",
                    help=f"comma-separated models to train (and what they start from), no evaluation: "
                         f"{', '.join(MODELS)}")
    ap.add_argument("--gather", action="store_true",
                    help="only pool the finished seeds' results into OUT (results.md, results.json, plots)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_intermixed_args(argv)

    def body() -> int:
        ef = load_experiment(args.config, args.overrides)
        out = Path(args.out or Path("experiments") / "results" / ef.name)
        train_only = None
        if args.train_only is not None:
            train_only = [m.strip() for m in args.train_only.split(",") if m.strip()]
            bad = [m for m in train_only if m not in MODELS]
            if bad or not train_only:
                raise ConfigError(f"--train-only {args.train_only!r}: use models among {', '.join(MODELS)}")
        seeds = list(ef.experiment.seeds)
        if args.seed is not None and args.seed not in seeds:
            raise ConfigError(f"{ef.where}: --seed {args.seed} is not one of experiment.seeds {seeds}")
        todo = [args.seed] if args.seed is not None else seeds
        paths = {}
        if not args.gather:
            for s in todo or [None]:
                where = out if s is None else out / "seeds" / str(s)
                paths = run(ef, where, s, train_only, progress=not args.no_progress, argv=argv)
        if seeds and train_only is None and (args.gather or args.seed is None):
            paths = gather(ef, out, argv)
        if not paths:
            return 0
        print(paths["md"].read_text())
        print("wrote", ", ".join(str(p) for k, p in paths.items() if not k.startswith("heatmap")))
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
