"""LoRA (fot/model/lora.py, fot/lora.py) against independent references: numpy for the merge and
the extraction, transformers + peft for the PEFT round trip; training changes only what it trains."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx, traverse_util
from transformers import LlamaForCausalLM

from hf_tiny import hf_logits, make_hf, random_ids
from test_train import TINY, write_config

from fot import ConfigError, load_config, load_model
from fot import lora as L
from fot.api import FotModel
from fot.checkpoint import params_dict
from fot.config import LoraConfig, config_from_dict
from fot.convert import export_hf, main as convert_main
from fot.model.lora import is_trainable, set_dropout_keys
from fot.train import StepPlan, forward, main as train_main

F32_TOL = 1e-4  # max |fot - transformers+peft| on logits: the HF parity tolerance (test_llama_parity)
MERGE_TOL = 1e-6  # max |merged kernel - numpy float64 W + (alpha/r) B A|: float32 rounding of O(1) values
ALL = ("q", "k", "v", "o", "gate", "up", "down")
TINY_CFG = config_from_dict({k: TINY[k] for k in ("model", "memory", "data")})


def flat(model: FotModel) -> dict[tuple, np.ndarray]:
    return {p: np.asarray(v) for p, v in traverse_util.flatten_dict(params_dict(model.module)).items()}


def with_lora(model: FotModel, seed: int = 0, zero_b: bool = False, **lora) -> FotModel:
    """`model` (no adapters) with random adapters (B = 0 with zero_b) and, with LoRA+, perturbed
    embeddings / norms: what a LoRA fine-tune could have produced."""
    cfg = model.config.replace(model=dataclasses.replace(model.config.model, lora=LoraConfig(**lora)))
    shapes = flat(FotModel.random(cfg, seed))
    base, rng = flat(model), np.random.RandomState(seed)
    out = {}
    for p, v in shapes.items():
        if "lora" in p:
            out[p] = np.zeros_like(v) if zero_b and p[-1] == "lora_b" else rng.normal(0, 0.3, v.shape)
        elif is_trainable(cfg.model.lora, p) and not zero_b:
            out[p] = base[p] + rng.normal(0, 0.1, v.shape)
        else:
            out[p] = base[p]
    return FotModel.from_params(cfg, traverse_util.unflatten_dict(out), model.tokenizer)


@pytest.mark.parametrize("override, key", [
    ("model.lora.rank=-1", "model.lora.rank"),
    ("model.lora.targets=[q,qkv]", "model.lora.targets"),
    ("model.lora.targets=[q,q]", "model.lora.targets"),
    ("model.lora.rank=33", "model.lora.rank"),  # > hidden 32
    ("model.lora.dropout=1.0", "model.lora.dropout"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.train_norms=true", "model.lora.train_norms"),  # without rank
])
def test_bad_lora_config_is_a_one_line_error(tmp_path, override, key):
    extra = [] if "rank" in override or "train_norms" in override else ["model.lora.rank=2"]
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path), [override, *extra])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_zero_b_is_the_base_and_merge_is_w_plus_scaled_ba():
    base = FotModel.random(TINY_CFG, seed=1)
    ids = np.random.RandomState(0).randint(0, 259, (2, 24))
    fresh = with_lora(base, zero_b=True, rank=2, targets=ALL)
    assert np.array_equal(np.asarray(fresh.logits(ids)), np.asarray(base.logits(ids)))

    m = with_lora(base, rank=3, alpha=5.0, targets=ALL)
    merged = L.merge(m)
    assert merged.config.model.lora.rank == 0
    got, lo, b0 = flat(merged), flat(m), flat(base)
    assert got.keys() == b0.keys()
    for t in ALL:
        at = (*L.KERNELS[t].fot[:-1],)
        for i in range(2):  # PEFT's notation: W [out, in], A [r, in], B [out, r]
            w = b0[at + ("kernel",)][i].T.astype(np.float64)
            a, b = lo[at + ("lora", "lora_a")][i].T, lo[at + ("lora", "lora_b")][i].T
            want = w + 5.0 / 3 * (b.astype(np.float64) @ a.astype(np.float64))
            assert np.abs(got[at + ("kernel",)][i].T - want).max() <= MERGE_TOL, (t, i)
    for p in b0:
        if p[-1] != "kernel" or p[-2] not in [f"{t}_proj" for t in ALL]:
            assert np.array_equal(got[p], lo[p]), p
    assert np.abs(np.asarray(merged.logits(ids)) - np.asarray(m.logits(ids))).max() <= 1e-5


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny random HF LLaMA, fot's model of it, and that model exported by export_hf."""
    tmp = tmp_path_factory.mktemp("hf")
    make_hf(tmp / "hf")
    base = load_model(tmp / "hf")
    return tmp, base, export_hf(base, tmp / "exported")


def _peft_model(path, adapter):
    return peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(path), adapter).eval()


