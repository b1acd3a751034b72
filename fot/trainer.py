"""The training loop: `Trainer.run` steps a compiled train step over a batch stream, saves
checkpoints, and tells its hooks what happened. Logging, the non-finite-loss stop and the signal
stop are hooks; add your own (an evaluation every N steps, early stopping, a profiler window) by
subclassing `Hook` and passing it to `fot.train.train(..., hooks=[...])`.

Order within a step: the step is dispatched, then the previous step's metrics are fetched (so the
host never stalls the device) and handed to every hook's `step_end`, in step order. Before a
checkpoint is saved every step up to it has been handed over and `checkpoint` is called, so a kill
after a checkpoint loses no logged step.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from fot import flops
from fot.checkpoint import save_train_state
from fot.metrics import TensorBoard, keep_steps_up_to, progress_bar


class TrainError(RuntimeError):
    """A training run that cannot go on (non-finite loss, bad run directory, unreadable data)."""


class Hook:
    """Called by `Trainer.run`; every method does nothing by default."""

    def start(self, t: Trainer) -> None:
        """Before the first step (also when there is none left to run)."""

    def stop_requested(self, t: Trainer, step: int) -> bool:
        """Before each step: True stops the run after `step` with a checkpoint."""
        return False

    def step_end(self, t: Trainer, step: int, metrics: dict[str, float]) -> None:
        """Step `step`'s metrics (loss, grad_norm, learning_rate, step_time, tokens_per_s, mfu)."""

    def checkpoint(self, t: Trainer, step: int) -> None:
        """Just before checkpoint `step` is saved (every earlier step_end has run)."""

    def end(self, t: Trainer, step: int) -> None:
        """After the loop, also when it raised."""


class Trainer:
    """One run's loop. `state` is the functional train state (params, opt_state, halted),
    `compiled(state, batch) -> (state, metrics)` the step, `next_batch()` the next device batch,
    `data_position()` the stream's position after the batches taken so far, `meta(step, data)` a
    checkpoint's metadata. `mngr` is the orbax manager of the run's checkpoints."""

    def __init__(self, *, compiled, state: dict, start: int, steps: int, checkpoint_every: int,
                 mngr, next_batch: Callable[[], Any], data_position: Callable[[], dict],
                 meta: Callable[[int, dict], dict], learning_rate: Callable[[int], Any],
                 tokens_per_step: int, flops_per_token: float, peak: tuple[float, int],
                 hooks: list[Hook]):
        self.compiled, self.state, self.start, self.steps = compiled, state, start, steps
        self.checkpoint_every, self.mngr, self.next_batch = checkpoint_every, mngr, next_batch
        self.data_position, self._meta, self.learning_rate = data_position, meta, learning_rate
        self.tokens, self.fpt, self.peak, self.hooks = tokens_per_step, flops_per_token, peak, hooks
        self.data_state = {start: data_position()}  # position after each step still in flight
        self.step = start
        self.last_loss = math.nan
        self._time = time.perf_counter()

    def meta(self, step: int) -> dict:
        return self._meta(step, self.data_state[step])

    def save(self, step: int) -> None:
        save_train_state(self.mngr, step, self.state, self.meta(step))

    def discard_after(self, good: int) -> None:
        """Save the state as step `good` and delete every checkpoint after it: the device state
        halted at `good` (a non-finite step and any in flight after it left it as it was), so
        checkpoints saved since hold good's state under later numbers (orbax never saves a step
        below its latest)."""
        self.mngr.wait_until_finished()
        for later in [s for s in self.mngr.all_steps() if s > good]:
            self.mngr.delete(later)
        self.save(good)
        self.mngr.wait_until_finished()

    def _finish(self, step: int, raw) -> None:
        m = {k: float(v) for k, v in jax.device_get(raw).items()}
        now = time.perf_counter()
        dt, self._time = now - self._time, now
        m.update(learning_rate=float(self.learning_rate(step - 1)), step_time=dt, tokens_per_s=self.tokens / dt)
        m["mfu"] = flops.mfu(m["tokens_per_s"], self.fpt, *self.peak)
        for h in self.hooks:
            h.step_end(self, step, m)
        self.last_loss = m["loss"]
        self.data_state.pop(step - 1, None)

    def _stop_requested(self) -> bool:
        return any([h.stop_requested(self, self.step) for h in self.hooks])  # each asked: collectives

    def run(self) -> int:
        """Steps until `steps` or a hook asks to stop; returns the last step (checkpointed)."""
        for h in self.hooks:
            h.start(self)
        pending = None
        try:
            batch = self.next_batch() if self.step < self.steps else None
            while self.step < self.steps and not self._stop_requested():
                self.state, metrics = self.compiled(self.state, batch)
                self.step += 1
                self.data_state[self.step] = self.data_position()
                if pending is not None:
                    self._finish(*pending)
                pending = (self.step, metrics)
                if self.step % self.checkpoint_every == 0 and self.step < self.steps:
                    self._finish(*pending)  # (no stall: the save waits for this step anyway)
                    pending = None
                    for h in self.hooks:
                        h.checkpoint(self, self.step)
                    self.save(self.step)
                if self.step < self.steps:
                    batch = self.next_batch()
            if pending is not None:
                self._finish(*pending)
            self.save(self.step)
            self.mngr.wait_until_finished()
        finally:
            for h in self.hooks:
                h.end(self, self.step)
        return self.step


