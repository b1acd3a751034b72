"""Passkey retrieval (the LongLLaMA/landmark prompt): accuracy per context length, depth and method.

    python -m fot.eval.passkey MODEL --lengths 1k,4k,16k --trials 10 --depths uniform --seed 0 \
        --memory on --out results/passkey retrieval.mode=knn

MODEL is anything `fot.load_model` reads (a fot checkpoint or a Hugging Face directory). For each
target length (tokens; 1k = 1024) and trial, the prompt from `fot.data.passkey.build_passkey_prompt`
is the longest one whose tokenization (with BOS) fits in the length; the key (1..49999) and the depth
come from a generator seeded with (seed, length, trial), so a trial does not depend on the other
lengths asked for. The model greedily decodes exactly len(answer_ids) tokens, where answer_ids are the
tokens that continue the tokenized prompt with " {key}" (tokenize prompt + " " + key and take the
suffix, falling back to the key tokenized alone if a tokenizer merges across the boundary; for the
LLaMA SentencePiece models both give "▁", digits). A trial is correct only if every generated token
equals its answer token.

Methods: `--memory on` uses the model's FoT memory (`FotModel.generate`: the prompt is read window
by window into memory; `--window`, and key=value config overrides such as `retrieval.mode=knn` or
`retrieval.last_context_length=64`); `--memory off` is the baseline: the
memory layers get no memory and the whole prompt goes through plain causal attention at positions
0..N-1. `--rope-scaling` applies to either (with memory on: FoT + a RoPE-scaled local window).

Outputs in --out: results.json (every trial, accuracy per method and length, the command, machine
and date), results.md, accuracy.png (accuracy vs length per method) and a length x depth heatmap per
method. Runs of other methods already in --out/results.json are kept, so successive runs into one
directory build one comparison table and plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Protocol, Sequence

import numpy as np

from fot.data import passkey as prompts
from fot.eval import report

ROPE_NAMES = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")
_KEEP = object()


class Generator(Protocol):
    """What the evaluations call: a tokenizer and greedy `generate` returning the new tokens
    (`WithMemory`, `FullAttention`, a `FotModel`, or a fake in tests)."""

    tokenizer: Any

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0) -> Sequence[int]: ...


# ------------------------------------------------------------------------------------------------
# Trials and scoring (pure functions of the seed / the tokens)


def parse_depths(spec: str | Sequence[float]) -> str | list[float]:
    """'uniform' or comma-separated fractions in [0, 1] ('0,0.25,0.5,0.75,1')."""
    if isinstance(spec, str):
        if spec.strip() == "uniform":
            return "uniform"
        try:
            spec = [float(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--depths {spec!r}: expected 'uniform' or comma-separated fractions "
                             f"in [0, 1] like 0,0.25,0.5,0.75,1") from None
    depths = [float(d) for d in spec]
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths {depths}: each must be a fraction in [0, 1]")
    return depths


def plan_trials(lengths: Sequence[int], trials: int, depths: str | Sequence[float], seed: int) -> list[dict]:
    """(length, trial, key, depth) for every trial. `trials` per length with uniform random depths, or
    `trials` per (length, depth) for a depth grid. Trial j of length L draws from
    default_rng([seed, L, j]): first the key, then (uniform depths) the depth."""
    depths = parse_depths(depths)
    if trials <= 0:
        raise ValueError(f"trials must be positive, got {trials}")
    plan = []
    for length in lengths:
        count = trials if depths == "uniform" else trials * len(depths)
        for j in range(count):
            rng = np.random.default_rng([seed, length, j])
            key = prompts.sample_key(rng)
            depth = float(rng.random()) if depths == "uniform" else depths[j // trials]
            plan.append({"length": int(length), "trial": j, "key": key, "depth": depth})
    return plan


def min_length(tokenizer) -> int:
    """Tokens of the prompt with no filler and the longest (5-digit) key: the smallest valid length."""
    return len(tokenizer.encode(prompts.assemble("", "", prompts.KEY_HIGH - 1), bos=True))


def check_lengths(tokenizer, lengths: Sequence[int]) -> None:
    need = min_length(tokenizer)
    short = [n for n in lengths if n < need]
    if short:
        raise ValueError(f"length {short[0]} is below the passkey prompt's fixed part: the prompt needs at "
                         f"least {need} tokens with no filler (with this tokenizer)")


def score(generated: Sequence[int], answer: Sequence[int]) -> bool:
    """Exact match: as many tokens as the answer, every one equal. A partial answer is wrong."""
    generated, answer = [int(t) for t in generated], [int(t) for t in answer]
    return len(answer) > 0 and generated == answer


def new_tokens(output: Any) -> list[int]:
    """generate()'s new tokens ([n] or FotModel's [1, n]) as a list."""
    return [int(t) for t in np.asarray(output).reshape(-1)]


def key_place(span: tuple[int, int], memory_tokens: int | None) -> str | None:
    """Where the asked key line was when the question was read: "memory" (read into the FoT memory),
    "local" (in the final local context), "both" (split across the boundary); None without memory."""
    if memory_tokens is None:
        return None
    start, end = span
    return "memory" if end <= memory_tokens else "local" if start >= memory_tokens else "both"


def _record(tok, p: prompts.PasskeyPrompt, out: list[int], memory_tokens: int | None) -> dict:
    n = len(p.answer_ids)
    correct = score(out[:n], p.answer_ids)
    after = tok.decode(out[n:n + 1]) if correct and len(out) > n else None
    return {"prompt_tokens": len(p.ids), "answer": p.answer, "answer_ids": list(map(int, p.answer_ids)),
            "generated_ids": out[:n + 1], "generated": tok.decode(out[:n]), "after": after,
            "correct": correct, "overgenerated": bool(after and after.strip()[:1].isdigit()),
            "key_span": list(p.key_span), "key_in": key_place(p.key_span, memory_tokens)}


def run_trials(model: Generator, ps: Sequence[prompts.PasskeyPrompt], until_wrong: bool = False) -> list[dict]:
    """Greedy trials: the answer's tokens and the one after them. `correct` is the exact match of the
    answer's tokens (the reference's score); `overgenerated` marks a correct answer followed by
    another digit (the model did not know where the key ends); `key_in`: see key_place. Prompts of
    one length go to a generator with `generate_batch` as one batch (every row decoded greedily on
    its own, as if alone)."""
    tok = model.tokenizer
    memory_tokens = getattr(model, "memory_tokens", lambda _: None)
    if hasattr(model, "generate_batch"):
        outs: list[list[int] | None] = [None] * len(ps)
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(ps):
            by_len.setdefault(len(p.ids), []).append(i)
        for idx in by_len.values():
            got = model.generate_batch([ps[i].ids for i in idx], [ps[i].answer_ids for i in idx], until_wrong)
            for i, o in zip(idx, got):
                outs[i] = o
    elif until_wrong and hasattr(model, "greedy_until_wrong"):
        outs = [model.greedy_until_wrong(p.ids, p.answer_ids, follow=True) for p in ps]
    else:
        outs = [new_tokens(model.generate(p.ids, max_new_tokens=len(p.answer_ids) + 1, temperature=0.0))
                for p in ps]
    return [_record(tok, p, o, memory_tokens(len(p.ids))) for p, o in zip(ps, outs)]


def run_passkey(model: Generator, lengths: Sequence[int], trials: int = 10,
                depths: str | Sequence[float] = "uniform", seed: int = 0, method: str = "model",
                progress: bool = True, until_wrong: bool = False) -> list[dict]:
    """Every trial as a dict: method, length, trial, depth, key and run_trials' record. `until_wrong`:
    a generator with `greedy_until_wrong` (the FullAttention baseline) gets the same verdict from one
    forward instead of one per answer token, and its generated_ids end at the first wrong token.
    The trials of one length run as one batch where the generator has `generate_batch`."""
    from tqdm.auto import tqdm

    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; passkey prompts are text")
    check_lengths(tok, lengths)
    plan = plan_trials(lengths, trials, depths, seed)
    results, hits = [], 0
    bar = tqdm(total=len(plan), desc=f"passkey {method}", disable=not progress, unit="trial")
    for length in dict.fromkeys(t["length"] for t in plan):
        mine = [t for t in plan if t["length"] == length]
        ps = [prompts.build_passkey_prompt(tok, t["length"], t["depth"], t["key"]) for t in mine]
        for t, rec in zip(mine, run_trials(model, ps, until_wrong)):
            results.append({"method": method, "task": "passkey", **t, **rec})
            hits += rec["correct"]
        bar.update(len(mine))
        bar.set_postfix(length=length, acc=f"{hits / len(results):.2f}")
    bar.close()
    return results


def run_multidoc(model: Generator, distractors: Sequence[int], trials: int, seed: int, tail_chars: int,
                 method: str = "model", progress: bool = True, until_wrong: bool = False) -> list[dict]:
    """The named-key multi-document task: for each D in `distractors`, `trials` prompts with D other
    named documents before the asked one (fot.data.passkey.build_multidoc_prompt); trial j of D
    draws its names and keys from default_rng([seed, D, j]). Records as run_passkey's, with
    `distractors` = D and `length` = the prompt's tokens."""
    from tqdm.auto import tqdm

    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; passkey prompts are text")
    results, hits = [], 0
    plan = [(d, j) for d in distractors for j in range(trials)]
    bar = tqdm(plan, desc=f"named keys {method}", disable=not progress, unit="trial")
    for d, j in bar:
        docs = prompts.sample_named_keys(np.random.default_rng([seed, d, j]), d + 1)
        p = prompts.build_multidoc_prompt(tok, docs, tail_chars)
        (rec,) = run_trials(model, [p], until_wrong)
        results.append({"method": method, "task": "named", "distractors": int(d), "trial": j,
                        "length": rec["prompt_tokens"], "depth": p.depth, "key": docs[-1][1],
                        "name": docs[-1][0], "distractor_keys": [k for _, k in docs[:-1]], **rec})
        hits += results[-1]["correct"]
        bar.set_postfix(distractors=d, acc=f"{hits / len(results):.2f}")
    return results


