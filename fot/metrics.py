"""Training observability: TensorBoard scalars (tensorboard's own event writer, no torch or
TensorFlow at runtime) and a tqdm progress bar with ETA and the current loss."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm.auto import tqdm


def keep_steps_up_to(path: str | Path, step: int) -> None:
    """Drop the records of steps after `step` from a metrics.jsonl (atomically): a run resumed from
    a checkpoint at `step` logs the later steps again, so each step stays in the file once."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class TensorBoard:
    """Scalars into `logdir/events.out.tfevents.*`, readable by TensorBoard's EventAccumulator."""

    def __init__(self, logdir: str | Path):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def restart(self, step: int) -> None:
        """Mark a resume at `step`: TensorBoard's readers drop this run's earlier events at steps
        >= `step` (a SessionLog START purges them), so a resumed run shows each step once."""
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                              session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def last_loss(run_dir: Path, step: int) -> float:
    """The training loss at `step` from a run's metrics.jsonl (NaN if it was not logged)."""
    path = run_dir / "metrics.jsonl"
    loss = math.nan
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if rec.get("step") == step:
                loss = rec["loss"]  # the last record wins: a resumed run may log a step again
    return loss


def progress_bar(start: int, total: int, disable: bool = False) -> tqdm:
    """Steps start..total with ETA; the loss goes in the postfix (`bar.set_postfix(loss=...)`)."""
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=disable,
                desc="train", mininterval=1.0)
