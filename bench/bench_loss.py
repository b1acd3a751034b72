"""The training step with fot's chunked LM-head loss against the same step with optax's
softmax cross-entropy over the whole [B, T, V] logits, in one process (issue 18).

    python -m bench.bench_loss [--shapes 128/2/259/128x16 512/8/32000/1024x2 ...] [--steps 4]

Shapes and configs as bench_torch (memory layers off, float32). Both steps are fot's real train
step (bench_train.FotStep); only the loss differs: `fot.model.loss.linear_cross_entropy` (a chunk
of tokens at a time, the gradient formed in the same pass) or the logits of the whole batch and
`optax.softmax_cross_entropy_with_integer_labels` on them, as fot computed it before. One warm-up
step each, then --steps timed steps alternating, medians; both losses printed (they must agree).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax.numpy as jnp
import optax

import fot.train
from bench.bench_torch import SHAPES, fot_config, parse
from bench.bench_train import FotStep, random_ids


def full_logits_loss(x, w, targets, weights, chunk=None):
    logits = jnp.einsum("bte,ev->btv", x, w).astype(jnp.float32)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)


def bench(shape: str, steps: int) -> dict:
    cfg = fot_config(parse(shape))
    ids = random_ids(cfg)
    chunked = fot.train.linear_cross_entropy
    try:  # make_step reads the name when the step is built
        fot.train.linear_cross_entropy = full_logits_loss
        full = FotStep(cfg, ids)
    finally:
        fot.train.linear_cross_entropy = chunked
    fused = FotStep(cfg, ids)
    times = {"full": [], "chunked": []}
    for i in range(steps + 1):
        for name, step in (("full", full), ("chunked", fused)):
            t0 = time.perf_counter()
            step()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()} | {
        "loss_full": float(full.metrics["loss"]), "loss_chunked": float(fused.metrics["loss"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    print("| shape (hidden / layers / vocab / tokens x rows) | full-logits loss step s | chunked loss step s | "
          "full / chunked | loss (full, chunked) |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        r = bench(shape, args.steps)
        print(f"| {shape.replace('/', ' / ').replace('x', ' x ')} | {r['full']:.3f} | {r['chunked']:.3f} | "
              f"{r['full'] / r['chunked']:.2f} | {r['loss_full']:.5f}, {r['loss_chunked']:.5f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