# ------------------------------------------------------------------------------------------------
# Methods: memory on / off, RoPE scaling, retrieval mode


class FullAttention:
    """The memory-off baseline: greedy decoding where every token attends to the whole prompt with
    plain causal attention at positions 0..N-1; memory layers get no memory.

    `greedy` reads the prompt once into a `fot.inference.Session` without memory whose window holds
    prompt and answer (a KV cache: each new token costs one step, not a forward over the prompt).
    Dynamic RoPE scaling sees the final length N + n - 1 on every step, a difference of < n tokens
    from a growing cache. `greedy_until_wrong` (run_passkey's `until_wrong`) gets the verdict from
    one forward instead of n.
    """

    def __init__(self, model):
        self.model = model
        self.tokenizer = model.tokenizer

    def greedy(self, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy tokens of equally long prompts decoded as one batch (each row as if alone)."""
        from fot.inference import Session, generate

        ids = np.asarray([np.asarray(p).reshape(-1) for p in prompts_ids], np.int32)
        n, total = ids.shape[1], ids.shape[1] + max_new_tokens - 1
        empty = Session(self.model, len(ids), window=total, last_context_length=n, memory=False,
                        rope_len=total)
        return generate(self.model, ids, max_new_tokens, session=empty, stop_at_eos=False).tolist()

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, **_) -> list[int]:
        if temperature != 0.0:
            raise ValueError("FullAttention decodes greedily (temperature 0)")
        return self.greedy([prompt_ids], max_new_tokens)[0]

    def generate_batch(self, prompts_ids: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                       until_wrong: bool = True) -> list[list[int]]:
        """Greedy answers + the token after them (stopping at the first wrong one) of equally long
        prompts in one forward: each row is teacher-forced with its own answer, padded after it
        (causal: padding is never seen)."""
        if not until_wrong:
            return [self.generate(p, len(a) + 1) for p, a in zip(prompts_ids, answers)]
        n = len(prompts_ids[0])
        width = max(len(a) for a in answers) + 1
        buf = np.full((len(prompts_ids), n + width - 1), self.model.tokenizer.pad_id, np.int32)
        for r, (p, a) in enumerate(zip(prompts_ids, answers)):
            buf[r, :n] = p
            buf[r, n:n + len(a)] = a
        picks = np.argmax(np.asarray(self.model.logits(buf)[:, n - 1:]), axis=-1)
        outs = []
        for r, a in enumerate(answers):
            out = []
            for i, pick in enumerate(picks[r, :len(a) + 1]):
                out.append(int(pick))
                if i < len(a) and out[-1] != int(a[i]):
                    break
            outs.append(out)
        return outs

    def greedy_until_wrong(self, prompt_ids, answer_ids: Sequence[int], follow: bool = False) -> list[int]:
        """generate()'s tokens up to and including the first one that differs from answer_ids, from
        ONE forward over prompt + answer (teacher forcing): while the greedy tokens equal the answer,
        generate() feeds the very same buffer, so every logit up to the first mismatch is the same.
        What follows a wrong token is not computed: the trial is wrong either way. `follow`: after a
        whole correct answer, also the token generate() would emit next."""
        out = self.generate_batch([prompt_ids], [answer_ids])[0]
        return out if follow else out[:len(answer_ids)]


class WithMemory:
    """Memory on: `FotModel.generate`, which reads a long prompt window by window into the memory.
    window (default model.max_position_embeddings) and last_context_length (default
    retrieval.last_context_length) are those of `fot.inference.Session`."""

    def __init__(self, model, window: int | None = None, last_context_length: int | None = None):
        if not model.config.memory.layers:
            raise ValueError("memory retrieval asked for, but the model has no memory layers "
                             "(memory.layers is empty); use memory off for a plain model")
        self.model, self.window, self.last_context_length = model, window, last_context_length
        self.tokenizer = model.tokenizer

    def generate_batch(self, prompts_ids: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                       until_wrong: bool = True) -> list[list[int]]:
        """Greedy decoding of equally long prompts as one batch (one memory per row): each row gets
        its answer's length + 1 tokens."""
        out = self.greedy(prompts_ids, max(len(a) for a in answers) + 1)
        return [row[:len(a) + 1] for row, a in zip(out, answers)]

    def greedy(self, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy tokens of equally long prompts decoded as one batch (one memory per row)."""
        out = self.model.generate(np.asarray(prompts_ids), max_new_tokens, window=self.window,
                                  last_context_length=self.last_context_length)
        return np.asarray(out).tolist()

    def memory_tokens(self, n_prompt: int) -> int:
        """How many of a fresh prompt's tokens go into the memory (the rest: the local context)."""
        lcl = self.model.config.retrieval.last_context_length if self.last_context_length is None \
            else self.last_context_length
        return max(n_prompt - lcl, 0)

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, **kw):
        return self.model.generate(np.asarray(prompt_ids).reshape(1, -1), max_new_tokens,
                                   temperature=temperature, window=self.window,
                                   last_context_length=self.last_context_length, **kw)


def generator(model, memory: bool, window: int | None = None,
              last_context_length: int | None = None) -> Generator:
    """WithMemory (memory on) or the FullAttention baseline (memory off) around a FotModel."""
    if not memory:
        if window is not None or last_context_length is not None:
            raise ValueError("window and last_context_length apply to memory on only")
        return FullAttention(model)
    return WithMemory(model, window, last_context_length)


def rope_scaling_from_spec(spec: str | dict | None, factor: float = 1.0) -> dict | None:
    """A RoPE-scaling dict from a JSON object (Hugging Face's rope_scaling), a dict, or a name
    (none, linear, ntk, dynamic, yarn, llama3) with an optional ':FACTOR' ('linear:8'); without one the
    factor is `factor`. llama3 gets Llama-3.1's low/high frequency factors (1, 4). longrope has
    per-dimension factors, so it is given as JSON only."""
    if spec is None or isinstance(spec, dict):
        return spec
    text = spec.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--rope-scaling {spec!r}: not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"--rope-scaling {spec!r}: the JSON must be an object")
        return value
    name, _, f = text.partition(":")
    if name not in ROPE_NAMES:
        raise ValueError(f"--rope-scaling {spec!r}: unknown RoPE scaling {name!r}; use one of "
                         f"{', '.join(ROPE_NAMES)} (optionally NAME:FACTOR) or a JSON object")
    if name == "none":
        return None
    try:
        value = float(f) if f else float(factor)
    except ValueError:
        raise ValueError(f"--rope-scaling {spec!r}: factor {f!r} is not a number") from None
    out = {"rope_type": name, "factor": value}
    if name == "llama3":
        out.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return out