class StopOnNonFinite(Hook):
    """A non-finite loss or gradient norm stops the run with a checkpoint of the last good step."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def step_end(self, t, step, metrics):
        if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
            return
        good = step - 1
        t.discard_after(good)
        raise TrainError(f"loss is {metrics['loss']} (grad norm {metrics['grad_norm']}) at step {step}: "
                         f"stopped; the last good step {good} is saved in {self.run_dir / 'checkpoints' / str(good)}")


class StopOnSignal(Hook):
    """SIGTERM/SIGINT stop the run after the current step, with a checkpoint. A signal may reach
    several processes at different steps: they compare notes at logging steps (a small blocking
    collective), so that all stop after the same step."""

    def __init__(self, log_every: int):
        self.log_every, self.signal, self._old = log_every, None, {}

    def start(self, t):
        def on_signal(signum, _frame):
            self.signal = signum

        self._old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def stop_requested(self, t, step):
        if jax.process_count() == 1:
            return self.signal is not None
        if step % self.log_every:
            return False
        got = int(np.max(multihost_utils.process_allgather(np.int32(self.signal or 0))))
        self.signal = got or None
        return self.signal is not None

    def end(self, t, step):
        for s, h in self._old.items():
            signal.signal(s, h)


class Log(Hook):
    """metrics.jsonl (every step), TensorBoard (every log_every steps) and the progress bar, from
    process 0 only. A resumed run first drops what an interrupted life logged after its
    checkpoint, so each step is logged once."""

    def __init__(self, run_dir: Path, log_every: int, progress: bool):
        self.run_dir, self.log_every, self.progress = run_dir, log_every, progress
        self.lead = jax.process_index() == 0

    def start(self, t):
        self.bar = progress_bar(t.start, t.steps, disable=not (self.progress and self.lead))
        if not self.lead:
            return
        self.tb = TensorBoard(self.run_dir)
        self.tb.restart(t.start + 1)  # readers drop the steps an interrupted run logged after start
        keep_steps_up_to(self.run_dir / "metrics.jsonl", t.start)
        self.log = open(self.run_dir / "metrics.jsonl", "a")

    def step_end(self, t, step, metrics):
        if not self.lead:
            return
        self.log.write(json.dumps({"step": step, **metrics}) + "\n")
        if step % self.log_every == 0 or step == t.steps:
            self.tb.scalars(step, metrics)
            self.log.flush()
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        self.bar.update(1)

    def checkpoint(self, t, step):
        if self.lead:
            self.log.flush()
            self.tb.flush()

    def end(self, t, step):
        self.bar.close()
        if self.lead:
            self.tb.close()
            self.log.close()
