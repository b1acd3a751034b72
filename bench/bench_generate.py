"""Reading a long prompt into the FoT memory, then generating: read tokens/s and per-token latency.

    python -m bench.bench_generate [--models tiny,bench] [--sizes 8192,32768,131072] [--new 32] [--repeats 3]

Models (random weights, batch 1, dense retrieval, memory capacity = the prompt length):
`tiny` is configs/tiny.yaml (hidden 128, 2 layers, window 128, memory layer 1, last_context_length
64, bfloat16 memory); `bench` is bench_memory's model (hidden 256, 4 layers, vocab 32000, window
256, memory layer 2, last_context_length 128) with the config's bfloat16 memory. Per row, in its own
process after a warm-up on a short prompt (compiles every step, reported apart), --repeats times in
turn (medians: the machine is shared): `build_memory` on the prompt (read tokens/s), then
`fot.inference.stream` on the same prompt: time to the first token (reading + the last local piece +
one step) and the gaps between the next --new tokens (median and max over all repeats). first / read
is the issue-18 check (generation after a long prompt costs what reading it costs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from bench import bench_memory

MODELS = ("tiny", "bench")


def config(model: str, n: int):
    from fot.config import config_from_dict, load_config

    if model == "tiny":
        return load_config("configs/tiny.yaml", [f"retrieval.capacity={n}"])
    cfg = bench_memory.config(n, "dense").to_dict()
    cfg["retrieval"].pop("dtype")  # the config default (bfloat16), as a user reads with it
    return config_from_dict(cfg)


def run_one(model_name: str, n: int, new: int, repeats: int) -> dict:
    import jax
    import numpy as np

    from fot.api import FotModel
    from fot.inference import stream

    cfg = config(model_name, n)
    model = FotModel.random(cfg)
    window, lcl = cfg.model.max_position_embeddings, cfg.retrieval.last_context_length
    ids = np.random.RandomState(0).randint(3, cfg.model.vocab_size, (1, n))

    def read(x):
        s = model.build_memory(x)
        jax.block_until_ready((s.memory.state, s.cache))

    def gen(x):  # time of each yielded token from the call
        t0, times = time.perf_counter(), []
        for _ in stream(model, x, new + 1, stop_at_eos=False):
            times.append(time.perf_counter() - t0)
        return times

    t0 = time.perf_counter()
    short = ids[:, : 3 * window + lcl]
    read(short)
    gen(short)
    warmup = time.perf_counter() - t0
    reads, firsts, gaps = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        read(ids)
        reads.append(time.perf_counter() - t0)
        times = gen(ids)
        firsts.append(times[0])
        gaps.extend(np.diff(times))
    gaps = np.asarray(gaps)
    return {"model": model_name, "n": n, "read_s": float(np.median(reads)),
            "first_s": float(np.median(firsts)),
            "token_ms": 1e3 * float(np.median(gaps)), "token_max_ms": 1e3 * float(gaps.max()),
            "warmup_s": warmup, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None) -> int:
    import jax

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--sizes", default="8192,32768,131072")
    p.add_argument("--new", type=int, default=32, help="tokens generated after the first")
    p.add_argument("--repeats", type=int, default=3, help="read + generate runs per row (medians)")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one[0], int(a.one[1]), a.new, a.repeats)))
        return 0
    print(f"jax {jax.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the "
          f"start; {a.repeats} repeats of reading, then {a.new + 1} tokens generated")
    print("| model | prompt tokens | read s | read tokens/s | first token s | first / read | "
          "per token ms (median, max) | peak RSS GiB | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in a.models.split(","):
        for n in [int(x) for x in a.sizes.split(",")]:
            out = subprocess.run([sys.executable, "-m", "bench.bench_generate", "--one", model, str(n),
                                  "--new", str(a.new), "--repeats", str(a.repeats)],
                                 capture_output=True, text=True, env=os.environ)
            if out.returncode:
                print(f"| {model} | {n} | failed: {out.stderr.strip().splitlines()[-1]} |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {model} | {n} | {r['read_s']:.2f} | {n / r['read_s']:,.0f} | {r['first_s']:.2f} | "
                  f"{r['first_s'] / r['read_s']:.2f} | {r['token_ms']:.1f} ({r['token_max_ms']:.1f}) | "
                  f"{r['peak_rss_gib']:.2f} | {r['warmup_s']:.1f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
