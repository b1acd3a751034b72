"""The mechanics of the FoT vs RoPE-scaling comparison: Wilson intervals, dynamic NTK scaled once,
the named-key multi-document prompts, where the key was, over-generation, pooled seeds, and the
baseline of every shipped experiment training."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fot.data import passkey as prompts
from fot.data.tokenizer import ByteTokenizer
from fot.eval import passkey, report

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "experiments"


def test_wilson_interval_known_values():
    # Published values of the Wilson score interval at 95% (e.g. Newcombe 1998, Table I: 0/10,
    # 1/10 ... ; Brown, Cai & DasGupta 2001): 8/10 -> [0.490, 0.943], 0/10 -> [0, 0.278],
    # 5/10 -> [0.237, 0.763], 81/263 -> [0.255, 0.366].
    for (k, n), (lo, hi) in {(8, 10): (0.4902, 0.9433), (0, 10): (0.0, 0.2775), (5, 10): (0.2366, 0.7634),
                             (81, 263): (0.2553, 0.3662), (10, 10): (0.7225, 1.0)}.items():
        got = report.wilson(k, n)
        assert got == pytest.approx((lo, hi), abs=1e-4), (k, n, got)
    assert all(np.isnan(report.wilson(0, 0)))
    assert report.format_rate(28, 30) == "0.93 [0.79, 0.98] 28/30"


@pytest.mark.parametrize("length", [512, 2048, 8192])
def test_baseline_dynamic_is_hf_dynamic_ntk_at_the_evaluated_length(length):
    """The baseline's dynamic NTK: factor 1 and transformers' update at the prompt's length, i.e.
    base x (L / max_pos)^(d/(d-2)); not factor L / max_pos on top of it (f² - f + 1)."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from fot.api import FotModel
    from fot.config import config_from_dict
    from fot.model import rope

    cfg = config_from_dict({"model": dict(vocab_size=259, hidden_size=64, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          max_position_embeddings=512)})
    gen, name = passkey.prepare(FotModel.random(cfg, seed=0, tokenizer=ByteTokenizer()), memory=False,
                                rope_scaling="dynamic", max_length=length)
    scaling = gen.model.config.model.rope_scaling
    assert scaling == {"rope_type": "dynamic", "factor": 1.0} and name == "baseline+dynamicx1"
    hf = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=512,
                     rope_parameters={"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0})
    emb = LlamaRotaryEmbedding(hf)
    emb(torch.zeros(1), torch.arange(length)[None])  # transformers grows the base with the length
    inv, _ = rope.rope_frequencies(gen.model.config.model, length)
    np.testing.assert_allclose(inv, emb.inv_freq.numpy(), rtol=1e-6)
    # And the formula written out: base (L / 512)^(d / (d - 2)) for L > 512, d = 32.
    base = 10000.0 * max(length / 512, 1.0) ** (32 / 30)
    np.testing.assert_allclose(inv, 1.0 / base ** (np.arange(0, 32, 2) / 32), rtol=1e-6)
    # The other types still stretch by L / max_pos.
    lin, _ = passkey.prepare(gen.model, memory=False, rope_scaling="linear", max_length=length)
    assert lin.model.config.model.rope_scaling["factor"] == max(1.0, length / 512)


@pytest.mark.parametrize("d", [0, 1, 8, 64])
def test_named_key_prompt_has_each_key_once_and_distinct_names(d):
    tok = ByteTokenizer()
    rng = np.random.default_rng([7, d])
    docs = prompts.sample_named_keys(rng, d + 1)
    names, keys = [n for n, _ in docs], [k for _, k in docs]
    assert len(set(names)) == len(names) == d + 1 and len(set(keys)) == d + 1
    assert all(re.fullmatch(r"[A-Z]{3}", n) and 1 <= k <= 49999 for n, k in docs)
    p = prompts.build_multidoc_prompt(tok, docs, tail_chars=256)
    name, key = docs[-1]
    # Every document's key line exactly once, in order; the asked one last, then filler and the question.
    lines = re.findall(r"The pass key of ([A-Z]{3}) is (\d+)\. Remember it\. (\d+) is the pass key of ([A-Z]{3})\.",
                       p.text)
    assert [(a, int(b)) for a, b, c, e in lines] == docs and all(b == c and a == e for a, b, c, e in lines)
    assert p.text.endswith(f"\nWhat is the pass key of {name}? The pass key of {name} is")
    assert p.text.count(f" {key}.") == 1 and p.text.count(f"{key} is the pass key") == 1
    assert p.answer == str(key) and p.answer_ids == tok.encode(f" {key}", bos=False)
    # The key span is the asked key line, and 256 bytes of filler follow it before the question.
    span = tok.decode(p.ids[p.key_span[0]:p.key_span[1]])
    assert span == prompts.key_line(key, name)
    assert len(p.ids) - p.key_span[1] == 1 + 256 + 1 + len(prompts.question(name))


class Echo:
    """Generates the key it finds, then `then` (the over-generation probe); memory_tokens like
    WithMemory with last_context_length 128."""

    tokenizer = ByteTokenizer()

    def __init__(self, then: str, pattern=r"The pass key (?:of [A-Z]+ )?is (\d+)\.", memory=True):
        self.then, self.pattern = then, pattern
        if memory:
            self.memory_tokens = lambda n: max(n - 128, 0)

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0):
        key = re.findall(self.pattern, self.tokenizer.decode(prompt_ids))[-1]
        return self.tokenizer.encode(f" {key}{self.then}", bos=False)[:max_new_tokens]


