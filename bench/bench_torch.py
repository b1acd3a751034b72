"""Training step against PyTorch + transformers at the same shapes, in one process (issue 18).

    python -m bench.bench_torch [--shapes 128/2/259/128x16 512/8/32000/1024x2 ...] [--steps 3] [--min-seconds 20]

Shape: hidden / layers / vocab / tokens x rows (heads: hidden / 64, or 4 below 256; intermediate
256 / 1376 / 2048 at hidden 128 / 512 / 768 as configs/tiny.yaml and the LLaMA-style sizes, else
8/3 x hidden). Both sides: float32, untied embeddings, no memory layers and no crossbatch, a fixed
batch of uniform random tokens, next-token cross-entropy over every position, gradient clipping at
1.0, AdamW (lr 1e-4, betas 0.9/0.95, weight decay 0.01). fot: the real train step
(bench_train.FotStep, every device of this process). torch: `transformers.LlamaForCausalLM` (sdpa
attention) + `torch.optim.AdamW`, torch.set_num_threads(os.cpu_count()), OMP_WAIT_POLICY=PASSIVE
unless set (on the shared 2-core machine OpenMP's default spin-waiting made torch's tiny step 10-20x
slower under load: 0.18 s -> 2.4-3.8 s). One warm-up round, then rounds of two fot steps then two
torch steps (load on a shared machine falls on both), at least --steps of them and until
--min-seconds have passed (at 3 rounds the 0.1 s shape's median moved 0.73-1.02 between runs),
medians; torch / fot > 1: fot
faster. The second step of each pair follows a step of its own framework, as in a training loop:
the headline. The first follows the other framework's step, and it is reported too: XLA:CPU
allocates a step's temporaries afresh, and after torch's step the kernel spends seconds handing
that memory out again (docs/performance.md, item 4). `make bench` runs it with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (both frameworks: one process), as fot's CPU entry points;
the header prints the setting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime

SHAPES = ("128/2/259/128x16", "512/8/32000/1024x2", "768/12/32000/1024x1")
INTERMEDIATE = {128: 256, 512: 1376, 768: 2048}


def parse(shape: str) -> dict:
    dims, rows = shape.split("x")
    hidden, layers, vocab, tokens = (int(x) for x in dims.split("/"))
    return dict(hidden=hidden, layers=layers, vocab=vocab, tokens=tokens, rows=int(rows),
                heads=hidden // 64 if hidden >= 256 else 4,
                inter=INTERMEDIATE.get(hidden, 8 * hidden // 3))


def fot_config(s: dict):
    from fot.config import config_from_dict

    return config_from_dict({
        "model": dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      max_position_embeddings=s["tokens"], tie_word_embeddings=False),
        "memory": dict(layers=[]),
        "train": dict(batch_size=s["rows"], window=s["tokens"], cross_batch_range=0, pack_size=1,
                      learning_rate=1e-4, weight_decay=0.01, b1=0.9, b2=0.95, clip_norm=1.0)})


class TorchStep:
    def __init__(self, s: dict, ids):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                          num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                          max_position_embeddings=s["tokens"], tie_word_embeddings=False,
                          attn_implementation="sdpa")
        self.torch = torch
        self.model = LlamaForCausalLM(cfg).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                     weight_decay=0.01)
        ids = torch.as_tensor(ids, dtype=torch.long)
        self.inputs, self.targets = ids[:, :-1], ids[:, 1:]

    def __call__(self) -> float:
        torch = self.torch
        logits = self.model(input_ids=self.inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), self.targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def bench(shape: str, steps: int, min_seconds: float = 0.0) -> dict:
    from bench.bench_train import FotStep, random_ids

    s = parse(shape)
    cfg = fot_config(s)
    ids = random_ids(cfg)
    fot, torch_step = FotStep(cfg, ids), TorchStep(s, ids)
    times = {(name, after): [] for name in ("fot", "torch") for after in ("own", "other")}

    def one_round(timed: bool) -> None:
        for name, step in (("fot", fot), ("torch", torch_step)):
            for after in ("other", "own"):
                t0 = time.perf_counter()
                step()
                if timed:
                    times[name, after].append(time.perf_counter() - t0)

    one_round(timed=False)  # warm-up
    rounds, start = 0, time.perf_counter()
    while rounds < steps or time.perf_counter() - start < min_seconds:
        one_round(timed=True)
        rounds += 1
    med = {key: statistics.median(ts) for key, ts in times.items()}
    return {"shape": shape, "rounds": rounds, "heads": s["heads"], "inter": s["inter"], "fot_s": med["fot", "own"],
            "torch_s": med["torch", "own"], "fot_other_s": med["fot", "other"],
            "torch_other_s": med["torch", "other"], "compile_s": fot.compile_s,
            "fot_loss": float(fot.metrics["loss"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--steps", type=int, default=3, help="timed rounds per shape, at least")
    ap.add_argument("--min-seconds", type=float, default=20.0,
                    help="and rounds until this long: the small shape's ~0.1 s steps need many for a stable median")
    args = ap.parse_args(argv)
    import jax
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{os.cpu_count()} cores ({torch.get_num_threads()} torch threads, OMP_WAIT_POLICY="
          f"{os.environ['OMP_WAIT_POLICY']}), GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}, load average "
          f"{os.getloadavg()[0]:.1f} at the start; medians of at least {args.steps} rounds and "
          f"{args.min_seconds:.0f} s per shape")
    print("| shape (hidden / layers / vocab / tokens x rows) | heads | intermediate | rounds | fot compile s | "
          "fot step s | torch step s | torch / fot | right after the other's step: fot s, torch s, "
          "torch / fot |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        r = bench(shape, args.steps, args.min_seconds)
        print(f"| {r['shape'].replace('/', ' / ').replace('x', ' x ')} | {r['heads']} | {r['inter']} | {r['rounds']} | "
              f"{r['compile_s']:.1f} | {r['fot_s']:.3f} | {r['torch_s']:.3f} | "
              f"{r['torch_s'] / r['fot_s']:.2f} | {r['fot_other_s']:.3f}, {r['torch_other_s']:.3f}, "
              f"{r['torch_other_s'] / r['fot_other_s']:.2f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
