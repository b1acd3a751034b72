"""Memory retrieval alone: top-128 of 256 queries over 16k/64k/256k keys of dim 64.

    python -m bench.bench_retrieval [--sizes 16384,65536,262144] [--data clustered|gaussian]

Exact (fot.model.memory.store.exact_topk, blocked GEMM + lax.top_k) and fot's two IVF searches, both
on keys stored bf16 as in the memory: JAX's (store.build_ivf + ivf_search) and faiss's
(fot.model.memory.faiss_ivf, the CPU default: bf16 lists trained like the JAX index, searched from a
jitted function), against faiss-cpu used directly in the same process: IndexFlatIP on the float32
keys (exact: the truth that every recall@128 is measured against) and IndexIVFFlat with the same
number of lists and probes (inner product, trained on every key) on the keys the memory holds
(the bf16 values, as float32).
Data: `clustered` (default) = a Gaussian mixture with n/1024 centres (blobs larger than k),
queries near random centres: the structure IVF relies on; `gaussian` = isotropic keys and queries
(no structure: IVF's worst case).
Each time is the best of 5 runs after a warm-up (the three IVF searches: of 31 rounds that run
them one after the other, on the first seed's indexes; faiss IVF's time over fot's also as the
median of the rounds' ratios, with a 95% bootstrap interval); the IVF index builds are timed
apart. IVF recalls and build times are means over `--seeds` index builds (k-means seeds 1, 2, ...;
the JAX build's first includes its compilation): one seed's recall varies by ~0.002 at 262k keys.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.stats import median_interval
from fot.model.memory import faiss_ivf
from fot.model.memory import store as M

Q, K, D = 256, 128, 64
IVF = {16384: (64, 8), 65536: (256, 8), 262144: (1024, 8)}  # n -> (clusters, probed lists)
ROUNDS = 31  # of the three IVF searches one after the other


def data(n: int, kind: str, seed: int = 0):
    r = np.random.RandomState(seed)
    if kind == "gaussian":
        return r.randn(n, D).astype(np.float32), r.randn(Q, D).astype(np.float32)
    centres = r.randn(max(n // 1024, 1), D).astype(np.float32)
    keys = centres[r.randint(0, len(centres), n)] + 0.6 * r.randn(n, D).astype(np.float32)
    queries = centres[r.randint(0, len(centres), Q)] + 0.6 * r.randn(Q, D).astype(np.float32)
    return keys.astype(np.float32), queries.astype(np.float32)


def best_of(f, runs: int = 5) -> float:
    f()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def interleaved(fns, rounds: int = ROUNDS) -> list[np.ndarray]:
    """Each function's times over `rounds` rounds that call them one after the other: the shared
    machine's load drifts, so the searches compared share it."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for f, out in zip(fns, times):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return [np.asarray(t) for t in times]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)]))


