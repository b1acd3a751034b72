"""Mesh, logical-axis rules, crossbatch halo exchange, FLOP accounting.

Multi-device checks run in a subprocess with 8 simulated CPU devices (the flag must be set before
jax is imported, and this process already imported it with one device).
"""

import functools
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from fot import flops as F
from fot import sharding as S
from fot.config import MeshConfig, ModelConfig, config_from_dict
from fot.model.llama import init_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def abstract_mesh(data=2, fsdp=2, tensor=2, sequence=1):
    return AbstractMesh((data, fsdp, tensor, sequence), S.MESH_AXES)


# ------------------------------------------------------------------------------------------------
# mesh and batch validation


def test_mesh_shape_fills_the_minus_one():
    assert S.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2, 1)
    assert S.mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=1), 8) == (2, 4, 1, 1)
    assert S.mesh_shape(MeshConfig(data=1, fsdp=1, tensor=2, sequence=-1), 8) == (1, 1, 2, 4)
    assert S.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=2, sequence=1), 8) == (2, 2, 2, 1)
    mesh = S.make_mesh(MeshConfig())  # this process: one CPU device
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}


@pytest.mark.parametrize("cfg, numbers", [
    (MeshConfig(data=-1, fsdp=3), ["product 3", "8 devices"]),
    (MeshConfig(data=2, fsdp=2, tensor=1), ["4 devices", "there are 8"]),
    (MeshConfig(data=-1, fsdp=-1), ["mesh.data=-1", "mesh.fsdp=-1", "at most one"]),
    (MeshConfig(data=0), ["mesh.data=0"]),
])
def test_bad_mesh_is_an_error_naming_the_numbers(cfg, numbers):
    with pytest.raises(S.ShardingError) as e:
        S.mesh_shape(cfg, 8)
    for n in numbers:
        assert n in str(e.value)


def test_bad_batch_is_an_error_naming_the_numbers():
    mesh = abstract_mesh()  # 4 batch shards
    S.validate_batch(8, mesh, cross_batch_range=2)
    with pytest.raises(S.ShardingError, match=r"batch_size=6 .*data=2 x fsdp=2 = 4 batch shards"):
        S.validate_batch(6, mesh)
    with pytest.raises(S.ShardingError, match=r"leaves 2 rows per shard.*cross_batch_range=3"):
        S.validate_batch(8, mesh, cross_batch_range=3)


# ------------------------------------------------------------------------------------------------
# the rules table


