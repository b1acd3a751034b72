"""FoT training: `python -m fot.train CONFIG [key=value ...] [--dry-run]`.

One step = one batch of `train.batch_size` rows of `train.window` tokens from `fot.data.pipeline`
(doc-aware k-packing), split into `train.grad_accum` micro-batches of whole packs (crossbatch reads
previous rows within a micro-batch only), next-token cross-entropy averaged over the unmasked tokens
of the whole batch, clipped AdamW (fot/optim.py). Memory layers use crossbatch attention
(fot/model/memory/crossbatch.py); `train.cross_batch_range=0` trains plain windows.

Scale-out: the step runs on the device mesh of the config's `mesh:` section (fot/sharding.py), and
parameters, optimizer state, batches and activations are placed through its one logical-axis
table: rows of every micro-batch over (data, fsdp), parameters and Adam moments split over fsdp
(and heads / MLP / vocabulary over tensor). On 1 device the mesh is 1x1x1x1 and the same code
runs. The jitted step has explicit in/out shardings, is compiled once, ahead of time, on the
functional state (params and optimizer state as plain pytrees; `nnx.merge` rebuilds the module
inside), with the state donated. Metrics of step N are fetched only after step N+1 is dispatched,
so the host never stalls the device. Several processes (`mesh.distributed`, see
fot.sharding.initialize_distributed): every process runs this same loop, reads, tokenizes and packs
only the pack slots of its rows of each batch (fot/data/pipeline.py: each slot its own share of the
data), writes its shards of every checkpoint; the data position saved with a checkpoint joins every
process's slots, so any number of processes resumes from it; logs, progress and TensorBoard come
from process 0 only.

`--dry-run` lowers and compiles the step for the configured mesh on abstract parameters (nothing
allocated, no weights, tokenizer or data read) and prints the parameter count, model FLOPs per
step, the compiled memory per device and the collectives in the compiled program, among them the
all-gathers and permutes of memory-layer keys/values (fot/sharding.py CROSSBATCH LAYOUT).

Run directory (`train.run_dir`): config.yaml (resolved config), events.out.tfevents.* (TensorBoard:
loss, learning_rate, grad_norm, tokens_per_s, mfu, step_time), metrics.jsonl (every step),
checkpoints/<step>/ (orbax CheckpointManager: params, opt_state, meta = step, RNG, data position),
final/ (a fot checkpoint of the trained model, readable by `fot.load_model`), config_changes.jsonl
(changes accepted on resume). A run directory with checkpoints is resumed from the newest one that
reads back intact (each carries checksums of its arrays; damaged newer ones are moved to
damaged_checkpoints/ with a warning), on any mesh, and gives exactly the losses of an uninterrupted
run. A config that trains differently from the run's (fot.config.trajectory_changes) is refused
unless `--accept-changes`. SIGTERM/SIGINT save a checkpoint and exit; a non-finite loss stops the
run with a checkpoint of the last good step (the step that produced it is not applied). The loop
itself is fot/trainer.py: logging and both stops are hooks; `train(cfg, hooks=[...])` adds yours.

LoRA (`model.lora.rank` > 0, fot/model/lora.py): the step differentiates only the trainable
parameters (the adapters, and with LoRA+ the embeddings and norms), the optimizer state exists for
those alone, and the frozen base weights pass through the step unchanged; checkpoints and final/
hold all parameters (final/ loads as base + adapters). `train.init_from` a model without adapters
starts new ones (B = 0) on its weights: continued pre-training of an existing checkpoint. Dropout
masks (model.lora.dropout) come from train.seed, the optimizer's step count and the micro-batch.

MFU = tokens/s x model FLOPs per token / (peak FLOP/s per device x devices), with FLOPs per token
from `fot.flops.train_flops_per_token` (3 x (2 x matmul weights + attention 4*H*D per visible key
per layer, counting the (T+1)/2 mean causal keys and, in memory layers, T keys per crossbatch
context)) and the peak from `fot.flops.system_peak_flops` (a datasheet table, or a large matmul
measured in this process on CPUs; the environment variable FOT_PEAK_FLOPS overrides it).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from fot import flops, sharding
from fot.checkpoint import CheckpointError, restore_latest, run_finished, save_final_model
from fot.config import Config, ConfigError, load_config, save_config, trajectory_changes
from fot.convert import _local_dir, load_model
from fot.data.pipeline import BatchStream, merge_states
from fot.data.sources import DataError, open_source
from fot.data.tokenizer import load_tokenizer
from fot.metrics import last_loss
from fot.model.memory.crossbatch import crossbatch_memory, reads_previous_shard
from fot.model import lora
from fot.model.loss import linear_cross_entropy
from fot.model.llama import Llama, abstract_model
from fot.optim import make_optimizer, schedule
from fot.sharding import ShardingError
from fot.trainer import Hook, Log, StopOnNonFinite, StopOnSignal, Trainer, TrainError

CHANGES_FILE = "config_changes.jsonl"  # config changes accepted on resume, with their step
BATCH_KEYS = ("inputs", "targets", "loss_mask")  # what the step reads of a pipeline batch
MEMORY_SCOPE = "fot_memory"  # named scope of the memory-layer code, to find its ops in the HLO


# ------------------------------------------------------------------------------------------------
# The model function and the step


def forward(module: Llama, ids: jax.Array, cross_batch_range: int, pack_size: int,
            stepping: bool, doc_ids: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] of a crossbatch training batch (each row a window at positions 0..T-1).
    doc_ids [B, T] (train.document_mask): tokens see only their own document, and negatives."""
    return module.head(hidden(module, ids, cross_batch_range, pack_size, stepping, doc_ids))


