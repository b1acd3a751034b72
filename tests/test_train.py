"""The training loop: resume after SIGKILL, TensorBoard scalars, bad input, NaN loss."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fot.config import load_config
from fot.train import main

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FOT_PEAK_FLOPS", "1e10")  # skip measuring the CPU's matmul peak

TINY = {
    "model": {"vocab_size": 259, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "max_position_embeddings": 32, "tie_word_embeddings": True},
    "memory": {"layers": [1]},
    "data": {"tokenizer": "byte", "sources": [{"path": "builtin:passkey", "min_chars": 100,
                                               "max_chars": 300}]},
    "train": {"steps": 8, "batch_size": 8, "window": 32, "pack_size": 4, "cross_batch_range": 3,
              "learning_rate": 1e-3, "checkpoint_every": 2, "log_every": 1, "keep_checkpoints": 10},
}


def write_config(tmp_path: Path, name: str = "cfg.yaml", **sections) -> Path:
    values = json.loads(json.dumps(TINY))
    for sec, upd in sections.items():
        values[sec].update(upd)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(values))
    return p


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m["loss"]
    return out


FULL = 40  # steps of the reference run: well past where the killed run can get before its kill


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    run = tmp / "run"
    assert main([str(write_config(tmp)), f"train.run_dir={run}", f"train.steps={FULL}",
                 "--no-progress"]) == 0
    return run


def start_run(cfg: Path, run: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "fot.train", str(cfg), f"train.run_dir={run}",
                             "train.steps=1000", "--no-progress", *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, run: Path, step: int) -> None:
    deadline = time.time() + 120
    while not (run / "checkpoints" / str(step) / "commit_success.txt").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)


def test_resume_after_sigkill_gives_the_same_losses(full_run, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = write_config(tmp_path)
    proc = start_run(cfg, run)
    try:
        wait_for_checkpoint(proc, run, 2)
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    capsys.readouterr()
    assert main([str(cfg), f"train.run_dir={run}", f"train.steps={FULL}", "--no-progress"]) == 0
    start = int(capsys.readouterr().out.split("(step ")[1].split(")")[0])
    assert 2 <= start < FULL
    # Every step once (the killed run's steps after the checkpoint were dropped and logged again),
    # with exactly the uninterrupted run's losses.
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    want = losses(full_run)
    assert [m["step"] for m in logged] == list(range(1, FULL + 1))
    for m in logged:
        assert m["loss"] == want[m["step"]], (m["step"], m["loss"], want[m["step"]])


def test_a_finished_run_started_again_reports_its_logged_final_loss(full_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    capsys.readouterr()
    assert main([str(write_config(tmp_path)), f"train.run_dir={run}", f"train.steps={FULL}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"steps {FULL}->{FULL}" in out and f"final loss {losses(full_run)[FULL]:.4f}," in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_that_resumes_exactly(full_run, tmp_path, capsys, signum):
    run = tmp_path / "run"
    cfg = write_config(tmp_path)
    proc = start_run(cfg, run, "train.checkpoint_every=3")
    try:
        wait_for_checkpoint(proc, run, 3)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum
    name = signal.Signals(signum).name
    step = int(out.split(f"{name}: saved checkpoint ")[1].split(" at step ")[1].split(";")[0])
    assert step >= 3 and (run / "checkpoints" / str(step) / "commit_success.txt").is_file()
    assert step < FULL, "the run reached the reference's length before the signal"
    assert main([str(cfg), f"train.run_dir={run}", f"train.steps={FULL}", "--no-progress"]) == 0
    assert f"(step {step})" in capsys.readouterr().out
    assert losses(run) == losses(full_run)


def test_tensorboard_scalars_and_config(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(full_run))
    ea.Reload()
    for tag in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "step_time"):
        events = ea.Scalars(tag)
        assert [e.step for e in events] == list(range(1, FULL + 1)), tag
        assert all(np.isfinite(e.value) for e in events)
    assert [e.value for e in ea.Scalars("loss")] == pytest.approx(
        [losses(full_run)[s] for s in range(1, FULL + 1)], rel=1e-6)
    assert ea.Scalars("learning_rate")[0].value == pytest.approx(1e-3)
    saved = load_config(full_run / "config.yaml")
    assert saved.train.steps == FULL and saved.memory.layers == (1,)
    assert (full_run / "final" / "config.yaml").is_file()


def test_a_hook_sees_every_step_in_order_and_can_stop_the_run(full_run, tmp_path):
    """A user hook gets each step's metrics (the same losses as the reference run), is told of a
    checkpoint after every earlier step, and stopping after step 5 leaves a checkpoint there."""
    from fot.train import train
    from fot.trainer import Hook

    class Record(Hook):
        def __init__(self):
            self.events = []

        def step_end(self, t, step, metrics):
            self.events.append(("step", step, metrics["loss"]))

        def checkpoint(self, t, step):
            self.events.append(("checkpoint", step))

        def stop_requested(self, t, step):
            return step == 5

    hook = Record()
    run = tmp_path / "run"
    summary = train(load_config(write_config(tmp_path), [f"train.run_dir={run}", "train.steps=8"]),
                    progress=False, hooks=[hook])
    ref = losses(full_run)
    assert [e for e in hook.events if e[0] == "checkpoint"] == [("checkpoint", 2), ("checkpoint", 4)]
    steps = [e for e in hook.events if e[0] == "step"]
    assert [e[1] for e in steps] == [1, 2, 3, 4, 5] and all(e[2] == ref[e[1]] for e in steps)
    assert hook.events.index(("checkpoint", 4)) == hook.events.index(("step", 4, ref[4])) + 1
    assert summary["final_step"] == 5 and (run / "checkpoints" / "5").is_dir()


def test_unknown_config_key(tmp_path, capsys):
    assert main([str(write_config(tmp_path)), "train.stepz=3"]) == 2
    assert "unknown key 'train.stepz'" in capsys.readouterr().err


def _run_err(tmp_path, capsys, *overrides, **sections) -> str:
    cfg = write_config(tmp_path, **sections)
    assert main([str(cfg), f"train.run_dir={tmp_path / 'run'}", "--no-progress", *overrides]) == 1
    return capsys.readouterr().err


def test_dataset_without_text_column(tmp_path, capsys):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"content": "x" * 500}) + "\n" for _ in range(3)))
    err = _run_err(tmp_path, capsys, data={"sources": [{"path": str(f)}]})
    assert "data.sources[0]" in err and "'text'" in err and "content" in err


def test_local_file_missing(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    err = _run_err(tmp_path, capsys, data={"sources": [{"path": str(missing)}]})
    assert "data.sources[0]" in err and str(missing) in err


def test_documents_all_shorter_than_window(tmp_path, capsys):
    f = tmp_path / "short.jsonl"
    f.write_text("".join(json.dumps({"text": "tiny doc"}) + "\n" for _ in range(5)))
    err = _run_err(tmp_path, capsys, data={"sources": [{"path": str(f)}]})
    assert "32 tokens" in err and "train.window" in err


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, capsys):
    err = _run_err(tmp_path, capsys, "train.learning_rate=1.0e+30", "train.checkpoint_every=100")
    assert "loss is" in err and "last good step" in err
    good = int(err.split("last good step ")[1].split()[0])
    ckpt = tmp_path / "run" / "checkpoints" / str(good)
    assert str(ckpt) in err and (ckpt / "commit_success.txt").is_file()
    from fot.checkpoint import restore_params  # the saved params are the last good, finite ones
    from flax import nnx
    from fot.model.llama import Llama

    cfg = load_config(tmp_path / "run" / "config.yaml")
    abstract = nnx.eval_shape(lambda: Llama(cfg.model, cfg.memory, rngs=nnx.Rngs(0)))
    params = restore_params(ckpt, nnx.split(abstract, nnx.Param, ...)[1]).to_pure_dict()
    import jax

    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params))


def test_grad_accum_matches_one_batch(tmp_path):
    """Without crossbatch, two micro-batches of one pack each give the full batch's loss and update."""
    cfg = write_config(tmp_path, train={"steps": 2, "cross_batch_range": 0})
    runs = {}
    for accum in (1, 2):
        run = tmp_path / f"run{accum}"
        assert main([str(cfg), f"train.run_dir={run}", f"train.grad_accum={accum}", "--no-progress"]) == 0
        runs[accum] = losses(run)
    assert runs[1][1] == pytest.approx(runs[2][1], rel=1e-6)
    assert runs[1][2] == pytest.approx(runs[2][2], rel=1e-5)


