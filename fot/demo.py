"""The built-in offline demo (`make demo`): train configs/tiny.yaml on this machine's CPU, then check
passkey retrieval of the trained model with its FoT memory far beyond its training window.

    python -m fot.demo [--config configs/tiny.yaml] [--multiples 4,16,64] [--trials 10] [key=value ...]

Training resumes from (or reuses) the run directory's checkpoints. Prompts: fot.data.passkey (the
LongLLaMA/landmark format), decoding: `FotModel.generate` reading the prompt window by window into
memory (fot/eval/passkey.py `WithMemory`), greedy, exact match of every answer token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fot.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--multiples", default="4,16,64", help="prompt lengths as multiples of the window")
    ap.add_argument("--trials", type=int, default=10, help="passkey trials per length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_intermixed_args(argv)

    from fot.config import ConfigError, load_config
    from fot.train import TrainError, train

    try:
        cfg = load_config(args.config, args.overrides)
        t0 = time.perf_counter()
        summary = train(cfg)
        train_s = time.perf_counter() - t0
    except (ConfigError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "signal" in summary:
        return 128 + summary["signal"]

    from fot.convert import load_model
    from fot.eval.passkey import WithMemory, run_passkey

    model = load_model(Path(cfg.train.run_dir) / "final")
    window = cfg.train.window or cfg.model.max_position_embeddings
    multiples = [int(m) for m in args.multiples.split(",")]
    rows = []
    for m in multiples:
        t1 = time.perf_counter()
        trials = run_passkey(WithMemory(model, window=window), [m * window], trials=args.trials,
                             seed=args.seed, method="fot-memory")
        hits = sum(t["correct"] for t in trials)
        rows.append((m, m * window, hits, len(trials), time.perf_counter() - t1))

    print(f"\ntrained {cfg.train.steps} steps in {train_s:.0f}s, final loss {summary['final_loss']:.4f}")
    print(f"passkey retrieval with memory (window {window} tokens, greedy, exact match):")
    print("| length | tokens | accuracy | trials | seconds |\n|---|---|---|---|---|")
    for m, n, hits, total, secs in rows:
        print(f"| {m}x window | {n} | {hits / total:.0%} | {hits}/{total} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