def hidden(module: Llama, ids: jax.Array, cross_batch_range: int, pack_size: int,
           stepping: bool, doc_ids: jax.Array | None = None) -> jax.Array:
    """`forward` up to the final norm: the last layer's hidden states [B, T, E]."""
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ctx = dataclasses.replace(module.context(pos, pos, None, segments=doc_ids, training=True), by_index=True)
    mem = crossbatch_memory(module, ctx, cross_batch_range, pack_size, stepping)
    if mem is not None and ctx.impl == "plain" and not module.mem.gate:
        ctx = dataclasses.replace(ctx, local_in_memory=True)  # see crossbatch_memory
    x, _ = module.run_layers(module.embed(ids), ctx, memory=mem and _scoped(mem, MEMORY_SCOPE))
    return x


def _scoped(fn, name: str):
    """`fn` with its ops (forward and backward) under `jax.named_scope(name)` in the HLO."""
    def scoped(*args):
        with jax.named_scope(name):
            return fn(*args)

    return scoped


def make_step(graphdef, rest, tx: optax.GradientTransformation, cfg: Config, train_shardings):
    """The train step on (state, batch), batch arrays [grad_accum, batch_size / grad_accum, T].
    train_shardings: those of the trainable parameters (all of them without LoRA)."""
    tr = cfg.train
    trainable = lambda path: lora.is_trainable(cfg.model.lora, path)
    # FSDP: each micro-batch's gradients leave reduce-scattered onto the parameters' shards.
    pin = lambda tree: jax.lax.with_sharding_constraint(tree, train_shardings)

    def dropout_key(opt_state, micro):
        # Fresh masks every step (the step count is in the optimizer state, so a resume repeats
        # them) and every micro-batch; unused, and so compiled away, without LoRA dropout.
        (_, count), *_ = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(tr.seed), count), micro)

    def loss_sum(train_params, frozen, batch, key):
        module = nnx.merge(graphdef, lora.join(train_params, frozen), rest)
        lora.set_dropout_keys(module, key)
        x = hidden(module, batch["inputs"], tr.cross_batch_range, tr.pack_size, tr.stepping,
                   batch.get("doc_ids"))
        mask = batch["loss_mask"]
        return linear_cross_entropy(module.norm(x), module.head_weight(), batch["targets"], mask), jnp.sum(mask)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def step(state, batch):
        params, opt_state = state["params"], state["opt_state"]
        train_params, frozen = lora.partition(params, trainable)
        if tr.grad_accum == 1:
            (s, n), grads = grad_fn(train_params, frozen, jax.tree.map(lambda a: a[0], batch),
                                    dropout_key(opt_state, 0))
            grads = pin(grads)
        else:
            def body(carry, xs):
                g_acc, s_acc, n_acc = carry
                mb, i = xs
                (s, n), g = grad_fn(train_params, frozen, mb, dropout_key(opt_state, i))
                return (pin(jax.tree.map(jnp.add, g_acc, g)), s_acc + s, n_acc + n), None

            zeros = pin(jax.tree.map(jnp.zeros_like, train_params))
            (grads, s, n), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (batch, jnp.arange(tr.grad_accum)))
        n = jnp.maximum(n, 1.0)
        loss = s / n
        grads = jax.tree.map(lambda g: g / n, grads)
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss halts the run on device: this and every later step leave the state
        # as it was, so what the host saves when it notices is the last good state. A cond, not
        # a select of new and old: the update then runs in place in the donated buffers (a select
        # kept a copy of the old state alive through the step: 0.45 GiB of the 110M step).
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~state["halted"]

        def updated():
            updates, new_opt = tx.update(grads, opt_state, train_params)
            return lora.join(optax.apply_updates(train_params, updates), frozen), new_opt

        new_params, new_opt = jax.lax.cond(ok, updated, lambda: (params, opt_state))
        new_state = {"params": new_params, "opt_state": new_opt, "halted": ~ok}
        return new_state, {"loss": loss, "grad_norm": grad_norm}

    return step