def test_trials_record_where_the_key_was_and_over_generation():
    # 512 tokens, depth 0: the key line is near the start, so in memory; depth 1: in the last 128.
    mem, loc = (passkey.run_passkey(Echo("."), [512], 1, [d], 0, "m", progress=False)[0] for d in (0.0, 1.0))
    assert mem["key_in"] == "memory" and mem["key_span"][1] <= 512 - 128
    assert loc["key_in"] == "local" and loc["key_span"][0] >= 512 - 128
    assert mem["correct"] and mem["after"] == "." and not mem["overgenerated"]
    over = passkey.run_passkey(Echo("7"), [512], 2, "uniform", 0, "m", progress=False)
    assert all(t["correct"] and t["overgenerated"] and t["after"] == "7" for t in over)
    plain = passkey.run_passkey(Echo(".", memory=False), [512], 1, "uniform", 0, "b", progress=False)
    assert plain[0]["key_in"] is None
    assert passkey.key_place((10, 20), 15) == "both"
    named = passkey.run_multidoc(Echo("."), [0, 8], 2, 0, 256, "m", progress=False)
    assert [t["distractors"] for t in named] == [0, 0, 8, 8] and all(t["correct"] for t in named)
    assert all(t["key_in"] == "memory" and t["key"] not in t["distractor_keys"] for t in named)
    assert len({t["distractor_keys"][0] for t in named if t["distractors"]}) == 2  # trials differ


def test_report_splits_by_key_place_seeds_and_named_task(tmp_path):
    def trial(method, length, correct, seed, key_in="memory", task="passkey", **kw):
        return {"method": method, "length": length, "depth": 0.5, "correct": correct, "seed": seed,
                "key_in": key_in, "overgenerated": False, "task": task, **kw}

    trials = [trial("fot", 512, True, s) for s in (0, 1) for _ in range(3)]
    trials += [trial("fot", 512, False, 1, key_in="local")]
    trials += [trial("fot", 600, s == 0, s, task="named", distractors=8) for s in (0, 1)]
    report.write_accuracy_report(tmp_path, trials, {}, name="t")
    md = (tmp_path / "results.md").read_text()
    assert "| fot | 0.86 [0.49, 0.97] 6/7 |" in md  # pooled
    assert "| fot | memory | 1.00 [0.61, 1.00] 6/6 |" in md and "| fot | local | 0.00 [0.00, 0.79] 0/1 |" in md
    assert "| fot | 512 | 3/3 | 3/4 |" in md  # per seed
    assert "| fot | 0.50 [0.09, 0.91] 1/2 |" in md.split("## Named keys")[1]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["wilson95"]["fot"]["512"] == pytest.approx(report.wilson(6, 7))
    assert (tmp_path / "named.png").read_bytes()[:4] == b"\x89PNG"


def test_gather_pools_the_finished_seeds(tmp_path):
    from fot.experiments import passkey_retrieval
    from fot.experiments.config import load_experiment

    ef = load_experiment(CONFIGS / "passkey_tiny.yaml")
    for s, ok in ((0, True), (1, False)):
        path = tmp_path / "seeds" / str(s) / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"command": f"seed {s}", "git_commit": "abc", "git_dirty": False,
                                    "trials": [{"method": "fot-dense", "length": 512, "depth": 0.1,
                                                "correct": ok, "seed": s, "task": "passkey"}]}))
    paths = passkey_retrieval.gather(ef, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert set(data["seeds"]) == {"0", "1"} and data["seeds"]["1"]["command"] == "seed 1"
    assert data["accuracy"] == {"fot-dense": {"512": 0.5}} and len(data["trials"]) == 2
    assert "seed 2" not in paths["md"].read_text() and "| fot-dense | 512 | 1/1 | 0/1 |" in paths["md"].read_text()


def _small(cfg, **train):
    """The same data, window, rows and schedule with a 1-layer, 32-wide model: the data and shapes are
    what is checked, not the model's size."""
    import dataclasses

    model = dataclasses.replace(cfg.model, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=None)
    return cfg.replace(model=model, train=dataclasses.replace(cfg.train, steps=2, checkpoint_every=2,
                                                              log_every=1, **train))


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("passkey_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_baseline_trains(path, tmp_path, monkeypatch):
    """The baseline (and its fine-tunes) of each shipped comparison reads window-long documents from
    its data and takes training steps (a smaller model at the same window, rows and data)."""
    from fot.experiments import passkey_retrieval
    from fot.experiments.config import load_experiment
    from fot.train import train

    monkeypatch.setenv("FOT_PEAK_FLOPS", "1e12")
    ef = load_experiment(path)
    cfgs, _ = passkey_retrieval.plan(ef, tmp_path, (ef.experiment.seeds or [None])[0])
    base = _small(cfgs["baseline"], batch_size=min(cfgs["baseline"].train.batch_size, 2))
    assert np.isfinite(train(base, progress=False)["final_loss"])
    for name in ("ft-pi", "ft-yarn"):
        if name in cfgs:
            ft = _small(cfgs[name], init_from=str(Path(base.train.run_dir) / "final"))
            assert ft.train.window == 4 * base.train.window
            assert np.isfinite(train(ft, progress=False)["final_loss"])


def test_git_dirty_ignores_results_but_not_code(tmp_path):
    """Results written by other runs do not make a run 'dirty'; an uncommitted code change does."""
    import subprocess

    from fot.experiments.provenance import git_info

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "init")
    assert git_info(tmp_path)["git_dirty"] is False
    (tmp_path / "experiments" / "results" / "run").mkdir(parents=True)
    (tmp_path / "experiments" / "results" / "run" / "results.json").write_text("{}")
    assert git_info(tmp_path)["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_info(tmp_path)["git_dirty"] is True
