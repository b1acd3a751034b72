"""The `fot` command: every tool of the framework under one name.

    fot train configs/tiny.yaml train.steps=50        # = python -m fot.train ...
    fot eval passkey MODEL --lengths 1k,4k            # = python -m fot.eval.passkey ...
    fot experiment sweep configs/experiments/ablation_tiny.yaml
    fot COMMAND --help                                # that tool's own options

Each subcommand runs its module's `main` with the remaining arguments, so `python -m <module>`
keeps working and takes the same arguments. Modules are imported only when their command runs:
`fot --help` answers without loading JAX.
"""

from __future__ import annotations

import importlib
import sys

# command (one or two words) -> (module, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("fot.train", "train or resume a model from a YAML config (key=value overrides)"),
    "demo": ("fot.demo", "train the tiny model offline, then a passkey check (make demo)"),
    "generate": ("fot.generate", "read a prompt into memory and generate; save or reuse the memory"),
    "convert": ("fot.convert", "Hugging Face / LongLLaMA / PEFT import and export, LoRA merge"),
    "eval passkey": ("fot.eval.passkey", "passkey retrieval accuracy by context length"),
    "eval needle": ("fot.eval.needle", "needle in a haystack by length and depth"),
    "eval perplexity": ("fot.eval.perplexity", "perplexity against context length"),
    "eval suite": ("fot.eval.suite", "the RULER-style task suite with effective lengths"),
    "eval harness": ("fot.eval.harness", "lm-evaluation-harness with the `fot` model (extra .[eval])"),
    "experiment passkey": ("fot.experiments.passkey_retrieval", "FoT against the RoPE-scaling baselines"),
    "experiment sweep": ("fot.experiments.sweep", "train and evaluate a grid of config overrides"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  fot {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return f"usage: fot COMMAND [ARGS...]\n\ncommands:\n{rows}\n\n`fot COMMAND --help` lists a command's options."


def resolve(argv: list[str]) -> tuple[str, list[str]]:
    """(command, its arguments) for argv; ValueError with a one-line message if there is none."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return name, argv[words:]
    subs = [c.split()[1] for c in COMMANDS if argv and c.startswith(argv[0] + " ")]
    hint = f"; `fot {argv[0]}` needs one of: {', '.join(subs)}" if subs else ""
    raise ValueError(f"unknown command {' '.join(argv[:2])!r}{hint} (fot --help lists the commands)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    try:
        name, args = resolve(argv)
    except ValueError as e:
        print(f"fot: error: {e}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name][0]).main(args)


if __name__ == "__main__":
    sys.exit(main())
