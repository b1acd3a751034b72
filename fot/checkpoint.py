"""fot checkpoint directories: a thin wrapper over orbax-checkpoint.

Layout of a checkpoint directory:

    config.yaml   the resolved Config (fot.config.save_config)
    params/       orbax checkpoint of `nnx.state(module, nnx.Param)` as a plain nested dict
                  (`State.to_pure_dict()`: {"embed_tokens": {"embedding": array}, "layers": ...})
    tokenizer/    optional copy of the tokenizer: `tokenizer.model` (SentencePiece), an HF tokenizer
                  directory, or an empty file `byte` for the byte-level tokenizer
    checksums.json  per tensor of params/, the sum of its raw bits as 32-bit words (`checksums`);
                  checked on every restore, so a flipped bit on disk is an error, not a silently
                  different model (directories written before it existed load unchecked)

The training loop keeps the same `params` layout under orbax's CheckpointManager, so a training step
directory restores with `restore_params` too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from fot.config import Config, load_config, save_config
from fot.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer
from fot.model.llama import Llama, abstract_model

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
CHECKSUMS_FILE = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint directory or weight file is missing, malformed or disagrees with its config."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint that cannot be read back as written: files truncated, missing or with flipped
    bits (as opposed to one that is intact but disagrees with the config)."""


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of a training run's finished checkpoints (orbax writes a step under a temporary name
    first)."""
    ckpt = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def run_finished(run_dir: Path, steps: int) -> bool:
    """Trained to `steps` with its model saved (the trainer writes final/config.yaml last)."""
    done = checkpoint_steps(run_dir)
    return bool(done) and done[-1] == steps and (Path(run_dir) / "final" / CONFIG_FILE).is_file()


@contextlib.contextmanager
def atomic_dir(dst: str | Path, overwrite: bool = False):
    """Yield a fresh temporary directory next to `dst`; rename it to `dst` only if the block succeeds.

    A failure (or interrupt) removes the temporary directory, so `dst` is either complete or absent.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: already exists (refusing to overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():  # overwrite: move the old one aside first so dst is never half-written
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / dst.name)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@jax.jit
def _word_sums(leaves: list) -> list:
    def words(x):  # the raw bits as unsigned words (an 8-byte dtype as two 32-bit words)
        width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
        return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)

    return [jnp.sum(words(x), dtype=jnp.uint32) for x in leaves]


def checksums(tree) -> dict[str, int]:
    """Per leaf (by its key path), the sum mod 2**32 of its raw bits as 32-bit words: integer sums
    are exact in any order, so the value is the same on every mesh and sharding, and one flipped
    bit changes it (by a power of two)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    sums = jax.device_get(_word_sums([leaf for _, leaf in flat]))
    return {jax.tree_util.keystr(path): int(v) for (path, _), v in zip(flat, sums)}


def mismatched(saved: dict[str, int], tree) -> list[str]:
    """The leaves of `tree` whose checksum differs from (or is missing in) `saved`."""
    got = checksums(tree)
    return sorted(k for k in got.keys() | saved.keys() if got.get(k) != saved.get(k))


def write_checksums(params: dict, directory: Path, write: bool = True) -> None:
    """directory/checksums.json of `params`. With several processes every one calls it (the sums
    are a collective) and one writes (`write`)."""
    sums = checksums(params)
    if write:
        (Path(directory) / CHECKSUMS_FILE).write_text(json.dumps(sums, sort_keys=True))


def params_dict(module: nnx.Module) -> dict:
    """The module's parameters as a plain nested dict of arrays (the checkpoint layout)."""
    return nnx.state(module, nnx.Param).to_pure_dict()


def save_tokenizer(tok: Tokenizer, dst: Path) -> None:
    dst.mkdir()
    if isinstance(tok, ByteTokenizer):
        (dst / "byte").touch()
    elif isinstance(tok, SentencePieceTokenizer):
        shutil.copyfile(tok.path, dst / "tokenizer.model")
    elif isinstance(tok, HFTokenizer):
        tok.tok.save_pretrained(str(dst))
    else:
        raise CheckpointError(f"cannot save a tokenizer of type {type(tok).__name__}")


def load_saved_tokenizer(src: Path) -> Tokenizer | None:
    if not src.is_dir():
        return None
    if (src / "byte").is_file():
        return ByteTokenizer()
    return load_tokenizer(str(src))


def save_model(model, path: str | Path, overwrite: bool = False) -> Path:
    """Write `model` (a fot.api.FotModel) as a fot checkpoint directory, atomically."""
    path = Path(path)
    with atomic_dir(path, overwrite) as tmp:
        save_config(model.config, tmp / CONFIG_FILE)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params_dict(model.module))
            ckptr.wait_until_finished()
        write_checksums(params_dict(model.module), tmp)
        if model.tokenizer is not None:
            save_tokenizer(model.tokenizer, tmp / TOKENIZER_DIR)
    return path


