"""Config files: every shipped YAML loads; bad keys, types and values name the key and the file."""

import dataclasses
from pathlib import Path

import jax
import pytest
from flax import nnx

from fot.config import ConfigError, load_config
from fot.model.llama import Llama

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# configs/experiments/ add experiment/sweep blocks: tests/test_experiments.py loads those.
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] != "experiments")


def test_shipped_model_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"openllama_3b.yaml", "openllama_7b.yaml", "openllama_13b.yaml", "tiny_model.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
def test_every_shipped_yaml_loads(path):
    load_config(path)


@pytest.mark.parametrize("name,params", [
    # Published sizes of OpenLLaMA 3B / 7B / 13B (= LLaMA 7B / 13B).
    ("openllama_3b.yaml", 3_426_473_600),
    ("openllama_7b.yaml", 6_738_415_616),
    ("openllama_13b.yaml", 13_015_864_320),
])
def test_openllama_parameter_counts(name, params):
    cfg = load_config(CONFIGS / name)
    model = nnx.eval_shape(lambda: Llama(cfg.model, cfg.memory, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == params


def test_tiny_model_uses_byte_tokenizer():
    cfg = load_config(CONFIGS / "tiny_model.yaml")
    assert cfg.data.tokenizer == "byte" and cfg.model.vocab_size == 259


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,key", [
    ("model:\n  hidden_sise: 64\n", "model.hidden_sise"),  # unknown key
    ("model:\n  hidden_size: big\n", "model.hidden_size"),  # wrong type
    ("model:\n  hidden_size: 64\n  num_attention_heads: 5\n", "model.num_attention_heads"),  # impossible
    ("modle:\n  hidden_size: 64\n", "modle"),  # unknown section
])
def test_bad_yaml_names_key_and_file(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and key in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("train.learning_rate", ".nan"), ("train.learning_rate", -1), ("train.learning_rate", 0),
    ("train.clip_norm", -1), ("train.warmup_steps", -5), ("train.b2", 1.5), ("train.b1", 1.0),
    ("train.eps", 0), ("train.weight_decay", -0.1), ("train.min_lr_ratio", 2), ("train.window", 0),
    ("model.rms_norm_eps", 0), ("model.rope_theta", ".inf"), ("model.initializer_range", -0.02),
    ("retrieval.capacity", 0), ("retrieval.knn_k", -1), ("retrieval.last_context_length", -1),
])
def test_impossible_hyperparameters_name_the_key_and_file(tmp_path, key, value):
    section, name = key.split(".")
    path = _write(tmp_path, f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and f"{key} must be" in str(e.value)


def test_cross_section_training_checks_live_in_the_config(tmp_path):
    """grad_accum must split the batch into whole packs (any config); crossbatch needs memory
    layers, which only a training run requires (a plain model loads for inference as it is)."""
    path = _write(tmp_path, "train:\n  batch_size: 8\n  pack_size: 4\n  grad_accum: 4\n")
    with pytest.raises(ConfigError, match=r"train.grad_accum=4 must split train.batch_size=8") as e:
        load_config(path)
    assert str(path) in str(e.value)
    plain = load_config(_write(tmp_path, "train:\n  cross_batch_range: 2\n"))
    assert plain.memory.layers == ()
    with pytest.raises(ConfigError, match=r"cross_batch_range > 0 needs memory layers"):
        plain.validate_training()
    assert plain.replace(train=dataclasses.replace(plain.train, cross_batch_range=0)).validate_training()


def test_overrides(tmp_path):
    cfg = load_config(CONFIGS / "tiny_model.yaml", ["model.hidden_size=128", "memory.layers=[1]",
                                                    "model.rope_scaling={rope_type: linear, factor: 2.0}"])
    assert cfg.model.hidden_size == 128 and cfg.memory.layers == (1,)
    assert cfg.model.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match=r"tiny_model\.yaml.*model\.hidden_sise"):
        load_config(CONFIGS / "tiny_model.yaml", ["model.hidden_sise=3"])
    with pytest.raises(ConfigError, match=r"tiny_model\.yaml.*memory\.layers contains 7"):
        load_config(CONFIGS / "tiny_model.yaml", ["memory.layers=[7]"])


def test_retrieval_settings_are_their_own_section_and_the_old_names_still_read(tmp_path):
    """The module is built from `memory` alone; a config saved before the split (retrieval settings
    under `memory`) and overrides with those names read as the `retrieval` section."""
    from fot.config import MemoryConfig, inference_only, trajectory_changes

    assert {f.name for f in dataclasses.fields(MemoryConfig)} == {"layers", "positionals", "gate"}
    old = _write(tmp_path, "memory:\n  layers: [0]\n  retrieval: knn\n  knn_k: 7\n  capacity: 4096\n"
                           "  last_context_length: 32\n  dtype: float32\n")
    cfg = load_config(old, ["memory.ivf_probe=3", "memory.on_full=drop_oldest"])
    assert cfg.memory == MemoryConfig(layers=(0,))
    r = cfg.retrieval
    assert (r.mode, r.knn_k, r.capacity, r.last_context_length, r.dtype, r.ivf_probe, r.on_full) == (
        "knn", 7, 4096, 32, "float32", 3, "drop_oldest")
    assert load_config(old, ["retrieval.mode=ivf"]).retrieval.mode == "ivf"  # an override wins
    assert inference_only("memory.knn_k") and inference_only("retrieval.capacity")
    assert not inference_only("memory.layers") and not inference_only("train.steps")
    assert trajectory_changes(cfg, load_config(old, ["retrieval.mode=dense", "memory.knn_k=1"])) == {}
    assert list(trajectory_changes(cfg, load_config(old, ["memory.positionals=false"]))) == ["memory.positionals"]


def test_base_file_is_merged_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {hidden_size: 64, num_attention_heads: 4, "
                                        "intermediate_size: 128, num_hidden_layers: 2}\n"
                                        "train: {steps: 7, batch_size: 4}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {steps: 9}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.model.hidden_size, cfg.train.steps, cfg.train.batch_size) == (64, 9, 4)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loop.yaml: base 'loop.yaml' includes itself"):
        load_config(tmp_path / "loop.yaml")


def test_exponent_floats_parse_as_yaml_1_2_does():
    cfg = load_config(None, ["train.learning_rate=1e-3", "train.eps=1E-8"])
    assert (cfg.train.learning_rate, cfg.train.eps) == (1e-3, 1e-8)
    with pytest.raises(ConfigError, match="train.learning_rate = 'fast' is not a valid float"):
        load_config(None, ["train.learning_rate=fast"])
