"""The RULER-style long-context suite: accuracy per task and context length, and each task's
effective length.

    python -m fot.eval.suite MODEL --tasks niah_filler,niah_multikey,vt,cwe,fwe --lengths 1k,4k \
        --trials 10 --seed 0 --memory on --out results/suite

Tasks are those of `fot.data.tasks` (NAME or NAME:OPTION=VALUE:..., e.g. `niah_multikey:keys=8`)
and `named`, the named-key multi-document task of fot.eval.passkey (`run_multidoc`, one run per
--distractors count; its prompts are as long as their documents, so --lengths does not apply).
Every prompt has exactly the target number of tokens (BOS counted). Trial j of a task at length L
draws its depth (uniform depths) from default_rng(task_seed(task, seed, L, j) + [0]) and its
content from the same sequence + [1], so a trial does not depend on the other tasks or lengths.

Scoring follows RULER (github.com/NVIDIA/RULER, scripts/eval/synthetic/constants.py): the model
greedily decodes --new-tokens tokens (default: the canonical answer's tokens + 4), and the
prediction's score is `string_match_all`, the fraction of the reference strings it contains
(case-insensitive). A trial is correct when it contains all of them; the accuracy (with its Wilson
95% interval) is the fraction of correct trials, and a task's effective length is the longest
evaluated length up to which the accuracy stays >= --threshold at every evaluated length (none
if the shortest already falls below). results.md also gives RULER's number, the mean score.

Methods (--memory, --rope-scaling, --window, key=value config overrides such as
retrieval.mode=knn) are those of fot.eval.passkey. Outputs in
--out: results.json (every trial), results.md and score.png; runs of other methods already in
--out/results.json are kept. Bad input (an unknown task or option, a length below a task's
shortest prompt, trials <= 0) is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fot.data import tasks as suite_tasks
from fot.eval import passkey, report

NAMED = "named"


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's string_match_all for one prediction: the fraction of references it contains."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER's string_match_part for one prediction: 1 if it contains any reference (QA tasks)."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


def parse_tasks(spec: str) -> list:
    """Comma-separated task specs; `named` stays a name (run by passkey.run_multidoc)."""
    specs = [s.strip() for s in spec.split(",") if s.strip()]
    if not specs:
        raise ValueError("--tasks is empty")
    return [NAMED if s == NAMED else suite_tasks.parse_task(s) for s in specs]


def check_lengths(tokenizer, tasks: Sequence, lengths: Sequence[int]) -> None:
    for task in tasks:
        if task == NAMED:
            continue
        for n in lengths:
            need = task.min_tokens(tokenizer, n)
            if n < need:
                raise ValueError(f"--lengths {n}: task {task.spec} needs at least {need} tokens with "
                                 f"this tokenizer")
        task.build(tokenizer, max(lengths), 0.5, [0])  # fails now if the tokenizer loses the haystack


def plan_trials(tasks: Sequence, lengths: Sequence[int], trials: int, depths, seed: int) -> list[dict]:
    """(task, length, trial, depth, seed sequence) of every trial of the fitted-length tasks;
    `trials` per length with uniform depths, or per (length, depth) of a depth grid."""
    depths = passkey.parse_depths(depths)
    if trials <= 0:
        raise ValueError(f"--trials must be positive, got {trials}")
    plan = []
    for task in tasks:
        if task == NAMED:
            continue
        for length in lengths:
            count = trials if depths == "uniform" else trials * len(depths)
            for j in range(count):
                seq = suite_tasks.task_seed(task, seed, length, j)
                depth = float(np.random.default_rng(seq + [0]).random()) if depths == "uniform" \
                    else depths[j // trials]
                plan.append({"task": task, "length": int(length), "trial": j, "depth": depth,
                             "seq": seq + [1]})
    return plan


def decode_until_eos(tok, ids: Sequence[int]) -> str:
    """The text of generated ids up to the first EOS."""
    ids = list(ids)
    return tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids)


def _generate(gen, rows: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    if hasattr(gen, "greedy"):  # WithMemory / FullAttention: one batch
        return gen.greedy(rows, n)
    return [passkey.new_tokens(gen.generate(r, max_new_tokens=n, temperature=0.0)) for r in rows]


def run_suite(gen, tasks: Sequence, lengths: Sequence[int], trials: int = 10, depths="uniform",
              seed: int = 0, method: str = "model", new_tokens: int | None = None, batch_size: int = 16,
              distractors: Sequence[int] = (4,), tail_chars: int | None = None,
              progress: bool = True) -> list[dict]:
    """Every trial as a dict: method, task, length, trial, depth, seed, prompt_tokens, expected,
    prediction, score (string_match_all), correct (all references found), generated_ids,
    needle_token (the asked needle's first token) and key_in (that token in memory or local; see
    passkey.key_place). The trials of one
    (task, length) are decoded in batches of `batch_size` (equal lengths by construction).
    `named` runs passkey.run_multidoc with `tail_chars` of filler after the asked document."""
    from tqdm.auto import tqdm

    tok = gen.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; suite prompts are text")
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    if NAMED in tasks and tail_chars is None:
        raise ValueError(f"task {NAMED} needs tail_chars (passkey.prompts.named_tail of the window)")
    check_lengths(tok, tasks, lengths)
    plan = plan_trials(tasks, lengths, trials, depths, seed)
    memory_tokens = getattr(gen, "memory_tokens", lambda _: None)
    results, hits = [], 0
    bar = tqdm(total=len(plan), desc=f"suite {method}", disable=not progress, unit="trial")
    cells: dict[tuple, list[dict]] = {}
    for t in plan:
        cells.setdefault((t["task"].spec, t["length"]), []).append(t)
    chunks = [c[i:i + batch_size] for c in cells.values() for i in range(0, len(c), batch_size)]
    for chunk in chunks:
        ps = [t["task"].build(tok, t["length"], t["depth"], t["seq"]) for t in chunk]
        budgets = [new_tokens or len(tok.encode(p.answer, bos=False)) + 4 for p in ps]
        outs = _generate(gen, [p.ids for p in ps], max(budgets))
        for t, p, out, k in zip(chunk, ps, outs, budgets):
            prediction = decode_until_eos(tok, out[:k])
            score = string_match_all(prediction, p.expected)
            span = None if p.needle_token is None else (p.needle_token, p.needle_token + 1)
            results.append({"method": method, "task": p.task, "length": t["length"], "trial": t["trial"],
                            "depth": p.depth, "seed": seed, "prompt_tokens": len(p.ids),
                            "expected": p.expected, "prediction": prediction, "score": score,
                            "correct": score == 1.0, "generated_ids": list(out[:k]), "needle_token": p.needle_token,
                            "key_in": span and passkey.key_place(span, memory_tokens(len(p.ids)))})
            hits += score == 1.0
        bar.update(len(chunk))
        bar.set_postfix(task=p.task, length=t["length"], acc=f"{hits / len(results):.2f}")
    bar.close()
    if NAMED in tasks:
        for t in passkey.run_multidoc(gen, distractors, trials, seed, tail_chars, method, progress,
                                      until_wrong=True):
            results.append({**t, "seed": seed, "expected": [t["answer"]], "prediction": t["generated"],
                            "score": float(t["correct"])})
    return results


# ------------------------------------------------------------------------------------------------
# Report


def effective_length(accuracy: dict[int, float], threshold: float) -> int | None:
    """The longest length L such that the accuracy is >= threshold at every evaluated length <= L."""
    best = None
    for n in sorted(accuracy):
        if accuracy[n] < threshold:
            break
        best = n
    return best


def write_suite_report(out, trials: Sequence[dict], meta: dict[str, Any], *, name: str,
                       threshold: float) -> dict[str, Path]:
    """results.json (meta, accuracy, Wilson intervals, mean score and effective length per method
    and task, every trial), results.md (per method: task x length accuracy with Wilson 95%
    intervals and the effective length, RULER's mean score, accuracy by where the needle was
    (memory / local) with memory on; the named-key task by distractor count) and score.png (accuracy vs length per method and task, Wilson bars)."""
    out = Path(out)
    fitted = [t for t in trials if t["task"] != NAMED]
    named = [t for t in trials if t["task"] == NAMED]
    methods = list(dict.fromkeys(t["method"] for t in trials))
    cnt = report.counts_by(fitted, "method", "task", "length")
    scores: dict[tuple, list[float]] = {}
    for t in fitted:
        scores.setdefault((t["method"], t["task"], t["length"]), []).append(t["score"])
    summary: dict[str, dict] = {}
    parts = [f"# {name}\n\nAccuracy (all reference strings in the prediction) by task and context "
             f"length (tokens): the fraction, its Wilson 95% interval and the counts. Effective length: "
             f"the longest length up to which the accuracy stays >= {threshold:g}.\n"]
    for m in methods:
        mine = [t for t in fitted if t["method"] == m]
        task_names = list(dict.fromkeys(t["task"] for t in mine))
        lengths = sorted({t["length"] for t in mine})
        summary[m] = {}
        rows, score_rows = [], []
        for task in task_names:
            cells = {n: cnt[(m, task, n)] for n in lengths if (m, task, n) in cnt}
            acc = {n: k / c for n, (k, c) in cells.items()}
            mean = {n: float(np.mean(scores[(m, task, n)])) for n in cells}
            eff = effective_length(acc, threshold)
            summary[m][task] = {"accuracy": {str(n): a for n, a in acc.items()},
                                "wilson95": {str(n): report.wilson(*c) for n, c in cells.items()},
                                "score": {str(n): s for n, s in mean.items()}, "effective_length": eff}
            rows.append([task, *[report.format_rate(*cells[n]) if n in cells else "—" for n in lengths],
                         report.format_length(eff) if eff else "—"])
            score_rows.append([task, *[mean.get(n, float("nan")) for n in lengths]])
        if rows:
            heads = [report.format_length(n) for n in lengths]
            parts.append(f"## {m}\n\n" + report.markdown_table(["task", *heads, "effective"], rows)
                         + "\nRULER's score (mean fraction of the references found):\n\n"
                         + report.markdown_table(["task", *heads], score_rows))
            placed = report.counts_by([t for t in mine if t.get("key_in")], "task", "key_in", "length")
            where = [[task, w, *[report.format_rate(*placed[(task, w, n)]) if (task, w, n) in placed else "—"
                                 for n in lengths]]
                     for task in task_names for w in ("memory", "local") if any(k[:2] == (task, w) for k in placed)]
            if where:
                parts.append("By where the asked needle's first token was when the question was read "
                             "(read into the FoT memory, or in the final local context):\n\n"
                             + report.markdown_table(["task", "needle in", *heads], where))
    extra = {}
    if named:
        nc = report.counts_by(named, "method", "distractors")
        extra["named_accuracy"] = {m: {str(d): k / n for (m2, d), (k, n) in nc.items() if m2 == m}
                                   for m in methods}
        ds = sorted({t["distractors"] for t in named})
        rows = [[m, *[report.format_rate(*nc[(m, d)]) if (m, d) in nc else "—" for d in ds]]
                for m in dict.fromkeys(t["method"] for t in named)]
        parts.append("## Named keys: other documents in memory\n\nD other named documents before the "
                     "asked one (fot.eval.passkey's named-key task).\n\n"
                     + report.markdown_table(["method", *[f"D={d}" for d in ds]], rows))
    paths = {"json": report.write_json(out / "results.json", {**meta, "threshold": threshold,
                                                             "tasks": summary, **extra,
                                                             "trials": list(trials)})}
    paths["md"] = out / "results.md"
    paths["md"].write_text("\n".join(parts))
    if fitted:
        labelled = [{**t, "method": t["task"] if len(methods) == 1 else f"{t['method']} {t['task']}"}
                    for t in fitted]
        series = list(dict.fromkeys(t["method"] for t in labelled))
        paths["png"] = report.plot_rates(out / "score.png", labelled, series, "length",
                                         sorted({t["length"] for t in fitted}),
                                         xlabel="context length (tokens)",
                                         title=f"{name}: accuracy (Wilson 95%)")
    return paths


# ------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fot.eval.suite", description=__doc__.split("\n")[0])
    passkey.add_model_args(ap)
    ap.add_argument("--tasks", default=",".join([*suite_tasks.TASKS, NAMED]),
                    help=f"comma-separated NAME[:OPTION=VALUE...]; names: {', '.join(suite_tasks.TASKS)}, "
                         f"{NAMED} (default: all)")
    ap.add_argument("--lengths", default="1k,4k", help="comma-separated token counts (1k = 1024)")
    ap.add_argument("--trials", type=int, default=10, help="trials per task and length (per depth for a grid)")
    ap.add_argument("--depths", default="uniform", help="uniform | comma-separated fractions in [0, 1]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.85, help="accuracy that defines the effective length")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens to decode (default: answer + 4)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts decoded at once")
    ap.add_argument("--distractors", default="4", help=f"{NAMED}: comma-separated counts of other documents")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_intermixed_args(argv)
    from fot.config import ConfigError

    try:
        task_list = parse_tasks(args.tasks)
        lengths = report.parse_lengths(args.lengths)
        depths = passkey.parse_depths(args.depths)
        distractors = [int(d) for d in args.distractors.split(",") if d.strip()]
        for name, value in (("--trials", args.trials), ("--batch-size", args.batch_size),
                            ("--new-tokens", args.new_tokens)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 < args.threshold <= 1.0:
            raise ValueError(f"--threshold must be in (0, 1], got {args.threshold}")
        gen, method = passkey.load_for_eval(args, max(lengths))
        check_lengths(gen.tokenizer, task_list, lengths)
        window = args.window or gen.model.config.model.max_position_embeddings
        trials = run_suite(gen, task_list, lengths, args.trials, depths, args.seed, method, args.new_tokens,
                           args.batch_size, distractors, passkey.prompts.named_tail(window),
                           not args.no_progress)
    except (ValueError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {**report.run_info(), "model": args.model, "seed": args.seed, "depths": depths,
            "trials_per_cell": args.trials, "tasks": [getattr(t, "spec", t) for t in task_list]}
    paths = passkey.write_outputs(args.out, trials, meta, method, "suite",
                                  functools.partial(write_suite_report, threshold=args.threshold))
    for task, row in report.read_json(paths["json"])["tasks"].get(method, {}).items():
        eff = row["effective_length"]
        print(f"{task}: " + " ".join(f"{report.format_length(int(n))}={a:.2f}" for n, a in row["accuracy"].items())
              + f" effective={report.format_length(eff) if eff else '-'}")
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
