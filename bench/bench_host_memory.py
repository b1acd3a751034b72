"""XLA:CPU's train step with glibc's malloc handing out transparent huge pages, against its default.

    python -m bench.bench_host_memory [--models tiny 512/8/32000/1024x2] [--rounds 3] [--steps 5]

XLA:CPU allocates a step's temporaries afresh on every execution; glibc maps blocks that large
with mmap and unmaps them on free, so every step faults its temporaries' pages in again, 4 KiB at
a time. `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35; `make demo` and `make test` set it) has malloc
ask for transparent huge pages (madvise), 2 MiB a fault. A process-wide setting read at start, so
each measurement is a fresh process: rounds alternate the two, each process a warm-up of 3 steps
then --steps timed steps (median step seconds, minor page faults per step, peak RSS). Models: a
bench_train name or a bench_torch shape (hidden / layers / vocab / tokens x rows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SETTINGS = {"glibc default": "", "hugetlb=1": "glibc.malloc.hugetlb=1"}


def child(model: str, steps: int) -> None:
    from bench.bench_torch import fot_config, parse
    from bench.bench_train import MODELS, FotStep, random_ids
    from fot.config import load_config

    cfg = load_config(*MODELS[model]) if model in MODELS else fot_config(parse(model))
    step = FotStep(cfg, random_ids(cfg))
    for _ in range(3):
        step()
    times, faults = [], []
    for _ in range(steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"s": statistics.median(times), "faults": statistics.median(faults),
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def run(model: str, steps: int, tunables: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-m", "bench.bench_host_memory", "--child", model,
                          "--steps", str(steps)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "512/8/32000/1024x2"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per process")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.steps)
        return 0
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; "
          f"{args.rounds} processes of each setting, alternating, {args.steps} timed steps each")
    print("| model | setting | step s (median of processes) | page faults / step | peak RSS GiB |")
    print("|---|---|---|---|---|")
    for model in args.models:
        got = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):
            for name, tunables in SETTINGS.items():
                got[name].append(run(model, args.steps, tunables))
        for name, rs in got.items():
            med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
            print(f"| {model} | {name} | {med('s'):.3f} | {med('faults'):.0f} | {med('rss'):.2f} |",
                  flush=True)
        speedup = statistics.median(r["s"] for r in got["glibc default"]) / statistics.median(
            r["s"] for r in got["hugetlb=1"])
        print(f"| {model} | default / hugetlb | {speedup:.2f} | | |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
