"""Ring attention over 8 simulated CPU devices equals single-device attention."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the device count must be set before jax is imported.
CHILD = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from fot.model import attention
from fot.model.ring import ring_attention

assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("sequence",))
r = np.random.RandomState(0)
b, t, h, kv, d = 2, 72, 4, 2, 8  # 9 tokens per device, GQA
q = jnp.asarray(r.randn(b, t, h, d), jnp.float32)
k = jnp.asarray(r.randn(b, t, kv, d), jnp.float32)
v = jnp.asarray(r.randn(b, t, kv, d), jnp.float32)
probe = jnp.asarray(r.randn(b, t, h, d), jnp.float32)
pos = jnp.broadcast_to(jnp.arange(t), (b, t))

single = lambda q, k, v: attention.attend(q, k, v, pos, pos)
ring = lambda q, k, v: ring_attention(q, k, v, mesh, block_size=4)
grads = [jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * probe), argnums=(0, 1, 2)))
         for f in (single, ring)]
ref, g_single = np.asarray(jax.jit(single)(q, k, v)), [np.asarray(g) for g in grads[0](q, k, v)]
out, g_ring = jax.jit(ring)(q, k, v), grads[1](q, k, v)
print(json.dumps({
    "sharded": len(out.sharding.device_set),
    "forward": float(np.abs(np.asarray(out) - ref).max()),
    "grad": max(float(np.abs(a - np.asarray(c)).max()) for a, c in zip(g_single, g_ring)),
    "grad_scale": float(np.abs(g_single[1]).max()),
}))
"""


def test_ring_attention_on_8_devices_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["sharded"] == 8
    assert res["forward"] <= 1e-5
    assert res["grad"] <= 1e-5 and res["grad_scale"] > 1e-2
