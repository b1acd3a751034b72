"""FoT training: `python -m fot.train CONFIG [key=value ...]`.

One step = one batch of `train.batch_size` rows of `train.window` tokens from `fot.data.pipeline`
(doc-aware k-packing), split into `train.grad_accum` micro-batches of whole packs (crossbatch reads
previous rows within a micro-batch only), next-token cross-entropy averaged over the unmasked tokens
of the whole batch, clipped AdamW (fot/optim.py). Memory layers use crossbatch attention
(fot/model/crossbatch.py); `train.cross_batch_range=0` trains plain windows.

The jitted step is compiled once, ahead of time, on the functional state (params and optimizer
state as plain pytrees; `nnx.merge` rebuilds the module inside), with the state donated. Metrics of
step N are fetched only after step N+1 is dispatched, so the host never stalls the device.

Run directory (`train.run_dir`): config.yaml (resolved config), events.out.tfevents.* (TensorBoard:
loss, learning_rate, grad_norm, tokens_per_s, mfu, step_time), metrics.jsonl (every step),
checkpoints/<step>/ (orbax CheckpointManager: params, opt_state, meta = step, RNG, data position),
final/ (a fot checkpoint of the trained model, readable by `fot.load_model`). A run directory with
checkpoints is resumed from the latest one, and gives exactly the losses of an uninterrupted run.
SIGTERM/SIGINT save a checkpoint and exit; a non-finite loss stops the run with a checkpoint of the
last good step (the step that produced it is not applied).

MFU = tokens/s x model FLOPs per token / peak FLOP/s, with FLOPs per token from
`fot.flops.train_flops_per_token` (3 x (2 x matmul weights + attention 4*H*D per visible key per
layer, counting the (T+1)/2 mean causal keys and, in memory layers, T keys per crossbatch context))
and the peak from `fot.flops.peak_flops` (a datasheet table, or a large matmul measured in this
process on CPUs; the environment variable FOT_PEAK_FLOPS overrides it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from fot import flops
from fot.config import Config, ConfigError, load_config, save_config
from fot.metrics import TensorBoard, progress_bar
from fot.model.crossbatch import crossbatch_memory
from fot.model.llama import Llama, init_model
from fot.optim import make_optimizer, schedule


class TrainError(RuntimeError):
    """The run cannot start or continue (missing weights or data, non-finite loss, ...)."""


# ------------------------------------------------------------------------------------------------
# The model function and the step


def forward(module: Llama, ids: jax.Array, cross_batch_range: int, pack_size: int,
            stepping: bool) -> jax.Array:
    """Logits [B, T, V] of a crossbatch training batch (each row a window at positions 0..T-1)."""
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ctx = module.context(pos, pos, None)
    mem = crossbatch_memory(module, ctx, cross_batch_range, pack_size, stepping)
    x, _ = module.run_layers(module.embed(ids), ctx, memory=mem)
    return module.head(x)


def make_step(graphdef, rest, tx: optax.GradientTransformation, cfg: Config):
    tr = cfg.train
    accum = tr.grad_accum

    def loss_sum(params, batch):
        module = nnx.merge(graphdef, params, rest)
        logits = forward(module, batch["inputs"], tr.cross_batch_range, tr.pack_size, tr.stepping)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = batch["loss_mask"]
        return jnp.sum(ce * mask), jnp.sum(mask)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def step(state, batch):
        params, opt_state = state["params"], state["opt_state"]
        if accum == 1:
            (s, n), grads = grad_fn(params, batch)
        else:
            micro = jax.tree.map(lambda a: a.reshape(accum, a.shape[0] // accum, *a.shape[1:]), batch)

            def body(carry, mb):
                g_acc, s_acc, n_acc = carry
                (s, n), g = grad_fn(params, mb)
                return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, s, n), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
        n = jnp.maximum(n, 1.0)
        loss = s / n
        grads = jax.tree.map(lambda g: g / n, grads)
        grad_norm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss halts the run on device: this and every later step leave the state
        # as it was, so what the host saves when it notices is the last good state.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~state["halted"]
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, opt_state),
                     "halted": ~ok}
        return new_state, {"loss": loss, "grad_norm": grad_norm}

    return step


# ------------------------------------------------------------------------------------------------
# Model and data set-up


def _init_params(cfg: Config, abstract_params: dict) -> dict:
    """Initial parameters: from train.init_from (HF dir / hub name, or fot checkpoint), or random."""
    tr = cfg.train
    if tr.init_from is None:
        return nnx.split(init_model(cfg.model, cfg.memory, tr.seed), nnx.Param, ...)[1].to_pure_dict()
    from fot.convert import load_model

    loaded = load_model(tr.init_from)
    got = nnx.state(loaded.module, nnx.Param).to_pure_dict()
    want_flat = dict(jax.tree_util.tree_flatten_with_path(abstract_params)[0])
    got_flat = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    for path, leaf in want_flat.items():
        name = jax.tree_util.keystr(path)
        if path not in got_flat:
            raise TrainError(f"train.init_from={tr.init_from!r} has no parameter {name}, which "
                             f"this config needs")
        if got_flat[path].shape != leaf.shape:
            raise TrainError(f"train.init_from={tr.init_from!r}: parameter {name} has shape "
                             f"{got_flat[path].shape}, this config's model implies {leaf.shape}")
    return jax.tree.map(lambda w, a: jnp.asarray(w, a.dtype), got, abstract_params)


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_inputs(cfg: Config):
    """Find the tokenizer, every data source and the weights before anything heavy, and report all
    that is missing in one message. Without network the hub libraries are put in offline mode first,
    so a missing download fails at once instead of after minutes of retries."""
    from fot.data.pipeline import BatchStream
    from fot.data.sources import open_source
    from fot.data.tokenizer import load_tokenizer

    names = [cfg.data.tokenizer, cfg.train.init_from, *(s.path for s in cfg.data.sources)]
    remote = [n for n in names if n and n != "byte" and not n.startswith("builtin:")
              and not Path(n).exists()]
    if remote and not (os.environ.get("HF_HUB_OFFLINE") or _hub_reachable()):
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    problems = []
    try:
        load_tokenizer(cfg.data.tokenizer)
    except Exception as e:
        problems.append(f"tokenizer: data.tokenizer={cfg.data.tokenizer!r}: {e}. Point "
                        f"data.tokenizer at a local tokenizer (a .model file or tokenizer directory)")
    for i, src in enumerate(cfg.data.sources):
        try:
            open_source(src, 0, f"data.sources[{i}]")
        except Exception as e:  # DataError, datasets' own errors: all one list
            problems.append(f"dataset: data.sources[{i}].path={src.path!r}: {e}")
    if cfg.train.init_from is not None:
        from fot.convert import _local_dir

        try:
            _local_dir(cfg.train.init_from)
        except Exception as e:
            problems.append(f"weights: train.init_from={cfg.train.init_from!r}: {e}. Point "
                            f"train.init_from at a local copy (a Hugging Face model directory or a "
                            f"fot checkpoint)")
    if problems:
        raise TrainError("cannot start training, missing inputs:\n  - " + "\n  - ".join(problems))
    return BatchStream(cfg)


def _validate(cfg: Config) -> None:
    tr = cfg.train
    if tr.batch_size % tr.grad_accum or (tr.batch_size // tr.grad_accum) % tr.pack_size:
        raise ConfigError(f"train.grad_accum={tr.grad_accum} must split train.batch_size="
                          f"{tr.batch_size} into micro-batches of whole packs of train.pack_size="
                          f"{tr.pack_size} rows")
    if tr.cross_batch_range and not cfg.memory.layers:
        raise ConfigError("train.cross_batch_range > 0 needs memory layers (memory.layers is empty); "
                          "set train.cross_batch_range=0 to train a plain model")


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _manager(run_dir: Path, keep: int) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=opts,
                                 item_names=("params", "opt_state", "meta"))


def _save(mngr: ocp.CheckpointManager, step: int, state: dict, meta: dict) -> None:
    if step in mngr.all_steps():
        return
    host = jax.device_get({"params": state["params"], "opt_state": state["opt_state"]})
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(host["params"]), opt_state=ocp.args.StandardSave(host["opt_state"]),
        meta=ocp.args.JsonSave(meta)))


def _restore(mngr: ocp.CheckpointManager, step: int, state: dict) -> tuple[dict, dict]:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                            {"params": state["params"], "opt_state": state["opt_state"]})
    got = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract["params"]),
        opt_state=ocp.args.StandardRestore(abstract["opt_state"]), meta=ocp.args.JsonRestore()))
    new = {"params": jax.tree.map(jnp.asarray, got["params"]),
           "opt_state": jax.tree.map(jnp.asarray, got["opt_state"]), "halted": jnp.asarray(False)}
    return new, got["meta"]


# ------------------------------------------------------------------------------------------------
# The loop


def _peak_flops() -> tuple[float, str]:
    if os.environ.get("FOT_PEAK_FLOPS"):
        return float(os.environ["FOT_PEAK_FLOPS"]), "FOT_PEAK_FLOPS"
    return flops.peak_flops()


def train(cfg: Config, progress: bool = True) -> dict:
    """Run (or resume) training; returns a summary dict. Raises TrainError on a non-finite loss."""
    _validate(cfg)
    tr = cfg.train
    stream = _check_inputs(cfg)
    run_dir = Path(tr.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    abstract = nnx.eval_shape(lambda: Llama(cfg.model, cfg.memory, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    tx = make_optimizer(tr)
    lr_at = schedule(tr)
    mngr = _manager(run_dir, tr.keep_checkpoints)
    start = mngr.latest_step()
    params = _init_params(cfg, abstract_params.to_pure_dict()) if start is None else \
        jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_params.to_pure_dict())
    state = {"params": params, "opt_state": tx.init(params), "halted": jnp.asarray(False)}
    rng = jax.random.key_data(jax.random.key(tr.seed))  # no dropout: saved for completeness
    if start is not None:
        state, meta = _restore(mngr, start, state)
        stream.restore(meta["data"])
        print(f"resumed from {run_dir / 'checkpoints' / str(start)} (step {start})", flush=True)
    start = start or 0

    step_fn = jax.jit(make_step(graphdef, rest, tx, cfg), donate_argnums=0)
    data_state = {start: stream.state()}  # data position after each step, kept for in-flight steps
    batch = next(stream) if start < tr.steps else None
    if batch is not None:
        compiled = step_fn.lower(state, batch).compile()
        print(f"compiled train step; memory analysis: {compiled.memory_analysis()}", flush=True)

    tokens = tr.batch_size * (tr.window or cfg.model.max_position_embeddings)
    fpt = flops.train_flops_per_token(cfg)
    peak, peak_src = _peak_flops()
    tb = TensorBoard(run_dir)
    log = open(run_dir / "metrics.jsonl", "a")
    bar = progress_bar(start, tr.steps, disable=not progress)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def meta(step: int) -> dict:
        return {"step": step, "rng": np.asarray(rng).tolist(), "data": data_state[step]}

    last = {"time": time.perf_counter(), "loss": math.nan}
    summary = {"start_step": start, "steps": tr.steps}

    def finish(step: int, metrics) -> None:
        """Handle step `step`'s metrics (blocks until that step is done)."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt, last["time"] = now - last["time"], now
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            good = step - 1
            _save(mngr, good, state, meta(good))
            mngr.wait_until_finished()
            raise TrainError(f"loss is {m['loss']} (grad norm {m['grad_norm']}) at step {step}: "
                             f"stopped; the last good step {good} is saved in "
                             f"{run_dir / 'checkpoints' / str(good)}")
        m.update(learning_rate=float(lr_at(step - 1)), step_time=dt, tokens_per_s=tokens / dt)
        m["mfu"] = flops.mfu(m["tokens_per_s"], fpt, peak)
        log.write(json.dumps({"step": step, **m}) + "\n")
        if step % tr.log_every == 0 or step == tr.steps:
            tb.scalars(step, m)
            log.flush()
        last["loss"] = m["loss"]
        bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        bar.update(1)

    pending = None
    step = start
    t0 = time.perf_counter()
    try:
        while step < tr.steps and stop["signal"] is None:
            state, metrics = compiled(state, batch)
            step += 1
            data_state[step] = stream.state()
            if pending is not None:
                finish(*pending)
                data_state.pop(pending[0] - 1, None)
            pending = (step, metrics)
            if step % tr.checkpoint_every == 0 and step < tr.steps:
                _save(mngr, step, state, meta(step))
            if step < tr.steps:
                batch = next(stream)
        if pending is not None:
            finish(*pending)
        _save(mngr, step, state, meta(step))
        mngr.wait_until_finished()
    finally:
        bar.close()
        tb.close()
        log.close()
        for s, h in old.items():
            signal.signal(s, h)
    elapsed = time.perf_counter() - t0
    summary.update(final_step=step, final_loss=last["loss"], seconds=elapsed,
                   checkpoint=str(run_dir / "checkpoints" / str(step)))
    if stop["signal"] is not None:
        name = signal.Signals(stop["signal"]).name
        print(f"{name}: saved checkpoint {summary['checkpoint']} at step {step}; exiting", flush=True)
        summary["signal"] = stop["signal"]
        return summary
    _save_final(cfg, graphdef, state["params"], rest, stream.tokenizer, run_dir / "final")
    n = step - start
    print(f"done: steps {start}->{step} in {elapsed:.1f}s ({n * tokens / max(elapsed, 1e-9):.0f} "
          f"tokens/s), final loss {last['loss']:.4f}, model FLOPs/token {fpt:.3g}, peak "
          f"{peak:.3g} FLOP/s ({peak_src}); model saved in {run_dir / 'final'}", flush=True)
    return summary


def _save_final(cfg, graphdef, params, rest, tokenizer, path: Path) -> None:
    from fot.api import FotModel

    FotModel(cfg, nnx.merge(graphdef, params, rest), tokenizer).save(path, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fot.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="YAML config file (e.g. configs/tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_intermixed_args(argv)
    from fot.checkpoint import CheckpointError
    from fot.data.sources import DataError

    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg, progress=not args.no_progress)
    except (ConfigError, TrainError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ConfigError) else 1
    return 128 + summary["signal"] if "signal" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
