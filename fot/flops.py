"""Model FLOPs, peak device FLOP/s and MFU.

Model FLOPs count the matmuls the model needs, not what an implementation happens to execute
(masked-out attention scores, recomputation under remat and elementwise work are not counted),
so MFU is comparable across implementations (PaLM appendix B; MaxText counts the same way).

Per token, forward pass:

    2 * N_matmul                          every weight in a matmul: q, k, v, o, gate, up, down
                                          projections of all layers, plus the LM head (tied or not;
                                          the embedding lookup is not a matmul)
  + sum over layers 4 * H * D * keys      scores (2HD per key) and probabilities x values (2HD per
                                          key) for H query heads of size D (GQA saves memory, not
                                          FLOPs)

keys = (T + 1) / 2 for causal attention over a window of T tokens (the mean number of visible
keys), plus, in a FoT memory layer, every memory key the query attends to: with crossbatch that is
T keys per other batch row it reads (fully visible), with kNN retrieval the k retrieved keys.
Training = 3 x forward (the backward pass costs two matmuls per forward matmul).
"""

from __future__ import annotations

import math
import os
import time
from functools import lru_cache

import jax
import jax.numpy as jnp

from fot.config import Config, ModelConfig
from fot.model.memory.crossbatch import extra_contexts


def matmul_params(cfg: ModelConfig) -> int:
    """Number of weights that multiply every token: all layer projections plus the LM head."""
    e, h, k, d, f = (cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head,
                     cfg.intermediate_size)
    per_layer = e * h * d + 2 * e * k * d + h * d * e + 3 * e * f
    return cfg.num_hidden_layers * per_layer + e * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, memory_layers: int = 0,
                    memory_keys: float = 0.0, training: bool = True) -> float:
    """Model FLOPs per token (see the module docstring). `memory_layers` layers each attend to
    `memory_keys` extra keys per query on top of the causal window of `seq_len` tokens."""
    h, d = cfg.num_attention_heads, cfg.dim_per_head
    local = cfg.num_hidden_layers * 4 * h * d * (seq_len + 1) / 2
    memory = memory_layers * 4 * h * d * memory_keys
    forward = 2 * matmul_params(cfg) + local + memory
    return 3 * forward if training else forward


def crossbatch_contexts(batch_size: int, pack_size: int, cross_batch_range: int,
                        stepping: bool) -> float:
    """Mean number of OTHER batch rows a row reads in a memory layer: the model's own rule,
    fot.model.memory.crossbatch.extra_contexts."""
    return float(extra_contexts(batch_size, pack_size, cross_batch_range, stepping).mean())


def train_flops_per_token(config: Config) -> float:
    """Training FLOPs per token of a config: window T, crossbatch memory keys in memory layers."""
    t = config.train.window or config.model.max_position_embeddings
    tr = config.train
    ctx = crossbatch_contexts(tr.batch_size, tr.pack_size, tr.cross_batch_range, tr.stepping)
    return flops_per_token(config.model, t, len(config.memory.layers), ctx * t, training=True)


MATMUL_N = 2048  # size of the matmul that measures the peak of devices not in the table

# Dense (no sparsity) bf16 matmul peak per JAX device, from the vendors' datasheets. Matched as a
# substring of the lower-cased `device_kind`, first match wins (so more specific names come first).
# TPU v2/v3 expose each of a chip's two cores as a device: the per-chip peak is halved.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200 nvl", 835e12),
    ("h200", 989e12),  # SXM, and GH200
    ("a100", 312e12),
    ("tpu v2", 22.5e12),  # 45e12 per chip
    ("tpu v3", 61.5e12),  # 123e12 per chip
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # v5p
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
)


def peak_flops(device=None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from). Known accelerators: the bf16
    datasheet table; anything else (CPUs): measured by `measure_matmul_flops` in this process."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for name, flops in PEAK_BF16_FLOPS:
        if name in kind:
            return flops, f"datasheet bf16 dense peak of {device.device_kind}"
    n = MATMUL_N
    return measure_matmul_flops(n), f"measured {n}x{n} float32 matmul on {device.device_kind}"


def system_peak_flops(devices=None) -> tuple[float, int, str]:
    """(peak FLOP/s of one device, how many of them the run uses, where the peak comes from).
    The environment variable FOT_PEAK_FLOPS overrides the per-device peak. A peak measured on a
    CPU already used every core of the host, however many (simulated) devices the host shows, so
    it counts once per process there; accelerators count once per device."""
    devices = list(jax.devices() if devices is None else devices)
    if os.environ.get("FOT_PEAK_FLOPS"):
        peak, source = float(os.environ["FOT_PEAK_FLOPS"]), "FOT_PEAK_FLOPS per device"
    else:
        peak, source = peak_flops(devices[0])
    n = len({d.process_index for d in devices}) if devices[0].platform == "cpu" else len(devices)
    return peak, n, source


@lru_cache(maxsize=None)
def measure_matmul_flops(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """Achieved FLOP/s of one n x n @ n x n matmul on the default device (best of `repeats`): the
    practical peak of hardware without a datasheet entry, such as the CPU running the tests."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices used."""
    return tokens_per_s * flops_per_token / (peak * n_devices)
