"""An lm-evaluation-harness model class for fot models (`pip install -e .[eval]`).

    python -m fot.eval.harness run --model fot \
        --model_args pretrained=runs/tiny/final,memory=on,rope_scaling=linear:4 --tasks TASK ...

(the harness's own CLI, after this module has registered the model name "fot"), or from Python:

    import lm_eval
    from fot.eval.harness import FotLM
    lm_eval.simple_evaluate(model=FotLM(pretrained="runs/tiny/final", memory="on"), tasks=[...])

Model arguments are those of `fot.eval.passkey.prepare`: memory (on / off), retrieval, rope_scaling
(NAME[:FACTOR]), window, last_context_length, max_length (the default RoPE factor's span with memory
off), plus dtype. Memory on reads every input window by window into the FoT memory
(`FotModel.logits_long`, `FotModel.generate`); memory off is one causal forward over the whole
input (`FotModel.logits`). Requests are scored one at a time (the harness's batch_size and
device are accepted and ignored: JAX places the model).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from fot.eval import passkey
from fot.eval.suite import decode_until_eos


@register_model("fot")
class FotLM(LM):
    def __init__(self, pretrained: str | None = None, model: Any = None, memory: str | bool = "on",
                 retrieval: str | None = None, rope_scaling: str | None = None, window: int | None = None,
                 last_context_length: int | None = None, max_length: int | None = None,
                 dtype: str | None = None, max_gen_toks: int = 256, **_harness: Any):
        super().__init__()
        if memory not in (True, False, "on", "off"):  # the harness turns "True"/"False" into bools
            raise ValueError(f"memory={memory!r}: use on or off")
        if model is None:
            if pretrained is None:
                raise ValueError("FotLM needs pretrained=PATH (a fot checkpoint or HF directory) or model=")
            import fot

            model = fot.load_model(pretrained, dtype=dtype)
        on = memory in (True, "on")
        self.gen, self.method = passkey.prepare(model, memory=on, retrieval=retrieval, rope_scaling=rope_scaling,
                                                max_length=max_length, window=window,
                                                last_context_length=last_context_length)
        self.tok, self.max_gen_toks = self.gen.tokenizer, max_gen_toks

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """log-softmax of the next-token logits [N, V] of ids (with the method's attention)."""
        import jax

        x = np.asarray(ids, np.int32)[None]
        m = self.gen.model
        logits = m.logits(x) if isinstance(self.gen, passkey.FullAttention) else \
            m.logits_long(x, self.gen.window, self.gen.last_context_length)
        return np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float32)[0], axis=-1))

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # The continuation's tokens as they follow the context in the whole text (the harness's
        # convention), or tokenized alone if the tokenizer merges across the boundary.
        ctx = self.tok.encode(context, bos=True)
        whole = self.tok.encode(context + continuation, bos=True)
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.tok.encode(continuation, bos=False)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            ctx, cont = self._split(*req.args)
            lp = self.logprobs(ctx + cont)[len(ctx) - 1:-1]
            out.append((float(lp[np.arange(len(cont)), cont].sum()),
                        bool(np.all(lp.argmax(-1) == np.asarray(cont)))))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood after BOS: memory on reads it window by window, so no
        text is cut into independent chunks."""
        out = []
        for req in requests:
            ids = self.tok.encode(req.args[0], bos=True)
            lp = self.logprobs(ids)[:-1]
            out.append(float(lp[np.arange(len(ids) - 1), ids[1:]].sum()))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (the harness's sampling arguments are refused) for max_gen_toks tokens, cut at
        EOS and at the first stop string."""
        out = []
        for req in requests:
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.pop("max_gen_toks", self.max_gen_toks))
            if kw.pop("do_sample", False) or kw.pop("temperature", 0.0):
                raise ValueError("FotLM decodes greedily: do_sample and temperature are not supported")
            ids = self.tok.encode(context, bos=True)
            text = decode_until_eos(self.tok, self.gen.greedy([ids], n)[0])
            cut = min([i for i in (text.find(s) for s in until if s) if i >= 0], default=len(text))
            out.append(text[:cut])
        return out


def main(argv: list[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    # lm-eval's own command line reads sys.argv
    sys.argv = ["python -m fot.eval.harness", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
