"""The lm-evaluation-harness adapter: its answers equal FotModel.logits / logits_long / generate."""

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from fot.eval import harness  # noqa: E402  (registers "fot")
from test_eval import tiny_model  # noqa: E402


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


@pytest.mark.parametrize("memory", ["off", "on"])
def test_harness_answers_equal_the_model(memory):
    model = tiny_model(memory_layers=[1], max_pos=128, scale=5.0)
    assert get_model("fot") is harness.FotLM
    lm = harness.FotLM(model=model, memory=memory, batch_size=4, device="cpu")  # harness extras ignored
    tok = model.tokenizer
    context = "The pass key is 4242. Remember it. " * 6 + "The pass key is"  # 238 tokens: 2 windows
    (ll, greedy), (ll2, _) = lm.loglikelihood([req("loglikelihood", context, " 4242"),
                                               req("loglikelihood", "", "abc")])
    ids = tok.encode(context + " 4242", bos=True)
    n = len(tok.encode(context, bos=True))
    x = np.asarray(ids)[None]
    logits = np.asarray(model.logits(x) if memory == "off" else model.logits_long(x))[0]
    ref = log_softmax(logits)
    assert ll == pytest.approx(sum(ref[t - 1, ids[t]] for t in range(n, len(ids))), abs=1e-3)
    assert greedy == all(ref[t - 1].argmax() == ids[t] for t in range(n, len(ids)))
    ref0 = log_softmax(np.asarray(model.logits(np.asarray(tok.encode("abc"))[None]))[0])
    assert ll2 == pytest.approx(sum(ref0[t - 1, tok.encode("abc")[t]] for t in range(1, 4)), abs=1e-3)
    (rolling,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", context + " 4242")])
    assert rolling == pytest.approx(sum(ref[t - 1, ids[t]] for t in range(1, len(ids))), abs=1e-2)
    prompt = np.asarray(tok.encode(context, bos=True))[None]
    if memory == "on":
        want = np.asarray(model.generate(prompt, 6))[0]
    else:  # the baseline: greedy over the whole sequence, one plain forward per token
        seq = list(prompt[0])
        for _ in range(6):
            seq.append(int(np.argmax(np.asarray(model.logits(np.asarray(seq)[None]))[0, -1])))
        want = seq[-6:]
    text = tok.decode(want)
    (full, cut) = lm.generate_until([req("generate_until", context, {"until": [], "max_gen_toks": 6}),
                                     req("generate_until", context, {"until": [text[3:5]], "max_gen_toks": 6})])
    assert full == text and cut == text[:text.find(text[3:5])]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([req("generate_until", context, {"do_sample": True})])
    with pytest.raises(ValueError, match="memory='maybe'"):
        harness.FotLM(model=model, memory="maybe")


def test_model_args_string(tmp_path):
    tiny_model().save(tmp_path / "m")
    lm = get_model("fot").create_from_arg_string(f"pretrained={tmp_path / 'm'},memory=off,rope_scaling=linear:2",
                                                 {"batch_size": 1, "device": None})
    assert lm.method == "baseline+linearx2" and lm.gen.model.config.model.rope_scaling["factor"] == 2.0
