"""Does the config's architecture learn a copy circuit on the simplest copy task?

    python -m fot.experiments.induction_probe configs/tiny.yaml [key=value ...] [--offset variable] [--alphabet 26]
                                          [--half 32] [--batch 32] [--steps 1000] [--lr 1e-3]
                                          [--short-steps 0 --short-half 8] [--memory-layers]

Rows are BOS, then L random tokens from an alphabet of `--alphabet` symbols, then the same L again
(then random tokens up to length 2 * half). `--offset fixed`: L = half in every row, so the copy
sits at a constant relative distance and a RoPE head can learn it by position alone. `--offset
variable`: L uniform in [half / 4, half] per row, so only an induction head (match the previous
token, copy the next) solves it. `--short-steps N` trains the first N steps on short copies (half
`--short-half`) first, a curriculum. Prints the greedy accuracy on the second copy every 100 steps;
chance is 1 / alphabet. Plain AdamW (b2 0.98, no warmup, clipping or weight decay), no memory,
full causal attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fot.config import load_config
from fot.model.llama import init_model

FIRST_ID = 10  # symbols start above the special ids


def make_batch(rng: np.random.Generator, batch: int, half: int, alphabet: int, variable: bool):
    """(ids [B, 2 * half + 1], mask [B, 2 * half] of positions that predict a second-copy token)."""
    x = rng.integers(FIRST_ID, FIRST_ID + alphabet, (batch, 2 * half + 1)).astype(np.int32)
    x[:, 0] = 1
    mask = np.zeros((batch, 2 * half), np.float32)
    for b in range(batch):
        n = int(rng.integers(max(1, half // 4), half + 1)) if variable else half
        x[b, 1 + n:1 + 2 * n] = x[b, 1:1 + n]
        mask[b, n:2 * n] = 1  # position p predicts token p + 1
    return x, mask


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. model.initializer_range=0.05)")
    ap.add_argument("--offset", choices=("fixed", "variable"), default="variable")
    ap.add_argument("--alphabet", type=int, default=26)
    ap.add_argument("--half", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--short-steps", type=int, default=0,
                    help="a curriculum: the first N steps train on short copies (--short-half)")
    ap.add_argument("--short-half", type=int, default=8)
    ap.add_argument("--memory-layers", action="store_true",
                    help="keep the config's memory layers (no memory attached): without RoPE when "
                         "memory.positionals is false, as they train")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if FIRST_ID + args.alphabet > cfg.model.vocab_size:
        raise ValueError(f"--alphabet {args.alphabet} does not fit the vocabulary ({cfg.model.vocab_size})")
    longest = 2 * max(args.half, args.short_half) + 1
    model = init_model(dataclasses.replace(cfg.model, max_position_embeddings=longest),
                       cfg.memory if args.memory_layers else None, seed=args.seed)
    opt = nnx.Optimizer(model, optax.adamw(args.lr, b2=0.98, weight_decay=0.0), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, mask):
        def loss_fn(model):
            logits = model(x[:, :-1])
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()
            return nll, ((logits.argmax(-1) == x[:, 1:]) * mask).sum() / mask.sum()
        (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss, acc

    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    for i in range(1, args.steps + 1):
        half = args.short_half if i <= args.short_steps else args.half
        x, mask = make_batch(rng, args.batch, half, args.alphabet, args.offset == "variable")
        loss, acc = step(model, opt, jnp.asarray(x), jnp.asarray(mask))
        if i % args.every == 0 or i == args.steps:
            print(f"step {i}  half {half}  loss {float(loss):.3f}  second-copy accuracy {float(acc):.2f}  "
                  f"{time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