def restore_params(path: str | Path, abstract_state: nnx.State) -> nnx.State:
    """Restore `path/params` into the structure, dtypes (and shardings) of `abstract_state`.

    `abstract_state` is `nnx.state(abstract_module, nnx.Param)` of a module built with
    `nnx.eval_shape`; its leaves may carry shardings, which the restored arrays then get. It is filled
    in place and returned.
    """
    src = Path(path).absolute() / PARAMS_DIR
    if not src.is_dir():
        raise CheckpointError(f"{src}: no params checkpoint")
    # Without a sharding, one local device: a checkpoint written on another mesh (a training run
    # on 8 devices) then still loads here; orbax would otherwise insist on the writer's devices.
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or here),
                          abstract_state.to_pure_dict())
    check_matches(src, read_metadata(src), flat_tensors(target))
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(src, target)
        except Exception as e:  # orbax/tensorstore raise many types for a damaged directory
            raise DamagedCheckpoint(f"{src}: damaged checkpoint, its arrays cannot be read "
                                    f"({damage(e)})") from None
    sums = Path(path).absolute() / CHECKSUMS_FILE
    if sums.is_file():
        try:
            saved = json.loads(sums.read_text())
        except ValueError as e:
            raise DamagedCheckpoint(f"{sums}: damaged ({e})") from None
        bad = mismatched(saved, restored)
        if bad:
            raise DamagedCheckpoint(f"{src}: damaged checkpoint, tensor {bad[0]} differs from its "
                                    f"checksum in {sums} ({len(bad)} tensor(s) differ)")
    nnx.replace_by_pure_dict(abstract_state, restored)
    return abstract_state


def read_metadata(src: Path) -> dict:
    """{tensor name: orbax metadata (shape, dtype)} of an orbax params directory."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # an item of a training checkpoint has no step metadata: not news
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return flat_tensors(ckptr.metadata(src).item_metadata.tree)
        except Exception as e:
            raise DamagedCheckpoint(f"{src}: damaged or incomplete checkpoint, its metadata cannot "
                                    f"be read ({damage(e)})") from None
        finally:
            absl.setLevel(level)


def damage(e: BaseException) -> str:
    """An exception from reading a damaged checkpoint in one line (orbax's run to pages). The
    reads still pending when it was raised fail later, each printing another page as an
    "exception ignored" at garbage collection: from now on those are dropped."""
    if sys.unraisablehook is not _drop_pending_reads:
        _drop_pending_reads.default = sys.unraisablehook
        sys.unraisablehook = _drop_pending_reads
    lines = [ln.strip() for ln in str(e).split(" See full TensorStore details")[0].splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _drop_pending_reads(unraisable) -> None:
    if "_read_array_index" not in repr(unraisable.object):
        _drop_pending_reads.default(unraisable)


def flat_tensors(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(flat_tensors(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + str(k): v})
    return out


def check_matches(src: Path, saved: dict, want: dict) -> None:
    # Checked here so a config that disagrees with the weights gives one clear line, not orbax's dump.
    for k in want:
        if k not in saved:
            raise CheckpointError(f"{src}: no tensor '{k}', which the config expects")
        if tuple(saved[k].shape) != tuple(want[k].shape):
            raise CheckpointError(f"{src}: tensor '{k}' has shape {tuple(saved[k].shape)}, "
                                  f"the config implies {tuple(want[k].shape)}")
    extra = sorted(set(saved) - set(want))
    if extra:
        raise CheckpointError(f"{src}: unexpected tensor '{extra[0]}' (not a parameter for this config)")


def read_checkpoint(path: str | Path, config: Config | None = None) -> tuple[Config, Llama, Tokenizer | None]:
    """A fot checkpoint directory -> (config, module, tokenizer), what a `fot.api.FotModel` holds.
    `config` (already resolved, e.g. with a new compute dtype) replaces the saved one; its parameter
    shapes must match the saved ones."""
    path = Path(path)
    cfg = config or load_config(path / CONFIG_FILE)
    try:
        tokenizer = load_saved_tokenizer(path / TOKENIZER_DIR)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path / TOKENIZER_DIR}: damaged tokenizer ({damage(e)})") from None
    graphdef, params, rest = nnx.split(abstract_model(cfg.model, cfg.memory), nnx.Param, ...)
    params = restore_params(path, params)
    return cfg, nnx.merge(graphdef, params, rest), tokenizer


# ------------------------------------------------------------------------------------------------
# Training runs: the train state under orbax's CheckpointManager (every process writes and reads its
# own shards; orbax coordinates them) and the run's final model


def train_manager(run_dir: Path, keep: int) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=opts,
                                 item_names=("params", "opt_state", "meta"))


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_train_state(mngr: ocp.CheckpointManager, step: int, state: dict, meta: dict) -> None:
    """Save `state` (params, opt_state) as step `step`; meta gets the state's checksums and a digest
    of itself, which restore_train_state verifies."""
    # The sharded arrays themselves: orbax copies them to the host before `save` returns (only the
    # file writes are asynchronous), so the next step may donate them.
    if step in mngr.all_steps():
        return
    meta = {**meta, "checksums": checksums({k: state[k] for k in ("params", "opt_state")})}
    meta["digest"] = _meta_digest(meta)
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]), meta=ocp.args.JsonSave(meta)))


def restore_train_state(mngr: ocp.CheckpointManager, step: int, abstract: dict) -> tuple[dict, dict]:
    """({params, opt_state}, meta) of step `step`, restored into the shapes and shardings of
    `abstract` (abstract params and opt_state), whatever mesh wrote the checkpoint.
    DamagedCheckpoint if its files cannot be read back as written; CheckpointError if it is intact
    but holds other shapes than this config's."""
    where = Path(mngr.directory) / str(step)
    check_matches(where / "params", read_metadata(where / "params"), flat_tensors(abstract["params"]))
    try:
        got = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract["params"]),
            opt_state=ocp.args.StandardRestore(abstract["opt_state"]),
            meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax/tensorstore raise many types for a damaged directory
        raise DamagedCheckpoint(f"{where}: damaged checkpoint, its files cannot be read "
                                f"({damage(e)})") from None
    meta = got["meta"]
    if "digest" in meta:  # (checkpoints written before checksums existed are taken as they are)
        if meta["digest"] != _meta_digest(meta):
            raise DamagedCheckpoint(f"{where}: damaged checkpoint, its metadata differs from its digest")
        bad = mismatched(meta["checksums"], {"params": got["params"], "opt_state": got["opt_state"]})
        if bad:
            raise DamagedCheckpoint(f"{where}: damaged checkpoint, {bad[0]} differs from its checksum "
                                    f"({len(bad)} array(s) differ)")
    return {"params": got["params"], "opt_state": got["opt_state"]}, meta


