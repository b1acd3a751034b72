"""Ring attention over the `sequence` axis of 8 simulated CPU devices: the attention equals the
single-device definition (forward and gradient, with packed documents, GQA, heads split over
tensor, and a memory-like extra source in the same softmax), and training with mesh.sequence=8
runs it and reproduces the 1-device losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.test_distributed import CONFIG, assert_losses_equal, cli, losses
from fot.train import main

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the device count must be set before jax is imported.
CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from fot import sharding
from fot.config import MeshConfig
from fot.model import attention, partials

assert jax.device_count() == 8, jax.devices()
r = np.random.RandomState(0)
b, t, h, kv, d = 2, 72, 4, 2, 8  # 9 tokens per device on sequence=8, GQA
q = jnp.asarray(r.randn(b, t, h, d), jnp.float32)
k = jnp.asarray(r.randn(b, t, kv, d), jnp.float32)
v = jnp.asarray(r.randn(b, t, kv, d), jnp.float32)
probe = jnp.asarray(r.randn(b, t, h, d), jnp.float32)
pos = jnp.broadcast_to(jnp.arange(t), (b, t))
seg = jnp.asarray(np.sort(r.randint(0, 5, (b, t)), axis=1))  # packed documents, across device blocks
extra = partials.dense_partial(q, k[:, :7] * 2, v[:, :7], None)  # a memory-like source

def reference(q, k, v):  # NumPy-free definition: one masked softmax over [window | extra]
    local = partials.dense_partial(q, k, v, partials.causal_mask(pos, pos, None, seg, seg))
    return partials.combine([local, extra], jnp.float32)

def ring(q, k, v):
    local = attention.local_partial(q, k, v, pos, pos, impl="ring", block_size=4, q_seg=seg, k_seg=seg)
    return partials.combine([local, extra], jnp.float32)

out = {}
for name, mesh_cfg in (("seq8", MeshConfig(data=1, sequence=8)),
                       ("seq4_tensor2", MeshConfig(data=1, tensor=2, sequence=4))):
    mesh = sharding.make_mesh(mesh_cfg)
    grads = [jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * probe), argnums=(0, 1, 2)))
             for f in (reference, ring)]
    ref, g_ref = np.asarray(jax.jit(reference)(q, k, v)), [np.asarray(g) for g in grads[0](q, k, v)]
    with jax.set_mesh(mesh):
        got, g_ring = jax.jit(ring)(q, k, v), grads[1](q, k, v)
        hlo = jax.jit(ring).lower(q, k, v).compile().as_text()
    out[name] = {
        "forward": float(np.abs(np.asarray(got) - ref).max()),
        "grad": max(float(np.abs(a - np.asarray(c)).max()) for a, c in zip(g_ref, g_ring)),
        "grad_scale": float(np.abs(g_ref[1]).max()),
        "permutes": sharding.collective_counts(hlo)["collective-permute"],
    }
print(json.dumps(out))
"""


def test_ring_attention_on_8_devices_equals_the_definition():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in res.items():
        assert r["permutes"] > 0, name  # the keys travel around the ring
        assert r["forward"] <= 1e-5, name
        assert r["grad"] <= 1e-5 and r["grad_scale"] > 1e-2, name


def test_training_on_a_sequence_split_mesh_equals_one_device(tmp_path):
    """tests/test_distributed.py's config (memory layer, crossbatch R=3, 32-token windows) on
    mesh.sequence=8 (4 tokens per device) and data=2 x sequence=4: the 1-device losses."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "train": {**CONFIG["train"], "steps": 3}}))
    assert main([str(cfg), f"train.run_dir={tmp_path / 'one'}", "--no-progress"]) == 0
    for mesh in (("mesh.data=1", "mesh.sequence=8"), ("mesh.data=2", "mesh.sequence=4")):
        run = tmp_path / "_".join(mesh)
        proc = cli(str(cfg), f"train.run_dir={run}", *mesh)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_losses_equal(losses(run), losses(tmp_path / "one"), (1, 2, 3))
    dry = cli(str(cfg), "--dry-run", "mesh.data=1", "mesh.sequence=8")  # rows unsplit: no halo permutes
    assert dry.returncode == 0, dry.stderr[-3000:]
    counts = json.loads(dry.stdout.split("counts once): ")[1].split("\n")[0].replace("'", '"'))
    assert counts["collective-permute"] >= 2 * 2  # the ring in both layers, forward and backward
    assert "as fot/sharding.py CROSSBATCH LAYOUT says" in dry.stdout
