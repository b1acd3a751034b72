"""Progressive context (train.stages): stages run in order, each from the previous one's model, a
killed schedule resumes bit-exactly across the stage boundary, bad schedules are errors."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx, traverse_util

from fot.config import ConfigError, load_config
from fot.train import main
from test_train import ROOT, losses, write_config

STAGES = [{"steps": 4, "window": 32},
          {"steps": 10, "window": 64, "rope_theta": 40000.0, "learning_rate": 5e-4}]


def staged_config(tmp_path: Path, stages=STAGES) -> Path:
    return write_config(tmp_path, train={"stages": stages, "checkpoint_every": 2})


def params(model_dir: Path) -> dict:
    from fot.convert import load_model

    return traverse_util.flatten_dict(nnx.state(load_model(model_dir).module, nnx.Param).to_pure_dict())


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("staged")
    run = tmp / "run"
    assert main([str(staged_config(tmp)), f"train.run_dir={run}", "--no-progress"]) == 0
    return run


def test_stages_run_in_order_each_from_the_previous(staged):
    for i, stage in enumerate(STAGES):
        assert sorted(losses(staged / f"stage{i}")) == list(range(1, stage["steps"] + 1))
    second = yaml.safe_load((staged / "stage1" / "config.yaml").read_text())
    assert second["train"]["window"] == 64 and second["train"]["learning_rate"] == 5e-4
    assert second["model"]["rope_theta"] == 40000.0 and second["train"]["stages"] == []
    assert second["train"]["init_from"] == str(staged / "stage0" / "final")
    assert second["data"]["seed"] == 1  # new documents, not stage 0's again
    first = yaml.safe_load((staged / "stage0" / "config.yaml").read_text())
    assert first["train"]["init_from"] is None and first["model"]["rope_theta"] == 10000.0
    assert (staged / "final").resolve() == (staged / "stage1" / "final").resolve()


def wait_for(proc: subprocess.Popen, path: Path) -> None:
    deadline = time.time() + 180
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_kills_at_and_after_the_stage_boundary_resume_bit_exactly(staged, tmp_path, capsys):
    cfg = staged_config(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # Life 1 dies as stage 0's model is written, life 2 at stage 1's first checkpoint.
    for marker in (run / "stage0" / "final" / "config.yaml",
                   run / "stage1" / "checkpoints" / "2" / "commit_success.txt"):
        proc = subprocess.Popen([sys.executable, "-m", "fot.train", str(cfg), f"train.run_dir={run}",
                                 "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_for(proc, marker)
            proc.kill()
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert main([str(cfg), f"train.run_dir={run}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "stage 1/2: " + str(run / "stage0") + " is trained (4 steps)" in out and "resumed from" in out
    for i in range(2):
        assert losses(run / f"stage{i}") == losses(staged / f"stage{i}")
    want, got = params(staged / "final"), params(run / "final")
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=str(path))


@pytest.mark.parametrize("stages, message", [
    ([{"steps": 2, "window": 64}, {"steps": 2, "window": 32}],
     "train.stages[1].window=32 is shorter than the stage before it (64): stages go from short to long"),
    ([{"steps": 0}], "train.stages[0].steps must be positive, got 0"),
    ([{"steps": 2, "rope_theta": -1.0}], "train.stages[0]: model.rope_theta"),
])
def test_bad_schedules(tmp_path, capsys, stages, message):
    cfg = staged_config(tmp_path, stages)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(cfg)
    assert main([str(cfg), f"train.run_dir={tmp_path / 'run'}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_dry_run_reports_every_stage(tmp_path, capsys):
    assert main([str(staged_config(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("memory per device:") == 2
    assert "stage 1/2:" in out and "stage 2/2:" in out and "batch 8 rows x 64 tokens" in out