def test_init_from_a_fot_checkpoint(full_run, tmp_path):
    """Starting from the trained model gives a lower first loss than starting at random."""
    cfg = write_config(tmp_path, train={"steps": 1})
    assert main([str(cfg), f"train.run_dir={tmp_path / 'a'}", "--no-progress"]) == 0
    assert main([str(cfg), f"train.run_dir={tmp_path / 'b'}", f"train.init_from={full_run / 'final'}",
                 "--no-progress"]) == 0
    assert losses(tmp_path / "b")[1] < losses(tmp_path / "a")[1] - 0.1


@pytest.mark.parametrize("config", ["configs/3b.yaml", "configs/7b.yaml"])
def test_large_configs_fail_offline_naming_what_is_missing(config, capsys, tmp_path):
    assert main([str(ROOT / config), f"train.run_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    for key in ("weights: train.init_from", "dataset: data.sources[0].path", "data.tokenizer"):
        assert key in err, key
    assert not (tmp_path / "run").exists()  # nothing started


def test_metrics_keep_steps_up_to(tmp_path):
    from fot.metrics import keep_steps_up_to

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3, 4, 3, 4, 5)))
    keep_steps_up_to(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    keep_steps_up_to(tmp_path / "missing.jsonl", 2)  # nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


def _plan(tmp_path, **model):
    import jax

    from fot.train import StepPlan

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1),
                             ("data", "fsdp", "tensor", "sequence"))
    return StepPlan(load_config(write_config(tmp_path, model=model)), mesh)


