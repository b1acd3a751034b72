"""Step time of the tiny fine-tuning recipes: full fine-tuning vs LoRA vs LoRA + S2-Attn (issue 21).

    python -m bench.bench_finetune_step [--lengths 2048,8192] [--steps 5]

configs/recipes/tiny_longlora.yaml's step (the tiny baseline's model, no memory, one row per step,
PI x4) on random parameters and a fixed batch of random tokens, for each length and variant: full
(every weight trained), lora (its rank-8 adapters on q, k, v, o plus embeddings and norms) and
lora s2 (the same with S2-Attn, groups of a quarter of the row). The variants of one length are
compiled first, then timed in turns (round robin, `--steps` rounds), so a noisy neighbour slows
them all alike; the table gives each one's median and its ratio to full fine-tuning.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from fot.config import load_config

from bench.bench_train import FotStep, random_ids

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "tiny_longlora.yaml"
VARIANTS = {"full": ["model.lora={rank: 0}"], "lora": [], "lora s2": ["model.attention=s2"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)
    print("| length | variant | trained params | compile s | median step s | tokens/s | vs full |")
    print("|---|---|---|---|---|---|---|")
    for length in (int(x) for x in a.lengths.split(",")):
        steps = {}
        for name, extra in VARIANTS.items():
            s2 = [f"model.s2_group_size={length // 4}"] if "s2" in name else []
            cfg = load_config(RECIPE, [f"train.window={length}", "train.init_from=null", *extra, *s2])
            steps[name] = FotStep(cfg, random_ids(cfg))
            steps[name]()  # warm-up
        times = {name: [] for name in steps}
        for _ in range(a.steps):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        full = statistics.median(times["full"])
        for name, step in steps.items():
            med = statistics.median(times[name])
            print(f"| {length} | {name} | {step.plan.param_count(trainable_only=True):,} | {step.compile_s:.1f} | "
                  f"{med:.3f} | {length / med:.0f} | {full / med:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
