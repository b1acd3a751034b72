"""Experiment runners: config blocks and their errors, the baseline derivation, sweep grids, task split
and re-runs, and an end-to-end passkey comparison with a few training steps."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fot.config import ConfigError
from fot.experiments import passkey_retrieval, sweep
from fot.experiments.config import SweepConfig, load_experiment
from fot.experiments.methods import parse_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "experiments"

# A tiny FoT model: window 128, packs of 2, crossbatch range 1.
TINY = {
    "model": dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
    "memory": dict(layers=[1], positionals=False),
    "retrieval": dict(last_context_length=64),
    "data": {"tokenizer": "byte", "sources": [{"path": "builtin:passkey", "min_chars": 200, "max_chars": 600}]},
    "train": dict(steps=2, batch_size=4, window=128, pack_size=2, cross_batch_range=1, learning_rate=1e-3,
                  checkpoint_every=2, log_every=1),
    "experiment": dict(lengths=[256, 512], trials=1),
}


def write_config(tmp_path, name="exp.yaml", **blocks):
    values = json.loads(json.dumps(TINY))
    for section, update in blocks.items():
        if update is None:
            values.pop(section, None)
        else:
            values.setdefault(section, {}).update(update)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------
# configs and their errors


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiment_configs_load_and_plan(path, tmp_path):
    ef = load_experiment(path)
    if ef.sweep is None:
        cfgs, methods = passkey_retrieval.plan(ef, tmp_path, (ef.experiment.seeds or [None])[0])
        assert methods and {m.model for m in methods} <= set(cfgs)
    else:
        assert sweep.plan(ef, tmp_path)


def test_passkey_tiny_covers_64x_the_window():
    ef = load_experiment(CONFIGS / "passkey_tiny.yaml")
    window = ef.config.train.window
    lengths = ef.experiment.token_lengths()
    assert lengths[0] <= 4 * window and lengths[-1] >= 64 * window


def test_bad_inputs_name_key_and_file(tmp_path):
    def error(**blocks):
        path = write_config(tmp_path, **blocks)
        with pytest.raises(ConfigError) as e:
            passkey_retrieval.plan(load_experiment(path), tmp_path / "out")
        assert str(path) in str(e.value)
        return str(e.value)

    msg = error(experiment={"methods": ["fot-dense", "fot-lsh"]})
    assert "experiment.methods[1]" in msg and "unknown method 'fot-lsh'" in msg
    assert "unknown key 'experiment.trails'" in error(experiment={"trails": 3})
    assert "unknown key 'model.hidden_sise'" in error(model={"hidden_sise": 3})
    assert "unknown key 'experimnt'" in error(experimnt={"trials": 3})
    msg = error(memory={"layers": []}, train={"cross_batch_range": 0}, experiment={"methods": ["fot-knn"]})
    assert "asks for memory retrieval" in msg and "memory.layers is empty" in msg
    msg = error(experiment={"lengths": [100, 512]})
    assert "experiment.lengths" in msg and "below the passkey prompt's fixed part" in msg
    assert "experiment.lengths[0]" in error(experiment={"lengths": ["4q"]})
    assert "raise retrieval.capacity" in error(retrieval={"capacity": 300})
    assert "python -m fot.experiments.sweep" in error(sweep={"axes": {"train.seed": [0, 1]}})
    assert "unknown key 'train.sed'" in error(experiment={"baseline_overrides": ["train.sed=1"]})
    # The baseline's 256-token window: documents of at most 200 bytes never fill it.
    msg = error(data={"sources": [{"path": "builtin:passkey", "min_chars": 100, "max_chars": 200}]},
                experiment={"methods": ["baseline"]})
    assert "baseline" in msg and "has at least 256 tokens" in msg
    msg = error(experiment={"distractors": [0, 64]}, retrieval={"capacity": 5000})
    assert "experiment.distractors=64" in msg and "raise retrieval.capacity" in msg
    assert "experiment.seeds must be distinct" in error(experiment={"seeds": [0, 0]})
    # Fine-tuning at 4x the baseline's context keeps its tokens per step: 2 rows cannot be split in 4.
    msg = error(experiment={"methods": ["ft-pi"], "finetune": {"factor": 4}})
    assert "experiment.finetune.factor=4 does not divide" in msg


def test_method_grammar():
    m = parse_method("fot-knn+yarn:2")
    assert (m.model, m.retrieval, m.rope, m.factor) == ("fot", "knn", "yarn", 2.0)
    assert parse_method("baseline+llama3").rope == "llama3" and parse_method("baseline").rope is None
    assert (parse_method("ft-yarn").model, parse_method("fot-ft").retrieval) == ("ft-yarn", "dense")
    assert parse_method("fot-ft").memory and not parse_method("ft-pi").memory
    for bad in ("baseline-dense", "fot", "fot-dense+longrope", "baseline+linear:0.5", "baseline+ntk:x",
                "ft-ntk", "fot-ft+yarn"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)


def test_baseline_sees_a_pack_per_row_with_the_same_tokens_per_step(tmp_path):
    ef = load_experiment(write_config(tmp_path, train={"batch_size": 8, "pack_size": 4, "cross_batch_range": 3}))
    cfgs, _ = passkey_retrieval.plan(ef, tmp_path / "out")
    fot_cfg, base = cfgs["fot"], cfgs["baseline"]
    k, w = fot_cfg.train.pack_size, fot_cfg.train.window
    assert base.train.window == k * w == 512 and base.model.max_position_embeddings == 512
    assert base.train.batch_size == fot_cfg.train.batch_size // k == 2
    assert base.train.batch_size * base.train.window == fot_cfg.train.batch_size * fot_cfg.train.window
    assert base.train.steps == fot_cfg.train.steps and base.train.pack_size == 1
    assert base.memory.layers == () and base.train.cross_batch_range == 0
    assert base.model.hidden_size == fot_cfg.model.hidden_size and base.data == fot_cfg.data
    assert (base.train.run_dir, fot_cfg.train.run_dir) == (str(tmp_path / "out/runs/baseline"),
                                                          str(tmp_path / "out/runs/fot"))
    over = passkey_retrieval.baseline_config(fot_cfg, ("train.learning_rate=0.5",))
    assert over.train.learning_rate == 0.5 and over.train.window == 512


def test_a_run_dir_of_another_config_is_an_error(tmp_path):
    from fot.config import save_config
    from fot.experiments.training import check_same_run

    cfg = load_experiment(write_config(tmp_path)).config
    save_config(cfg, tmp_path / "config.yaml")
    same = load_experiment(write_config(tmp_path, train={"steps": 9}, retrieval={"knn_k": 4})).config
    check_same_run(same, tmp_path)  # more steps continue the run; knn_k matters at inference only
    other = load_experiment(write_config(tmp_path, train={"learning_rate": 0.5})).config
    with pytest.raises(ConfigError, match="train.learning_rate: 0.001 there, 0.5 now"):
        check_same_run(other, tmp_path)


# ------------------------------------------------------------------------------------------------
# sweeps


def test_grid_expansion():
    grid = sweep.expand(SweepConfig(axes={
        "train.cross_batch_range": [0, 3],
        "search": [{"retrieval.mode": "dense"}, {"retrieval.mode": "knn", "retrieval.knn_k": 16}]}), "f")
    assert grid == [
        {"train.cross_batch_range": 0, "retrieval.mode": "dense"},
        {"train.cross_batch_range": 0, "retrieval.mode": "knn", "retrieval.knn_k": 16},
        {"train.cross_batch_range": 3, "retrieval.mode": "dense"},
        {"train.cross_batch_range": 3, "retrieval.mode": "knn", "retrieval.knn_k": 16}]
    cells = ({"memory.layers": [0]}, {"memory.layers": [0, 1]})
    assert sweep.expand(SweepConfig(cells=cells), "f") == list(cells)
    bad = [(SweepConfig(), "needs axes or cells"),
           (SweepConfig(axes={"a.b": [1]}, cells=({"a.b": 1},)), "not both"),
           (SweepConfig(axes={"a.b": []}), "non-empty list"),
           (SweepConfig(axes={"r": [{"a.b": 1}, 2]}), "mixes"),
           (SweepConfig(axes={"a.b": [1], "r": [{"a.b": 2}]}), "set by two sweep axes"),
           (SweepConfig(cells=({"a.b": 1}, {"a.b": 1})), "same cell")]
    for cfg, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            sweep.expand(cfg, "f")


def sweep_file(tmp_path):
    return load_experiment(write_config(tmp_path, sweep={"axes": {
        "train.cross_batch_range": [0, 1],
        "train.seed": [0, 1, 2],
        "search": [{"retrieval.mode": "dense"}, {"retrieval.mode": "knn", "retrieval.knn_k": 16}]}}))


def test_task_split_runs_each_cell_once_and_each_model_in_one_task(tmp_path):
    cells = sweep.plan(sweep_file(tmp_path), tmp_path / "out")
    assert len(cells) == 12 and len({c.train_name for c in cells}) == 6  # retrieval is eval-only
    assert len({c.config.train.run_dir for c in cells}) == 6
    for n in (1, 2, 4, 7):
        tasks = [sweep.assign(cells, i, n) for i in range(n)]
        names = [c.name for t in tasks for c in t]
        assert sorted(names) == sorted(c.name for c in cells)  # every cell exactly once
        for t in tasks:  # a model's cells never split between tasks
            others = {c.train_name for u in tasks if u is not t for c in u}
            assert not others & {c.train_name for c in t}
    with pytest.raises(ValueError, match="task-index"):
        sweep.assign(cells, 2, 2)


def test_finished_cells_are_skipped_and_gathered(tmp_path, monkeypatch):
    ef, out = sweep_file(tmp_path), tmp_path / "out"
    calls = {"train": [], "eval": []}

    def fake_train(cfg, progress=True):
        calls["train"].append(cfg.train.run_dir)
        return {"run_dir": cfg.train.run_dir, "final": cfg.train.run_dir + "/final", "final_loss": 1.5,
                "trained": True}

    def fake_eval(cell, final, ef, progress):
        calls["eval"].append(cell.name)
        right = cell.overrides["retrieval.mode"] == "dense"
        return "fake", {}, [{"method": cell.name, "length": n, "depth": 0.5, "correct": right,
                             "seed": cell.config.train.seed} for n in ef.experiment.token_lengths()]

    monkeypatch.setattr(sweep, "ensure_trained", fake_train)
    monkeypatch.setattr(sweep, "evaluate_cell", fake_eval)
    ran = sweep.run_task(ef, out, 0, 2, progress=False) + sweep.run_task(ef, out, 1, 2, progress=False)
    assert len(ran) == 12 and len(calls["eval"]) == 12 and len(calls["train"]) == 6
    assert sweep.run_task(ef, out, progress=False) == []  # all done: nothing trained or evaluated
    assert len(calls["eval"]) == 12 and len(calls["train"]) == 6
    victim = sweep.plan(ef, out)[5]
    sweep.result_path(out, victim).unlink()
    assert [c.name for c in sweep.run_task(ef, out, progress=False)] == [victim.name]
    assert calls["train"][-1] == victim.config.train.run_dir
    paths = sweep.gather(ef, out)
    md = paths["md"].read_text()
    # One row per cell without its seed (train.seed): the 3 seeds' trials pooled, Wilson 95%.
    assert "| method | 256 | 512 |" in md
    assert "| cross_batch_range=1, mode=knn, knn_k=16 | 0.00 [0.00, 0.56] 0/3 | 0.00 [0.00, 0.56] 0/3 |" in md
    assert "| cross_batch_range=0, mode=dense | 1.00 [0.44, 1.00] 3/3 | 1.00 [0.44, 1.00] 3/3 |" in md
    assert "| cross_batch_range=0, mode=dense | 256 | 1/1 | 1/1 | 1/1 |" in md  # per seed
    assert "| train.cross_batch_range=1,train.seed=2,retrieval.mode=knn,retrieval.knn_k=16 | 1.5 |" in md
    data = json.loads(paths["json"].read_text())
    assert len(data["cells"]) == 12 and data["missing"] == []
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------
# the baseline's one-forward verdict equals greedy decoding


def test_full_attention_greedy_until_wrong_matches_generate():
    from fot.api import FotModel
    from fot.config import config_from_dict
    from fot.data.tokenizer import ByteTokenizer
    from fot.eval.passkey import FullAttention
    import jax
    from flax import nnx

    cfg = config_from_dict({"model": TINY["model"]})
    model = FotModel.random(cfg, seed=0, tokenizer=ByteTokenizer())
    nnx.update(model.module, jax.tree.map(lambda a: a * 5.0, nnx.state(model.module, nnx.Param)))
    gen = FullAttention(model)
    ids = ByteTokenizer().encode("The pass key is 4711. " * 9, bos=True)
    greedy = gen.generate(ids, 5)
    assert gen.greedy_until_wrong(ids, greedy) == greedy  # all right: the whole answer
    wrong = greedy[:2] + [(greedy[2] + 1) % 259, 7, 7]
    assert gen.greedy_until_wrong(ids, wrong) == greedy[:3]  # up to and including the first miss
    # follow: a whole right answer, then the token generate() emits after it
    assert gen.greedy_until_wrong(ids, greedy[:4], follow=True) == greedy
    assert gen.greedy_until_wrong(ids, wrong[:4], follow=True) == greedy[:3]


# ------------------------------------------------------------------------------------------------
# end to end


def test_passkey_retrieval_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("FOT_PEAK_FLOPS", "1e12")  # the trainer's MFU: skip measuring the CPU
    methods = ["fot-dense+linear", "baseline+yarn"]
    path = write_config(tmp_path, experiment={"methods": methods, "name": "smoke"})
    out = tmp_path / "out"
    assert passkey_retrieval.main([str(path), "experiment.seed=3", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["experiment"] == "smoke" and "experiment.seed=3" in data["command"]
    assert {"git_commit", "machine", "date", "config_file", "overrides"} <= set(data)
    assert data["configs"]["baseline"]["train"]["window"] == 256 and data["configs"]["fot"]["memory"]["layers"] == [1]
    assert [data["training"][m]["trained"] for m in ("fot", "baseline")] == [True, True]
    assert {(t["method"], t["length"]) for t in data["trials"]} == {(m, n) for m in methods for n in (256, 512)}
    by = {(t["method"], t["length"]): t for t in data["trials"]}
    assert by[("fot-dense+linear", 256)]["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert by[("fot-dense+linear", 512)]["window"] == 256 and data["methods"]["fot-dense+linear"]["memory"]
    assert by[("baseline+yarn", 256)]["rope_scaling"]["factor"] == 1.0  # 256 = the baseline's context
    assert by[("baseline+yarn", 512)]["rope_scaling"]["factor"] == 2.0
    assert by[("fot-dense+linear", 512)]["key"] == by[("baseline+yarn", 512)]["key"]  # the same trials
    md = (out / "results.md").read_text()
    assert all(f"| {m} |" in md for m in methods) and "| method | 256 | 512 |" in md
    assert "| fot-dense+linear | memory |" in md or "| fot-dense+linear | both |" in md  # where the key was
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

    # Finished runs are reused, not retrained.
    import fot.train

    monkeypatch.setattr(fot.train, "train", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert passkey_retrieval.main([str(path), "experiment.methods=[fot-dense+linear]", "experiment.lengths=[256]",
                                   "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["training"]["fot"]["trained"] is False and np.isfinite(data["training"]["fot"]["final_loss"])

    # The RULER-style suite beside passkey: the same lengths, trials and seed, its own report.
    assert passkey_retrieval.main([str(path), "experiment.methods=[fot-dense+linear]", "experiment.lengths=[512]",
                                   "experiment.suite=[vt, niah_multikey]", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert sorted((t["task"], t["length"]) for t in data["trials"]) == [
        ("niah_multikey", 512), ("passkey", 512), ("vt", 512)]
    suite_md = (out / "suite" / "results.md").read_text()
    assert "## fot-dense+linear" in suite_md and "| vt |" in suite_md and "| niah_multikey |" in suite_md
    assert "| passkey |" not in suite_md and (out / "suite" / "score.png").is_file()


def test_unknown_suite_task_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"experiment.suite: unknown task 'nope'"):
        load_experiment(write_config(tmp_path, experiment={"suite": ["nope"]}))
