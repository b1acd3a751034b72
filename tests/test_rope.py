"""RoPE scaling types against transformers' implementation (frequencies and full-model logits)."""

import itertools

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from fot.config import ConfigError, ModelConfig, config_from_dict
from fot.convert import load_model
from fot.model import rope

HEADS = 2


def scalings(factor: float, dim: int) -> list[dict]:
    """One or more rope dicts per type (the yarn/longrope variants exercise every optional key)."""
    ramp = np.linspace(1.0, factor, dim // 2).tolist()
    return [
        {"rope_type": "linear", "factor": factor},
        {"rope_type": "dynamic", "factor": factor},
        {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 512},
        {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 512, "mscale": 0.707,
         "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "truncate": False},
        {"rope_type": "yarn", "factor": factor, "attention_factor": 0.8},
        {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 512},
        {"rope_type": "longrope", "short_factor": [1.0] * (dim // 2), "long_factor": ramp,
         "original_max_position_embeddings": 512},
        {"rope_type": "longrope", "short_factor": ramp[::-1], "long_factor": ramp, "factor": factor,
         "attention_factor": 1.3, "original_max_position_embeddings": 512},
    ]


def hf_config(scaling: dict | None, dim: int, theta: float, max_pos: int, **kw) -> LlamaConfig:
    params = {"rope_type": "default"} if scaling is None else dict(scaling)
    params["rope_theta"] = theta
    return LlamaConfig(hidden_size=dim * HEADS, num_attention_heads=HEADS, max_position_embeddings=max_pos,
                       rope_parameters=params, **kw)


def fot_config(scaling: dict | None, dim: int, theta: float, max_pos: int, **kw) -> ModelConfig:
    cfg = ModelConfig(hidden_size=dim * HEADS, num_attention_heads=HEADS, max_position_embeddings=max_pos,
                      rope_theta=theta, rope_scaling=None if scaling is None else dict(scaling), **kw)
    cfg.validate("<test>")
    return cfg


def assert_rel(ours: np.ndarray, ref, tol: float = 1e-6):
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    rel = np.max(np.abs(np.asarray(ours, np.float64) / ref - 1))
    assert rel <= tol, rel


GRID = list(itertools.product([1.0, 2.0, 8.0], [16, 64, 128], [10000.0, 500000.0]))


@pytest.mark.parametrize("factor,dim,theta", GRID)
def test_init_functions_match_transformers(factor, dim, theta):
    ref_inv, ref_af = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config(None, dim, theta, 2048))
    inv, af = rope.rope_frequencies(fot_config(None, dim, theta, 2048))
    assert_rel(inv, ref_inv)
    assert af == ref_af == 1.0
    for sc in scalings(factor, dim):
        ref_inv, ref_af = ROPE_INIT_FUNCTIONS[sc["rope_type"]](hf_config(sc, dim, theta, 2048), None)
        inv, af = rope.rope_frequencies(fot_config(sc, dim, theta, 2048))
        assert_rel(inv, ref_inv)
        assert abs(af / ref_af - 1) <= 1e-6, (sc, af, ref_af)


@pytest.mark.parametrize("factor,dim,theta", [(2.0, 64, 10000.0), (8.0, 128, 500000.0), (4.0, 16, 10000.0)])
def test_length_dependent_types_follow_transformers_update(factor, dim, theta):
    """dynamic and longrope recompute from max(position)+1 inside the rotary forward."""
    for sc in scalings(factor, dim):
        if sc["rope_type"] not in ("dynamic", "longrope"):
            continue
        for seq_len in (100, 512, 513, 1024, 2048, 2049, 5000, 20000):
            emb = LlamaRotaryEmbedding(hf_config(sc, dim, theta, 512))  # fresh: the update is stateful
            emb(torch.zeros(1), torch.arange(seq_len)[None])
            inv, af = rope.rope_frequencies(fot_config(sc, dim, theta, 512), seq_len)
            assert_rel(inv, emb.inv_freq)
            assert abs(af / emb.attention_scaling - 1) <= 1e-6


@pytest.mark.parametrize("factor,dim,theta", GRID)
def test_ntk_is_default_with_scaled_base(factor, dim, theta):
    base = theta * factor ** (dim / (dim - 2))
    ref_inv, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config(None, dim, base, 2048))
    inv, af = rope.rope_frequencies(fot_config({"type": "ntk", "factor": factor}, dim, theta, 2048))
    assert_rel(inv, ref_inv)
    assert af == 1.0


def test_old_and_new_hf_dict_styles():
    """`type` (old rope_scaling) and `rope_type` + `rope_theta` (new rope_parameters) are the same."""
    old = rope.rope_frequencies(fot_config({"type": "linear", "factor": 4.0}, 64, 500000.0, 2048))
    new = rope.rope_frequencies(fot_config({"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
                                           64, 10000.0, 2048))
    np.testing.assert_array_equal(old[0], new[0])
    linear = {"rope_type": "linear", "factor": 4.0}
    ref, _ = ROPE_INIT_FUNCTIONS["linear"](hf_config(linear, 64, 500000.0, 2048))
    assert_rel(old[0], ref)


# -- full model against LlamaForCausalLM ---------------------------------------------------------

ORIG = 16  # original context; inputs are 4x longer
MODEL = dict(vocab_size=97, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=1)
FULL = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},  # dynamic scales past max_position_embeddings
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIG},
    "longrope": {"rope_type": "longrope", "short_factor": np.linspace(1.0, 1.5, 8).tolist(),
                 "long_factor": np.linspace(1.0, 6.0, 8).tolist(), "original_max_position_embeddings": ORIG},
    "ntk": {"rope_type": "ntk", "factor": 4.0},
}