def reconfigure(model, *, rope_scaling: Any = _KEEP, retrieval: str | None = None):
    """A FotModel sharing `model`'s parameters with another RoPE scaling and/or memory retrieval mode
    (config validated: a bad scaling dict or mode raises ConfigError naming the key)."""
    from flax import nnx

    from fot.config import RetrievalConfig, build
    from fot.model.llama import abstract_model

    cfg = model.config
    where = "evaluation override (rope scaling / retrieval)"
    changes = {}
    if rope_scaling is not _KEEP:
        changes["model"] = dataclasses.replace(cfg.model, rope_scaling=rope_scaling)
    if retrieval is not None:  # built as the config file's section is: the mode's type is checked
        changes["retrieval"] = build(RetrievalConfig, {**dataclasses.asdict(cfg.retrieval), "mode": retrieval},
                                     where, "retrieval")
    if not changes:
        return model
    cfg = dataclasses.replace(cfg, **changes).validate(where)
    if "model" not in changes:  # retrieval is read by the Session: the module stays as it is
        return dataclasses.replace(model, config=cfg)
    graphdef, _ = nnx.split(abstract_model(cfg.model, cfg.memory))
    _, state = nnx.split(model.module)
    return dataclasses.replace(model, config=cfg, module=nnx.merge(graphdef, state))