def main(argv=None) -> int:
    import faiss

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="16384,65536,262144")
    p.add_argument("--data", default="clustered", choices=("clustered", "gaussian"))
    p.add_argument("--seeds", type=int, default=3, help="IVF builds (k-means seeds 1..n): recalls are their mean")
    a = p.parse_args(argv)
    print(f"data: {a.data}; {Q} queries, top-{K}, dim {D}; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads")
    print("| keys | faiss FlatIP ms | exact ms | faiss IVF ms | ivf (faiss) ms | faiss IVF / ivf (faiss) | "
          "the same, rounds' median (95% interval) | ivf (jax) ms | faiss IVF / ivf (jax) | "
          "faiss IVF recall | ivf (faiss) recall | ivf (jax) recall | "
          "exact recall | clusters/probe | faiss IVF build s | ivf (faiss) build s | ivf (jax) build s |")
    print("|" + "---|" * 17)
    for n in [int(x) for x in a.sizes.split(",")]:
        keys, queries = data(n, a.data)
        index = faiss.IndexFlatIP(D)
        index.add(keys)
        t_faiss = best_of(lambda: index.search(queries, K))
        _, truth = index.search(queries, K)

        kd = jnp.asarray(keys, jnp.bfloat16)[None, None]  # [B=1, K=1, n, D], the memory layout
        qh = jnp.asarray(queries)[None, None]
        valid = jnp.ones((1, n), bool)
        block = M.blocks(n)[1]
        exact = jax.jit(lambda q, k, v: M.exact_topk(q, k, v, jnp.int32(0), jnp.int32(n), K, block))
        t_exact = best_of(lambda: jax.block_until_ready(exact(qh, kd, valid)))
        exact_ids = np.asarray(exact(qh, kd, valid)[1])[0, 0]

        clusters, probe = IVF.get(n, (256, 8))
        cap = M.list_size(n, clusters)
        kf = np.asarray(kd[0, 0], np.float32)  # the keys the memory holds; faiss searches the same
        qd = jnp.asarray(queries)
        builds = {"faiss": [], "fot-faiss": [], "jax": []}  # per k-means seed: (build s, search fn)
        build_jax = jax.jit(lambda x, key: M.build_ivf(x, jnp.int32(n), clusters, key, cap))  # compiles once
        for seed in range(1, a.seeds + 1):
            t0 = time.perf_counter()
            fivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, clusters, faiss.METRIC_INNER_PRODUCT)
            fivf.cp.seed = seed
            fivf.train(kf)
            fivf.add(kf)
            fivf.nprobe = probe
            builds["faiss"].append((time.perf_counter() - t0, lambda i=fivf: i.search(queries, K)[1]))
            # fot's faiss search (retrieval.ivf_library=faiss, the CPU default), called from a
            # jitted function through jax.pure_callback
            t0 = time.perf_counter()
            fx = faiss_ivf.build(kf[None, None, None], np.ones((1, 1, n), bool), clusters, probe, M.IVF_ITERS,
                                 M.IVF_TRAIN_PER_CLUSTER, "bfloat16", seed)
            fsearch = jax.jit(lambda q, fx=fx: faiss_ivf.search(fx, q, 0, K)[1][0, 0])
            builds["fot-faiss"].append((time.perf_counter() - t0, lambda f=fsearch: f(qh)))
            t0 = time.perf_counter()
            cent, starts, sizes, order = jax.block_until_ready(build_jax(kd[0, 0], jax.random.key(seed)))
            sk, so = jax.block_until_ready(M.sorted_layout(kd[0, 0], order, cap))
            ix = (cent, starts, sizes, sk, so)
            search = jax.jit(lambda q, ix=ix: M.ivf_search(q, *ix, K, probe, cap)[1])
            builds["jax"].append((time.perf_counter() - t0, lambda f=search: f(qd)))
        rec = {name: np.mean([recall(np.asarray(f()), truth) for _, f in b]) for name, b in builds.items()}
        build_s = {name: np.mean([t for t, _ in b]) for name, b in builds.items()}
        first = [b[0][1] for b in builds.values()]
        rounds = interleaved([lambda f=f: jax.block_until_ready(f()) for f in first])
        t_fivf, t_x, t_ivf = (min(t) for t in rounds)
        paired = median_interval(rounds[0] / rounds[1])  # faiss IVF / ivf (faiss), round by round
        print(f"| {n} | {1e3 * t_faiss:.1f} | {1e3 * t_exact:.1f} | {1e3 * t_fivf:.1f} | {1e3 * t_x:.1f} | "
              f"{t_fivf / t_x:.2f}x | {paired[0]:.2f}x ({paired[1]:.2f}-{paired[2]:.2f}) | "
              f"{1e3 * t_ivf:.1f} | {t_fivf / t_ivf:.2f}x | {rec['faiss']:.4f} | {rec['fot-faiss']:.4f} | "
              f"{rec['jax']:.4f} | {recall(exact_ids, truth):.4f} | {clusters}/{probe} "
              f"(cap {cap}) | {build_s['faiss']:.1f} | {build_s['fot-faiss']:.1f} | {build_s['jax']:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
