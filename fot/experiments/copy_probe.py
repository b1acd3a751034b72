"""Does an architecture learn to copy the pass key at all? The question behind a 0% passkey result.

    python -m fot.experiments.copy_probe configs/tiny.yaml [--steps 800] [--batch 16] [--window 320]
                                                       [--lists 0.5] [--lr 3e-3] [--every 100]

Trains the config's model (and its train.* optimizer settings) *without* memory layers or crossbatch, full causal attention, on passkey
documents that fit in one window (intro, key line, a little filler, question, answer), so the only
thing to learn beyond the fixed text is the copy. A fraction `--lists` of the rows are instead "N
random keys, then the same N again" (a dense induction task). Every `--every` steps it prints, on a
fixed held-out batch of passkey documents, the greedy accuracy of the answer's digits, of its first
digit, and of the key line's second occurrence ("{K} is the pass key"). Chance is about 0.1.
If these stay at chance, retrieval through memory cannot work either: the copy circuit is missing.
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
from fot.data import passkey
from fot.data.tokenizer import load_tokenizer
from fot.model.llama import init_model
from fot.optim import make_optimizer

FIXED = len(passkey.assemble("", "", passkey.KEY_HIGH - 1)) + len(f" {passkey.KEY_HIGH - 1}.") + 1


def passkey_row(tok, rng: np.random.Generator, window: int):
    """(ids, positions predicting the answer's digits, positions predicting the key line's 2nd copy)."""
    if window < FIXED:
        raise ValueError(f"window {window} is shorter than a passkey document without filler ({FIXED})")
    key = passkey.sample_key(rng)
    n = int(rng.integers(0, window - FIXED + 1))
    cut = int(rng.integers(0, n + 1))
    text = passkey.passkey_prompt(cut, n - cut, key)[0] + f" {key}."
    ids = tok.encode(text, bos=True)  # byte-level: one token per character after BOS
    digits = len(str(key))
    answer = len(ids) - 1 - digits - 1  # the " " before the answer's first digit
    line = passkey.key_line(key)
    second = text.index(line) + line.rindex(str(key))  # +1 for BOS, -1: position p predicts p + 1
    return ids, np.arange(answer, answer + digits), np.arange(second, second + digits)


def list_row(tok, rng: np.random.Generator, window: int) -> list[int]:
    keys = " ".join(str(passkey.sample_key(rng)) for _ in range(int(rng.integers(4, 16))))
    return tok.encode(keys + "\n" + keys, bos=True)[: window + 1]


def make_batch(tok, rng, rows: int, window: int, lists: float):
    x = np.zeros((rows, window + 1), np.int32)
    mask, answer, second = (np.zeros((rows, window), np.float32) for _ in range(3))
    for b in range(rows):
        if rng.random() < lists:
            ids = list_row(tok, rng, window)
        else:
            ids, a, s = passkey_row(tok, rng, window)
            answer[b, a] = 1
            second[b, s] = 1
        x[b, : len(ids)] = ids
        mask[b, : len(ids) - 1] = 1
    return x, mask, answer, second


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--window", type=int, default=320)
    ap.add_argument("--lists", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=None, help="default: the config's train.learning_rate")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    model_cfg = dataclasses.replace(cfg.model, max_position_embeddings=args.window)
    tok = load_tokenizer(cfg.data.tokenizer)
    model = init_model(model_cfg, None, seed=args.seed)
    lr = args.lr if args.lr is not None else cfg.train.learning_rate
    tx = make_optimizer(dataclasses.replace(cfg.train, learning_rate=lr, steps=args.steps))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, mask):
        def loss_fn(model):
            nll = optax.softmax_cross_entropy_with_integer_labels(model(x[:, :-1]), x[:, 1:])
            return (nll * mask).sum() / mask.sum()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    @nnx.jit
    def accuracy(model, x, answer, second):
        ok = model(x[:, :-1]).argmax(-1) == x[:, 1:]
        first = ok[jnp.arange(x.shape[0]), jnp.argmax(answer, axis=1)]
        return (ok * answer).sum() / answer.sum(), first.mean(), (ok * second).sum() / second.sum()

    held_out = [jnp.asarray(a) for a in make_batch(tok, np.random.default_rng([args.seed, 1]),
                                                   args.batch, args.window, 0.0)]
    rng = np.random.default_rng([args.seed, 0])
    t0 = time.time()
    for i in range(1, args.steps + 1):
        x, mask, _, _ = make_batch(tok, rng, args.batch, args.window, args.lists)
        loss = step(model, opt, jnp.asarray(x), jnp.asarray(mask))
        if i % args.every == 0 or i == args.steps:
            digits, first, second = accuracy(model, held_out[0], held_out[2], held_out[3])
            print(f"step {i}  loss {float(loss):.3f}  answer digits {float(digits):.2f}  first digit "
                  f"{float(first):.2f}  key line 2nd copy {float(second):.2f}  {time.time() - t0:.0f} s",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
