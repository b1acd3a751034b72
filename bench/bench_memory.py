"""Scoring long inputs with the FoT memory: time, peak memory and the FLOP floor of each run.

    python -m bench.bench_memory [--sizes 16384,65536,262144] [--modes dense,knn,ivf] [--full]

Modes: dense, knn, ivf (retrieval.ivf_library=auto: faiss on the CPU when installed), ivf-jax and
ivf-faiss (that library).

Model: hidden 256, 4 layers, 4 heads (head_dim 64), intermediate 688, vocab 32000, window 256, one
memory layer (layer 2), last_context_length 128; scoring = next-token log-probs of every token
(`fot.inference.logprobs_long`), batch 1. Memory float32 (FOT_BENCH_MEM_DTYPE=bfloat16 for the
config default: half the bytes, but slower score GEMMs on this CPU). Each (size, mode) runs in its
own process so its peak RSS is its own; compilation runs first on a short input and is reported
apart. The FLOP floor is the run's model FLOPs divided by the matmul FLOP/s measured on the same
machine in the same run.
Without --full, exact knn at 256k is skipped (XLA:CPU's top_k makes it take ~20 min here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HIDDEN, LAYERS, HEADS, INTER, VOCAB, WINDOW, LCL, MEM_LAYER = 256, 4, 4, 688, 32000, 256, 128, 2
MEM_DTYPE = os.environ.get("FOT_BENCH_MEM_DTYPE", "float32")  # f32 GEMMs are faster on CPU than bf16
IVF = {16384: (64, 8), 65536: (256, 8), 262144: (1024, 8)}  # n -> (clusters, probed lists)
KNN_K = 128


def config(n: int, mode: str):
    from fot.config import config_from_dict

    clusters, probe = IVF.get(n, (128, 8))
    mode, _, library = mode.partition("-")  # ivf-jax / ivf-faiss: retrieval.ivf_library
    return config_from_dict({
        "model": dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      max_position_embeddings=WINDOW),
        "memory": dict(layers=[MEM_LAYER]),
        "retrieval": dict(mode=mode, last_context_length=LCL, capacity=n, knn_k=KNN_K,
                          ivf_clusters=clusters, ivf_probe=probe, ivf_library=library or "auto",
                          dtype=MEM_DTYPE)})


def model_flops(cfg, n: int, mode: str) -> float:
    """Forward FLOPs of scoring n tokens: projections + head, causal local attention inside each
    window, and the memory layer's retrieval (dense: every stored key; knn: scores of every stored
    key + attention to k; ivf: centroids + probed clusters at their mean size + attention to k)."""
    from fot.flops import matmul_params

    m = cfg.model
    hd = m.num_attention_heads * m.dim_per_head
    total = 2 * matmul_params(m) * n
    prefix = max(n - LCL, 0)
    filled, t = 0, 0
    for i in range(0, n, WINDOW if t < prefix else LCL):
        t = min(WINDOW, prefix - i) if i < prefix else n - i
        total += m.num_hidden_layers * 4 * hd * t * (t + 1) / 2  # causal within the piece
        if mode == "dense":
            total += 4 * hd * t * filled
        elif mode == "knn":
            total += 2 * hd * t * filled + 4 * hd * t * min(KNN_K, filled)
        else:  # lists of ~filled/C keys; the tail since the last build (~1/8 on average) is dense
            c, probe = cfg.retrieval.ivf_clusters, cfg.retrieval.ivf_probe
            if filled >= 16 * c:
                total += 2 * hd * t * (c + probe * filled / c) + 4 * hd * t * (KNN_K + filled / 8)
            else:
                total += 4 * hd * t * filled
        if i < prefix:
            filled += t
    return total


def run_one(n: int, mode: str) -> dict:
    import jax
    import numpy as np

    from fot.api import FotModel
    from fot.inference import Session, logprobs_long

    cfg = config(n, mode)
    model = FotModel.random(cfg)
    ids = np.random.RandomState(0).randint(3, VOCAB, (1, n))
    t0 = time.perf_counter()
    jax.block_until_ready(logprobs_long(model, ids[:, : 3 * WINDOW + LCL]))  # compiles the steps
    compile_s = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    jax.block_until_ready(logprobs_long(model, ids))
    seconds = time.perf_counter() - t0
    s = Session(model, 1)
    return {"n": n, "mode": mode, "seconds": seconds, "warmup_s": compile_s,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rss_before_gib": rss0, "bytes_per_token": s.memory.memory_bytes_per_token(),
            "flops": model_flops(cfg, n, mode)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="16384,65536,262144")
    p.add_argument("--modes", default="dense,knn,ivf")
    p.add_argument("--full", action="store_true", help="also exact knn at 256k (slow)")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(int(a.one[0]), a.one[1])))
        return 0
    from fot.flops import measure_matmul_flops

    peak = measure_matmul_flops()
    print(f"matmul peak measured here: {peak / 1e9:.0f} GFLOP/s (2048^3 float32)")
    print("| tokens | retrieval | time s | FLOP floor s | floor/time | us/token | peak RSS GiB | "
          "memory B/token | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in a.sizes.split(",")]:
        for mode in a.modes.split(","):
            if n > 65536 and mode == "knn" and not a.full:
                cfg = config(n, mode)
                fl = model_flops(cfg, n, mode)
                print(f"| {n} | {mode} | skipped | {fl / peak:.1f} | | | | | |", flush=True)
                continue
            out = subprocess.run([sys.executable, "-m", "bench.bench_memory", "--one", str(n), mode],
                                 capture_output=True, text=True, env=os.environ)
            if out.returncode:
                print(f"| {n} | {mode} | failed: {out.stderr.strip().splitlines()[-1]} |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            floor = r["flops"] / peak
            print(f"| {n} | {mode} | {r['seconds']:.2f} | {floor:.2f} | {floor / r['seconds']:.2f} | "
                  f"{1e6 * r['seconds'] / n:.1f} | {r['peak_rss_gib']:.2f} | {r['bytes_per_token']} | "
                  f"{r['warmup_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
