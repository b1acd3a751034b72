"""Output forms shared by the evaluations: JSON, markdown tables, PNG line plots and heatmaps.

Plots use matplotlib's Agg backend (no display needed), imported only when a plot is written.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence


def parse_length(text: str) -> int:
    """'4096', '4k' (= 4096), '1.5k', '1m' (= 1048576) -> tokens; a clear error otherwise."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    num = t[:-1] if mult > 1 else t
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"length {text!r} is not a number of tokens like 4096 or 4k") from None
    if not math.isfinite(value) or value * mult <= 0 or value * mult != int(value * mult):
        raise ValueError(f"length {text!r} must be a positive whole number of tokens")
    return int(value * mult)


def parse_lengths(text: str) -> list[int]:
    """The --lengths argument of the eval CLIs: "1k,4k,300" -> [1024, 4096, 300]; empty is an error."""
    lengths = [parse_length(x) for x in text.split(",") if x.strip()]
    if not lengths:
        raise ValueError("--lengths is empty")
    return lengths


def format_length(n: int) -> str:
    """Inverse of parse_length for table headers: 4096 -> '4k'."""
    for unit, size in (("m", 1024 * 1024), ("k", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def run_info() -> dict[str, Any]:
    """The exact command, machine and date, recorded with every result."""
    import shlex

    # Under `python -m pkg.mod`, sys.argv[0] is the module's file: name the module instead.
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return {"command": shlex.join([Path(sys.executable).name, *head, *sys.argv[1:]]) if sys.argv else "",
            "argv": list(sys.argv), "machine": platform.platform(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)  # atomic: a crash never leaves half a results file
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "—"
            return f"{v:.4g}" if abs(v) >= 1000 else f"{v:.3f}".rstrip("0").rstrip(".")
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(path: str | Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *,
               xlabel: str, ylabel: str, title: str = "", logx: bool = True,
               ylim: tuple[float, float] | None = None,
               errors: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> Path:
    """One line per series name: {name: (xs, ys)}; x on a log2 axis (context lengths) by default;
    `errors` {name: (lower bounds, upper bounds)} draws error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, (xs, ys)) in enumerate(series.items()):
        # the colour cycle has 10 colours: later series differ by line and marker
        style = {"marker": "os^D"[i // 10 % 4], "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}
        if errors and name in errors:  # asymmetric (lower, upper) bounds, e.g. Wilson intervals
            lo, hi = errors[name]
            # max(0, .): the bounds are clipped to [0, 1], so they can miss y by a rounding error
            ax.errorbar(xs, ys, yerr=[[max(0.0, y - a) for y, a in zip(ys, lo)],
                                      [max(0.0, b - y) for y, b in zip(ys, hi)]],
                        capsize=3, label=name, **style)
        else:
            ax.plot(xs, ys, label=name, **style)
    if logx:
        ax.set_xscale("log", base=2)
        ticks = sorted({x for xs, _ in series.values() for x in xs})
        ax.set_xticks(ticks, [format_length(int(t)) for t in ticks])
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(path: str | Path, values: Sequence[Sequence[float]], row_labels: Sequence[str],
                 col_labels: Sequence[str], *, xlabel: str, ylabel: str, title: str = "") -> Path:
    """values[row][col] in [0, 1] (NaN = no trial), green = 1; each cell annotated."""
    import numpy as np

    plt = _pyplot()
    v = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(len(col_labels), 2), 1.2 + 0.6 * max(len(row_labels), 2)))
    im = ax.imshow(np.ma.masked_invalid(v), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    for (i, j), x in np.ndenumerate(v):
        if not np.isnan(x):
            ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Accuracy reports for retrieval evaluations (passkey, needle): trials are dicts with at least
# method, length, depth and correct.


def depth_bins(depths: Sequence[float]) -> tuple[list[str], Any]:
    """Column labels and a depth -> column function: the depths themselves when they form a grid
    (every one a multiple of 0.05), else five equal bins (uniformly random depths)."""
    distinct = sorted(set(depths))
    if all(abs(d * 20 - round(d * 20)) < 1e-9 for d in distinct):
        index = {d: i for i, d in enumerate(distinct)}
        return [f"{d:g}" for d in distinct], index.__getitem__
    edges = [i / 5 for i in range(6)]
    return ([f"{edges[i]:g}-{edges[i + 1]:g}" for i in range(5)], lambda d: min(int(d * 5), 4))


def accuracy_by(trials: Sequence[dict], *keys: str) -> dict[tuple, float]:
    """Mean of `correct` grouped by the given trial keys, in first-seen order."""
    groups: dict[tuple, list[bool]] = {}
    for t in trials:
        groups.setdefault(tuple(t[k] for k in keys), []).append(bool(t["correct"]))
    return {k: sum(v) / len(v) for k, v in groups.items()}


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n: centre (p + z²/2n) / (1 + z²/n),
    half-width z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)."""
    if n <= 0:
        return math.nan, math.nan
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def counts_by(trials: Sequence[dict], *keys: str) -> dict[tuple, tuple[int, int]]:
    """(correct, trials) grouped by the given trial keys, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for t in trials:
        g = groups.setdefault(tuple(t.get(k) for k in keys), [0, 0])
        g[0] += bool(t["correct"])
        g[1] += 1
    return {k: (c, n) for k, (c, n) in groups.items()}


def format_rate(k: int, n: int) -> str:
    """'0.93 [0.79, 0.98] 28/30': the accuracy, its Wilson 95% interval and the counts."""
    if n == 0:
        return "—"
    lo, hi = wilson(k, n)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}] {k}/{n}"


def _grid(trials: Sequence[dict], rows: Sequence[str], row_key: str, cols: Sequence[Any], col_key: str,
          label=str) -> str:
    cnt = counts_by(trials, row_key, col_key)
    body = [[r, *[format_rate(*cnt[(r, c)]) if (r, c) in cnt else "—" for c in cols]] for r in rows]
    return markdown_table([row_key, *[label(c) for c in cols]], body)


def write_accuracy_report(out: str | Path, trials: Sequence[dict], meta: dict[str, Any], *,
                          name: str) -> dict[str, Path]:
    """results.json (meta + every trial + accuracy per method and length), results.md (accuracy per
    method and length with Wilson 95% intervals; then, where the trials record them, accuracy by
    where the key was (memory / final local window), over-generated answers, accuracy per training
    seed, and the named-key task by distractor count), accuracy.png (accuracy vs length per method,
    interval bars), one length x depth heatmap per method (heatmap_METHOD.png) and, with named-key
    trials, named.png. Returns the written paths."""
    out = Path(out)
    pk = [t for t in trials if t.get("task", "passkey") == "passkey"]
    named = [t for t in trials if t.get("task") == "named"]
    methods = list(dict.fromkeys(t["method"] for t in pk))
    lengths = sorted({t["length"] for t in pk})
    cnt = counts_by(pk, "method", "length")
    summary = {m: {str(n): cnt[(m, n)][0] / cnt[(m, n)][1] for n in lengths if (m, n) in cnt} for m in methods}
    intervals = {m: {str(n): wilson(*cnt[(m, n)]) for n in lengths if (m, n) in cnt} for m in methods}
    extra = {}
    if named:
        nc = counts_by(named, "method", "distractors")
        extra["named_accuracy"] = {m: {str(d): k / n for (m2, d), (k, n) in nc.items() if m2 == m}
                                   for m in dict.fromkeys(t["method"] for t in named)}
    paths = {"json": write_json(out / "results.json", {**meta, "accuracy": summary, "wilson95": intervals,
                                                       **extra, "trials": list(trials)})}
    parts = [f"# {name}\n\nAccuracy by context length (tokens): the fraction of exact answers, its "
             f"Wilson 95% interval and the counts.\n\n" + _grid(pk, methods, "method", lengths, "length",
                                                             format_length)]
    placed = [t for t in pk if t.get("key_in")]
    if placed:
        rows = [[m, w, *[format_rate(*c) if (c := counts_by([t for t in placed if t["key_in"] == w],
                                                          "method", "length").get((m, n))) else "—"
                        for n in lengths]]
                for m in methods for w in ("memory", "both", "local")
                if any(t["method"] == m and t["key_in"] == w for t in placed)]
        parts.append("## By where the key line was when the question was read\n\n`memory`: read into the "
                     "FoT memory; `local`: in the final local context; `both`: split across the "
                     "boundary.\n\n" + markdown_table(["method", "key in", *map(format_length, lengths)], rows))
    if any("overgenerated" in t for t in pk):
        rows = [[m, *[f"{sum(t['overgenerated'] for t in pk if t['method'] == m and t['length'] == n)}"
                      f"/{sum(t['correct'] for t in pk if t['method'] == m and t['length'] == n)}"
                      for n in lengths]] for m in methods]
        parts.append("## Over-generation\n\nCorrect answers followed by another digit (the model did not "
                     "stop at the key's end) / correct answers.\n\n"
                     + markdown_table(["method", *map(format_length, lengths)], rows))
    seeds = sorted({t["seed"] for t in pk if t.get("seed") is not None})
    if len(seeds) > 1:
        per = counts_by(pk, "method", "length", "seed")
        rows = [[m, format_length(n), *[f"{per[(m, n, s)][0]}/{per[(m, n, s)][1]}" if (m, n, s) in per else "—"
                                        for s in seeds]] for m in methods for n in lengths]
        parts.append("## Per training seed\n\nThe training run is the unit of replication: the pooled "
                     "interval above counts trials, these columns show how much the runs differ.\n\n"
                     + markdown_table(["method", "length", *[f"seed {s}" for s in seeds]], rows))
    if named:
        nmethods = list(dict.fromkeys(t["method"] for t in named))
        ds = sorted({t["distractors"] for t in named})
        parts.append("## Named keys: other documents in memory\n\nD other named documents before the asked "
                     "one; the question names its key.\n\n"
                     + _grid(named, nmethods, "method", ds, "distractors", lambda d: f"D={d}"))
    md = out / "results.md"
    md.write_text("\n".join(parts))
    paths["md"] = md
    paths["png"] = plot_rates(out / "accuracy.png", pk, methods, "length", lengths,
                              xlabel="context length (tokens)", title=f"{name}: accuracy (Wilson 95%)")
    if named:
        paths["named_png"] = plot_rates(out / "named.png", named, nmethods, "distractors", ds, logx=False,
                                        xlabel="other named documents in memory (D)",
                                        title=f"{name}: named keys (Wilson 95%)")
    for m in methods:
        mine = [t for t in pk if t["method"] == m]
        labels, column = depth_bins([t["depth"] for t in mine])
        cells: dict[tuple[int, int], list[bool]] = {}
        for t in mine:
            cells.setdefault((lengths.index(t["length"]), column(t["depth"])), []).append(bool(t["correct"]))
        grid = [[sum(cells[(i, j)]) / len(cells[(i, j)]) if (i, j) in cells else float("nan")
                 for j in range(len(labels))] for i in range(len(lengths))]
        file = out / f"heatmap_{_slug(m)}.png"
        paths[f"heatmap:{m}"] = plot_heatmap(file, grid, [format_length(n) for n in lengths], labels,
                                             xlabel="depth (fraction of the text before the hidden fact)",
                                             ylabel="context length (tokens)", title=f"{name}: {m}")
    return paths


def plot_rates(path: str | Path, trials: Sequence[dict], methods: Sequence[str], key: str,
               xs: Sequence[Any], *, xlabel: str, title: str, logx: bool = True) -> Path:
    """Accuracy vs trials[key] per method, with Wilson 95% bars."""
    cnt = counts_by(trials, "method", key)
    series, errors = {}, {}
    for m in methods:
        got = [(x, *cnt[(m, x)]) for x in xs if (m, x) in cnt]
        series[m] = ([x for x, _, _ in got], [k / n for _, k, n in got])
        bounds = [wilson(k, n) for _, k, n in got]
        errors[m] = ([b[0] for b in bounds], [b[1] for b in bounds])
    return plot_lines(path, series, xlabel=xlabel, ylabel="accuracy", title=title, ylim=(-0.05, 1.05),
                      logx=logx, errors=errors)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
