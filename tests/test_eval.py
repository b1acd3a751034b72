"""Evaluations: passkey trials and scoring, needle in a haystack, perplexity, reports, CLI errors."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from fot.data.tokenizer import ByteTokenizer
from fot.eval import needle, passkey, perplexity, report

# The reference prompt, written out here from the LongLLaMA/landmark format (not imported).
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


class FakeModel:
    """The generate interface: answers the key it finds in the prompt (right) or a wrong one."""

    tokenizer = ByteTokenizer()

    def __init__(self, right: bool, pattern: str = r"The pass key is (\d+)\."):
        self.right, self.pattern, self.calls = right, pattern, []

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0):
        assert temperature == 0.0
        key = re.search(self.pattern, self.tokenizer.decode(prompt_ids)).group(1)
        self.calls.append(max_new_tokens)
        answer = key if self.right else str(int(key) % 9 + 1) * 2  # never the key: wrong digits
        return self.tokenizer.encode(" " + answer + ".", bos=False)[:max_new_tokens]


def tiny_model(memory_layers=(), max_pos=128, scale=1.0):
    """Random tiny byte-level model; scale > 1 multiplies every weight so that the (otherwise almost
    constant) output depends on the whole context."""
    import jax
    from flax import nnx

    from fot.api import FotModel
    from fot.config import config_from_dict

    cfg = config_from_dict({"model": dict(vocab_size=259, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2,
                                          max_position_embeddings=max_pos),
                            "memory": {"layers": list(memory_layers)}})
    model = FotModel.random(cfg, seed=0, tokenizer=ByteTokenizer())
    if scale != 1.0:
        nnx.update(model.module, jax.tree.map(lambda a: a * scale, nnx.state(model.module, nnx.Param)))
    return model


# ------------------------------------------------------------------------------------------------
# passkey: trials, prompt, scoring


def test_prompt_matches_reference_text_for_seed_and_length():
    tok = ByteTokenizer()
    (trial,) = passkey.plan_trials([300], 1, "uniform", seed=0)
    # Pinned: seed 0, length 300, trial 0 always draws this key and depth.
    assert trial["key"] == 27459 and trial["depth"] == pytest.approx(0.17443723123495525, abs=1e-15)
    p = passkey.prompts.build_passkey_prompt(tok, 300, trial["depth"], trial["key"])
    key = trial["key"]
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    n = 300 - 1 - len("\n".join([INTRO, "", info, "", QUESTION]))  # bytes = tokens - BOS: fills exactly
    garbage = " ".join([FILLER] * 100)
    prefix = round(trial["depth"] * n)
    expected = "\n".join([INTRO, garbage[:prefix], info, garbage[:n - prefix], QUESTION])
    assert p.text == expected
    assert len(p.ids) == 300 and p.answer_ids == tok.encode(f" {key}", bos=False)


def test_plan_is_seeded_and_independent_of_other_lengths():
    a = passkey.plan_trials([300, 1024], 4, "uniform", seed=3)
    assert a == passkey.plan_trials([300, 1024], 4, "uniform", seed=3)
    assert a[:4] == passkey.plan_trials([300], 4, "uniform", seed=3)
    assert a != passkey.plan_trials([300, 1024], 4, "uniform", seed=4)
    assert all(1 <= t["key"] <= 49999 and 0 <= t["depth"] <= 1 for t in a)
    grid = passkey.plan_trials([300], 2, "0,0.5,1", seed=0)
    assert [t["depth"] for t in grid] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]


def test_score_is_exact_match_of_all_tokens():
    assert passkey.score([5, 6, 7], [5, 6, 7])
    assert passkey.score(np.array([5, 6, 7]), [5, 6, 7])
    assert not passkey.score([5, 6], [5, 6, 7])  # partial answer
    assert not passkey.score([5, 6, 8], [5, 6, 7])  # last token wrong
    assert not passkey.score([9, 6, 7], [5, 6, 7])
    assert not passkey.score([5, 6, 7, 8], [5, 6, 7])  # too long
    assert not passkey.score([], [])
    assert passkey.new_tokens(np.array([[5, 6]])) == [5, 6]  # FotModel.generate's [1, n]


@pytest.mark.parametrize("depths", ["uniform", "0,0.5,1"])
def test_always_right_scores_100_and_never_right_scores_0(depths):
    right, wrong = FakeModel(True), FakeModel(False)
    r = passkey.run_passkey(right, [260, 700], 3, depths, seed=1, method="right", progress=False)
    w = passkey.run_passkey(wrong, [260, 700], 3, depths, seed=1, method="wrong", progress=False)
    assert len(r) == len(w) == (6 if depths == "uniform" else 18)
    assert all(t["correct"] for t in r) and not any(t["correct"] for t in w)
    assert report.accuracy_by(r, "length") == {(260,): 1.0, (700,): 1.0}
    assert report.accuracy_by(w, "length") == {(260,): 0.0, (700,): 0.0}
    # the answer's length is decoded (" " + digits of the key), and one token more (what follows it)
    assert right.calls == [len(str(t["key"])) + 2 for t in r]
    assert all(t["after"] == "." and not t["overgenerated"] for t in r)
    assert all(t["prompt_tokens"] <= t["length"] for t in r)


def test_report_files(tmp_path):
    r = passkey.run_passkey(FakeModel(True), [260, 512], 2, "0,1", 0, "right", progress=False)
    w = passkey.run_passkey(FakeModel(False), [260, 512], 3, "uniform", 0, "wrong", progress=False)
    passkey.write_outputs(tmp_path, r, {"command": "a"}, "right", "passkey")
    paths = passkey.write_outputs(tmp_path, w, {"command": "b"}, "wrong", "passkey")  # merged
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["trials"]) == len(r) + len(w) == 14
    assert data["accuracy"] == {"right": {"260": 1.0, "512": 1.0}, "wrong": {"260": 0.0, "512": 0.0}}
    assert data["runs"]["right"]["command"] == "a"
    md = (tmp_path / "results.md").read_text()
    # accuracy, Wilson 95% interval, counts (4/4: [0.51, 1.00]; 0/3: [0.00, 0.56])
    assert "| right | 1.00 [0.51, 1.00] 4/4 | 1.00 [0.51, 1.00] 4/4 |" in md
    assert "| wrong | 0.00 [0.00, 0.56] 0/3 | 0.00 [0.00, 0.56] 0/3 |" in md
    for name in ("accuracy.png", "heatmap_right.png", "heatmap_wrong.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert set(paths) == {"json", "md", "png", "heatmap:right", "heatmap:wrong"}


def test_parse_helpers_and_bad_input():
    assert report.parse_lengths("1k,4k,300,1.5k") == [1024, 4096, 300, 1536]
    with pytest.raises(ValueError, match="--lengths is empty"):
        report.parse_lengths(" , ")
    assert report.format_length(4096) == "4k" and report.format_length(300) == "300"
    for bad in ("abc", "0", "-1k", "1.3", "inf"):
        with pytest.raises(ValueError, match="length"):
            report.parse_length(bad)
    with pytest.raises(ValueError, match="uniform"):
        passkey.parse_depths("middle")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        passkey.parse_depths("0,1.5")
    need = passkey.min_length(ByteTokenizer())
    assert need == len(("\n".join([INTRO, "", "The pass key is 49999. Remember it. 49999 is the pass key.",
                                   "", QUESTION])).encode()) + 1
    with pytest.raises(ValueError, match=f"below the passkey prompt's fixed part.*at least {need} tokens"):
        passkey.run_passkey(FakeModel(True), [1024, need - 1], 1, progress=False)
    with pytest.raises(ValueError, match="unknown RoPE scaling 'ntk-by-parts'"):
        passkey.rope_scaling_from_spec("ntk-by-parts")
    assert passkey.rope_scaling_from_spec("linear:8") == {"rope_type": "linear", "factor": 8.0}
    assert passkey.rope_scaling_from_spec("yarn", 4.0) == {"rope_type": "yarn", "factor": 4.0}
    assert passkey.rope_scaling_from_spec('{"rope_type": "dynamic", "factor": 2}')["factor"] == 2
    assert passkey.rope_scaling_from_spec("none") is None


def test_memory_methods_and_rope_baselines_on_a_real_model():
    plain = tiny_model()
    with pytest.raises(ValueError, match="no memory layers"):
        passkey.prepare(plain, memory=True, retrieval=None, rope_scaling=None, max_length=512)
    with pytest.raises(ValueError, match="needs memory on"):
        passkey.prepare(plain, memory=False, retrieval="knn", rope_scaling=None, max_length=512)
    gen, name = passkey.prepare(plain, memory=False, retrieval=None, rope_scaling="linear", max_length=512)
    assert name == "baseline+linearx4" and gen.model.config.model.rope_scaling["factor"] == 4.0
    assert plain.config.model.rope_scaling is None  # the loaded model is not changed
    from fot.config import ConfigError

    with pytest.raises(ConfigError, match="factor"):
        passkey.prepare(plain, memory=False, retrieval=None, rope_scaling="linear:0.5", max_length=512)
    mem = tiny_model(memory_layers=[1])
    gen, name = passkey.prepare(mem, memory=True, retrieval="knn", rope_scaling=None, max_length=512)
    assert name == "fot-knn" and gen.model.config.retrieval.mode == "knn"
    assert mem.config.retrieval.mode == "dense"
    assert gen.model.module.embed_tokens.embedding[...] is mem.module.embed_tokens.embedding[...]  # shared
    # FoT + a RoPE-scaled local window: the default factor stretches max_position_embeddings to the window
    gen, name = passkey.prepare(mem, memory=True, rope_scaling="linear", max_length=4096, window=256)
    assert name == "fot-dense+linearx2+w256" and gen.window == 256
    assert gen.model.config.model.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="memory on only"):
        passkey.prepare(mem, memory=False, window=256)


def test_full_attention_baseline_is_greedy_over_the_whole_prompt():
    model = tiny_model(scale=5.0)
    ids = ByteTokenizer().encode("The pass key is 123. " * 12, bos=True)  # 253 tokens > 128 positions
    got = passkey.FullAttention(model).generate(ids, max_new_tokens=4)
    seq = list(ids)
    for _ in range(4):  # reference: unpadded forward over the growing sequence
        seq.append(int(np.argmax(np.asarray(model.logits(np.array([seq])))[0, -1])))
    assert got == seq[len(ids):]


@pytest.mark.parametrize("memory", [dict(layers=[1]), dict(layers=[1], gate=True, positionals=False)])
def test_full_attention_with_a_kv_cache_equals_a_forward_per_token(memory):
    """The definition: step i is one full forward over prompt + the i tokens so far, padded to the
    final length (so dynamic RoPE scaling sees N + n - 1 throughout), memory layers reading nothing."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fot.api import FotModel
    from fot.config import config_from_dict

    cfg = config_from_dict({"model": dict(vocab_size=259, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                                          rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                            "memory": memory})
    model = FotModel.random(cfg, seed=1, tokenizer=ByteTokenizer())
    nnx.update(model.module, jax.tree.map(lambda a: a * 5.0, nnx.state(model.module, nnx.Param)))
    if memory.get("gate"):  # an open gate: memory off must not mix in an empty memory's zeros
        model.module.mem_gate.value = jnp.full_like(model.module.mem_gate[...], 2.0)
    rows = np.random.RandomState(0).randint(3, 259, (2, 150))
    new = 6
    buf = np.zeros((2, 150 + new - 1), np.int32)
    buf[:, :150] = rows
    want = np.zeros((2, new), np.int64)
    for i in range(new):
        want[:, i] = np.argmax(np.asarray(model.logits(buf))[:, 150 - 1 + i], axis=-1)
        if i + 1 < new:
            buf[:, 150 + i] = want[:, i]
    assert passkey.FullAttention(model).greedy(rows, new) == want.tolist()
    assert len({tuple(r) for r in want.tolist()}) == 2  # the rows decode differently


def test_memory_and_full_attention_agree_within_one_window():
    model = tiny_model(memory_layers=[1], max_pos=512, scale=5.0)  # 300 tokens fit in one window
    fot = passkey.run_passkey(passkey.WithMemory(model), [300], 2, "uniform", 0, "fot", progress=False)
    base = passkey.run_passkey(passkey.FullAttention(model), [300], 2, "uniform", 0, "base", progress=False)
    assert [t["generated_ids"] for t in fot] == [t["generated_ids"] for t in base]
    assert fot[0]["generated_ids"] != fot[1]["generated_ids"]  # the output depends on the prompt
    assert all(len(t["generated_ids"]) == len(t["answer_ids"]) + 1 for t in fot)  # + the one after


# ------------------------------------------------------------------------------------------------
# needle in a haystack


def test_needle_prompt_and_scoring():
    tok = ByteTokenizer()
    hay = needle.haystack(iter(["line one\nline two\n" * 40, "second doc\n" * 80]), 1500)
    for depth in (0.0, 0.5, 1.0):
        text, ids = needle.build_needle_prompt(tok, hay, 400, depth, 4321)
        assert len(ids) <= 400 and len(tok.encode(needle.assemble(hay, len(text), depth, 4321))) > 400
        assert text.count("The special magic number is 4321.") == 1 and text.endswith(needle.QUESTION)
        lines = text.split("\n")
        assert "The special magic number is 4321." in lines  # on a line of its own
    assert needle.build_needle_prompt(tok, hay, 400, 0.0, 4321)[0].startswith("The special magic number")
    end = needle.build_needle_prompt(tok, hay, 400, 1.0, 4321)[0]
    assert end.endswith("The special magic number is 4321.\n\n\n" + needle.QUESTION)
    pattern = r"The special magic number is (\d+)\."
    right = needle.run_needle(FakeModel(True, pattern), hay, [300, 500], [0, 0.5, 1], 2, progress=False)
    wrong = needle.run_needle(FakeModel(False, pattern), hay, [300, 500], [0, 0.5, 1], 2, progress=False)
    assert len(right) == 12 and all(t["correct"] for t in right) and not any(t["correct"] for t in wrong)
    with pytest.raises(ValueError, match="below the needle prompt's fixed part"):
        needle.run_needle(FakeModel(True, pattern), hay, [50], [0.5], progress=False)
    with pytest.raises(ValueError, match="too short"):
        needle.build_needle_prompt(tok, hay, 5000, 0.5, 4321)


# ------------------------------------------------------------------------------------------------
# perplexity


def test_perplexity_of_uniform_and_oracle_logits():
    v = 50
    docs = [list(np.random.default_rng(i).integers(0, v, 300)) for i in range(3)]
    uniform = lambda ids: perplexity.next_token_logprobs(np.zeros((len(ids), v)), ids)  # noqa: E731
    res = perplexity.run_perplexity(uniform, docs, [16, 64, 172], 128, progress=False)
    assert [r["perplexity"] for r in res] == pytest.approx([v] * 3, rel=1e-6)

    def oracle(ids):  # knows the document: logit 10 on the true next token
        out = np.zeros((1, len(ids), v))
        out[0, np.arange(len(ids) - 1), ids[1:]] = 10.0
        return perplexity.next_token_logprobs(out, ids)

    best = perplexity.run_perplexity(oracle, docs, [16, 172], 128, progress=False)
    assert [r["perplexity"] for r in best] == pytest.approx([1 + (v - 1) * np.exp(-10)] * 2, rel=1e-6)
    assert best[0]["tokens"] == 3 * 128 and len(best[0]["doc_perplexity"]) == 3

    def only(scored: bool):  # certain (log p = 0) on the last 128 targets only, or everywhere else
        def fn(ids):
            lp = np.full(len(ids) - 1, -np.log(v))
            if scored:
                lp[-128:] = 0.0
            else:
                lp[:-128] = 0.0
            return lp
        return fn

    assert perplexity.run_perplexity(only(True), docs, [16, 172], 128, progress=False)[1]["perplexity"] == 1.0
    assert perplexity.run_perplexity(only(False), docs, [16, 172], 128,
                                     progress=False)[1]["perplexity"] == pytest.approx(v)
    with pytest.raises(ValueError, match="300 tokens; 301 are needed"):
        perplexity.run_perplexity(oracle, docs, [173], 128, progress=False)


def test_perplexity_on_a_real_model_with_and_without_memory(tmp_path):
    model = tiny_model(memory_layers=[1], scale=5.0)
    docs = perplexity.long_documents(ByteTokenizer(), iter(["x" * 100, "abc def\n" * 60, "q" * 50]), 400, 4)
    assert len(docs) == 1 and len(docs[0]) == 400
    plain = perplexity.logprob_fn(passkey.FullAttention(model))
    memory = perplexity.logprob_fn(passkey.WithMemory(model))
    short = np.asarray(docs[0][:100])  # within one window (128): memory has nothing to add
    np.testing.assert_allclose(memory(short), plain(short), atol=1e-4)
    base = perplexity.run_perplexity(plain, docs, [64, 272], 128, "baseline", progress=False)
    fot = perplexity.run_perplexity(memory, docs, [64, 272], 128, "fot", progress=False)
    assert all(np.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in base + fot)
    paths = perplexity.write_report(tmp_path, base + fot, {"baseline": {}, "fot": {}})
    assert json.loads(paths["json"].read_text())["results"][3]["length"] == 272
    md = paths["md"].read_text()
    assert "| baseline |" in md and "| fot |" in md and paths["png"].stat().st_size > 2000
    with pytest.raises(ValueError, match="no document"):
        perplexity.long_documents(ByteTokenizer(), iter(["short"]), 400, 4)


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_smoke_and_errors(tmp_path):
    tiny_model().save(tmp_path / "plain")
    tiny_model(memory_layers=[1]).save(tmp_path / "fot")
    out = tmp_path / "out"

    def cli(model, *args):
        cmd = [sys.executable, "-m", "fot.eval.passkey", str(tmp_path / model), "--lengths", "300",
               "--trials", "1", "--no-progress", "--out", str(out), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    run = cli("plain", "--memory", "off")
    assert run.returncode == 0, run.stderr
    run = cli("fot", "--memory", "on", "retrieval.mode=knn")  # 300 tokens: 3 windows of 128
    assert run.returncode == 0, run.stderr
    data = json.loads((out / "results.json").read_text())
    assert [(t["method"], t["prompt_tokens"]) for t in data["trials"]] == [("baseline", 300),
                                                                           ("fot-knn", 300)]
    for name in ("heatmap_baseline.png", "heatmap_fot-knn.png", "accuracy.png", "results.md"):
        assert (out / name).stat().st_size > 0
    bad = cli("plain", "--memory", "on")
    assert bad.returncode == 1 and "no memory layers" in bad.stderr
    bad = cli("plain", "--memory", "off", "--lengths", "200")
    assert bad.returncode == 1 and "at least 248 tokens" in bad.stderr
    bad = cli("fot", "retrieval.mode=nearest")
    assert bad.returncode == 1 and "retrieval.mode" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("memory", [True, False])
def test_batched_trials_equal_one_at_a_time(memory):
    """run_passkey decodes the trials of one length as one batch; each row must get what it gets alone
    (WithMemory: FotModel.generate on one prompt; FullAttention: greedy_until_wrong)."""
    model = tiny_model(memory_layers=[1] if memory else [], max_pos=128, scale=5.0)
    gen = passkey.WithMemory(model) if memory else passkey.FullAttention(model)
    batched = passkey.run_passkey(gen, [300, 400], 3, "uniform", 0, "m", progress=False, until_wrong=True)
    single = []
    for t in batched:
        p = passkey.prompts.build_passkey_prompt(gen.tokenizer, t["length"], t["depth"], t["key"])
        single.append(new := (passkey.new_tokens(model.generate(np.asarray(p.ids)[None], len(p.answer_ids) + 1))
                              if memory else gen.greedy_until_wrong(p.ids, p.answer_ids, follow=True)))
        assert t["generated_ids"] == new, t
    assert len({tuple(s) for s in single}) > 1  # the outputs depend on the prompt


def test_changing_retrieval_keeps_the_module_and_scales_rope_in_a_new_one():
    """Retrieval is read by the Session, so reconfigure swaps the config only (the same module
    object); a RoPE scaling is in the graph, so it gets a new module with the same weights."""
    import dataclasses

    import jax
    from flax import nnx

    from fot.config import ConfigError

    model = tiny_model(memory_layers=[1], scale=3.0)
    knn = passkey.reconfigure(model, retrieval="knn")
    assert knn.module is model.module and knn.config.retrieval.mode == "knn"
    assert model.config.retrieval.mode == "dense"
    ids = np.random.RandomState(0).randint(3, 259, (1, 300))
    dense_logits = np.asarray(model.logits_long(ids))
    ret = dataclasses.replace(knn.config.retrieval, knn_k=10_000)  # above every stored key: dense's softmax
    knn_k = dataclasses.replace(knn, config=dataclasses.replace(knn.config, retrieval=ret))
    np.testing.assert_allclose(np.asarray(knn_k.logits_long(ids)), dense_logits, atol=1e-5)
    yarn = passkey.reconfigure(model, rope_scaling={"type": "yarn", "factor": 4.0})
    assert yarn.module is not model.module
    new, old = (jax.tree.leaves(nnx.state(m.module, nnx.Param)) for m in (yarn, model))
    assert len(new) == len(old) > 0 and all(bool((a == b).all()) for a, b in zip(new, old))
    with pytest.raises(ConfigError, match="rope_scaling"):
        passkey.reconfigure(model, rope_scaling={"type": "nope", "factor": 2.0})