def test_exported_adapter_gives_fot_logits_in_peft_and_imports_back(hf_base, tmp_path):
    _, base, exported = hf_base
    m = with_lora(base, rank=4, alpha=8.0, targets=ALL, train_embeddings=True, train_norms=True)
    L.export_peft(m, tmp_path / "adapter")
    ids = random_ids(2, 16)
    fot_logits = np.asarray(m.logits(ids))
    assert np.abs(fot_logits - np.asarray(base.logits(ids))).max() > 100 * F32_TOL  # the adapter matters
    assert np.abs(hf_logits(_peft_model(exported, tmp_path / "adapter"), ids) - fot_logits).max() <= F32_TOL

    back = L.import_peft(base, tmp_path / "adapter")
    assert back.config.model.lora == m.config.model.lora
    want, got = flat(m), flat(back)
    assert want.keys() == got.keys() and all(np.array_equal(want[p], got[p]) for p in want)


def test_adapter_saved_by_peft_imports_with_peft_logits(hf_base, tmp_path):
    tmp, base, _ = hf_base
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "up_proj"],
                          modules_to_save=["norm"], init_lora_weights=False)  # random B too
    pm = peft.get_peft_model(LlamaForCausalLM.from_pretrained(tmp / "hf"), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "adapter")
    m = L.import_peft(base, tmp_path / "adapter")
    assert m.config.model.lora == LoraConfig(rank=2, alpha=5.0, targets=("q", "v", "up"), train_norms=True)
    ids = random_ids(2, 16, seed=1)
    assert np.abs(np.asarray(m.logits(ids)) - hf_logits(pm, ids)).max() <= F32_TOL


def test_bad_lora_inputs_are_one_line_errors(hf_base, tmp_path, capsys):
    tmp, base, _ = hf_base
    L.export_peft(with_lora(base, rank=2, targets=("q", "k")), tmp_path / "ok")

    def error(*argv) -> str:
        capsys.readouterr()  # (transformers' progress bars)
        assert convert_main([*map(str, argv)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "no LoRA adapters" in error("export-peft", tmp / "hf", tmp_path / "x")
    assert "no LoRA adapters" in error("merge-lora", tmp / "hf", tmp_path / "x")
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "ok", other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["query_key_value"]}))
    assert "another architecture" in error("import-peft", tmp / "hf", other, tmp_path / "x")
    make_hf(tmp_path / "narrow", kv_heads=2)  # k_proj is 64 -> 32 there, not 64 -> 64
    assert "k_proj.lora_B.weight' has shape" in error("import-peft", tmp_path / "narrow", tmp_path / "ok",
                                                          tmp_path / "x")
    assert "--rank" in error("extract-lora", tmp / "hf", tmp / "hf", tmp_path / "x", "--rank", "0")
    assert not (tmp_path / "x").exists()


def test_training_changes_only_adapters_and_norms(tmp_path):
    """Continued pre-training of a checkpoint with LoRA (crossbatch, a memory layer, remat, dropout,
    two micro-batches): the base weights stay bit-identical, and only the trained parameters have
    optimizer state."""
    FotModel.random(TINY_CFG, seed=2).save(tmp_path / "base")
    lora = {"rank": 2, "dropout": 0.1, "targets": ["q", "v", "down"], "train_norms": True}
    cfg = write_config(tmp_path, model={"lora": lora, "remat_policy": "full"},
                       train={"steps": 2, "grad_accum": 2, "init_from": str(tmp_path / "base")})
    assert train_main([str(cfg), f"train.run_dir={tmp_path / 'run'}", "--no-progress"]) == 0
    before, after = flat(load_model(tmp_path / "base")), flat(load_model(tmp_path / "run" / "final"))
    trained = {p for p in after if "lora" in p or p[-2].endswith("norm")}
    assert trained - before.keys() == {p for p in after if "lora" in p}
    for p in before:
        assert np.array_equal(before[p], after[p]) == (p not in trained), p
    assert all(np.any(after[p] != 0) for p in after if p[-1] == "lora_b")  # B left zero

    plan = StepPlan(load_config(cfg), jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1),
                                                        ("data", "fsdp", "tensor", "sequence")))
    full = StepPlan(load_config(cfg, ["model.lora.rank=0", "model.lora.train_norms=false"]), plan.mesh)
    for moment in ("mu", "nu"):
        got = traverse_util.flatten_dict(optax.tree_utils.tree_get(plan.abstract["opt_state"], moment))
        assert set(got) == trained
    n_other = len(jax.tree.leaves(full.abstract["opt_state"])) - 2 * len(before)  # step counts
    assert len(jax.tree.leaves(plan.abstract["opt_state"])) == 2 * len(trained) + n_other
    assert plan.param_count(trainable_only=True) < plan.param_count() / 10


def test_dropout_masks_only_with_keys():
    m = with_lora(FotModel.random(TINY_CFG), rank=2, dropout=0.5)
    graphdef, state = nnx.split(m.module)
    ids = np.random.RandomState(0).randint(0, 259, (1, 16))

    @jax.jit
    def run(key):
        module = nnx.merge(graphdef, state)
        if key is not None:
            set_dropout_keys(module, key)
        return module(ids)

    plain, k0, k0b, k1 = run(None), run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    assert np.abs(plain - np.asarray(m.logits(ids))).max() <= 1e-6  # (another compiled program)
    assert np.array_equal(k0, k0b) and not np.allclose(k0, k1) and not np.allclose(k0, plain)


