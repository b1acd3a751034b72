"""Reliability of training runs: resume checks the config it resumes, damaged checkpoints fall back to
the newest intact one, a NaN on a checkpoint step keeps the last good state, bad input is one line,
and a run killed 20 times ends exactly as an uninterrupted one (tests/fault_injection.py)."""

import json
import os
import shutil

import pytest

from fault_injection import kill_resume
from fot.checkpoint import DamagedCheckpoint
from fot.config import ConfigError, load_config
from fot.train import main
from test_train import losses, write_config

os.environ.setdefault("FOT_PEAK_FLOPS", "1e10")
BASE = 6  # steps of the run the damage tests start from: checkpoints 2, 4, 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run of BASE steps (resumed from in each test, on a copy) and an uninterrupted one of
    BASE + 2 steps (the losses a resume must give)."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = write_config(tmp)
    for name, steps in (("base", BASE), ("reference", BASE + 2)):
        assert main([str(cfg), f"train.run_dir={tmp / name}", f"train.steps={steps}", "--no-progress"]) == 0
    return tmp


def copy_base(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "base", run)
    return write_config(tmp_path), run


def resume(cfg, run, *extra) -> int:
    return main([str(cfg), f"train.run_dir={run}", f"train.steps={BASE + 2}", "--no-progress", *extra])


# ---- resume compares the config ----------------------------------------------------------------


def test_changed_config_is_refused_then_accepted_with_the_flag(runs, tmp_path, capsys):
    _, run = copy_base(runs, tmp_path)
    changed = write_config(tmp_path, "changed.yaml",
                           data={"sources": [{"path": "builtin:passkey", "min_chars": 120, "max_chars": 300}]})
    saved = (run / "config.yaml").read_text()
    assert resume(changed, run, "train.learning_rate=0.5") == 2
    err = capsys.readouterr().err
    assert "train.learning_rate: 0.001 -> 0.5" in err and "data.sources[0].min_chars: 100 -> 120" in err
    assert "--accept-changes" in err and len(err.strip().splitlines()) == 4  # the message, 2 keys, the way out
    assert (run / "config.yaml").read_text() == saved and not (run / "config_changes.jsonl").exists()

    assert resume(changed, run, "train.learning_rate=0.5", "--accept-changes") == 0
    assert "accepted config changes from step 6" in capsys.readouterr().out
    record = [json.loads(x) for x in (run / "config_changes.jsonl").read_text().splitlines()]
    assert record == [{"step": BASE, "time": record[0]["time"], "changes": {
        "data.sources[0].min_chars": {"from": 100, "to": 120},
        "train.learning_rate": {"from": 0.001, "to": 0.5}}}]
    assert load_config(run / "config.yaml").train.learning_rate == 0.5


def test_bookkeeping_changes_resume_freely(runs, tmp_path):
    cfg, run = copy_base(runs, tmp_path)
    assert resume(cfg, run, "train.log_every=3", "train.checkpoint_every=5", "train.keep_checkpoints=2",
                  "retrieval.mode=knn", "retrieval.knn_k=2") == 0
    assert losses(run) == losses(runs / "reference")


def test_failed_restore_leaves_the_run_config(runs, tmp_path, capsys):
    cfg, run = copy_base(runs, tmp_path)
    saved = (run / "config.yaml").read_text()
    assert resume(cfg, run, "model.intermediate_size=48", "--accept-changes") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has shape (2, 64, 32), the config implies (2, 48, 32)" in err
    assert (run / "config.yaml").read_text() == saved
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "6"]


# ---- damaged checkpoints -------------------------------------------------------------------------


