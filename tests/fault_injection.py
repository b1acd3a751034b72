"""Kill a tiny training run with SIGKILL at random moments, many times, resuming after each kill, and
check that it ends exactly as an uninterrupted run: the same final parameters bit for bit, the same
loss at every step, each step once in metrics.jsonl and in TensorBoard.

    python tests/fault_injection.py --kills 100 [--seed 0]    # the once-off run reported in README

tests/test_reliability.py runs `kill_resume` with 20 kills. A kill lands while the process starts,
restores or compiles (a fifth of them) or while it trains, where a checkpoint save is in flight
most of the time (one every 2 steps, written asynchronously).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from test_train import TINY

ROOT = Path(__file__).resolve().parents[1]
# test_train's tiny run, longer (enough steps for the kills), keeping 3 checkpoints.
CONFIG = {**TINY, "train": {**TINY["train"], "steps": 200, "keep_checkpoints": 3}}


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "FOT_PEAK_FLOPS": "1e10"}


def _train(cfg: Path, run: Path, steps: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fot.train", str(cfg), f"train.run_dir={run}",
                             f"train.steps={steps}", "--no-progress"], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensorboard_losses(run: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars("loss")]


def final_params(run: Path) -> dict[str, np.ndarray]:
    import jax

    from fot.checkpoint import params_dict
    from fot.convert import load_model

    flat, _ = jax.tree_util.tree_flatten_with_path(params_dict(load_model(run / "final").module))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def kill_resume(work: Path, kills: int, seed: int = 0, steps: int | None = None,
                say=lambda msg: None) -> dict:
    """Run CONFIG uninterrupted in work/reference, then in work/killed with `kills` SIGKILLs at
    random moments (resuming each time) until it finishes; return the comparison (see `check`)."""
    rng = random.Random(seed)
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    steps = steps or CONFIG["train"]["steps"]
    ref, run = work / "reference", work / "killed"
    proc = _train(cfg, ref, steps)
    _, err = proc.communicate(timeout=600)
    if proc.returncode:
        raise RuntimeError(f"the reference run failed: {err[-2000:]}")
    lives, killed, t0 = 0, 0, time.time()
    while True:
        lives += 1
        before = logged_steps(run)
        proc = _train(cfg, run, steps)
        if killed < kills:
            if rng.random() < 0.2:  # while starting, restoring or compiling
                time.sleep(rng.uniform(0.0, 4.0))
            else:  # while training: after its first step of this life, mid-save most of the time
                deadline = time.time() + 300
                while proc.poll() is None and logged_steps(run) <= before and time.time() < deadline:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.5))
            if proc.poll() is None:
                proc.kill()
                killed += 1
                proc.wait()
                say(f"kill {killed}/{kills}: life {lives}, {logged_steps(run)} steps logged")
                continue
        _, err = proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(f"life {lives} failed (rc {proc.returncode}): {err[-2000:]}")
        if killed < kills:
            raise RuntimeError(f"the run finished after {killed} of {kills} kills: give it more steps")
        break
    return {"kills": killed, "lives": lives, "seconds": time.time() - t0, **check(ref, run, steps)}


def check(ref: Path, run: Path, steps: int) -> dict:
    """What the killed run kept: steps logged (each once?), losses equal to the reference's,
    TensorBoard, final parameters bit for bit, damaged checkpoints recovered."""
    got, want = metrics(run), {m["step"]: m["loss"] for m in metrics(ref)}
    logged = [m["step"] for m in got]
    tb = tensorboard_losses(run)
    mine, theirs = final_params(run), final_params(ref)
    aside = run / "damaged_checkpoints"
    return {
        "steps_once": logged == list(range(1, steps + 1)),
        "losses_equal": all(m["loss"] == want[m["step"]] for m in got),
        "tensorboard_once": [s for s, _ in tb] == list(range(1, steps + 1)),
        "tensorboard_equal": all(v == np.float32(want[s]) for s, v in tb),
        "params_equal": mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine),
        "steps_lost": steps - len(set(logged)),
        "damaged_recovered": len(list(aside.iterdir())) if aside.is_dir() else 0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: enough for the kills)")
    args = ap.parse_args()
    steps = args.steps or max(CONFIG["train"]["steps"], 10 * args.kills)
    with tempfile.TemporaryDirectory() as tmp:
        out = kill_resume(Path(tmp), args.kills, args.seed, steps, say=lambda m: print(m, flush=True))
    print(json.dumps(out, indent=1))
    ok = all(out[k] for k in ("steps_once", "losses_equal", "tensorboard_once", "tensorboard_equal",
                              "params_equal")) and out["steps_lost"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