def test_logical_names_map_through_the_one_table():
    assert S.logical_to_mesh_spec(("embed", "q_heads")) == P("fsdp", "tensor")
    assert S.logical_to_mesh_spec(("layers", "mlp", "embed")) == P(None, "tensor", "fsdp")
    assert (S.logical_to_mesh_spec(("batch", "length", "act_embed"))
            == P(("data", "fsdp"), "sequence", None))
    assert S.logical_to_mesh_spec(None) == P()
    mesh = abstract_mesh()
    # 259 byte-vocab rows cannot be split in two: replicated; 64 embed columns can
    assert S.logical_to_mesh_spec(("vocab", "embed"), (259, 64), mesh) == P(None, "fsdp")
    assert S.logical_to_mesh_spec(("vocab", "embed"), (256, 64), mesh) == P("tensor", "fsdp")
    # a mesh axis is used once per array: fsdp already splits the batch
    assert S.logical_to_mesh_spec(("batch", "embed"), (8, 64), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(S.ShardingError, match="'heads'"):
        S.logical_to_mesh_spec(("embed", "heads"))


def test_every_parameter_name_of_the_model_is_in_the_table():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    abstract = nnx.eval_shape(lambda: nnx.state(init_model(cfg)))
    shardings = S.param_shardings(abstract, S.make_mesh(MeshConfig()))
    leaves = jax.tree.leaves(shardings)
    assert len(leaves) == len(jax.tree.leaves(abstract)) == 12
    assert all(isinstance(s, jax.sharding.NamedSharding) for s in leaves)


def test_optimizer_state_is_sharded_like_the_parameters():
    import optax

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = init_model(cfg)
    mesh = S.make_mesh(MeshConfig())
    params = {p: v.get_value().spec for p, v in nnx.to_flat_state(S.param_shardings(model, mesh))}
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    specs = {p: v.get_value().spec
             for p, v in nnx.to_flat_state(S.param_shardings(nnx.state(opt), mesh))}
    for moment in ("mu", "nu"):
        assert {p[3:]: s for p, s in specs.items() if p[:3] == ("opt_state", 0, moment)} == params
    assert specs[("step",)] == P() and specs[("opt_state", 0, "count")] == P()
    assert params[("layers", "self_attn", "q_proj", "kernel")] == P(None, "fsdp", "tensor")


def test_optimizer_shardings_follow_the_parameters():
    from fot.config import TrainConfig
    from fot.optim import make_optimizer

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    mesh = S.make_mesh(MeshConfig())
    params = S.abstract_state(lambda: nnx.state(init_model(cfg), nnx.Param), mesh).to_pure_dict()
    shardings = jax.tree.map(lambda a: a.sharding, params)
    tx = make_optimizer(TrainConfig())  # clipping, then AdamW with masked weight decay
    clip, (adam, _, schedule) = S.optimizer_shardings(tx, jax.eval_shape(tx.init, params),
                                                      shardings, mesh)
    assert adam.mu == shardings and adam.nu == shardings
    assert adam.mu["layers"]["self_attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert adam.count.spec == P() and schedule.count.spec == P()


def test_previous_rows_without_a_mesh():
    x = jnp.arange(6 * 3, dtype=jnp.float32).reshape(6, 3)
    out = np.asarray(S.previous_rows(x, 2))
    assert out.shape == (6, 2, 3)
    for b in range(6):
        for r in (1, 2):
            want = np.asarray(x[b - r]) if b - r >= 0 else np.zeros(3)
            np.testing.assert_array_equal(out[b, r - 1], want)
    assert S.previous_rows(x, 0).shape == (6, 0, 3)
    k, v = S.previous_rows((x, 2 * x), 2)  # pytrees: keys and values together
    np.testing.assert_array_equal(v, 2 * k)


# ------------------------------------------------------------------------------------------------
# 8 simulated devices

CHILD = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from fot import sharding as S
    from fot.config import MeshConfig, MemoryConfig, ModelConfig
    from fot.model.llama import init_model

    def collectives(fn, *args):
        return S.collective_counts(fn.lower(*args).compile().as_text())

    res = {"devices": jax.device_count()}
    mesh = S.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    graphdef, state = nnx.split(init_model(cfg, MemoryConfig(layers=(1,))))
    ids = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, 128))

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    ref = np.asarray(jax.jit(forward)(state, jnp.asarray(ids)))  # one device
    placed = S.shard_state(state, mesh)
    make_state = lambda: nnx.state(init_model(cfg, MemoryConfig(layers=(1,))))
    fresh = S.init_sharded(make_state, mesh)
    # (a jitted init may differ from the eager one in the last bit; compare jitted with jitted)
    jitted = jax.jit(make_state)()
    res["init_sharded_equal"] = all(
        np.array_equal(a, b) and a.sharding == c.sharding for a, b, c in
        zip(jax.tree.leaves(fresh), jax.tree.leaves(jitted), jax.tree.leaves(placed)))
    abstract = S.abstract_state(lambda: nnx.state(init_model(cfg)), mesh)
    res["abstract_equal"] = all(
        a.shape == b.shape and a.sharding == b.sharding
        for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(placed)))
    res["params"] = {"/".join(map(str, path)): [
        [list(a) if isinstance(a, tuple) else a for a in v.get_value().sharding.spec],
        list(v.get_value().addressable_shards[0].data.shape)]
        for path, v in nnx.to_flat_state(placed)}
    with jax.set_mesh(mesh):
        in_shardings = (S.param_shardings(state, mesh), S.batch_sharding(mesh))
        fwd = jax.jit(forward, in_shardings=in_shardings)
        batch = S.shard_batch(ids, mesh)
        out = fwd(placed, batch)
        res["logits_spec"] = [list(a) if isinstance(a, tuple) else a for a in out.sharding.spec]
        res["rel_err"] = float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))
        res["forward_collectives"] = collectives(fwd, placed, batch)

    # crossbatch halo: keys and values [B, T, K, D], rows over (data, fsdp), kv heads over tensor
    k, v = (jax.random.normal(jax.random.key(i), (16, 8, 4, 8)) for i in (2, 3))
    kv_sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    kvs = jax.device_put((k, v), kv_sharding)
    weight = jnp.arange(1.0, 4.0)[None, :, None, None, None]

    def loss(kv, m):
        pk, pv = S.previous_rows(kv, 3, m)
        return jnp.sum(pk ** 2 * weight) + jnp.sum(pv * weight)

    prev = jax.jit(lambda kv: S.previous_rows(kv, 3, mesh))
    grad = jax.jit(jax.grad(lambda kv: loss(kv, mesh)))
    ref_prev, ref_grad = S.previous_rows((k, v), 3), jax.grad(lambda kv: loss(kv, None))((k, v))
    res["halo_equal"] = all(np.array_equal(a, b) for a, b in zip(prev(kvs), ref_prev))
    res["halo_grad_rel_err"] = max(float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))
                                   for a, b in zip(grad(kvs), ref_grad))
    res["halo_forward"] = collectives(prev, kvs)
    res["halo_grad"] = collectives(grad, kvs)
    res["local_rows"] = [S.local_batch_rows(mesh, 16).start, S.local_batch_rows(mesh, 16).stop]

    # counting by named scope (what the dry run does for memory layers): a naive halo, padding
    # the batch-sharded keys instead of previous_rows' permute, makes collectives in its scope
    def naive(x):
        with jax.named_scope("halo"):
            return S._stack_previous(jnp.zeros((3,) + x.shape[1:], x.dtype), x, 3)

    hlo = jax.jit(naive).lower(kvs[0]).compile().as_text()
    res["naive_halo"] = [S.collective_counts(hlo, scope) for scope in (None, "halo", "other")]
    print("RESULT " + json.dumps(res))
