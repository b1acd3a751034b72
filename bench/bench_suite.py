"""Suite prompt generation: 100 prompts of exactly 64k tokens per task and tokenizer.

    python -m bench.bench_suite [--tasks niah_prose,niah_stdlib,niah_multikey,vt,cwe,fwe]
        [--length 65536] [--prompts 100]

Each prompt is fitted to the exact length (fot.data.tasks.fit: the secant method to within a few
tokens, then a pad); the table gives the seconds for all prompts, per prompt, and the tokenizer calls per prompt
(a plain bisection over the haystack size, RULER's search, needs about log2(size) ~ 17 of them).
Tokenizers: bytes and, when ../shared/tokenizers holds it, OpenLLaMA v2's SentencePiece model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fot.data import tasks
from fot.data.tokenizer import ByteTokenizer, SentencePieceTokenizer

SPM = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "open_llama_v2.model"


class Counting:
    """A tokenizer that counts its encode calls."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def encode(self, text, bos=True, eos=False):
        self.calls += 1
        return self.tok.encode(text, bos, eos)

    def decode(self, ids):
        return self.tok.decode(ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="niah_prose,niah_stdlib,niah_multikey,vt,cwe,fwe")
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--prompts", type=int, default=100)
    a = p.parse_args(argv)
    toks = {"byte": ByteTokenizer()}
    if SPM.is_file():
        toks["open_llama_v2"] = SentencePieceTokenizer(SPM)
    print(f"{a.prompts} prompts of {a.length} tokens each\n")
    print("| task | tokenizer | seconds | per prompt (s) | encodes per prompt |")
    print("|---|---|---|---|---|")
    for spec in a.tasks.split(","):
        task = tasks.parse_task(spec)
        for name, tok in toks.items():
            counting = Counting(tok)
            t0 = time.perf_counter()
            for j in range(a.prompts):
                prompt = task.build(counting, a.length, (j + 0.5) / a.prompts, [j])
                assert len(prompt.ids) == a.length
            dt = time.perf_counter() - t0
            print(f"| {spec} | {name} | {dt:.1f} | {dt / a.prompts:.3f} | {counting.calls / a.prompts:.1f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