def _release_freed_host_memory() -> None:
    """Hand what initialisation and compilation freed back to the OS before the step allocates its
    own temporaries: glibc keeps it in its heap (the ~110M step's peak RSS 4.62 -> 4.33 GiB)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


# XLA:CPU orders a step's ops for concurrency by default, which keeps more buffers live at once. A
# step under remat has asked to trade time for memory, so on a CPU it is compiled in XLA's
# memory-optimised order: the ~110M step under full remat planned 3.57 -> 3.06 GiB and ran no slower
# (docs/scaling.md). Without remat the default order stays (at 768 / 12 it was 9-16% faster).
MEMORY_SCHEDULE = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compile_lowered(lowered, options: dict):
    """lowered.compile(options), or without them on a jaxlib that lacks an option."""
    try:
        return lowered.compile(options)
    except jax.errors.JaxRuntimeError as e:
        if not any(f"No such compile option: '{k}'" in str(e) for k in options):
            raise
        return lowered.compile()


class StepPlan:
    """What the train step is on a mesh, with nothing allocated: the abstract state and batch
    (ShapeDtypeStructs carrying their shardings) and the jitted step with explicit in/out
    shardings. Checks the batch against the mesh first (errors name the numbers)."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
        tr = cfg.train
        self.cfg, self.mesh = cfg, mesh
        self.accum, self.micro = tr.grad_accum, tr.batch_size // tr.grad_accum
        self.window = tr.window or cfg.model.max_position_embeddings
        sharding.validate_batch(
            self.micro, mesh, tr.cross_batch_range,
            "train.batch_size" if self.accum == 1 else
            f"the micro-batch (train.batch_size={tr.batch_size} / train.grad_accum={self.accum})")
        self._model_fn = lambda: Llama(cfg.model, cfg.memory, rngs=nnx.Rngs(tr.seed))
        self.graphdef, _, self.rest = nnx.split(abstract_model(cfg.model, cfg.memory), nnx.Param, ...)
        params = sharding.abstract_state(lambda: nnx.state(self._model_fn(), nnx.Param), mesh).to_pure_dict()
        param_sh = jax.tree.map(lambda a: a.sharding, params)
        self.trainable = lambda path: lora.is_trainable(cfg.model.lora, path)
        train_sh, _ = lora.partition(param_sh, self.trainable)
        self.tx = make_optimizer(tr)
        opt = jax.eval_shape(self.tx.init, lora.partition(params, self.trainable)[0])
        opt_sh = sharding.optimizer_shardings(self.tx, opt, train_sh, mesh)
        self.replicated = NamedSharding(mesh, P())
        self.shardings = {"params": param_sh, "opt_state": opt_sh, "halted": self.replicated}
        with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        self.abstract = {"params": params, "opt_state": jax.tree.map(with_sharding, opt, opt_sh),
                         "halted": jax.ShapeDtypeStruct((), jnp.bool_, sharding=self.replicated)}
        self.batch_sharding = sharding.batch_sharding(mesh, 3, micro=True)
        self.batch_keys = BATCH_KEYS + ("doc_ids",) * tr.document_mask  # the mask reads doc ids
        self.abstract_batch = {
            k: jax.ShapeDtypeStruct((self.accum, self.micro, self.window),
                                    jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=self.batch_sharding) for k in self.batch_keys}
        step = make_step(self.graphdef, self.rest, self.tx, cfg, train_sh)
        self.step = jax.jit(step, in_shardings=(self.shardings, self.batch_sharding),
                            out_shardings=(self.shardings, self.replicated), donate_argnums=0)
        self.rows = sharding.local_batch_rows(mesh, self.micro)
        # The pack slots of this process's rows (of every micro-batch), which is all this process
        # builds (BatchStream(cfg, slots=plan.slots)), and where its rows are in what it builds.
        k = tr.pack_size
        rows = np.arange(self.rows.start, self.rows.stop)
        glob = np.arange(self.accum)[:, None] * self.micro + rows[None, :]  # [accum, local rows]
        self.slots = sorted({int(g) // k for g in glob.flat})
        at = {s: i for i, s in enumerate(self.slots)}
        self._take = np.vectorize(lambda g: at[g // k] * k + g % k, otypes=[np.int64])(glob)

    def random_params(self, kind: type[nnx.Variable] = nnx.Param) -> dict:
        """Parameters (or those of a kind, e.g. nnx.LoRAParam) initialised from train.seed, each
        created directly in its shards."""
        return sharding.init_sharded(lambda: nnx.state(self._model_fn(), kind), self.mesh).to_pure_dict()

    def init_state(self, params: dict) -> dict:
        """The step's state for parameters on the mesh: a fresh optimizer state beside them (for
        the trainable ones)."""
        init = lambda p: self.tx.init(lora.partition(p, self.trainable)[0])
        opt_state = jax.jit(init, out_shardings=self.shardings["opt_state"])(params)
        return {"params": params, "opt_state": opt_state, "halted": self.not_halted()}

    def not_halted(self) -> jax.Array:
        return jax.device_put(np.asarray(False), self.replicated)

    def compiler_options(self) -> dict:
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        return MEMORY_SCHEDULE if on_cpu and self.cfg.model.remat_policy != "none" else {}

    def compile(self):
        with jax.set_mesh(self.mesh):  # model code's constraints and the crossbatch halo see it
            lowered = self.step.lower(self.abstract, self.abstract_batch)
            compiled = compile_lowered(lowered, self.compiler_options())
        _release_freed_host_memory()
        return compiled

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The rows of this process's pack slots (`BatchStream(cfg, slots=self.slots)`, k rows per
        slot in slot order; on one process the global batch) -> its rows of every micro-batch, on
        the mesh."""
        want = len(self.slots) * self.cfg.train.pack_size
        for key in self.batch_keys:
            if batch[key].shape != (want, self.window):
                raise TrainError(f"batch {key!r} has shape {batch[key].shape}, not the {want} rows "
                                 f"of pack slots {self.slots} x {self.window} tokens")
        local = {key: batch[key][self._take] for key in self.batch_keys}
        return sharding.shard_batch(local, self.mesh, micro=True)

    def param_count(self, trainable_only: bool = False) -> int:
        params = self.abstract["params"]
        if trainable_only:
            params = lora.partition(params, self.trainable)[0]
        return sum(math.prod(a.shape) for a in jax.tree.leaves(params))


# ------------------------------------------------------------------------------------------------
# Model and data set-up


def _init_params(cfg: Config, plan: StepPlan) -> dict:
    """Initial parameters on the mesh: from train.init_from (HF dir / hub name, or fot
    checkpoint), or random, created directly in their shards. LoRA adapters that init_from lacks
    start fresh (B = 0, so the model starts as init_from's)."""
    tr = cfg.train
    abstract_params = plan.abstract["params"]
    if tr.init_from is None:
        return plan.random_params()

    loaded = load_model(tr.init_from)
    want = traverse_util.flatten_dict(abstract_params)
    got = traverse_util.flatten_dict(nnx.state(loaded.module, nnx.Param).to_pure_dict())
    if any(lora.is_lora(path) for path in want.keys() - got.keys()):
        got.update(traverse_util.flatten_dict(plan.random_params(nnx.LoRAParam)))
    for path, leaf in want.items():
        name = "/".join(path)
        if path not in got:
            raise TrainError(f"train.init_from={tr.init_from!r} has no parameter {name}, which "
                             f"this config needs")
        if got[path].shape != leaf.shape:
            raise TrainError(f"train.init_from={tr.init_from!r}: parameter {name} has shape "
                             f"{got[path].shape}, this config's model implies {leaf.shape}")
    extra = sorted(got.keys() - want.keys())
    if extra:  # e.g. the adapters of a LoRA run, which this config would silently drop
        hint = " (merge its LoRA adapters first: python -m fot.convert merge-lora)" * lora.is_lora(extra[0])
        raise TrainError(f"train.init_from={tr.init_from!r} has parameter {'/'.join(extra[0])}, which "
                         f"this config lacks{hint}")
    return traverse_util.unflatten_dict(
        {p: jax.device_put(np.asarray(got[p], a.dtype), a.sharding) for p, a in want.items()})


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_inputs(cfg: Config) -> None:
    """Find the tokenizer, every data source and the weights before anything heavy, and report all
    that is missing in one message. Without network the hub libraries are put in offline mode first,
    so a missing download fails at once instead of after minutes of retries."""
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
        try:
            _local_dir(cfg.train.init_from)
        except Exception as e:
            problems.append(f"weights: train.init_from={cfg.train.init_from!r}: {e}. Point "
                            f"train.init_from at a local copy (a Hugging Face model directory or a "
                            f"fot checkpoint)")
    if problems:
        raise TrainError("cannot start training, missing inputs:\n  - " + "\n  - ".join(problems))


def _all_slots(data_state: dict) -> dict:
    """The data positions of every process's pack slots in one state (all processes call this at
    the same step): what a checkpoint stores, so that any set of processes can resume from it."""
    if jax.process_count() == 1:
        return data_state
    blob = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(blob)))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(blob)] = blob
    got = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return merge_states([json.loads(got[i, :int(n)].tobytes()) for i, n in enumerate(sizes)])


# ------------------------------------------------------------------------------------------------
# The loop


def _mesh(cfg: Config) -> jax.sharding.Mesh:
    """Processes joined (when configured), then the mesh; errors before anything is compiled."""
    sharding.initialize_distributed(cfg.mesh.distributed)
    return sharding.make_mesh(cfg.mesh)


def _describe(mesh: jax.sharding.Mesh) -> str:
    axes = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
    return (f"mesh {axes} over {mesh.size} {jax.devices()[0].platform} devices, "
            f"{jax.process_count()} process(es)")


def _memory_report(compiled) -> dict[str, int]:
    """Bytes per device of the compiled step (XLA's memory analysis of one SPMD partition)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
           ("argument", "output", "alias", "temp", "generated_code")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _config_changes(cfg: Config, run_dir: Path, accept: bool) -> dict[str, tuple]:
    """What of cfg trains differently from the run in run_dir (fot.config.trajectory_changes;
    nothing for a run without checkpoints): a ConfigError listing it unless `accept`."""
    saved = run_dir / "config.yaml"
    ckpt = run_dir / "checkpoints"
    if not (saved.is_file() and ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())):
        return {}
    changes = trajectory_changes(load_config(saved), cfg)
    if changes and not accept:
        listing = "\n  - ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise ConfigError(f"{run_dir} holds a run whose config trains differently; resuming with this "
                          f"config would change its trajectory:\n  - {listing}\nRestore these settings, "
                          f"use another train.run_dir, or accept the changes with --accept-changes "
                          f"(recorded in {run_dir / CHANGES_FILE})")
    return changes


def _restore_data(stream, state: dict, changes: dict, say) -> None:
    """The data position of a checkpoint; after an accepted change to the data the saved position
    may not fit the new stream, which then starts from its beginning."""
    try:
        stream.restore(state)
    except DataError as e:
        if not changes:
            raise
        say(f"warning: the saved data position does not fit the changed config ({e}); the data "
            f"stream starts from its beginning")


def train(cfg: Config, progress: bool = True, accept_changes: bool = False,
          hooks: Sequence[Hook] = ()) -> dict:
    """Run (or resume) training; returns a summary dict. Raises TrainError on a non-finite loss, and
    ConfigError when resuming a run whose config trains differently, unless `accept_changes` (then
    the changes are recorded in run_dir/config_changes.jsonl with the step they took effect).
    `hooks` (fot.trainer.Hook) run after the built-in ones: non-finite stop, signals, logging."""
    if cfg.train.stages:
        return _train_stages(cfg, progress, accept_changes, hooks)
    cfg.validate_training()
    tr = cfg.train
    run_dir = Path(tr.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"train.run_dir={run_dir} is a file, not a directory")
    changes = _config_changes(cfg, run_dir, accept_changes)
    _check_inputs(cfg)  # (touches no device: the processes join in _mesh)
    mesh = _mesh(cfg)
    plan = StepPlan(cfg, mesh)
    stream = BatchStream(cfg, slots=plan.slots)  # this process's pack slots only
    lead = jax.process_index() == 0
    say = (lambda msg: print(msg, flush=True)) if lead else (lambda msg: None)
    run_dir.mkdir(parents=True, exist_ok=True)
    say(_describe(mesh))

    mngr, start, state, meta = restore_latest(run_dir, tr.keep_checkpoints, plan.abstract, say)
    rng = jax.random.key_data(jax.random.key(tr.seed))  # no dropout: saved for completeness
    if state is None:
        state = plan.init_state(_init_params(cfg, plan))
    else:
        state["halted"] = plan.not_halted()
        _restore_data(stream, meta["data"], changes, say)
        say(f"resumed from {run_dir / 'checkpoints' / str(start)} (step {start})")
    if lead:  # only now: after a failed restore the run directory still describes its checkpoints
        save_config(cfg, run_dir / "config.yaml")
        if changes:
            record = {"step": start, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}
            with open(run_dir / CHANGES_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            say(f"accepted config changes from step {start}: {', '.join(changes)}")

    if start < tr.steps:
        compiled = plan.compile()
        say(f"compiled train step; memory per device: "
            f"{ {k: _gib(v) for k, v in _memory_report(compiled).items()} }")
    else:
        compiled = None
    fpt = flops.train_flops_per_token(cfg)
    peak, n_peak, peak_src = flops.system_peak_flops(mesh.devices.flat)
    signals = StopOnSignal(tr.log_every)
    # (meta: with several processes a collective, as every process saves at the same steps)
    trainer = Trainer(
        compiled=compiled, state=state, start=start, steps=tr.steps, checkpoint_every=tr.checkpoint_every,
        mngr=mngr, next_batch=lambda: plan.put_batch(next(stream)), data_position=stream.state,
        meta=lambda step, data: {"step": step, "rng": np.asarray(rng).tolist(), "data": _all_slots(data)},
        learning_rate=schedule(tr), tokens_per_step=tr.batch_size * plan.window, flops_per_token=fpt,
        peak=(peak, n_peak),
        hooks=[StopOnNonFinite(run_dir), signals, Log(run_dir, tr.log_every, progress), *hooks])
    t0 = time.perf_counter()
    step = trainer.run()
    elapsed = time.perf_counter() - t0
    # a run resumed at its last step trains nothing: its final loss is the one it logged
    final_loss = trainer.last_loss if step > start else last_loss(run_dir, step)
    summary = {"start_step": start, "steps": tr.steps, "final_step": step, "final_loss": final_loss,
               "seconds": elapsed, "checkpoint": str(run_dir / "checkpoints" / str(step))}
    if signals.signal is not None:
        name = signal.Signals(signals.signal).name
        say(f"{name}: saved checkpoint {summary['checkpoint']} at step {step}; exiting")
        summary["signal"] = signals.signal
        return summary
    save_final_model(cfg, trainer.state["params"], stream.tokenizer, run_dir / "final")
    n = step - start
    say(f"done: steps {start}->{step} in {elapsed:.1f}s ({n * trainer.tokens / max(elapsed, 1e-9):.0f} "
        f"tokens/s), final loss {final_loss:.4f}, model FLOPs/token {fpt:.3g}, peak "
        f"{peak:.3g} FLOP/s x {n_peak} ({peak_src}); model saved in {run_dir / 'final'}")
    return summary


def _train_stages(cfg: Config, progress: bool, accept_changes: bool, hooks: Sequence[Hook]) -> dict:
    """train.stages in order (Config.stages), each a run of its own. A finished stage is skipped
    (after the same config check as a resume), so a killed schedule continues in the stage it
    stopped in; RUN_DIR/final then links to the last stage's model."""
    run_dir = Path(cfg.train.run_dir)
    stages = cfg.stages()
    done = []
    for i, stage in enumerate(stages):
        where = Path(stage.train.run_dir)
        if run_finished(where, stage.train.steps):
            _config_changes(stage, where, accept_changes)
            print(f"stage {i + 1}/{len(stages)}: {where} is trained ({stage.train.steps} steps)", flush=True)
            continue
        print(f"stage {i + 1}/{len(stages)}: {stage.train.steps} steps of {stage.train.batch_size} x "
              f"{stage.train.window or stage.model.max_position_embeddings} tokens in {where}", flush=True)
        summary = train(stage, progress, accept_changes, hooks)
        done.append(summary)
        if "signal" in summary:
            return {**summary, "stage": i}
    final = run_dir / "final"
    if jax.process_index() == 0:
        save_config(cfg, run_dir / "stages.yaml")
        if final.is_symlink() or final.exists():
            final.unlink()
        final.symlink_to(Path(stages[-1].train.run_dir).absolute() / "final", target_is_directory=True)
    return {"stages": done, "final_step": sum(s.train.steps for s in stages),
            "final_loss": last_loss(Path(stages[-1].train.run_dir), stages[-1].train.steps),
            "checkpoint": str(final)}


def dry_run(cfg: Config) -> dict:
    """Lower and compile the train step for the configured mesh on abstract state: nothing is
    allocated and no weights, tokenizer or data are read (the vocabulary is model.vocab_size).
    Prints and returns the parameter count, model FLOPs per step, memory per device, and the
    collectives of the compiled step, those of the memory layers' code separately; with
    train.stages, those of each stage."""
    if cfg.train.stages:
        reports = []
        for i, stage in enumerate(cfg.stages()):
            if jax.process_index() == 0:
                print(f"stage {i + 1}/{len(cfg.train.stages)}:", flush=True)
            reports.append(dry_run(stage))
        return {"stages": reports}
    cfg.validate_training()
    tr = cfg.train
    mesh = _mesh(cfg)
    plan = StepPlan(cfg, mesh)
    t0 = time.perf_counter()
    compiled = plan.compile()
    seconds = time.perf_counter() - t0
    hlo = compiled.as_text()
    mem_layers = len(cfg.memory.layers) if tr.cross_batch_range else 0
    halo = mem_layers * reads_previous_shard(
        plan.micro, cfg.model.num_attention_heads, plan.window, tr.pack_size, tr.cross_batch_range,
        tr.stepping, sharding.batch_shards(mesh))
    report = {
        "mesh": dict(mesh.shape), "devices": mesh.size, "compile_seconds": seconds,
        "params": plan.param_count(), "trainable_params": plan.param_count(trainable_only=True),
        "flops_per_step": flops.train_flops_per_token(cfg) * tr.batch_size * plan.window,
        "micro_batch": [plan.accum, plan.micro, plan.window],
        "memory_per_device": _memory_report(compiled),
        "compiler_options": plan.compiler_options(),
        "collectives": sharding.collective_counts(hlo),
        "memory_layer_collectives": sharding.collective_counts(hlo, MEMORY_SCOPE),
        # what the CROSSBATCH LAYOUT comment in fot/sharding.py promises, per micro-batch
        "expected_memory_layer": {"all-gather": 2 * mem_layers if mesh.shape["sequence"] > 1 else 0,
                                  "collective-permute": 2 * halo},
    }
    got = report["memory_layer_collectives"]
    ok = all(got[k] == v for k, v in report["expected_memory_layer"].items())
    if jax.process_index() == 0:
        print(f"dry run: {_describe(mesh)}\n"
              f"  compiled in {seconds:.1f}s; batch {tr.batch_size} rows x {plan.window} tokens "
              f"as {plan.accum} micro-batch(es) of {plan.micro} rows (one scanned step body)\n"
              f"  parameters: {report['params']:,} ({report['trainable_params']:,} trained)\n"
              f"  model FLOPs per step: {report['flops_per_step']:.4g}\n"
              f"  memory per device: " + ", ".join(f"{k} {_gib(v)}" for k, v in
                                                   report["memory_per_device"].items())
              + (" (XLA:CPU's memory-optimised op order: remat is on)" if report["compiler_options"] else "")
              + "\n"
              f"  collectives in the compiled step (a scanned body counts once): "
              f"{report['collectives']}\n"
              f"  memory-layer keys/values ({mem_layers} memory layers, {MEMORY_SCOPE} scope): "
              f"all-gathers {got['all-gather']} (expected {report['expected_memory_layer']['all-gather']}: "
              f"their whole windows over mesh.sequence), collective-permutes "
              f"{got['collective-permute']} (expected {2 * halo}: one per memory layer forward "
              f"+ one backward) -> {'as fot/sharding.py CROSSBATCH LAYOUT says' if ok else 'MISMATCH'}",
              flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fot.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="YAML config file (e.g. configs/tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--accept-changes", action="store_true",
                    help="resume a run even though this config trains differently from the run's "
                         "(the changes are recorded in RUN_DIR/config_changes.jsonl)")
    ap.add_argument("--dry-run", action="store_true",
                    help="compile the train step for the configured mesh on abstract parameters, "
                         "print its size, FLOPs, memory per device and collectives, and exit")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            dry_run(cfg)
            return 0
        summary = train(cfg, progress=not args.no_progress, accept_changes=args.accept_changes)
    except (ConfigError, ShardingError, TrainError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, (ConfigError, ShardingError)) else 1
    return 128 + summary["signal"] if "signal" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