def largest_chunk(item):
    return max((p for p in item.rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def truncate(step):
    f = largest_chunk(step / "params")
    os.truncate(f, f.stat().st_size // 2)


def flip_bit(step):  # one bit of the raw (uncompressed) Adam moments
    f = largest_chunk(step / "opt_state")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x04
    f.write_bytes(bytes(data))


def drop_metadata(step):
    (step / "params" / "_METADATA").unlink()


def edit_meta(step):  # the data position, as JSON that still parses
    meta = step / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"step": 6', '"step": 5'))


@pytest.mark.parametrize("damage", [truncate, flip_bit, drop_metadata, edit_meta])
def test_damaged_latest_checkpoint_falls_back(runs, tmp_path, capsys, damage):
    cfg, run = copy_base(runs, tmp_path)
    damage(run / "checkpoints" / "6")
    stale = run / "checkpoints" / "8.orbax-checkpoint-tmp-1796000000"
    stale.mkdir()  # an interrupted save
    assert resume(cfg, run) == 0
    out = capsys.readouterr().out
    warned = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {run / 'checkpoints' / '6'}") and "damaged" in warned[0]
    assert "resumed from" in out and "(step 4)" in out and not stale.exists()
    assert [p.name.split("-")[0] for p in (run / "damaged_checkpoints").iterdir()] == ["6"]
    assert losses(run) == losses(runs / "reference")  # steps 5.. trained again, exactly
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "6", "8"]


def test_no_intact_checkpoint_is_one_error_and_moves_nothing(runs, tmp_path, capsys):
    cfg, run = copy_base(runs, tmp_path)
    for step in (2, 4, 6):
        truncate(run / "checkpoints" / str(step))
    assert resume(cfg, run) == 1
    err = capsys.readouterr().err
    assert "reads back intact (nothing was moved)" in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "6"]


def test_damaged_model_directory_is_one_error_naming_it(runs, tmp_path, capsys):
    from fot.convert import load_model
    from fot.convert import main as convert_main
    from fot.eval.passkey import main as passkey_main

    final = tmp_path / "final"
    shutil.copytree(runs / "reference" / "final", final)
    load_model(final)  # intact, with its checksums
    f = largest_chunk(final / "params")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match=f"{final / 'params'}: damaged checkpoint"):
        load_model(final)
    for cli in (lambda: convert_main(["export-hf", str(final), str(tmp_path / "hf")]),
                lambda: passkey_main([str(final), "--lengths", "256", "--trials", "1", "--out", str(tmp_path / "pk")])):
        assert cli() == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(final / "params") in err, err


# ---- NaN, bad run directory, tokenizer ----------------------------------------------------------


@pytest.mark.parametrize("accum", [1, 2])
def test_nan_on_a_checkpoint_step_keeps_the_last_good_state(tmp_path, capsys, accum):
    """lr 1e30 gives a non-finite gradient at step 2, a checkpoint step: the halted state saved
    there is the last good one under a later number, so it goes and step 1 is saved."""
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    assert main([str(cfg), f"train.run_dir={run}", "train.learning_rate=1e30", "train.checkpoint_every=2",
                 f"train.grad_accum={accum}", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "at step 2" in err and f"the last good step 1 is saved in {run / 'checkpoints' / '1'}" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]
    assert json.loads((run / "checkpoints" / "1" / "meta" / "metadata").read_text())["step"] == 1


def test_run_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "run"
    f.write_text("not a directory")
    assert main([str(write_config(tmp_path)), f"train.run_dir={f}", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == f"error: train.run_dir={f} is a file, not a directory"


def test_tokenizer_must_fit_the_vocabulary(tmp_path, capsys, v2_tokenizer_path):
    from fot.api import FotModel
    from fot.data.tokenizer import load_tokenizer

    cfg = load_config(write_config(tmp_path))
    with pytest.raises(ConfigError, match="the tokenizer has 32000 ids but model.vocab_size=259"):
        FotModel.random(cfg, tokenizer=load_tokenizer(str(v2_tokenizer_path)))
    assert main([str(write_config(tmp_path)), f"train.run_dir={tmp_path / 'run'}",
                 f"data.tokenizer={v2_tokenizer_path}", "--no-progress"]) == 2
    assert "32000 ids but model.vocab_size=259" in capsys.readouterr().err


# ---- SIGKILL at random moments -----------------------------------------------------------------


def test_twenty_kills_end_as_an_uninterrupted_run(tmp_path):
    out = kill_resume(tmp_path, kills=20, seed=0)
    assert out["kills"] == 20
    assert out["steps_once"] and out["losses_equal"] and out["steps_lost"] == 0
    assert out["tensorboard_once"] and out["tensorboard_equal"]
    assert out["params_equal"]
