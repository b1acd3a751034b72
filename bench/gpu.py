"""The GPU figures in one run (issue 18): MFU, compiled memory and long-input reading speed.

    python -m bench.gpu [--steps 5] [--smoke]

Meant for one H100/H200 in under 5 minutes; `--smoke` runs the same cases at the tiny model's
shapes on any backend (what the CPU tests of this script run). Cases, each the real train step
(bench.bench_train.FotStep: forward with crossbatch memory layers, backward, AdamW) on a fixed
batch, one warm-up step then --steps timed ones:

- `100m`: configs/100m.yaml in bfloat16, 16 rows x 1024 tokens (4 packs of 4 windows);
- `3b-shaped`: configs/3b.yaml's width (hidden 3200, 32 heads, intermediate 8640, vocab 32000,
  full remat, bfloat16) with 4 layers (memory layer 2), 4 rows x 2048 tokens, once with the
  default attention and once with `model.attention=cudnn` (cuDNN's fused causal kernel in the
  layers without memory; a memory layer keeps the blockwise partials it merges memory with);
- `read`: the 100m model (random weights) reading 32,768 tokens into its memory
  (`FotModel.build_memory`, dense retrieval): tokens/s.

MFU = model FLOPs per token (fot.flops.train_flops_per_token; remat's recompute not counted) x
tokens/s over the device's datasheet peak (fot.flops.system_peak_flops; FOT_PEAK_FLOPS overrides).
Memory: XLA's analysis of the compiled step, per device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np

from bench.bench_train import FotStep, random_ids
from fot import flops
from fot.api import FotModel
from fot.config import load_config
from fot.train import _memory_report

GIB = 2 ** 30


def cases(smoke: bool) -> dict[str, tuple[str, list[str]]]:
    """name -> (config file, overrides)."""
    if smoke:
        tiny = ["train.batch_size=8"]
        return {"100m": ("configs/tiny.yaml", tiny),
                "3b-shaped": ("configs/tiny.yaml", tiny),
                "3b-shaped+cudnn": ("configs/tiny.yaml", tiny + ["model.attention=cudnn"])}
    three_b = ["model.num_hidden_layers=4", "memory.layers=[2]", "train.batch_size=4", "train.grad_accum=1",
               "train.init_from=null"]
    return {"100m": ("configs/100m.yaml", ["train.batch_size=16"]),
            "3b-shaped": ("configs/3b.yaml", three_b),
            "3b-shaped+cudnn": ("configs/3b.yaml", three_b + ["model.attention=cudnn"])}


def train_case(path: str, overrides: list[str], steps: int) -> dict:
    cfg = load_config(path, overrides)
    ids = random_ids(cfg)
    try:
        step = FotStep(cfg, ids)
    except ValueError as e:  # e.g. cudnn off a CUDA GPU
        return {"error": " ".join(str(e).split())}
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    peak, n, src = flops.system_peak_flops(jax.devices())
    fpt = flops.train_flops_per_token(step.cfg)
    mem = _memory_report(step.step)
    return {"compile_s": step.compile_s, "step_s": dt, "tokens_per_s": tokens / dt,
            "mfu": flops.mfu(tokens / dt, fpt, peak, n), "peak": f"{peak:.3g} ({src})",
            "memory_gib": mem.get("total", 0) / GIB, "loss": float(step.metrics["loss"])}


def read_case(smoke: bool) -> dict:
    n = 2048 if smoke else 32768
    path, over = ("configs/tiny.yaml", []) if smoke else ("configs/100m.yaml", [])
    cfg = load_config(path, over + [f"retrieval.capacity={n}"])
    model = FotModel.random(cfg)
    ids = np.random.default_rng(0).integers(3, cfg.model.vocab_size, (1, n))
    warm = ids[:, : 4 * cfg.model.max_position_embeddings]
    jax.block_until_ready(model.build_memory(warm).memory.state)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(model.build_memory(ids).memory.state)
        times.append(time.perf_counter() - t0)
    return {"tokens": n, "read_s": min(times), "tokens_per_s": n / min(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any backend")
    a = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}\n")
    print("| case | compile s | median step s | tokens/s | MFU | memory per device GiB | peak FLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for name, (path, over) in cases(a.smoke).items():
        r = train_case(path, over, a.steps)
        if "error" in r:
            print(f"| {name} | n/a: {r['error']} |||||", flush=True)
            continue
        print(f"| {name} | {r['compile_s']:.1f} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | "
              f"{100 * r['mfu']:.1f}% | {r['memory_gib']:.2f} | {r['peak']} |", flush=True)
    r = read_case(a.smoke)
    print(f"\nread: {r['tokens']} tokens into memory in {r['read_s']:.2f} s ({r['tokens_per_s']:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
