"""Training on a mesh: 8 simulated CPU devices and 2 processes train exactly like 1 device,
checkpoints move between meshes, bad meshes fail before compiling, and the 3B dry run.

Multi-device runs are `python -m fot.train` subprocesses (XLA_FLAGS must be set before jax is
imported; this process has one CPU device); 1-device runs call `main` in this process.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from fot.train import main

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FOT_PEAK_FLOPS", "1e10")  # skip measuring the CPU's matmul peak

# tests/test_train.py's tiny model; 16 rows so that 4 batch shards hold R=3 rows each
CONFIG = {
    "model": {"vocab_size": 259, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "max_position_embeddings": 32, "tie_word_embeddings": True},
    "memory": {"layers": [1]},
    "data": {"tokenizer": "byte", "sources": [{"path": "builtin:passkey", "min_chars": 100,
                                               "max_chars": 300}]},
    "train": {"steps": 5, "batch_size": 16, "window": 32, "pack_size": 4, "cross_batch_range": 3,
              "learning_rate": 1e-3, "checkpoint_every": 3, "log_every": 1, "keep_checkpoints": 10},
}
MESH_222 = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
REL = 1e-5  # losses: f32 sums in another order across shards


def cli(*args: str, devices: int = 8, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fot.train", *args, "--no-progress"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").open())}


def final_params(run: Path) -> dict[str, np.ndarray]:
    """The trained model in `run/final`, loaded here on one device whatever mesh wrote it."""
    from fot import load_model
    from fot.checkpoint import params_dict

    tree = params_dict(load_model(run / "final").module)
    return {jax.tree_util.keystr(p): np.asarray(a)
            for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_losses_equal(got: dict, want: dict, steps) -> None:
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=REL), (s, got[s], want[s])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 5 steps on 1 device (here) and on a data=2 fsdp=2 tensor=2 mesh of 8."""
    tmp = tmp_path_factory.mktemp("dist")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    assert main([str(cfg), f"train.run_dir={tmp / 'one'}", "--no-progress"]) == 0
    proc = cli(str(cfg), f"train.run_dir={tmp / 'eight'}", *MESH_222)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh data=2 fsdp=2 tensor=2 sequence=1 over 8 cpu devices" in proc.stdout
    return tmp


def test_eight_devices_train_like_one(runs):
    one, eight = losses(runs / "one"), losses(runs / "eight")
    assert sorted(one) == sorted(eight) == [1, 2, 3, 4, 5]
    assert_losses_equal(eight, one, range(1, 6))
    assert one[5] < one[1]  # it trains
    p1, p8 = final_params(runs / "one"), final_params(runs / "eight")
    assert p1.keys() == p8.keys() and len(p1) == 11
    for k in p1:  # atol: 1% of one Adam step (lr 1e-3)
        np.testing.assert_allclose(p8[k], p1[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_rows_reading_their_own_pack_take_no_halo(tmp_path):
    """R=2, k=4, stepping: pack rows read 0, 1, 2, 2 rows, all of their own pack, so on data=2
    (whole packs per shard) the small memory layer sends no collective permute and trains as on
    one device."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "train": {**CONFIG["train"], "steps": 3, "cross_batch_range": 2}}))
    assert main([str(cfg), f"train.run_dir={tmp_path / 'one'}", "--no-progress"]) == 0
    proc = cli(str(cfg), f"train.run_dir={tmp_path / 'two'}", "mesh.data=2", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_losses_equal(losses(tmp_path / "two"), losses(tmp_path / "one"), (1, 2, 3))
    dry = cli(str(cfg), "--dry-run", "mesh.data=2", devices=2)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "collective-permutes 0 (expected 0" in dry.stdout and "CROSSBATCH LAYOUT says" in dry.stdout


def _resumable_copy(src: Path, dst: Path, step: int) -> Path:
    """`src` as it was right after the checkpoint of `step` (later checkpoints, logs, model gone)."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if ckpt.name.isdigit() and int(ckpt.name) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(dst / "final")
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines[:step]))
    return dst


