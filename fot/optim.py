"""The optimizer: global-norm clipping, then AdamW with a warmup + constant/cosine schedule.

Parameters are kept in `model.param_dtype` (float32 master weights) and the optimizer runs on them;
the model casts to `model.dtype` (bfloat16) for compute. Only `nnx.Param` leaves are ever given to
the optimizer (the train loop splits them out), so memory caches and other variables are never
trained. Weight decay skips the RMSNorm weights (as LLaMA recipes do); embeddings and projection
kernels are decayed. Gradient accumulation is a scan over micro-batches in fot/train.py.
"""

from __future__ import annotations

import jax
import optax

from fot.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 over warmup_steps, then constant or cosine decay to min_lr_ratio * lr."""
    lr, warm = cfg.learning_rate, cfg.warmup_steps
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(cfg.steps, warm + 1),
                                                  end_value=lr * cfg.min_lr_ratio)
    if warm == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])


def _decay_mask(params):
    def keep(path, _):
        return not any("norm" in str(getattr(p, "key", p)) for p in path)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=_decay_mask)
    if cfg.clip_norm <= 0:  # 0 disables clipping
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
