"""Needle in a haystack: a sentence hidden in real text at a grid of depths x lengths.

    python -m fot.eval.needle MODEL --lengths 1k,4k --depths 0,0.25,0.5,0.75,1 --trials 1 \
        --data builtin:stdlib --memory on --out results/needle

The haystack is the documents of --data (default builtin:stdlib, read in its seeded order) joined by
blank lines. For each length and depth the prompt is the longest one whose tokenization (with BOS)
fits in the length:

    {haystack[:cut]}{NEEDLE}\n{haystack[cut:n]}\n\n{QUESTION}

with n haystack characters (binary search) and the needle on its own line, at the start of the line
that holds character round(depth * n) (depth 1: after the last character). The number (1000..9999)
comes from default_rng([seed, length, trial]) (the same number at every depth of a trial). The model
greedily decodes --new-tokens tokens (default: the answer's tokens + 4) and is right when the
decoded text contains the number. Methods (--memory, --rope-scaling, --window, key=value config
overrides) and outputs (results.json, results.md, accuracy.png, heatmap PNG) are those of
fot.eval.passkey.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from fot.eval import passkey, report
from fot.eval.perplexity import iter_documents

NEEDLE = "The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text above? The special magic number is"


def haystack(texts, n_chars: int) -> str:
    """At least n_chars characters of documents joined by blank lines (error if the source is shorter)."""
    parts, size = [], 0
    for t in texts:
        parts.append(t)
        size += len(t) + 2
        if size >= n_chars:
            return "\n\n".join(parts)
    raise ValueError(f"the haystack source has only {size} characters; {n_chars} are needed")


def assemble(hay: str, n: int, depth: float, number: int) -> str:
    pos = int(round(depth * n))
    cut = n if pos >= n else hay.rfind("\n", 0, pos) + 1
    before, after = hay[:cut], hay[cut:n]
    sep = "\n" if before and not before.endswith("\n") else ""
    return f"{before}{sep}{NEEDLE.format(number=number)}\n{after}\n\n{QUESTION}"


def check_length(tokenizer, length: int) -> None:
    need = len(tokenizer.encode(assemble("", 0, 0.0, 9999), bos=True))
    if length < need:
        raise ValueError(f"length {length} is below the needle prompt's fixed part: the prompt needs at "
                         f"least {need} tokens with no haystack (with this tokenizer)")


def build_needle_prompt(tokenizer, hay: str, target_tokens: int, depth: float, number: int
                        ) -> tuple[str, list[int]]:
    """The longest prompt (text, ids with BOS) with at most target_tokens tokens."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must be in [0, 1], got {depth}")
    check_length(tokenizer, target_tokens)

    def make(n: int) -> tuple[str, list[int]]:
        text = assemble(hay, n, depth, number)
        return text, tokenizer.encode(text, bos=True)

    lo, hi = 0, min(1024, len(hay))
    while len(make(hi)[1]) <= target_tokens:
        if hi == len(hay):
            raise ValueError(f"the haystack ({len(hay)} characters) is too short for {target_tokens} tokens")
        lo, hi = hi, min(2 * hi, len(hay))
    while hi - lo > 1:  # make(lo) fits, make(hi) does not
        mid = (lo + hi) // 2
        if len(make(mid)[1]) <= target_tokens:
            lo = mid
        else:
            hi = mid
    return make(lo)


def run_needle(model: passkey.Generator, hay: str, lengths: Sequence[int], depths: Sequence[float],
               trials: int = 1, seed: int = 0, method: str = "model", new_tokens: int | None = None,
               progress: bool = True) -> list[dict]:
    """Every (length, depth, trial) as a dict: method, length, depth, trial, number, prompt_tokens,
    generated, correct (the decoded generation contains the number)."""
    from tqdm.auto import tqdm

    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; needle prompts are text")
    check_length(tok, min(lengths))  # before any trial runs
    depths = passkey.parse_depths(depths)
    if depths == "uniform":
        raise ValueError("needle depths are a grid: give comma-separated fractions in [0, 1]")
    cells = [(n, d, j) for n in lengths for j in range(trials) for d in depths]
    results, hits = [], 0
    bar = tqdm(cells, desc=f"needle {method}", disable=not progress, unit="trial")
    for length, depth, j in bar:
        number = int(np.random.default_rng([seed, length, j]).integers(1000, 10000))
        text, ids = build_needle_prompt(tok, hay, length, depth, number)
        k = new_tokens or len(tok.encode(f"{text} {number}.", bos=True)) - len(ids) + 4
        out = passkey.new_tokens(model.generate(ids, max_new_tokens=k, temperature=0.0))
        generated = tok.decode(out)
        correct = str(number) in generated
        hits += correct
        results.append({"method": method, "length": int(length), "depth": float(depth), "trial": j,
                        "number": number, "prompt_tokens": len(ids), "generated_ids": out,
                        "generated": generated, "correct": correct})
        bar.set_postfix(length=length, acc=f"{hits / len(results):.2f}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fot.eval.needle", description=__doc__.split("\n")[0])
    passkey.add_model_args(ap)
    ap.add_argument("--lengths", default="1k,4k", help="comma-separated token counts (1k = 1024)")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated fractions in [0, 1]")
    ap.add_argument("--trials", type=int, default=1, help="trials per (length, depth)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens to decode (default: answer + 4)")
    ap.add_argument("--data", default="builtin:stdlib",
                    help="haystack: builtin:stdlib, a text file, a dataset")
    ap.add_argument("--split", default="train", help="dataset split of --data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_intermixed_args(argv)
    from fot.config import ConfigError

    try:
        lengths = report.parse_lengths(args.lengths)
        depths = passkey.parse_depths(args.depths)
        if args.trials <= 0:
            raise ValueError(f"--trials must be positive, got {args.trials}")
        gen, method = passkey.load_for_eval(args, max(lengths))
        hay = haystack(iter_documents(args.data, split=args.split, seed=args.seed), 12 * max(lengths))
        trials = run_needle(gen, hay, lengths, depths, args.trials, args.seed, method, args.new_tokens,
                            not args.no_progress)
    except (ValueError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = {**report.run_info(), "model": args.model, "data": args.data, "seed": args.seed,
            "depths": depths, "trials_per_cell": args.trials}
    paths = passkey.write_outputs(args.out, trials, meta, method, "needle")
    acc = report.accuracy_by(trials, "length")
    print(" ".join(f"{report.format_length(n)}={a:.2f}" for (n,), a in acc.items()), f"[{method}]")
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