def test_remat_covers_the_memory_layers():
    """remat_policy wraps the memory layer (run on its own) as well as the scanned plain layer;
    the gradients do not change."""
    ids = np.random.RandomState(0).randint(0, 259, (4, 16))

    def grads(policy):
        cfg = TINY_CFG.replace(model=dataclasses.replace(TINY_CFG.model, remat_policy=policy))
        graphdef, params, rest = nnx.split(FotModel.random(cfg, seed=3).module, nnx.Param, ...)
        loss = lambda p: forward(nnx.merge(graphdef, p, rest), ids, 3, 4, True).sum()
        return str(jax.make_jaxpr(loss)(params)).count("remat"), jax.jit(jax.grad(loss))(params)

    (n_none, g_none), (n_full, g_full) = grads("none"), grads("full")
    # crossbatch in a layer this small reads its sources unrolled, with no remat of its own
    # (crossbatch.UNROLL_BYTES); the policy adds one per segment: the plain layer 0 and the memory
    # layer 1
    assert (n_none, n_full) == (0, 2)
    for a, b in zip(jax.tree.leaves(g_none), jax.tree.leaves(g_full)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(a)).max()


def test_a_lora_step_holds_no_compute_dtype_copy_of_the_frozen_kernels(tmp_path):
    """Float32 weights, bfloat16 compute: the frozen layer kernels are cast as each layer uses them.
    Cast all at once before the layers run, XLA kept a bfloat16 copy of every one through the step
    (the 3B shape on one device: 1.7 -> 14.4 GiB of temporaries). At this shape the kernels
    dominate: the step's temporaries must stay below the size of that copy."""
    from fot.train import dry_run

    h, inter, layers = 256, 1024, 4
    cfg = load_config(write_config(
        tmp_path, model={"hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
                         "num_attention_heads": 4, "param_dtype": "float32", "dtype": "bfloat16",
                         "remat_policy": "full", "lora": {"rank": 4}},
        train={"batch_size": 2, "pack_size": 1, "cross_batch_range": 0}))
    copy_bytes = layers * (4 * h * h + 3 * h * inter) * 2  # q, k, v, o, gate, up, down in bfloat16
    assert dry_run(cfg)["memory_per_device"]["temp"] < copy_bytes


def test_lora_params_shard_like_their_kernels():
    from fot.sharding import logical_to_mesh_spec
    from jax.sharding import PartitionSpec as P

    m = with_lora(FotModel.random(TINY_CFG), rank=2, targets=("q", "down"))
    specs = nnx.get_partition_spec(nnx.state(m.module, nnx.Param))["layers"]
    spec = lambda v: logical_to_mesh_spec(tuple(v.get_value()))
    assert spec(specs["self_attn"]["q_proj"]["lora"]["lora_a"]) == P(None, "fsdp", None)
    assert spec(specs["self_attn"]["q_proj"]["lora"]["lora_b"]) == P(None, None, "tensor")
    assert spec(specs["mlp"]["down_proj"]["lora"]["lora_a"]) == P(None, "tensor", None)
    assert spec(specs["mlp"]["down_proj"]["lora"]["lora_b"]) == P(None, None, "fsdp")


def test_extract_recovers_a_planted_low_rank_difference():
    base = FotModel.random(TINY_CFG, seed=4)
    rng = np.random.RandomState(0)
    tuned = flat(base)
    q, o = ("layers", "self_attn", "q_proj", "kernel"), ("layers", "self_attn", "o_proj", "kernel")
    planted = np.einsum("lir,lro->lio", rng.normal(0, 0.1, (2, 32, 2)), rng.normal(0, 0.1, (2, 2, 32)))
    tuned[q] = tuned[q] + planted
    tuned[o] = tuned[o] + rng.normal(0, 0.01, tuned[o].shape)  # full rank
    tuned[("norm", "weight")] = tuned[("norm", "weight")] + 0.1  # outside the targets
    tuned = FotModel.from_params(base.config, traverse_util.unflatten_dict(tuned))
    model, errors = L.extract(tuned, base, rank=2, targets=("q", "o"))
    merged, want, b0 = flat(L.merge(model)), flat(tuned), flat(base)
    for i in range(2):
        assert errors[f"layers.{i}.q_proj"] <= 1e-6
        assert np.abs(merged[q][i] - want[q][i]).max() <= MERGE_TOL
        d = (want[o][i] - b0[o][i]).astype(np.float64)
        s = np.linalg.svd(d, compute_uv=False)  # Eckart-Young: the best rank-2 error
        best = np.sqrt(np.sum(s[2:] ** 2)) / np.linalg.norm(d)
        assert errors[f"layers.{i}.o_proj"] == pytest.approx(best, rel=1e-6)
        got = np.linalg.norm(merged[o][i] - want[o][i]) / np.linalg.norm(d)
        assert got == pytest.approx(best, rel=1e-3)  # what the stored float32 adapter achieves
    assert errors["norm/weight"] == 1.0 and len(errors) == 5