def method_name(memory: bool, retrieval: str | None, rope: dict | None) -> str:
    name = f"fot-{retrieval or 'memory'}" if memory else "baseline"
    if rope:
        kind = rope.get("rope_type", rope.get("type"))
        name += f"+{kind}" + (f"x{rope['factor']:g}" if isinstance(rope.get("factor"), (int, float)) else "")
    return name


def default_factor(rope_scaling: str | dict | None, span: int, max_pos: int) -> float:
    """The factor a named scaling gets when none is given: span / max_position_embeddings (at least
    1), the stretch of the positions, for linear, ntk, yarn and llama3. Dynamic NTK derives its
    stretch from the current length itself (base x (factor x len / max_pos - (factor - 1))^(d/(d-2)),
    transformers' semantics), so its factor stays 1: factor L / max_pos would scale twice."""
    name = rope_scaling.partition(":")[0].strip() if isinstance(rope_scaling, str) else None
    return 1.0 if name == "dynamic" else max(1.0, span / max_pos)


def prepare(model, *, memory: bool, retrieval: str | None = None, rope_scaling: str | dict | None = None,
            max_length: int | None = None, window: int | None = None,
            last_context_length: int | None = None) -> tuple[Generator, str]:
    """The generator and default method name for one evaluated configuration of a loaded model.

    A named RoPE scaling without a factor gets the longest context plain attention must cover over
    model.max_position_embeddings (at least 1): max_length with memory off, the local window with
    memory on (FoT + a RoPE-scaled local window)."""
    if retrieval is not None and not memory:
        raise ValueError(f"retrieval {retrieval!r} needs memory on")
    max_pos = model.config.model.max_position_embeddings
    span = (window or max_pos) if memory else (max_length or max_pos)
    rope = rope_scaling_from_spec(rope_scaling, default_factor(rope_scaling, span, max_pos))
    if rope_scaling is not None:
        model = reconfigure(model, rope_scaling=rope)
    if retrieval is not None:
        model = reconfigure(model, retrieval=retrieval)
    gen = generator(model, memory, window, last_context_length)
    name = method_name(memory, model.config.retrieval.mode if memory else None, rope)
    if window is not None:
        name += f"+w{window}"
    return gen, name


