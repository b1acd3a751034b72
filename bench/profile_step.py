"""Where a train step's time goes on this machine: one step under `jax.profiler`, its ops named from
the optimised HLO, summed by kind (docs/performance.md).

    python -m bench.profile_step [--shape 512/8/32000/1024x2 | --model tiny] [--top 25]

The step is bench_torch's fot step for the shape (memory layers off), or one of bench_train's models
(with memory layers: then also the busy time of the ops made in the memory layers' `fot_memory`
scope, which is where crossbatch reads other rows). Prints the step's wall time,
its page faults and system time (fresh pages the step's buffers touch), the busy time of XLA's
threads by kind of op (GEMMs, [T, T] attention arrays, vocabulary-sized arrays, copies and
transposes, dynamic slices, other elementwise), and the ops with the most busy time. Busy time is
summed over threads and counts an op once on the thread that ran it, so compare kinds and ops
within one run rather than with wall time.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

DUMP = tempfile.mkdtemp(prefix="fot_hlo_")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP} --xla_dump_hlo_as_text"

import jax  # noqa: E402  (after XLA_FLAGS)
from jax.profiler import ProfileData  # noqa: E402


def hlo_ops(dump: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (shape, op_name metadata)} of the step's optimised HLO."""
    text = next(Path(dump).glob("*jit_step*after_optimizations.txt")).read_text()
    ops = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? [\w\-]+\((.*)$", text, re.M):
        meta = re.search(r'op_name="([^"]*)"', m.group(3))
        ops[m.group(1)] = (m.group(2), meta.group(1) if meta else "")
    return ops


def kind(name: str, shape: str, op_name: str, tokens: int, vocab: int) -> str:
    if "ynn_fusion" in name or name.startswith(("dot", "convolution")):
        return "GEMM"
    if f",{tokens},{tokens}]" in shape:
        return "attention [T, T]"
    if str(vocab) in shape:
        return "vocabulary-sized"
    if "copy" in name or "transpose" in name:
        return "copy / transpose"
    if "dynamic" in name:
        return "dynamic slice / update"
    return "other elementwise"


def main(argv: list[str] | None = None) -> int:
    from bench.bench_torch import fot_config, parse
    from bench.bench_train import MODELS, FotStep, random_ids
    from fot.config import load_config
    from fot.train import MEMORY_SCOPE

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="512/8/32000/1024x2", help="hidden/layers/vocab/tokens x rows")
    ap.add_argument("--model", choices=list(MODELS), help="one of bench_train's models instead of --shape")
    ap.add_argument("--top", type=int, default=25, help="how many ops to list")
    args = ap.parse_args(argv)
    if args.model:
        cfg = load_config(*MODELS[args.model])
        s = {"tokens": cfg.train.window or cfg.model.max_position_embeddings, "vocab": cfg.model.vocab_size}
    else:
        s = parse(args.shape)
        cfg = fot_config(s)
    step = FotStep(cfg, random_ids(cfg))
    step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    step()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    print(f"{args.model or args.shape}: step {wall:.2f} s, {r1.ru_minflt - r0.ru_minflt} page faults, system time "
          f"{r1.ru_stime - r0.ru_stime:.2f} s, user time {r1.ru_utime - r0.ru_utime:.2f} s")
    trace = tempfile.mkdtemp(prefix="fot_trace_")
    jax.profiler.start_trace(trace)
    step()
    jax.profiler.stop_trace()
    busy, calls = collections.Counter(), collections.Counter()
    for plane in ProfileData.from_file(str(next(Path(trace).rglob("*.xplane.pb")))).planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:
                continue
            for ev in line.events:
                if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    busy[ev.name] += ev.duration_ns / 1e6
                    calls[ev.name] += 1
    ops = hlo_ops(DUMP)
    total = sum(busy.values())
    by_kind = collections.Counter()
    for name, ms in busy.items():
        by_kind[kind(name, *ops.get(name, ("", "")), s["tokens"], s["vocab"])] += ms
    print(f"\nbusy time of XLA's threads: {total:.0f} ms\n\n| kind | ms | share |\n|---|---|---|")
    for k, ms in by_kind.most_common():
        print(f"| {k} | {ms:.0f} | {ms / total:.1%} |")
    memory = sum(ms for name, ms in busy.items() if MEMORY_SCOPE in ops.get(name, ("", ""))[1])
    if memory:
        print(f"\nops made in the `{MEMORY_SCOPE}` scope: {memory:.0f} ms ({memory / total:.1%})")
    print("\n| op | calls | ms | shape | from |\n|---|---|---|---|---|")
    for name, ms in busy.most_common(args.top):
        shape, op_name = ops.get(name, ("?", "?"))
        print(f"| {name} | {calls[name]} | {ms:.0f} | {shape} | {op_name[-60:]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
