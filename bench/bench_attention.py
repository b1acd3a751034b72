"""Tiny-model forward at 4k / 16k / 64k tokens: plain vs blockwise attention, time and peak memory.

    python -m bench.bench_attention [--lengths 4096 16384 65536] [--repeats 3]

Each (attention, length) runs in a fresh subprocess so its peak RSS (`resource.getrusage`) is its own.
Plain attention is only attempted when its score matrix fits comfortably in the memory available now;
otherwise the row reports the estimate. The length where plain attention stops fitting is computed
from the measured peak of the longest plain run that did run (bytes per score entry) and this
machine's total memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

MODEL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
BLOCK = 64  # fastest of 64..2048 on the 2-core CPU (small blocks stay in cache)


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


def score_bytes(length: int) -> int:
    """One layer's float32 attention scores for batch 1: T^2 * heads * 4 bytes."""
    return length * length * MODEL["num_attention_heads"] * 4


def run_one(impl: str, length: int, repeats: int) -> dict:
    """In this process: build the model, compile, time `repeats` forwards."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from fot.config import ModelConfig
    from fot.model.llama import init_model

    cfg = ModelConfig(**MODEL, max_position_embeddings=length, attention=impl, attention_block_size=BLOCK)
    model = init_model(cfg)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, MODEL["vocab_size"], (1, length)), jnp.int32)
    forward = nnx.jit(lambda m, x: m(x)[:, -1])  # last position only: keep the [T, V] logits out of it
    base = _rss()
    t0 = time.perf_counter()
    forward(model, ids).block_until_ready()
    compile_and_first = time.perf_counter() - t0
    times = []
    for _ in range(repeats if compile_and_first < 20 else 1):  # long runs: one timed run after the first
        t0 = time.perf_counter()
        forward(model, ids).block_until_ready()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"impl": impl, "length": length, "median_s": statistics.median(times), "runs": len(times),
            "first_s": compile_and_first, "peak_rss": peak, "rss_before": base,
            "device": str(jax.devices()[0].platform)}


def spawn(impl: str, length: int, repeats: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "bench.bench_attention", "--one", impl, str(length),
                           "--repeats", str(repeats)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"impl": impl, "length": length, "error": f"exit {proc.returncode}: {proc.stderr[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.repeats)))
        return 0

    gib = 2 ** 30
    total = _meminfo("MemTotal")
    print(f"# tiny model {MODEL}, batch 1, block {BLOCK}, {os.cpu_count()} CPUs, {total / gib:.1f} GiB RAM, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print("| attention | tokens | median forward (s) | runs | compile + first (s) | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for length in args.lengths:
        for impl in ("plain", "blockwise"):
            # Plain materialises scores and probabilities: run it only with ~3x headroom right now.
            if impl == "plain" and 3 * score_bytes(length) > _meminfo("MemAvailable") * 0.8:
                print(f"| plain | {length} | not run: scores alone need {score_bytes(length) / gib:.1f} GiB "
                      f"per layer | | | |")
                continue
            r = spawn(impl, length, args.repeats)
            rows.append(r)
            if "error" in r:
                print(f"| {impl} | {length} | failed: {r['error']!r} | | | |")
            else:
                print(f"| {impl} | {length} | {r['median_s']:.3f} | {r['runs']} | {r['first_s']:.2f} | "
                      f"{r['peak_rss'] / gib:.2f} |")
            sys.stdout.flush()
    plain = [r for r in rows if r["impl"] == "plain" and "error" not in r]
    if plain:
        r = max(plain, key=lambda r: r["length"])
        per_entry = (r["peak_rss"] - r["rss_before"]) / (score_bytes(r["length"]) / 4)
        # Peak grows as T^2 * heads * per_entry: solve for the machine's total memory.
        fit = math.sqrt((total - r["rss_before"]) / (MODEL["num_attention_heads"] * per_entry))
        print(f"\nplain attention at {r['length']} tokens: {per_entry:.1f} bytes of peak per score entry "
              f"(heads x T^2); computed from that, plain stops fitting in {total / gib:.1f} GiB at about "
              f"{fit:,.0f} tokens (scores alone, 4 bytes/entry: "
              f"{math.sqrt(total / (MODEL['num_attention_heads'] * 4)):,.0f} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