def restore_latest(run_dir: Path, keep: int, abstract: dict, say) -> tuple:
    """(manager, step, state, meta) of the newest checkpoint that reads back intact (step 0, None,
    None without checkpoints). Newer damaged ones are warned about and moved to
    run_dir/damaged_checkpoints/ (out of the manager's view, so their steps can be saved again);
    if none is intact, nothing is moved and the error lists them all. Stale temporary
    directories of an interrupted save are removed first."""
    ckpt = run_dir / "checkpoints"
    lead = jax.process_index() == 0
    if lead and ckpt.is_dir():
        for tmp in ckpt.glob("*.orbax-checkpoint-tmp*"):
            say(f"removing {tmp}: an unfinished save")
            shutil.rmtree(tmp, ignore_errors=True)
    barrier("fot_tmp_cleanup")
    mngr = train_manager(run_dir, keep)
    damaged = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state, meta = restore_train_state(mngr, step, abstract)
        except DamagedCheckpoint as e:
            say(f"warning: {e}; trying the previous one")
            damaged.append((step, str(e)))
            continue
        if damaged:
            mngr.close()
            if lead:
                aside = run_dir / "damaged_checkpoints"
                aside.mkdir(exist_ok=True)
                for bad, _ in damaged:
                    os.replace(ckpt / str(bad), aside / f"{bad}-{time.strftime('%Y%m%dT%H%M%S')}")
                say(f"moved {len(damaged)} damaged checkpoint(s) to {aside}")
            barrier("fot_damaged_moved")
            mngr = train_manager(run_dir, keep)
        return mngr, step, state, meta
    if damaged:
        listing = "\n  - ".join(msg for _, msg in damaged)
        raise CheckpointError(f"no checkpoint of {run_dir} reads back intact (nothing was moved):"
                              f"\n  - {listing}")
    return mngr, 0, None, None


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def save_final_model(cfg: Config, params: dict, tokenizer, path: Path) -> None:
    """The trained model as a fot checkpoint (fot/checkpoint.py layout), written by every process
    (each its shards of params/; `save_model`'s private temporary directory cannot be shared by
    several hosts). config.yaml goes last: `fot.load_model` needs it, so a directory without it is
    an unfinished one."""
    path = path.absolute()
    lead = jax.process_index() == 0
    if lead:
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).unlink(missing_ok=True)
        shutil.rmtree(path / TOKENIZER_DIR, ignore_errors=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_DIR, params, force=True)
        ckptr.wait_until_finished()
    write_checksums(params, path, write=lead)
    if lead:
        if tokenizer is not None:
            save_tokenizer(tokenizer, path / TOKENIZER_DIR)
        save_config(cfg, path / CONFIG_FILE)
