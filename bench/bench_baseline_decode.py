"""Greedy decoding of the memory-off baseline after a long prompt: fot's KV-cached `FullAttention`
against one full forward per new token (fot's previous decoder, the definition the test checks it
against) and transformers' `LlamaForCausalLM.generate` (KV cache, greedy), in one process.

    python -m bench.bench_baseline_decode [--sizes 2048,8192] [--new 24] [--repeats 3]

Model: the tiny baseline of the experiments (hidden 128, 2 layers, 4 heads, vocab 259, no memory
layers, float32), random weights, batch 1, no RoPE scaling. Each row: one warm-up of each, then
--repeats rounds timing the three in turn (medians; load falls on all three alike). Reported: the
seconds to decode --new tokens after the prompt, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime


def models(n: int, new: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fot.api import FotModel
    from fot.config import config_from_dict
    from fot.data.tokenizer import ByteTokenizer

    shape = dict(vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=n + new, tie_word_embeddings=True)
    fot = FotModel.random(config_from_dict({"model": shape, "memory": {"layers": []}}), seed=0,
                          tokenizer=ByteTokenizer())
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).eval()
    return fot, hf


def bench(n: int, new: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from fot.eval.passkey import FullAttention

    fot, hf = models(n, new)
    ids = np.random.RandomState(0).randint(3, 259, (1, n)).astype(np.int32)
    cached = FullAttention(fot)

    def per_token_forward():  # one forward over prompt + answer so far (padded) per new token
        buf = np.zeros((1, n + new - 1), np.int32)
        buf[:, :n] = ids
        for i in range(new):
            tok = int(np.argmax(np.asarray(fot.logits(buf))[0, n - 1 + i]))
            if i + 1 < new:
                buf[0, n + i] = tok

    def transformers_generate():
        with torch.no_grad():
            hf.generate(torch.as_tensor(ids, dtype=torch.long), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, use_cache=True, pad_token_id=0)

    runs = {"fot cached": lambda: cached.greedy(ids, new), "fot forward per token": per_token_forward,
            "transformers generate": transformers_generate}
    times = {k: [] for k in runs}
    for i in range(repeats + 1):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            if i:  # the first round is the warm-up (compiles)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2048,8192")
    ap.add_argument("--new", type=int, default=24, help="tokens decoded after the prompt")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    import jax
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; medians of "
          f"{a.repeats} rounds, {a.new} tokens after the prompt")
    print("| prompt tokens | fot cached s | fot forward per token s | transformers generate s | "
          "forward per token / cached | transformers / fot cached |")
    print("|---|---|---|---|---|---|")
    for n in [int(x) for x in a.sizes.split(",")]:
        r = bench(n, a.new, a.repeats)
        c, f, t = r["fot cached"], r["fot forward per token"], r["transformers generate"]
        print(f"| {n} | {c:.2f} | {f:.2f} | {t:.2f} | {f / c:.1f} | {t / c:.2f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
