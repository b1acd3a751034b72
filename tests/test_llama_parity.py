"""fot's LLaMA against transformers' LlamaForCausalLM on tiny random models loaded from disk."""

import numpy as np
import pytest

from hf_tiny import edit_config, hf_logits, make_hf, random_ids

from fot import load_model

F32_TOL = 1e-4  # max |fot - HF| on logits, float32
BF16_REL_TOL = 2e-2  # max |bf16 - f32| / max |f32|


@pytest.mark.parametrize("heads,kv_heads,tied,weights,shard", [
    (4, 4, False, "safetensors", None),  # MHA, untied
    (4, 2, True, "safetensors", None),  # GQA, tied
    (4, 1, False, "bin", None),  # MQA, pytorch_model.bin
    (4, 4, True, "bin", None),  # tied .bin (holds a redundant lm_head.weight)
    (4, 2, False, "safetensors", "20KB"),  # sharded safetensors with an index
    (4, 2, True, "bin", "2 shards"),  # sharded .bin with an index
])
def test_logits_match_hf(tmp_path, heads, kv_heads, tied, weights, shard):
    hf = make_hf(tmp_path, heads=heads, kv_heads=kv_heads, tied=tied, weights=weights, max_shard_size=shard)
    if shard:
        stem = "pytorch_model" if weights == "bin" else "model"
        assert (tmp_path / f"{stem}.{weights}.index.json").is_file()
        assert len(list(tmp_path.glob(f"{stem}-*.{weights}"))) > 1
    if weights == "bin":
        assert not list(tmp_path.glob("*.safetensors"))
    model = load_model(tmp_path)
    assert model.config.model.kv_heads == kv_heads and model.config.model.tie_word_embeddings == tied
    ids = random_ids(3, 19)
    diff = np.abs(np.asarray(model.logits(ids)) - hf_logits(hf, ids)).max()
    assert diff <= F32_TOL, diff


def test_rope_scaling_kept_and_matches(tmp_path):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    hf = make_hf(tmp_path, kv_heads=2, rope_parameters=rope)
    model = load_model(tmp_path)
    assert model.config.model.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert model.config.model.rope_theta == 5000.0
    ids = random_ids(2, 40)
    assert np.abs(np.asarray(model.logits(ids)) - hf_logits(hf, ids)).max() <= F32_TOL


def test_bf16_compute_close_to_f32(tmp_path):
    hf = make_hf(tmp_path, kv_heads=2)
    ids = random_ids(2, 33)
    ref = hf_logits(hf, ids)
    model = load_model(tmp_path, dtype="bfloat16")
    assert model.config.model.dtype == "bfloat16"
    out = np.asarray(model.logits(ids))
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < rel <= BF16_REL_TOL, rel  # > 0: the forward really ran in bf16


def test_longllama_config_keeps_memory_fields(tmp_path):
    hf = make_hf(tmp_path, kv_heads=2)
    edit_config(tmp_path, model_type="longllama", architectures=["LongLlamaForCausalLM"], mem_layers=[1],
                mem_positionals=True, mem_dtype="float32", last_context_length=16, mem_attention_grouping=None,
                torch_attention=True, gradient_checkpoint_every_ith=1)
    model = load_model(tmp_path)
    mem, ret = model.config.memory, model.config.retrieval
    assert (mem.layers, mem.positionals, ret.dtype, ret.last_context_length) == ((1,), True, "float32", 16)
    # With no memory attached, a LongLLaMA (positionals on) computes exactly what LLaMA does.
    ids = random_ids(2, 17)
    assert np.abs(np.asarray(model.logits(ids)) - hf_logits(hf, ids)).max() <= F32_TOL


GRAD_TOL = 1e-5  # max |fot - HF| over every parameter's gradient, relative to that gradient's max


@pytest.mark.parametrize("heads,kv_heads,tied,train_window", [(4, 4, False, False), (4, 2, True, False),
                                                              (4, 2, True, True)])
def test_gradients_match_hf(tmp_path, monkeypatch, heads, kv_heads, tied, train_window):
    """The training loss's gradient for every weight equals torch autograd's through transformers:
    the projections' and the attention's own backward passes (custom VJPs) against autodiff.
    `train_window`: through the train step's forward, whose attention reads query blocks (of 8
    here) each with only the keys up to its end."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from flax import nnx

    from fot import train
    from fot.hf import params_to_hf
    from fot.model import attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)

    hf = make_hf(tmp_path, heads=heads, kv_heads=kv_heads, tied=tied)
    model = load_model(tmp_path)
    ids = random_ids(2, 33)
    graphdef, params, rest = nnx.split(model.module, nnx.Param, ...)

    def loss(p):
        module, inputs = nnx.merge(graphdef, p, rest), jnp.asarray(ids[:, :-1])
        logits = train.forward(module, inputs, 0, 1, False) if train_window else module(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(ids[:, 1:])).mean()

    grads = params_to_hf(nnx.to_pure_dict(jax.grad(loss)(params)), model.config.model.num_hidden_layers)
    hf.zero_grad()
    logits = hf(torch.as_tensor(ids[:, :-1])).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.as_tensor(ids[:, 1:]).flatten()).backward()
    want = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    assert set(want) <= set(grads)
    for name, g in want.items():
        scale = np.abs(g).max()
        assert scale > 0, name
        assert np.abs(grads[name] - g).max() <= GRAD_TOL * scale, name