""")


@pytest.fixture(scope="module")
def eight_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return SimpleNamespace(**json.loads(line[len("RESULT "):]), stderr=proc.stderr)


def test_sharded_forward_equals_one_device(eight_devices):
    r = eight_devices
    assert r.devices == 8
    assert r.rel_err <= 1e-5
    # activations stay split over all batch shards (FSDP), logits over the vocabulary (tensor)
    assert r.logits_spec == [["data", "fsdp"], None, "tensor"]
    # the embedding lookup does not fall back to replicating activations
    assert "Involuntary full rematerialization" not in r.stderr
    # FSDP weight gathers and tensor-parallel reductions, nothing else
    assert r.forward_collectives["all-gather"] > 0 and r.forward_collectives["all-reduce"] > 0
    assert r.forward_collectives["all-to-all"] == 0


def test_parameters_carry_the_expected_shardings(eight_devices):
    expect = {  # [spec, per-device shard shape] for hidden 64, 4 heads x 16, 2 kv heads, mlp 128
        "embed_tokens/embedding": [["tensor", "fsdp"], [64, 32]],
        "layers/self_attn/q_proj/kernel": [[None, "fsdp", "tensor"], [3, 32, 32]],
        "layers/self_attn/k_proj/kernel": [[None, "fsdp", "tensor"], [3, 32, 16]],
        "layers/self_attn/v_proj/kernel": [[None, "fsdp", "tensor"], [3, 32, 16]],
        "layers/self_attn/o_proj/kernel": [[None, "tensor", "fsdp"], [3, 32, 32]],
        "layers/mlp/gate_proj/kernel": [[None, "fsdp", "tensor"], [3, 32, 64]],
        "layers/mlp/up_proj/kernel": [[None, "fsdp", "tensor"], [3, 32, 64]],
        "layers/mlp/down_proj/kernel": [[None, "tensor", "fsdp"], [3, 64, 32]],
        "layers/input_layernorm/weight": [[None, "fsdp"], [3, 32]],
        "layers/post_attention_layernorm/weight": [[None, "fsdp"], [3, 32]],
        "norm/weight": [["fsdp"], [32]],
        "lm_head/kernel": [["fsdp", "tensor"], [32, 64]],
    }
    assert eight_devices.params == expect
    # created in place by a jitted init: same values, same shardings; and abstractly, for dry runs
    assert eight_devices.init_sharded_equal and eight_devices.abstract_equal


def test_crossbatch_halo_is_one_permute_and_no_all_gather(eight_devices):
    r = eight_devices
    assert r.halo_equal  # a copy: bit-exact
    assert r.halo_grad_rel_err <= 1e-6  # sums of up to 3 terms, in another order
    # the numbers the CROSSBATCH LAYOUT comment in fot/sharding.py promises
    assert r.halo_forward == {"all-gather": 0, "all-reduce": 0, "reduce-scatter": 0,
                              "all-to-all": 0, "collective-permute": 1}  # k and v in one buffer
    assert r.halo_grad["all-gather"] == 0 and r.halo_grad["collective-permute"] == 2
    assert r.local_rows == [0, 16]  # one process holds every shard


def test_collectives_are_counted_by_named_scope(eight_devices):
    everything, in_scope, elsewhere = eight_devices.naive_halo
    assert sum(everything.values()) > 0 and in_scope == everything
    assert sum(elsewhere.values()) == 0


# ------------------------------------------------------------------------------------------------
# FLOPs

TINY = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4)


def test_flops_match_a_hand_count():
    # per layer: q 8*2*4 + k,v 2*8*1*4 + o 2*4*8 + mlp 3*8*16 = 64+64+64+384 = 576; x2 layers
    # + head 8*16 = 128 -> 1280 matmul weights
    assert F.matmul_params(TINY) == 1280
    # forward/token, T=4: 2*1280 + 2 layers * 4*2*4 * (4+1)/2 = 2560 + 160 = 2720; training x3
    assert F.flops_per_token(TINY, 4, training=False) == 2720
    assert F.flops_per_token(TINY, 4) == 3 * 2720
    # one memory layer with 8 extra keys per query: + 4*2*4*8 = 256
    assert F.flops_per_token(TINY, 4, memory_layers=1, memory_keys=8, training=False) == 2976


def test_flop_count_reads_the_rows_the_model_reads():
    """For every (pack_size, range, stepping) of a grid, pack_size 1 included: the FLOP count's mean
    crossbatch rows equal the rows the model's visibility mask opens (crossbatch_memory), and the
    definition written out here (n(b) = min(i * step + 1, R + 1) with stepping and k > 1, R + 1
    otherwise, never more than b + 1)."""
    import jax.numpy as jnp

    from fot.model import partials
    from fot.model.memory.crossbatch import crossbatch_memory

    class Ctx:  # what crossbatch_memory reads of the layer context
        segments = None
        inv_freq, attention_factor = np.ones(1, np.float32), 1.0

    class Module:
        class mem:
            positionals, gate = False, False

    b, t = 8, 2
    for k in (1, 2, 3, 4, 8):
        for r in (0, 1, 2, 3, 5):
            for stepping in (True, False):
                step = -(-(r + 1) // max(k - 1, 1))
                want = [min(min(i % k * step + 1, r + 1) if stepping and k > 1 else r + 1, i + 1) - 1
                        for i in range(b)]
                assert F.crossbatch_contexts(b, k, r, stepping) == sum(want) / b, (k, r, stepping)
                if r == 0:
                    continue
                Ctx.q_pos = jnp.zeros((b, t), jnp.int32)
                fn = crossbatch_memory(Module, Ctx, r, k, stepping)
                q = jnp.zeros((b, t, 1, 2))
                # Values = 1 in every key: the partial's normaliser counts the visible keys per row.
                parts, _ = fn(0, q, jnp.zeros((b, t, 1, 2)), jnp.ones((b, t, 1, 2)))
                part = functools.reduce(partials.merge, parts)
                seen = np.where(np.asarray(part.m)[:, 0, 0] > -1e29, np.asarray(part.l)[:, 0, 0], 0.0)
                np.testing.assert_allclose(seen, np.asarray(want) * t, err_msg=str((k, r, stepping)))


def test_crossbatch_contexts_hand_count():
    # B=8, k=4, R=3, step=ceil(4/3)=2: rows see 0,1,2,3 | 0,2,3,3 other rows (capped by b)
    assert F.crossbatch_contexts(8, 4, 3, stepping=True) == 14 / 8
    # no stepping: min(R, b) = 0,1,2,3,3,3,3,3
    assert F.crossbatch_contexts(8, 4, 3, stepping=False) == 18 / 8
    assert F.crossbatch_contexts(8, 4, 0, stepping=True) == 0
    cfg = config_from_dict({
        "model": {k: getattr(TINY, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                 "num_hidden_layers", "num_attention_heads",
                                                 "num_key_value_heads", "max_position_embeddings")},
        "memory": {"layers": [1]},
        "train": {"batch_size": 8, "pack_size": 4, "cross_batch_range": 3}})
    # memory keys 1.75 rows * 4 tokens = 7: forward 2720 + 4*2*4*7 = 2944
    assert F.train_flops_per_token(cfg) == 3 * 2944


def test_flops_agree_with_xla_cost_analysis():
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      scan_layers=False)  # XLA counts a scanned layer once, not per iteration
    graphdef, state = nnx.split(init_model(cfg))
    ids = jnp.zeros((4, 64), jnp.int32)

    def loss(state, ids):
        return nnx.merge(graphdef, state)(ids).mean()

    for fn, training in ((loss, False), (jax.grad(loss), True)):
        cost = jax.jit(fn).lower(state, ids).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        if not cost or "flops" not in cost:
            pytest.skip("this jax backend reports no cost analysis")
        model = F.flops_per_token(cfg, 64, training=training) * ids.size
        # XLA executes every model FLOP plus masked-out scores and elementwise work
        assert 1.0 <= cost["flops"] / model <= 1.5


def test_peak_flops_table_and_mfu(monkeypatch):
    dev = lambda kind: SimpleNamespace(device_kind=kind)
    assert F.peak_flops(dev("NVIDIA H100 80GB HBM3"))[0] == 989e12
    assert F.peak_flops(dev("NVIDIA H100 PCIe"))[0] == 756e12
    assert F.peak_flops(dev("NVIDIA H200"))[0] == 989e12
    assert F.peak_flops(dev("NVIDIA A100-SXM4-80GB"))[0] == 312e12
    assert F.peak_flops(dev("TPU v4"))[0] == 275e12
    assert F.peak_flops(dev("TPU v5 lite"))[0] == 197e12
    assert F.peak_flops(dev("TPU v5"))[0] == 459e12
    monkeypatch.setattr(F, "MATMUL_N", 128)
    peak, source = F.peak_flops(dev("cpu"))
    assert peak > 1e6 and "measured 128x128" in source
    assert F.mfu(1000.0, 6e9, 1e13, n_devices=2) == pytest.approx(0.3)


def test_system_peak_counts_accelerators_per_device_and_cpus_per_host(monkeypatch):
    dev = lambda kind, platform, process: SimpleNamespace(device_kind=kind, platform=platform,
                                                           process_index=process)
    monkeypatch.delenv("FOT_PEAK_FLOPS", raising=False)
    gpus = [dev("NVIDIA H100 80GB HBM3", "gpu", i // 4) for i in range(8)]  # 2 hosts x 4
    assert F.system_peak_flops(gpus)[:2] == (989e12, 8)
    monkeypatch.setenv("FOT_PEAK_FLOPS", "1e9")
    # 8 simulated CPU devices of 2 processes share their hosts' cores: the peak counts per host
    assert F.system_peak_flops([dev("cpu", "cpu", i // 4) for i in range(8)])[:2] == (1e9, 2)


# ------------------------------------------------------------------------------------------------
# multi-process launch

LAUNCH_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "SLURM_STEP_NODELIST", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri",
               "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.mark.parametrize("env, found", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "8"}, "SLURM"),
    ({"SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": "1"}, None),  # one task: nothing to join
    ({"OMPI_MCA_orte_hnp_uri": "1.2.3.4;tcp://x", "OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "TPU pod"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "TPU pod"),
])
def test_distributed_env_detects_multi_process_launchers(monkeypatch, env, found):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert S.distributed_env() == found


def test_initialize_distributed_follows_the_config(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    assert S.initialize_distributed("auto") is None and calls == []
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert S.initialize_distributed(False) is None and calls == []
    assert S.initialize_distributed("auto") == "JAX_COORDINATOR_ADDRESS"
    assert calls == [{"num_processes": 2, "process_id": 1}]
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(S.ShardingError, match="JAX_NUM_PROCESSES is set but JAX_PROCESS_ID is not"):
        S.initialize_distributed("auto")
    assert len(calls) == 1

    def fail(**kw):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    with pytest.raises(S.ShardingError, match=r"mesh.distributed=True \(no launcher found\): "
                                              r"jax.distributed.initialize failed: coordinator"):
        S.initialize_distributed(True)
