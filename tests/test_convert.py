"""Checkpoint import/export: round trips, HF loading of exports, atomic writes, overrides, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from hf_tiny import edit_config, hf_logits, make_hf, random_ids

import fot.convert
from fot import ConfigError, load_config, load_model
from fot.api import FotModel
from fot.checkpoint import CheckpointError, params_dict
from fot.data.tokenizer import ByteTokenizer
from fot.model.llama import init_model

ROOT = Path(__file__).resolve().parents[1]
F32_TOL = 1e-4


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
    return out


def assert_params_identical(a, b):
    fa, fb = flat(params_dict(a.module)), flat(params_dict(b.module))
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "fot.convert", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    make_hf(path, kv_heads=2)
    return path


def test_cli_round_trip_is_bit_identical(hf_dir, tmp_path):
    r = cli("import-hf", hf_dir, tmp_path / "fot")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fot" / "config.yaml").is_file() and (tmp_path / "fot" / "params").is_dir()
    r = cli("export-hf", tmp_path / "fot", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    first = load_model(hf_dir)
    assert_params_identical(first, load_model(tmp_path / "fot"))
    assert_params_identical(first, load_model(tmp_path / "hf"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("fmt", ["llama", "longllama"])
def test_export_loads_in_transformers(tmp_path, fmt):
    # llama: tied, with linear RoPE scaling (exported as rope_theta + rope_scaling)
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0} if fmt == "llama" else None
    hf = make_hf(tmp_path / "src", kv_heads=2, tied=fmt == "llama", rope_parameters=rope)
    model = load_model(tmp_path / "src", mem_layers=[1] if fmt == "longllama" else [])
    # longllama: also write sharded, to exercise the index path of the exporter
    fot.convert.export_hf(model, tmp_path / "out", fmt, max_shard_bytes=40_000 if fmt == "longllama" else 2 << 30)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == fmt
    if fmt == "longllama":
        assert cfg["mem_layers"] == [1] and "mem_positionals" in cfg and "last_context_length" in cfg
        assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    orig, new = hf.state_dict(), back.state_dict()
    assert orig.keys() == new.keys() and all(torch.equal(orig[k], new[k]) for k in orig)
    ids = random_ids(2, 21)
    assert np.abs(hf_logits(back, ids) - np.asarray(model.logits(ids))).max() <= F32_TOL
    assert np.abs(hf_logits(back, ids) - hf_logits(hf, ids)).max() == 0  # same weights, same config
    reloaded = load_model(tmp_path / "out")
    assert reloaded.config.memory.layers == model.config.memory.layers
    assert_params_identical(model, reloaded)


def test_failed_export_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    model = load_model(hf_dir)

    def half_write(dst, tensors, max_shard_bytes):
        (dst / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(fot.convert, "write_safetensors", half_write)
    with pytest.raises(OSError, match="disk full"):
        fot.convert.export_hf(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_overwrite(hf_dir, tmp_path):
    model = load_model(hf_dir)
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        fot.convert.export_hf(model, tmp_path / "out")
    fot.convert.export_hf(model, tmp_path / "out", overwrite=True)
    assert_params_identical(model, load_model(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_tiny_config_checkpoint_keeps_tokenizer_and_bf16_params(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny_model.yaml", ["model.param_dtype=bfloat16"])
    model = FotModel.random(cfg, seed=3, tokenizer=ByteTokenizer())
    model.save(tmp_path / "ckpt")
    back = load_model(tmp_path / "ckpt")
    assert back.config == cfg and isinstance(back.tokenizer, ByteTokenizer)
    assert flat(params_dict(back.module))["embed_tokens/embedding"].dtype.name == "bfloat16"
    assert_params_identical(model, back)
    ids = np.array([ByteTokenizer().encode("hello, world")])
    assert np.array_equal(np.asarray(model.logits(ids)), np.asarray(back.logits(ids)))


def test_override_rule(hf_dir):
    rope = {"rope_type": "linear", "factor": 4.0}
    m = load_model(hf_dir, rope_scaling=rope, mem_layers=[0], retrieval={"mode": "knn"},
                   **{"model.rope_theta": 500.0, "train.seed": 7})
    assert m.config.model.rope_scaling == rope and m.config.model.rope_theta == 500.0
    assert m.config.memory.layers == (0,) and m.config.retrieval.mode == "knn"
    assert m.config.train.seed == 7
    with pytest.raises(ConfigError, match=r"'seed' is ambiguous.*data\.seed"):
        load_model(hf_dir, seed=1)
    with pytest.raises(ConfigError, match=r"config\.json.*unknown override key 'hiden_size'"):
        load_model(hf_dir, hiden_size=8)
    with pytest.raises(ConfigError, match=r"config\.json.*memory\.layers contains 5"):
        load_model(hf_dir, mem_layers=[5])


def _bad(kind, src):
    """Break a copy of a good HF dir; return (cli args, strings the error line must contain)."""
    if kind == "no_config":
        (src / "config.json").unlink()
        return [], [str(src / "config.json"), "missing"]
    if kind == "no_weights":
        (src / "model.safetensors").unlink()
        return [], [str(src), "no weights"]
    if kind == "model_type":
        edit_config(src, model_type="mistral")
        return [], [str(src / "config.json"), "model_type", "mistral"]
    if kind == "shape":
        edit_config(src, intermediate_size=128)
        return [], [str(src / "model.safetensors"), "model.layers.0.mlp.gate_proj.weight", "(112, 64)", "(128, 64)"]
    if kind == "unknown_key":
        edit_config(src, sliding_window=4096)
        return [], [str(src / "config.json"), "'sliding_window'"]
    if kind == "corrupt":
        (src / "model.safetensors").write_bytes(b"not a safetensors file")
        return [], [str(src / "model.safetensors"), "not a readable safetensors file"]
    if kind == "bad_override":
        return ["model.num_attention_heads=5"], [str(src / "config.json"), "model.num_attention_heads=5"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no_config", "no_weights", "model_type", "shape", "unknown_key", "corrupt",
                                  "bad_override"])
def test_cli_bad_input_is_one_clear_line(hf_dir, tmp_path, kind):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    extra, must = _bad(kind, src)
    r = cli("import-hf", src, tmp_path / "dst", *extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    for s in must:
        assert s in lines[0], (s, lines[0])
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("change,must", [
    ({"hiden_size": 8}, ["config.yaml", "model.hiden_size"]),  # unknown key
    ({"intermediate_size": 128}, ["params", "layers/mlp/down_proj/kernel", "(2, 112, 64)", "(2, 128, 64)"]),
    ({"tie_word_embeddings": True}, ["params", "unexpected tensor 'lm_head/kernel'"]),
])
def test_cli_bad_fot_checkpoint(hf_dir, tmp_path, change, must):
    load_model(hf_dir).save(tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "config.yaml"
    cfg = yaml.safe_load(f.read_text())
    cfg["model"].update(change)
    f.write_text(yaml.safe_dump(cfg))
    r = cli("export-hf", tmp_path / "ckpt", tmp_path / "out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    for s in must:
        assert s in lines[0], (s, lines[0])
    assert str(tmp_path / "ckpt") in lines[0]
    assert not (tmp_path / "out").exists()


def test_initializer_range_travels_and_sets_the_init_std(tmp_path):
    make_hf(tmp_path / "src", initializer_range=0.05)
    model = load_model(tmp_path / "src")
    assert model.config.model.initializer_range == 0.05
    fot.convert.export_hf(model, tmp_path / "out", "llama")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["initializer_range"] == 0.05
    for std in (0.02, 0.1):
        m = init_model(load_config(ROOT / "configs/tiny.yaml", [f"model.initializer_range={std}"]).model)
        w = np.asarray(m.layers.self_attn.q_proj.kernel[...])
        assert abs(w.std() / std - 1) < 0.02, (std, w.std())