# ------------------------------------------------------------------------------------------------
# CLI


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """Arguments shared by the evaluation CLIs: which model and which method."""
    ap.add_argument("model", help="fot checkpoint or Hugging Face model directory")
    ap.add_argument("--rope-scaling", default=None,
                    help="none | linear | ntk | dynamic | yarn | llama3 [:FACTOR] | JSON object "
                         "(default factor: longest length / max_position_embeddings)")
    ap.add_argument("--memory", choices=("on", "off"), default="on",
                    help="on: FoT memory, window by window; off: plain attention over the whole input")
    ap.add_argument("--window", type=int, default=None,
                    help="memory on: local window (default: max_position_embeddings)")
    ap.add_argument("--dtype", default=None, help="compute dtype (float32, bfloat16)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="the model's config for this evaluation, as for training: retrieval.mode=knn, "
                         "retrieval.knn_k=16, retrieval.last_context_length=64, ...")
    ap.add_argument("--method-name", default=None, help="label in tables and plots")
    ap.add_argument("--out", required=True, help="output directory")


def load_for_eval(args, max_length: int):
    """Validate the method flags (before the weights are read), load the model with the key=value
    overrides, build the generator."""
    import fot
    from fot.config import parse_override

    overrides = dict(map(parse_override, args.overrides))  # a malformed pair fails before loading
    rope_scaling_from_spec(args.rope_scaling)  # so does an unknown RoPE scaling name
    model = fot.load_model(args.model, dtype=args.dtype, **overrides)
    gen, name = prepare(model, memory=args.memory == "on", rope_scaling=args.rope_scaling,
                        max_length=max_length, window=args.window)
    return gen, args.method_name or name


