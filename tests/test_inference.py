"""Long-input inference, generation and saved memory against a float64 NumPy LongLLaMA reference."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from fot.api import FotModel
from fot.config import config_from_dict
from fot.inference import Session, logprobs_long
from fot.model.memory import store as memlib
from fot.model.memory.store import MemoryCapacityError
from tests.longllama_ref import LongLlamaRef

W, LCL, V = 16, 8, 64


def tiny(positionals=True, retrieval="dense", layers=(1,), capacity=512, on_full="error", knn_k=128,
         seed=0, mem_dtype="float32", **model):
    cfg = config_from_dict({
        "model": {**dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=W),
                  **model},
        "memory": dict(layers=list(layers), positionals=positionals),
        "retrieval": dict(mode=retrieval, knn_k=knn_k, dtype=mem_dtype, capacity=capacity, on_full=on_full,
                          last_context_length=LCL)})
    return FotModel.random(cfg, seed=seed)


def ids_of(n, batch=1, seed=0):
    return np.random.RandomState(seed).randint(0, V, (batch, n))


@pytest.mark.parametrize("positionals", [True, False])
@pytest.mark.parametrize("windows", [1, 3.5, 10])
def test_logits_long_matches_numpy_reference(positionals, windows):
    model = tiny(positionals)
    ids = ids_of(int(windows * W), batch=2, seed=int(windows * 2))
    got = np.asarray(model.logits_long(ids))
    ref = LongLlamaRef(model.module, W, LCL).long(ids)
    assert got.shape == ref.shape == (2, ids.shape[1], V)
    assert np.abs(got - ref).max() <= 1e-4
    if windows == 10:  # the memory matters at this tolerance: without it the logits differ
        plain = LongLlamaRef(model.module, W, LCL)
        plain.mem_layers = set()
        assert np.abs(plain.long(ids) - ref).max() > 1e-2


def test_memory_content_is_the_reference_concatenation():
    model = tiny()
    ids = ids_of(5 * W + 3, seed=3)
    s = model.build_memory(ids)
    ref = LongLlamaRef(model.module, W, LCL)
    ref.long(ids)
    rk, rv = ref.memory_kv(1)  # [B, S, K, D]
    st = s.memory.state
    n = s.memory.filled
    assert n == ids.shape[1] - LCL == rk.shape[1]
    assert np.abs(np.asarray(st.keys[0, :, :, :n]) - rk.swapaxes(1, 2)).max() <= 1e-5
    assert np.abs(np.asarray(st.values[0, :, :, :n]) - rv.swapaxes(1, 2)).max() <= 1e-5
    assert np.asarray(st.valid[0, :, :n]).all() and not np.asarray(st.valid[0, :, n:]).any()


def test_knn_with_k_above_memory_size_equals_dense():
    ids = ids_of(6 * W, seed=4)
    dense = np.asarray(tiny().logits_long(ids))
    knn = np.asarray(tiny(retrieval="knn", knn_k=8 * W).logits_long(ids))
    assert np.abs(knn - dense).max() <= 1e-5


def test_no_memory_within_one_window_equals_logits():
    model = tiny(layers=())
    ids = ids_of(LCL, batch=2, seed=5)  # all of it goes through the local cache
    assert np.abs(np.asarray(model.logits_long(ids)) - np.asarray(model.logits(ids))).max() <= 1e-5
    ids = ids_of(W, batch=2, seed=6)  # one prefix window (lcl=0)
    assert np.abs(np.asarray(model.logits_long(ids, last_context_length=0))
                  - np.asarray(model.logits(ids))).max() <= 1e-5


def test_rope_scaled_model_reads_long_input():
    # rope_scaling is a dict inside the config, which the jitted steps take as a static argument
    rope = {"rope_type": "linear", "factor": 2.0}
    model = tiny(layers=(), rope_scaling=rope)
    ids = ids_of(LCL, batch=2, seed=7)
    assert np.abs(np.asarray(model.logits_long(ids)) - np.asarray(model.logits(ids))).max() <= 1e-5
    with_memory = tiny(rope_scaling=rope)
    assert with_memory.logits_long(ids_of(3 * W, seed=8)).shape == (1, 3 * W, V)
    assert with_memory.generate(ids_of(2 * W, seed=9), 3, stop_at_eos=False).shape == (1, 3)


def test_logprobs_long_are_the_logits_log_softmax():
    model = tiny()
    ids = ids_of(3 * W + 5, seed=7)
    lg = np.asarray(model.logits_long(ids), np.float64)
    top = lg.max(-1, keepdims=True)
    lp = lg - top - np.log(np.exp(lg - top).sum(-1, keepdims=True))
    want = np.take_along_axis(lp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    assert np.abs(np.asarray(logprobs_long(model, ids)) - want).max() <= 1e-4


def test_generation_steps_match_reference_including_cache_move():
    model = tiny()
    ids = ids_of(2 * W + 4, seed=8)
    s = Session(model, 1)
    ref = LongLlamaRef(model.module, W, LCL)
    last = np.asarray(s.feed(ids, out="last"))
    assert np.abs(last - ref.long(ids)[:, -1]).max() <= 1e-4
    tokens = []
    for _ in range(12):  # the cache holds 8 after the prompt: it moves to memory at step 9
        tok = last.argmax(-1)
        tokens.append(int(tok[0]))
        last = np.asarray(s.feed(tok[:, None], out="last"))
        assert np.abs(last - ref.step(tok[:, None])[:, -1]).max() <= 1e-4
    assert s.memory.filled == 2 * W + 4 - LCL + W  # prompt prefix, then one full cache
    assert model.generate(ids, 12).tolist() == [tokens]
    streamed = [int(t[0]) for t in model.stream(ids, 12)]
    assert streamed == tokens


def test_pieces_that_fill_the_cache_to_the_window_match_reference():
    """The cache holds a window: a padded piece ending exactly there (8 + 3 + 5 = 16 tokens) must
    lose none of them, and the next token moves the whole cache to memory."""
    model = tiny()
    ids = ids_of(2 * W + 4, seed=16)
    s = Session(model, 1)
    ref = LongLlamaRef(model.module, W, LCL)
    s.feed(ids, out="none")
    ref.long(ids)
    for n, seed in ((3, 17), (5, 18), (1, 19), (2, 20)):
        piece = ids_of(n, seed=seed)
        assert np.abs(np.asarray(s.feed(piece)) - ref.step(piece)).max() <= 1e-4
    assert s.cache_len == 3 and s.memory.filled == 2 * W + 4 - LCL + W


@pytest.mark.parametrize("layers,dtype", [((2,), "float32"), ((1,), "bfloat16")])
def test_generate_after_long_prompt_equals_reading_every_logit(layers, dtype):
    """generate() reads the prompt's windows without outputs (XLA then drops the work only they
    needed: the head, and in a window the last memory layer's retrieval); the same tokens as the
    straightforward path, which keeps the logits of every piece."""
    model = tiny(layers=layers, mem_dtype=dtype)
    ids = ids_of(5 * W + 3, batch=2, seed=21)
    s = Session(model, 2)
    logits = np.asarray(s.feed(ids))[:, -1]
    tokens = []
    for _ in range(12):  # crosses a cache move into memory
        tok = logits.argmax(-1)
        tokens.append(tok)
        logits = np.asarray(s.feed(tok[:, None]))[:, -1]
    assert model.generate(ids, 12, stop_at_eos=False).tolist() == np.stack(tokens, 1).tolist()
    fast = Session(model, 2)
    last = np.asarray(fast.feed(ids, out="last"))
    assert np.abs(last - np.asarray(Session(model, 2).feed(ids))[:, -1]).max() <= 1e-5
    assert fast.memory.filled == ids.shape[1] - LCL and fast.tokens_read == ids.shape[1]


def test_generation_without_memory_layers_drops_the_cache():
    model = tiny(layers=())
    ids = ids_of(W - 2, seed=15)
    out = model.generate(ids, 12, stop_at_eos=False)  # the cache (8 + 8) is dropped at step 9
    assert out.shape == (1, 12)
    ref = LongLlamaRef(model.module, W, LCL)
    last = ref.long(ids)[:, -1]
    for t in out[0]:
        assert t == last.argmax(-1)[0]
        last = ref.step(np.array([[t]]))[:, -1]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    model = tiny()
    ids = ids_of(W + 3, seed=9)
    a = model.generate(ids, 6, temperature=1.0, seed=1)
    assert (a == model.generate(ids, 6, temperature=1.0, seed=1)).all()
    assert (model.generate(ids, 6, temperature=1.0, top_p=1e-9, seed=2) == model.generate(ids, 6)).all()


@pytest.mark.parametrize("mem_dtype", ["float32", "bfloat16"])
def test_saved_memory_round_trip_and_reuse(tmp_path, mem_dtype):
    model = tiny(mem_dtype=mem_dtype)
    doc, question = ids_of(4 * W + 2, seed=10), ids_of(5, seed=11)
    mem = model.build_memory(doc)
    want = model.generate(question, 10, memory=mem)
    again = model.generate(question, 10, memory=mem)  # the session is not consumed
    path = model.save_memory(mem, tmp_path / "doc")
    loaded = model.load_memory(path)
    assert loaded.memory.filled == mem.memory.filled and loaded.cache_len == mem.cache_len
    assert (want == again).all() and (model.generate(question, 10, memory=loaded) == want).all()
    with np.load(path) as z:  # saved as the memory dtype's values, not as the stored bit patterns
        meta = json.loads(bytes(z["meta"]).decode())
        n = mem.memory.filled
        saved = np.asarray(z["keys"]).view(jnp.bfloat16) if mem_dtype == "bfloat16" else z["keys"]
        assert meta["dtypes"]["keys"] == mem_dtype
        assert (saved == np.asarray(memlib.decode(mem.memory.state.keys[:, :, :, :n]))).all()


def test_memory_saved_before_the_cache_held_rotated_keys_loads(tmp_path):
    """Files written before the local cache held rotated keys hold every layer's keys unrotated
    (and no memory / rope_len entries): loading them continues as the reference does."""
    model = tiny()
    ids = ids_of(3 * W + 5, seed=12)
    ref = LongLlamaRef(model.module, W, LCL)
    ref.long(ids)
    path = model.save_memory(model.build_memory(ids), tmp_path / "new.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    for key in ("cache_rotated", "memory", "rope_len"):
        del meta[key]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    arrays["cache_k"] = np.stack([k for k, _ in ref.cache]).astype(np.float32)  # unrotated
    np.savez(tmp_path / "old.npz", **arrays)
    s = model.load_memory(tmp_path / "old.npz")
    tok = ids_of(1, seed=13)
    assert np.abs(np.asarray(s.feed(tok))[:, -1] - ref.step(tok)[:, -1]).max() <= 1e-4


def test_a_session_without_memory_saves_and_loads_as_it_was(tmp_path):
    """memory=False and a rope_len for dynamic scaling come back with the saved session."""
    model = tiny(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    ids, tok = ids_of(3 * W, seed=14), ids_of(2, seed=15)
    s = Session(model, 1, window=4 * W, last_context_length=3 * W, memory=False, rope_len=4 * W)
    s.feed(ids, out="none")
    path = model.save_memory(s, tmp_path / "off.npz")
    want = np.asarray(s.feed(tok))
    loaded = model.load_memory(path)
    assert loaded.retrieval is None and loaded.rope_len == 4 * W
    assert np.abs(np.asarray(loaded.feed(tok)) - want).max() <= 1e-6


def test_saved_memory_from_another_model_is_refused(tmp_path):
    path = tiny().save_memory(tiny().build_memory(ids_of(3 * W)), tmp_path / "m.npz")
    with pytest.raises(ValueError, match="different model"):
        tiny(seed=1).load_memory(path)
    with pytest.raises(FileNotFoundError, match="no saved memory"):
        tiny().load_memory(tmp_path / "absent.npz")


def test_bad_input_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="non-empty"):
        model.logits_long(np.zeros((1, 0), np.int32))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.logits_long(np.array([[1, 2, V]]))


def test_capacity_error_and_drop_oldest(caplog):
    ids = ids_of(6 * W + LCL, seed=12)
    with pytest.raises(MemoryCapacityError, match="retrieval.capacity=64"):
        tiny(capacity=4 * W).logits_long(ids)
    model = tiny(capacity=4 * W, on_full="drop_oldest")
    with caplog.at_level(logging.WARNING):
        s = model.build_memory(ids)
    assert "dropping the oldest" in caplog.text
    assert s.memory.filled == 4 * W
    ref = LongLlamaRef(model.module, W, LCL)
    ref.long(ids)
    rk, _ = ref.memory_kv(1)
    kept = np.asarray(s.memory.state.keys[0, :, :, :4 * W])
    assert np.abs(kept - rk[:, -4 * W:].swapaxes(1, 2)).max() <= 1e-5


def test_longllama_hf_directory_loads_and_reads_long_input(tmp_path):
    positionals = False  # not the default: shows the mem_* fields are read
    from fot.convert import load_model
    from tests.hf_tiny import edit_config, make_hf, random_ids

    make_hf(tmp_path, heads=4, kv_heads=2)  # window = max_position_embeddings = 128
    edit_config(tmp_path, model_type="longllama", architectures=["LongLlamaForCausalLM"], mem_layers=[1],
                mem_positionals=positionals, mem_dtype="float32", last_context_length=40)
    model = load_model(tmp_path)
    mem, ret = model.config.memory, model.config.retrieval
    assert (mem.layers, mem.positionals, ret.dtype, ret.last_context_length) == (
        (1,), positionals, "float32", 40)
    ids = random_ids(1, 2 * 128 + 100, seed=13)  # two prefix windows + 60 + the local 40
    got = np.asarray(model.logits_long(ids))
    ref = LongLlamaRef(model.module, 128, 40).long(ids)
    assert np.abs(got - ref).max() <= 1e-4


def test_generate_cli_streams_text_and_reuses_saved_memory(tmp_path, capsys):
    from fot.data.tokenizer import ByteTokenizer
    from fot.generate import main

    model = tiny(vocab_size=259)
    model.tokenizer = ByteTokenizer()
    model.save(tmp_path / "m")
    doc = "The grass is green. " * 4
    (tmp_path / "doc.txt").write_text(doc)
    assert main([str(tmp_path / "m"), "--prompt-file", str(tmp_path / "doc.txt"),
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == model.generate(doc, 6) + "\n"
    assert main([str(tmp_path / "m"), "--prompt-file", str(tmp_path / "doc.txt"),
                 "--save-memory", str(tmp_path / "doc.npz")]) == 0
    assert main([str(tmp_path / "m"), "--memory", str(tmp_path / "doc.npz"), "--prompt", "Sky?",
                 "--max-new-tokens", "6"]) == 0
    saved = model.load_memory(tmp_path / "doc.npz")
    assert capsys.readouterr().out == model.generate("Sky?", 6, memory=saved) + "\n"
    with pytest.raises(SystemExit):
        main([str(tmp_path / "m"), "--prompt-file", str(tmp_path / "absent.txt")])
    # config overrides, key=value as for training: k above every stored key reads what dense reads
    assert main([str(tmp_path / "m"), "--prompt-file", str(tmp_path / "doc.txt"), "--max-new-tokens", "6",
                 "retrieval.mode=knn", "retrieval.knn_k=4096"]) == 0
    assert capsys.readouterr().out == model.generate(doc, 6) + "\n"
    with pytest.raises(SystemExit):
        main([str(tmp_path / "m"), "--prompt", "Sky?", "retrieval.mode=nearest"])
    assert "retrieval.mode" in capsys.readouterr().err


def test_closed_gate_ablation_reads_no_memory():
    import jax.numpy as jnp

    from fot.model.llama import init_model

    gated, plain = tiny(seed=3), tiny(layers=(), seed=3)  # same weights (the gate takes no rng)
    cfg = config_from_dict({**gated.config.to_dict(), "memory": {**gated.config.to_dict()["memory"],
                                                                 "gate": True}})
    module = init_model(cfg.model, cfg.memory, seed=3)
    module.mem_gate[...] = jnp.full(module.mem_gate[...].shape, -40.0)  # sigmoid: 4e-18
    gated = FotModel(cfg, module)
    ids = ids_of(4 * W, seed=14)
    assert np.abs(np.asarray(gated.logits_long(ids)) - np.asarray(plain.logits_long(ids))).max() <= 1e-5
    module.mem_gate[...] = jnp.zeros(module.mem_gate[...].shape)  # half memory: now it differs
    assert np.abs(np.asarray(gated.logits_long(ids)) - np.asarray(plain.logits_long(ids))).max() > 1e-3


def test_config_and_module_memory_layers_must_agree():
    model = tiny()
    other = FotModel(tiny(layers=()).config, model.module)
    with pytest.raises(ValueError, match="does not match the module"):
        other.logits_long(ids_of(W))