def test_a_step_under_remat_is_compiled_in_xla_cpus_memory_optimised_order(tmp_path, monkeypatch):
    """On a CPU, remat asks XLA for its memory-optimised schedule: the compiled step plans fewer
    temporaries than XLA's default (concurrency-optimised) order of the same lowered step. Its
    crossbatch reads one source at a time, as a large model's does (a model this small reads them
    unrolled, and the two orders then plan within 0.3% of each other)."""
    import jax

    from fot.model.memory import crossbatch

    monkeypatch.setattr(crossbatch, "UNROLL_BYTES", 0)
    plan = _plan(tmp_path, remat_policy="full")
    with jax.set_mesh(plan.mesh):
        default = plan.step.lower(plan.abstract, plan.abstract_batch).compile()
    temp = lambda c: c.memory_analysis().temp_size_in_bytes
    assert temp(plan.compile()) < temp(default)
    assert _plan(tmp_path, remat_policy="none").compiler_options() == {}


def test_a_compile_option_the_jaxlib_lacks_is_dropped_and_no_other_error_is():
    import jax

    from fot.train import compile_lowered

    class Lowered:
        def __init__(self, message):
            self.message, self.calls = message, []

        def compile(self, options=None):
            self.calls.append(options)
            if options:
                raise jax.errors.JaxRuntimeError(self.message)
            return "compiled"

    old = Lowered("INVALID_ARGUMENT: No such compile option: 'xla_cpu_scheduler_type'")
    assert compile_lowered(old, {"xla_cpu_scheduler_type": "X"}) == "compiled"
    assert old.calls == [{"xla_cpu_scheduler_type": "X"}, None]
    with pytest.raises(jax.errors.JaxRuntimeError, match="not a valid"):
        compile_lowered(Lowered("INVALID_ARGUMENT: 'X' is not a valid value"), {"xla_cpu_scheduler_type": "X"})
