"""Training for the experiments: train a config, or reuse its finished run directory.

A run is finished when `<run_dir>/final` exists and the latest checkpoint is at train.steps; it is then
reused without calling the trainer. A run directory holding a run of another config (other than in
the keys below, which do not change what is trained up to a step) is an error rather than a silent
resume of the wrong model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable


from fot.checkpoint import CheckpointError, checkpoint_steps, run_finished
from fot.config import Config, ConfigError, config_from_dict, read_yaml, trajectory_changes
from fot.metrics import last_loss


class Interrupted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT (its checkpoint is saved); carries the signal number."""

    def __init__(self, signum: int):
        super().__init__(f"training interrupted by signal {signum}; re-run to resume")
        self.signum = signum


def exit_status(body: Callable[[], int]) -> int:
    """A runner's main body, with bad input or a failed or interrupted training as one line on
    stderr and the exit status: 2 for a config error, 128 + the signal, else 1."""
    from fot.data.sources import DataError
    from fot.train import TrainError

    try:
        return body()
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, TrainError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


def check_same_run(cfg: Config, run_dir: Path) -> None:
    """Raise if run_dir holds a run of a config that trains differently
    (fot.config.trajectory_changes). The saved config is read with today's defaults for keys added
    since."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    saved_cfg = config_from_dict(read_yaml(saved), str(saved))
    diff = trajectory_changes(saved_cfg, cfg)
    if diff:
        shown = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in list(diff.items())[:5])
        raise ConfigError(f"{run_dir} holds a run of another config ({shown}); delete it or choose "
                          f"another output directory")


def check_documents(cfg: Config, where: str) -> None:
    """Read each pack slot's document stream as training would until it gives a window-long
    document: a source mix that never does is a ConfigError now, not a DataError mid-experiment."""
    from fot.data.pipeline import BatchStream
    from fot.data.sources import DataError

    try:
        for docs in BatchStream(cfg).docs.values():
            while docs.reads_before_long >= 0:
                docs.next()
    except DataError as e:
        raise ConfigError(f"{where}: {e}") from None


def ensure_trained(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Train cfg (resuming from its run dir) unless it is finished. Returns run_dir, final (the model
    directory), steps, final_loss, trained (False: reused) and, when trained, the trainer's seconds."""
    run_dir = Path(cfg.train.run_dir)
    check_same_run(cfg, run_dir)
    steps = checkpoint_steps(run_dir)
    done = steps[-1] if steps else 0
    if done > cfg.train.steps:
        raise ConfigError(f"{run_dir} is trained to step {done}, beyond train.steps={cfg.train.steps}; "
                          f"delete it or choose another output directory")
    info = {"run_dir": str(run_dir), "final": str(run_dir / "final"), "steps": cfg.train.steps}
    if run_finished(run_dir, cfg.train.steps):
        print(f"{run_dir}: trained to step {done}, reusing {run_dir / 'final'}", flush=True)
        return {**info, "trained": False, "final_loss": last_loss(run_dir, done)}
    from fot.train import train

    summary = train(cfg, progress=progress)
    if "signal" in summary:
        raise Interrupted(summary["signal"])
    return {**info, "trained": True, "final_loss": summary["final_loss"], "seconds": summary["seconds"]}