def sharp_model(config: LlamaConfig) -> LlamaForCausalLM:
    """Random model with larger q/k weights: peaked attention, so positions visibly change logits."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return hf


@pytest.mark.parametrize("kind", list(FULL))
def test_full_model_logits_match_transformers(kind, tmp_path):
    """The rope dict travels through config.json (fot.convert.load_model) into the forward pass."""
    scaling, theta, dim = FULL[kind], 10000.0, 16
    # dynamic scales relative to max_position_embeddings, the others to original_max_position_embeddings.
    max_pos = ORIG if kind == "dynamic" else 4 * ORIG
    overrides = {}
    if kind == "ntk":  # not a transformers type: the reference is plain RoPE with the scaled base
        hf = sharp_model(hf_config(None, dim, theta * 4.0 ** (dim / (dim - 2)), max_pos, **MODEL))
        overrides = {"rope_theta": theta, "rope_scaling": scaling}  # fot.load_model(..., rope_scaling=...)
    else:
        hf = sharp_model(hf_config(scaling, dim, theta, max_pos, **MODEL))
    hf.save_pretrained(tmp_path)
    ids = np.random.RandomState(1).randint(0, 97, (2, 4 * ORIG))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    for impl in ("plain", "blockwise") if kind == "yarn" else ("plain",):
        model = load_model(tmp_path, attention=impl, attention_block_size=16, **overrides)
        assert rope.rope_type(model.config.model.rope_scaling) == kind
        out = np.asarray(model.logits(ids))
        assert np.abs(out - ref).max() <= 1e-4, (kind, impl, np.abs(out - ref).max())


# -- bad configs ---------------------------------------------------------------------------------

BAD = [
    ({"rope_type": "ntk-by-parts", "factor": 2.0}, "model.rope_scaling.rope_type"),
    ({"type": "nope"}, "model.rope_scaling.type"),
    ({"rope_type": "linear", "factor": 0.5}, "model.rope_scaling.factor"),
    ({"rope_type": "yarn", "factor": 0.9}, "model.rope_scaling.factor"),
    ({"rope_type": "dynamic"}, "model.rope_scaling.factor"),
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "model.rope_scaling.low_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "model.rope_scaling.high_freq_factor"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8}, "model.rope_scaling.long_factor"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8},
     "model.rope_scaling.short_factor"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 9},
     "model.rope_scaling.long_factor"),
    ({"rope_type": "linear", "factor": 2.0, "facter": 3.0}, "model.rope_scaling.facter"),
]


@pytest.mark.parametrize("scaling,key", BAD)
def test_bad_rope_config_names_the_key(scaling, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict({"model": {"hidden_size": 32, "num_attention_heads": 2, "rope_scaling": scaling}})


def test_rope_scaling_from_yaml(tmp_path):
    from fot.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_attention_heads: 2\n  max_position_embeddings: 64\n"
                    "  rope_scaling: {rope_type: yarn, factor: 4.0, original_max_position_embeddings: 16}\n")
    inv, af = rope.rope_frequencies(load_config(path).model)
    ref_inv, ref_af = ROPE_INIT_FUNCTIONS["yarn"](
        hf_config({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 32, 10000.0, 64))
    assert_rel(inv, ref_inv)
    assert abs(af / ref_af - 1) <= 1e-6 and af > 1.1
