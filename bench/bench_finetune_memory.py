"""Fine-tuning memory at the 3B shape: full fine-tuning vs LoRA vs LoRA + S2-Attn, per context length.

    python -m bench.bench_finetune_memory [--lengths 2048,8192,16384,32768]

From the compiled train step of `--dry-run` (fot.train.dry_run: XLA's memory analysis, nothing
allocated) on one device of this machine: OpenLLaMA-3B v2 (configs/openllama_3b.yaml), float32
master weights, bfloat16 compute, full remat, one sequence per step, YaRN for lengths beyond 2048.
Variants: full (every weight trained), lora (rank 8 on q, k, v, o), lora+ (LongLoRA's: also the
embeddings and norms), lora+ s2 (and S2-Attn with groups of 1/4 of the sequence). Optimizer state
is the argument memory less the weights and the batch; activations are XLA's temporaries.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from fot.config import load_config
from fot.train import dry_run

BASE = Path(__file__).resolve().parents[1] / "configs" / "openllama_3b.yaml"
GIB = 2 ** 30
VARIANTS = {
    "full": [],
    "lora": ["model.lora.rank=8"],
    "lora+": ["model.lora.rank=8", "model.lora.train_embeddings=true", "model.lora.train_norms=true"],
    "lora+ s2": ["model.lora.rank=8", "model.lora.train_embeddings=true", "model.lora.train_norms=true",
                 "model.attention=s2"],
}


def overrides(variant: str, length: int) -> list[str]:
    out = ["model.param_dtype=float32", "model.dtype=bfloat16", "model.remat_policy=full",
           "train.pack_size=1", "train.cross_batch_range=0", "train.batch_size=1", f"train.window={length}",
           *VARIANTS[variant]]
    if variant.endswith("s2"):
        out.append(f"model.s2_group_size={length // 4}")
    if length > 2048:
        out.append(f"model.rope_scaling={{rope_type: yarn, factor: {length / 2048}}}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="2048,8192,16384,32768")
    a = p.parse_args(argv)
    print("| length | variant | trained params | weights GiB | optimizer state GiB | activations (temp) GiB "
          "| total GiB |")
    print("|---|---|---|---|---|---|---|")
    for length in (int(x) for x in a.lengths.split(",")):
        for variant in VARIANTS:
            cfg = load_config(BASE, overrides(variant, length))
            with contextlib.redirect_stdout(io.StringIO()):
                r = dry_run(cfg)
            mem = r["memory_per_device"]
            weights = r["params"] * 4
            batch = 4 * length * 4  # inputs, targets, loss mask (, doc ids): 4 bytes a token each
            opt = mem["argument"] - weights - batch
            print(f"| {length} | {variant} | {r['trainable_params']:,} | {weights / GIB:.2f} | {opt / GIB:.2f} | "
                  f"{mem['temp'] / GIB:.2f} | {mem['total'] / GIB:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