def write_outputs(out, trials: list[dict], meta: dict, method: str, name: str,
                  writer=report.write_accuracy_report) -> dict:
    """The report (`writer`) over this run's trials plus those of other methods already in
    out/results.json (each method's command, machine and date kept under "runs")."""
    from pathlib import Path

    path = Path(out) / "results.json"
    old = report.read_json(path) if path.is_file() else {}
    trials = [t for t in old.get("trials", []) if t.get("method") != method] + trials
    runs = {**old.get("runs", {}), method: meta}
    return writer(out, trials, {"eval": name, "runs": runs}, name=name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fot.eval.passkey", description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--lengths", default="1k,4k,16k", help="comma-separated token counts (1k = 1024)")
    ap.add_argument("--trials", type=int, default=10, help="trials per length (per depth for a grid)")
    ap.add_argument("--depths", default="uniform", help="uniform | comma-separated fractions in [0, 1]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_intermixed_args(argv)
    from fot.config import ConfigError

    try:
        lengths = report.parse_lengths(args.lengths)
        depths = parse_depths(args.depths)
        gen, method = load_for_eval(args, max(lengths))
        trials = run_passkey(gen, lengths, args.trials, depths, args.seed, method, not args.no_progress)
    except (ValueError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = {**report.run_info(), "model": args.model, "seed": args.seed, "depths": depths,
            "trials_per_cell": args.trials}
    paths = write_outputs(args.out, trials, meta, method, "passkey")
    acc = report.accuracy_by(trials, "length")
    print(" ".join(f"{report.format_length(n)}={a:.2f}" for (n,), a in acc.items()), f"[{method}]")
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