def test_checkpoint_of_eight_devices_resumes_on_other_meshes(runs, tmp_path, capsys):
    want = losses(runs / "eight")
    # on 1 device
    run = _resumable_copy(runs / "eight", tmp_path / "on_one", 3)
    capsys.readouterr()
    assert main([str(runs / "cfg.yaml"), f"train.run_dir={run}", "--no-progress"]) == 0
    assert "(step 3)" in capsys.readouterr().out
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]
    assert_losses_equal(losses(run), want, (4, 5))
    # on another mesh shape: 4 batch shards without fsdp, heads still split in two
    run = _resumable_copy(runs / "eight", tmp_path / "on_412", 3)
    proc = cli(str(runs / "cfg.yaml"), f"train.run_dir={run}", "mesh.data=4", "mesh.fsdp=1",
               "mesh.tensor=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(step 3)" in proc.stdout and "mesh data=4 fsdp=1 tensor=2" in proc.stdout
    assert_losses_equal(losses(run), want, (4, 5))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(cfg: Path, run: Path, *overrides: str) -> tuple[list[int], list[tuple[str, str]]]:
    """`python -m fot.train` as 2 processes x 4 CPU devices joined through JAX_COORDINATOR_ADDRESS
    (mesh.distributed=auto) on the data=2 fsdp=2 tensor=2 mesh: return codes and (stdout, stderr)."""
    env = {"JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": "2",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    base = {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4", **env}
    procs = [subprocess.Popen([sys.executable, "-m", "fot.train", str(cfg), f"train.run_dir={run}",
                               *MESH_222, *overrides, "--no-progress"], cwd=ROOT,
                              env={**base, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outs


def test_two_processes_train_like_one(runs, tmp_path):
    """Each process loads its rows, all write their checkpoint shards, only process 0 logs."""
    run = tmp_path / "run"
    codes, outs = two_processes(runs / "cfg.yaml", run)
    assert codes == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "over 8 cpu devices, 2 process(es)" in outs[0][0] and "done:" in outs[0][0]
    # Process 1 prints none of the run's log (only gloo's own connection messages, which wrap lines).
    assert not any(m in outs[1][0] for m in ("over 8 cpu devices", "done:", "step ", "loss"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5  # written once
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert_losses_equal(losses(run), losses(runs / "one"), range(1, 6))
    p1, p2 = final_params(runs / "one"), final_params(run)
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_two_processes_keep_the_last_good_state_on_nan(runs, tmp_path):
    """lr 1e30: a non-finite gradient at step 2, a checkpoint step (tests/test_reliability.py has
    the one-process case): both processes stop, and the checkpoint of step 1 is the one on disk."""
    run = tmp_path / "run"
    codes, outs = two_processes(runs / "cfg.yaml", run, "train.learning_rate=1e30", "train.checkpoint_every=2")
    assert codes == [1, 1], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert f"the last good step 1 is saved in {run / 'checkpoints' / '1'}" in outs[0][1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]


@pytest.mark.parametrize("overrides, message", [
    (("mesh.fsdp=3", "mesh.tensor=2"), "mesh.data=-1 mesh.fsdp=3 mesh.tensor=2 mesh.sequence=1: "
                                       "the fixed axes (product 6) do not divide the 8 devices"),
    (("mesh.data=8", "train.batch_size=12"),
     "train.batch_size=12 is not divisible by the data axes: mesh data=8 x fsdp=1 = 8 batch "
     "shards"),
    (("mesh.data=4", "mesh.tensor=2", "train.grad_accum=2"),
     "the micro-batch (train.batch_size=16 / train.grad_accum=2)=8 over 4 batch shards leaves 2"),
])
def test_bad_mesh_or_batch_is_a_one_line_error(runs, tmp_path, overrides, message):
    proc = cli(str(runs / "cfg.yaml"), f"train.run_dir={tmp_path / 'run'}", *overrides)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "run").exists()  # nothing started


def test_dry_run_of_the_3b_config_on_eight_devices():
    """No weights, tokenizer or data are present; the step compiles for the mesh, and the
    memory layers' keys/values are never all-gathered: one permute per memory layer each way."""
    proc = cli("configs/3b.yaml", *MESH_222, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "parameters: 3,426,473,600" in out  # OpenLLaMA-3B
    assert "as 8 micro-batch(es) of 16 rows" in out
    mem = dict(re.findall(r"(\w+) ([\d.]+) GiB", out.split("memory per device:")[1].split("\n")[0]))
    # params + Adam moments, f32, over fsdp x tensor = 4: 3 * 3.43e9 * 4 B / 4 = 9.57 GiB
    assert float(mem["argument"]) == pytest.approx(9.57, abs=0.01)
    assert float(mem["total"]) > float(mem["argument"])
    gathers, permutes = map(int, re.search(
        r"memory-layer keys/values \(3 memory layers.*all-gathers (\d+) \(expected 0: .*\), "
        r"collective-permutes (\d+) \(expected 6", out).groups())
    assert (gathers, permutes) == (0, 6)  # fot/sharding.py CROSSBATCH LAYOUT
    counts = json.loads(out.split("counts once): ")[1].split("\n")[0].replace("'", '"'))
    assert counts["all-gather"] > 0 and counts["collective-permute"] == 6  # FSDP gathers; halo only
