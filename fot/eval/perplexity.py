"""Perplexity vs context length on long documents.

    python -m fot.eval.perplexity MODEL --lengths 256,1k,4k --chunk 128 --docs 8 \
        --data builtin:stdlib --memory on --out results/ppl

Each document (tokenized with BOS, at least max(lengths) + chunk tokens; the first --docs such
documents of --data in its seeded order) is cut to T = max(lengths) + chunk tokens. The scored
tokens are always the same, the last `chunk` of those T; for a context length L the model reads the
L tokens before them plus the chunk, and perplexity is exp(mean negative log-likelihood) over the
chunk tokens of all documents. Memory on: `fot.inference.logprobs_long` (the context goes window by
window into memory); memory off: one plain causal forward over L + chunk tokens (`--rope-scaling`
applies). Held-out text is the caller's choice: point --data / --split at text the model was not trained on
(builtin:stdlib is the interpreter's own library, the built-in training corpus).

Outputs in --out: results.json (per method and length: perplexity, NLL, tokens, per-document
perplexities; the command, machine and date), results.md and perplexity.png (one line per method).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from fot.eval import report


def iter_documents(path: str = "builtin:stdlib", split: str = "train", seed: int = 0,
                   text_column: str = "text", min_chars: int = 0) -> Iterator[str]:
    """Texts of a data source (fot.data.sources: builtin:stdlib, a local file, a dataset) in its
    seeded order; builtin:stdlib skips files under min_chars bytes."""
    from fot.config import SourceConfig
    from fot.data.sources import open_source

    cfg = SourceConfig(path=path, split=split, text_column=text_column, min_chars=min_chars)
    src = open_source(cfg, seed, where="--data")
    if not src.random_access:
        yield from src.texts(0, 0)
        return
    i = 0
    while src.length is None or i < src.length:
        yield src.text(0, i)
        i += 1


def long_documents(tokenizer, texts: Iterator[str], min_tokens: int, count: int,
                   max_scanned: int = 100_000) -> list[list[int]]:
    """The first `count` documents of at least min_tokens tokens (with BOS), cut to min_tokens."""
    docs, scanned = [], 0
    for text in texts:
        ids = tokenizer.encode(text, bos=True)
        if len(ids) >= min_tokens:
            docs.append(ids[:min_tokens])
            if len(docs) == count:
                break
        scanned += 1
        if scanned >= max_scanned:
            break
    if not docs:
        raise ValueError(f"no document of the data source has the {min_tokens} tokens needed "
                         f"(longest length + chunk); use shorter --lengths or longer documents")
    return docs


def next_token_logprobs(logits, ids) -> np.ndarray:
    """log p(ids[t+1] | ids[:t+1]) [T-1] from logits [T, V] (or [1, T, V]) of ids [T]."""
    import jax
    import jax.numpy as jnp

    ids = jnp.asarray(np.asarray(ids).reshape(-1))
    lg = jnp.asarray(logits, jnp.float32).reshape(ids.shape[0], -1)
    lp = jax.nn.log_softmax(lg[:-1], axis=-1)
    return np.asarray(jnp.take_along_axis(lp, ids[1:, None], axis=-1)[:, 0])


def run_perplexity(logprob_fn: Callable[[np.ndarray], np.ndarray], docs: Sequence[Sequence[int]],
                   lengths: Sequence[int], chunk: int = 128, method: str = "model",
                   progress: bool = True) -> list[dict]:
    """Per length: method, length, chunk, docs, tokens, nll (mean), perplexity, doc_perplexity.

    logprob_fn maps token ids [T] to next-token log-probabilities [T-1] (`next_token_logprobs`);
    every document must hold max(lengths) + chunk tokens."""
    from tqdm.auto import tqdm

    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    total = max(lengths) + chunk
    short = [i for i, d in enumerate(docs) if len(d) < total]
    if short:
        raise ValueError(f"document {short[0]} has {len(docs[short[0]])} tokens; {total} are needed")
    results = []
    bar = tqdm(total=len(lengths) * len(docs), desc=f"perplexity {method}", disable=not progress)
    for length in lengths:
        per_doc = []
        for d in docs:
            ids = np.asarray(d[total - chunk - length: total], np.int32)
            lp = np.asarray(logprob_fn(ids), np.float64).reshape(-1)
            if lp.shape[0] != len(ids) - 1:
                raise ValueError(f"logprob_fn gave {lp.shape[0]} log-probabilities for {len(ids)} tokens")
            per_doc.append(-lp[-chunk:])
            bar.update()
        nll = float(np.mean(np.concatenate(per_doc)))
        results.append({"method": method, "length": int(length), "chunk": chunk, "docs": len(docs),
                        "tokens": chunk * len(docs), "nll": nll, "perplexity": float(np.exp(nll)),
                        "doc_perplexity": [float(np.exp(x.mean())) for x in per_doc]})
        bar.set_postfix(length=length, ppl=f"{results[-1]['perplexity']:.3g}")
    bar.close()
    return results


def logprob_fn(gen) -> Callable[[np.ndarray], np.ndarray]:
    """Memory on: the model's window-by-window `fot.inference.logprobs_long` (no [T, V] logits kept);
    memory off: one plain causal forward."""
    from fot.eval.passkey import FullAttention
    from fot.inference import logprobs_long

    if isinstance(gen, FullAttention):
        return lambda ids: next_token_logprobs(gen.model.logits(np.asarray(ids)[None]), ids)
    return lambda ids: np.asarray(logprobs_long(gen.model, np.asarray(ids)[None], gen.window,
                                                gen.last_context_length))[0]


def write_report(out: str | Path, results: list[dict], runs: dict) -> dict[str, Path]:
    out = Path(out)
    methods = list(dict.fromkeys(r["method"] for r in results))
    lengths = sorted({r["length"] for r in results})
    ppl = {(r["method"], r["length"]): r["perplexity"] for r in results}
    paths = {"json": report.write_json(out / "results.json", {"eval": "perplexity", "runs": runs,
                                                              "results": results})}
    rows = [[m, *[ppl.get((m, n), float("nan")) for n in lengths]] for m in methods]
    table = report.markdown_table(["method", *[report.format_length(n) for n in lengths]], rows)
    chunk = results[0]["chunk"]
    (out / "results.md").write_text(f"# perplexity of the last {chunk} tokens by context length (tokens)\n\n"
                                    f"{table}")
    paths["md"] = out / "results.md"
    series = {m: ([n for n in lengths if (m, n) in ppl], [ppl[(m, n)] for n in lengths if (m, n) in ppl])
              for m in methods}
    paths["png"] = report.plot_lines(out / "perplexity.png", series, xlabel="context length (tokens)",
                                     ylabel=f"perplexity of the last {chunk} tokens", title="perplexity")
    return paths


def main(argv: list[str] | None = None) -> int:
    from fot.eval import passkey

    ap = argparse.ArgumentParser(prog="python -m fot.eval.perplexity", description=__doc__.split("\n")[0])
    passkey.add_model_args(ap)
    ap.add_argument("--lengths", default="256,1k,4k", help="context lengths in tokens (1k = 1024)")
    ap.add_argument("--chunk", type=int, default=128, help="scored tokens after the context")
    ap.add_argument("--docs", type=int, default=8, help="documents (the first long-enough ones)")
    ap.add_argument("--data", default="builtin:stdlib", help="builtin:stdlib, a text file, a dataset")
    ap.add_argument("--split", default="train", help="dataset split of --data")
    ap.add_argument("--seed", type=int, default=0, help="order of the documents")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_intermixed_args(argv)
    from fot.config import ConfigError

    try:
        lengths = report.parse_lengths(args.lengths)
        if args.chunk <= 0 or args.docs <= 0:
            raise ValueError(f"--chunk and --docs must be positive, got {args.chunk}, {args.docs}")
        gen, method = passkey.load_for_eval(args, max(lengths) + args.chunk)
        need = max(lengths) + args.chunk
        texts = iter_documents(args.data, split=args.split, seed=args.seed, min_chars=need)
        docs = long_documents(gen.tokenizer, texts, need, args.docs)
        results = run_perplexity(logprob_fn(gen), docs, lengths, args.chunk, method, not args.no_progress)
    except (ValueError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    path = Path(args.out) / "results.json"
    old = report.read_json(path) if path.is_file() else {}
    merged = [r for r in old.get("results", []) if r["method"] != method] + results
    runs = {**old.get("runs", {}), method: {**report.run_info(), "model": args.model, "data": args.data,
                                            "seed": args.seed}}
    paths = write_report(args.out, merged, runs)
    print(" ".join(f"{report.format_length(r['length'])}={r['perplexity']:.4g}" for r in results),
          f"[{method}]")
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
