"""Training step: achieved model FLOP/s over this process's large-matmul FLOP/s (issue 6).

    python -m bench.bench_train [--models tiny tiny-nocb 100m 100m-remat ...] [--steps 5]

For each model: the real train step (fot.train.StepPlan: forward with crossbatch memory layers,
backward, clipped AdamW update) on every device of this process, compiled once, fed a fixed
synthetic batch (uniform random tokens: the step's cost does not depend on the data), one warm-up
step, then `--steps` timed steps, each until its new state is ready. Achieved FLOP/s = model FLOPs
per step (fot.flops.train_flops_per_token x tokens; masked attention scores, the optimizer and
elementwise work are not counted) / median step time; the ratio divides it by
fot.flops.measure_matmul_flops (a 2048^3 float32 matmul, best of 5) measured in this same process
right before. Models: configs/tiny.yaml as it is, and without crossbatch; with both, crossbatch's
share of the step is measured right after them, with the two steps alternating one by one
in this process (--pair-rounds rounds: one tiny step is ~0.06 s, and the shared machine's load
drifts): the median of the paired differences, with a 95% bootstrap interval; configs/100m.yaml
with one pack of 4 windows of 1024 tokens per step and float32 compute (bfloat16 matmuls are
slower than float32 ones on CPUs), without and with full remat (and blockwise local attention).
Peak RSS is the process's so far (ru_maxrss): run one model per process to read a model's own.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import jax
import numpy as np

from bench.stats import median_interval
from fot import flops, sharding
from fot.config import MeshConfig, load_config
from fot.train import StepPlan

# The ~110M step as a CPU runs it: one pack of 4 x 1024 tokens, float32
M100 = ["train.batch_size=4", "model.dtype=float32", "retrieval.dtype=float32"]
MODELS = {
    "tiny": ("configs/tiny.yaml", []),
    # the same step without crossbatch (rows read no other rows): tiny's time over this one is
    # what crossbatch costs
    "tiny-nocb": ("configs/tiny.yaml", ["train.cross_batch_range=0"]),
    "100m": ("configs/100m.yaml", M100),
    # under full remat: the memory budget's case (docs/scaling.md); and with blockwise local
    # attention (no [T, T] scores outside a block)
    "100m-remat": ("configs/100m.yaml", M100 + ["model.remat_policy=full"]),
    "100m-remat-blockwise": ("configs/100m.yaml", M100 + ["model.remat_policy=full", "model.attention=blockwise"]),
}


class FotStep:
    """fot's real train step for `cfg`, compiled, on a fixed batch of uniform random tokens `ids`
    [rows, window + 1]; each call runs one step and waits for its new state."""

    def __init__(self, cfg, ids: np.ndarray):
        cfg = cfg.replace(mesh=MeshConfig())  # every device of this process, data-parallel
        self.cfg = cfg
        self.plan = StepPlan(cfg, sharding.make_mesh(cfg.mesh))
        b, t = ids.shape[0], ids.shape[1] - 1
        self.batch = self.plan.put_batch({"inputs": ids[:, :-1], "targets": ids[:, 1:],
                                          "loss_mask": np.ones((b, t), np.float32),
                                          "doc_ids": np.zeros((b, t), np.int32)})
        self.state = self.plan.init_state(self.plan.random_params())
        t0 = time.perf_counter()
        self.step = self.plan.compile()
        self.compile_s = time.perf_counter() - t0
        self.metrics = None

    def __call__(self) -> None:
        self.state, self.metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))


def random_ids(cfg) -> np.ndarray:
    t = cfg.train.window or cfg.model.max_position_embeddings
    rng = np.random.default_rng(0)
    return rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, t + 1), dtype=np.int32)


def bench(name: str, steps: int) -> dict:
    path, overrides = MODELS[name]
    cfg = load_config(path, overrides)
    ids = random_ids(cfg)
    step = FotStep(cfg, ids)
    # not the cached figure: each model its own reference, measured right before its steps (one
    # cached sample read 112.8 GFLOP/s in a `make bench`, other processes 187-215, BENCHMARKS.md)
    matmul = flops.measure_matmul_flops.__wrapped__(flops.MATMUL_N)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step()
        if i:  # the first run is the warm-up
            times.append(time.perf_counter() - t0)
    b, t = ids.shape[0], ids.shape[1] - 1
    model_flops = flops.train_flops_per_token(cfg) * b * t
    median = statistics.median(times)
    return {"model": name, "params": step.plan.param_count(), "tokens": b * t,
            "gflop_step": model_flops / 1e9, "compile_s": step.compile_s, "median_s": median,
            "achieved": model_flops / median, "matmul": matmul,
            "ratio": model_flops / median / matmul, "loss": float(step.metrics["loss"]),
            "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def crossbatch_pair(rounds: int) -> dict:
    """The tiny step with and without crossbatch, alternating one by one in one process for
    `rounds` rounds: crossbatch's share = the median of the rounds' paired differences over the
    median step with it, and a 95% bootstrap interval of that median (the pairs cancel the shared
    machine's drift, which moves both steps alike)."""
    pair = []
    for name in ("tiny", "tiny-nocb"):
        cfg = load_config(*MODELS[name])
        pair.append(FotStep(cfg, random_ids(cfg)))
    times = ([], [])
    for i in range(rounds + 1):
        for step, out in zip(pair, times):
            t0 = time.perf_counter()
            step()
            if i:  # the first round is the warm-up
                out.append(time.perf_counter() - t0)
    with_cb, without = (np.asarray(t) for t in times)
    share, lo, hi = (float(d / np.median(with_cb)) for d in median_interval(with_cb - without))
    return {"with_s": float(np.median(with_cb)), "without_s": float(np.median(without)),
            "share": share, "lo": lo, "hi": hi}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model")
    ap.add_argument("--pair-rounds", type=int, default=100, help="alternating rounds of crossbatch's pair")
    args = ap.parse_args(argv)
    devices = jax.devices()
    print(f"jax {jax.__version__}, {len(devices)} {devices[0].device_kind} device(s), "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    print("| model | parameters | tokens/step | model GFLOP/step | compile s | median step s | "
          "achieved GFLOP/s | matmul GFLOP/s | achieved / matmul | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ran = set()
    for name in args.models:
        r = bench(name, args.steps)
        ran.add(name)
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['tokens']} | "
              f"{r['gflop_step']:.1f} | {r['compile_s']:.1f} | {r['median_s']:.3f} | "
              f"{r['achieved'] / 1e9:.1f} | {r['matmul'] / 1e9:.1f} | {r['ratio']:.2f} | {r['rss_gib']:.2f} |",
              flush=True)
        if {"tiny", "tiny-nocb"} <= ran and name in ("tiny", "tiny-nocb"):
            # right away, before larger models leave this process's heap and caches behind
            cb = crossbatch_pair(args.pair_rounds)
            # (not from the two rows above, each model's steps on their own: 1-34% on this host)
            print(f"crossbatch share of the tiny step: {cb['share']:.1%} (95% interval {cb['lo']:.1%}-"
                  f"{cb['hi']:.1%}), alternating step by step, {args.pair_rounds} rounds "
                  f"({cb['with_s']:.4f} s with, {cb['without_s']:.4f} s without)", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
