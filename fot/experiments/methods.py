"""Evaluated methods of the passkey comparison, named by a small grammar:

    fot-RETRIEVAL[+ROPE[:F]]   the FoT model with its memory (RETRIEVAL: dense, knn, ivf); with +ROPE the
                               local window is F x the FoT window, RoPE-scaled by ROPE (F defaults to
                               train.pack_size: the context the baseline attends to in training)
    baseline[+ROPE[:F]]        the baseline with plain causal attention over the whole prompt; ROPE
                               scales by F, by default (eval length / baseline training context) at
                               each length, at least 1; dynamic NTK derives its scale from the
                               length itself, so its default factor is 1 (transformers' semantics)
    ft-pi, ft-yarn             the baseline fine-tuned at a longer context with PI / YaRN
                               (experiment.finetune), evaluated with the scaling it was trained with
    fot-ft                     FoT trained on for the same steps and tokens, dense memory
    ROPE: linear, ntk, dynamic, yarn, llama3 (fot.eval.passkey.rope_scaling_from_spec)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fot.eval import passkey, report, suite

RETRIEVALS = ("dense", "knn", "ivf")
ROPES = tuple(n for n in passkey.ROPE_NAMES if n != "none")
DEFAULT_METHODS = ("fot-dense", "fot-knn", "fot-dense+linear", "fot-dense+yarn", "baseline",
                   *(f"baseline+{r}" for r in ROPES))


@dataclass(frozen=True)
class Method:
    spec: str
    model: str  # the trained model it uses: "fot", "baseline", "fot-ft", "ft-pi" or "ft-yarn"
    retrieval: str | None  # fot only
    rope: str | None
    factor: float | None  # None: the default described in the module docstring

    @property
    def memory(self) -> bool:
        return self.model.startswith("fot")


FINETUNED = {"fot-ft": ("fot-ft", "dense"), "ft-pi": ("ft-pi", None), "ft-yarn": ("ft-yarn", None)}


def parse_method(spec: str) -> Method:
    if spec in FINETUNED:
        model, retrieval = FINETUNED[spec]
        return Method(spec, model, retrieval, None, None)
    head, plus, rope = spec.partition("+")
    model, _, retrieval = head.partition("-")
    name, colon, factor = rope.partition(":")
    ok = ((model == "fot" and retrieval in RETRIEVALS) or (model == "baseline" and not retrieval)) \
        and (not plus or name in ROPES)
    value = None
    if ok and colon:
        try:
            value = float(factor)
            ok = value >= 1
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(f"unknown method {spec!r}: use fot-RETRIEVAL[+ROPE[:F]], baseline[+ROPE[:F]], "
                         f"{', '.join(FINETUNED)}, with RETRIEVAL one of {', '.join(RETRIEVALS)}, ROPE one of "
                         f"{', '.join(ROPES)} and a factor F >= 1")
    return Method(spec, model, retrieval or None, name or None, value)


def evaluate(method: Method, model, lengths: Sequence[int], *, window: int, pack_size: int, trials: int,
             depths, seed: int, distractors: Sequence[int] = (), suite_tasks: Sequence = (),
             training_seed: int | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Passkey trials of one method on its loaded model, each trial recording the RoPE scaling and
    local window it ran with and the training seed; with `distractors`, a method with memory also
    runs the named-key multi-document task (the filler after the asked document is 2 windows long,
    so the asked key is in memory too); with `suite_tasks` (fot.data.tasks), the RULER-style
    tasks at the same lengths, trials and seed (trials whose "task" is the task's spec). Returns the
    trials and the method's settings for results.json."""
    if method.memory:
        win = window if method.rope is None else int(window * (method.factor or pack_size))
        # No factor in the spec: prepare() scales max_position_embeddings to the window.
        gen, _ = passkey.prepare(model, memory=True, retrieval=method.retrieval, rope_scaling=method.rope,
                                 window=win)
        runs = [(gen, list(lengths))]
    else:
        win = None
        spec = method.rope and (method.rope + (f":{method.factor:g}" if method.factor else ""))
        # One configuration per length: the default factor follows the length.
        runs = [(passkey.prepare(model, memory=False, rope_scaling=spec, max_length=n)[0], [n])
                for n in lengths]
    out = []
    for gen, ns in runs:
        rope = gen.model.config.model.rope_scaling
        got = passkey.run_passkey(gen, ns, trials, depths, seed, method.spec, progress, until_wrong=True)
        if suite_tasks:
            got += suite.run_suite(gen, suite_tasks, ns, trials, depths, seed, method.spec, progress=progress)
        if method.memory and distractors:  # one run (all lengths) per memory method
            got += passkey.run_multidoc(gen, distractors, trials, seed, passkey.prompts.named_tail(window), method.spec,
                                        progress)
        out += [{**t, "window": win, "rope_scaling": dict(rope) if rope else None, "seed": training_seed}
                for t in got]
    info = {"model": method.model, "memory": method.memory, "retrieval": method.retrieval,
            "knn_k": model.config.retrieval.knn_k if method.retrieval == "knn" else None, "window": win,
            "rope_scaling": {str(t["length"]): t["rope_scaling"] for t in out if t["task"] == "passkey"}}
    return out, info


def write_reports(out: Path, trials: Sequence[dict], meta: dict, name: str, threshold: float) -> dict[str, Path]:
    """results.json/md and the plots of passkey and the named task in `out` (fot.eval.report);
    when suite tasks ran, their report in out/suite (fot.eval.suite, effective lengths at
    `threshold`)."""
    paths = report.write_accuracy_report(out, trials, meta, name=name)
    tasks = [t for t in trials if t.get("task", "passkey") not in ("passkey", "named")]
    if tasks:
        got = suite.write_suite_report(out / "suite", tasks, meta, name=f"{name}: RULER-style suite",
                                       threshold=threshold)
        paths.update({f"suite_{k}": v for k, v in got.items()})
    return paths
