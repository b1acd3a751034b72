"""Generate text with the FoT memory from a (long) prompt.

    python -m fot.generate MODEL --prompt-file F --max-new-tokens N [--temperature T] [--top-p P]
    python -m fot.generate MODEL --prompt-file DOC --save-memory doc.npz      # read once, save
    python -m fot.generate MODEL --memory doc.npz --prompt "Question?" --max-new-tokens N
    python -m fot.generate MODEL --prompt-file F retrieval.mode=knn retrieval.capacity=262144

MODEL: a fot checkpoint or Hugging Face directory (LongLLaMA or LLaMA) as `fot.convert.load_model`
reads it, with key=value overrides of its config (retrieval.mode, retrieval.knn_k, retrieval.capacity,
retrieval.last_context_length, ...). The prompt is read window by window into the memory, then tokens
stream to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fot.generate", description=__doc__.split("\n")[0])
    p.add_argument("model", help="fot checkpoint or Hugging Face model directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt-file", type=Path, help="UTF-8 text file with the prompt")
    src.add_argument("--prompt", help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, help="default: model.max_position_embeddings")
    p.add_argument("--memory", type=Path, help="a memory saved with --save-memory, read before the prompt")
    p.add_argument("--save-memory", type=Path, help="read the prompt into memory, save it here and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides: retrieval.mode=knn, ...")
    a = p.parse_intermixed_args(argv)
    if a.prompt_file is None and a.prompt is None:
        p.error("give --prompt-file or --prompt")
    if a.prompt_file is not None and not a.prompt_file.is_file():
        p.error(f"--prompt-file {a.prompt_file}: no such file")
    text = a.prompt if a.prompt is not None else a.prompt_file.read_text(encoding="utf-8")

    from fot.config import ConfigError, parse_override
    from fot.convert import load_model

    try:
        model = load_model(a.model, **dict(map(parse_override, a.overrides)))
    except ConfigError as e:
        p.error(str(e))
    if model.tokenizer is None:
        p.error(f"{a.model} has no tokenizer; fot.generate works on text")
    opts = dict(window=a.window)
    if a.save_memory is not None:
        session = model.build_memory(text, **opts)
        path = model.save_memory(session, a.save_memory)
        print(f"read {session.tokens_read} tokens: {session.memory.filled} in memory, "
              f"{session.cache_len} in the local cache; saved to {path}", file=sys.stderr)
        return 0
    session = model.load_memory(a.memory) if a.memory is not None else None
    kw = {} if session is not None else opts
    for piece in model.stream(text, a.max_new_tokens, a.temperature, a.top_p, a.seed, memory=session, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
