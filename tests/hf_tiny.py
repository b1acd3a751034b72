"""Tiny random Hugging Face LLaMA models saved to a directory, for the parity and conversion tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 101


def make_hf(path: Path, *, heads: int = 4, kv_heads: int = 4, tied: bool = False, weights: str = "safetensors",
            max_shard_size: str | None = None, seed: int = 0, vocab_size: int = VOCAB,
            **config) -> LlamaForCausalLM:
    """Save a random 2-layer LlamaForCausalLM to `path` and return it (eval mode, float32).

    weights: "safetensors" (save_pretrained, sharded with an index if max_shard_size is given) or "bin"
    (pytorch_model.bin written with torch.save; with max_shard_size, two .bin shards and an index).
    """
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      tie_word_embeddings=tied, **config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1: perturb them so a wrong norm mapping shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    if max_shard_size and weights == "safetensors":
        model.save_pretrained(path, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(path)
    if weights == "bin":
        for f in Path(path).glob("model*.safetensors*"):
            f.unlink()
        state = model.state_dict()
        if not max_shard_size:
            torch.save(state, Path(path) / "pytorch_model.bin")
        else:
            names = list(state)
            shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
            for fname, keys in shards.items():
                torch.save({k: state[k] for k in keys}, Path(path) / fname)
            index = {"weight_map": {k: fname for fname, keys in shards.items() for k in keys}}
            (Path(path) / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return model


def hf_logits(model: LlamaForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def edit_config(path: Path, **changes) -> None:
    """Rewrite config.json in `path`; a value of None deletes the key."""
    f = Path(path) / "config.json"
    cfg = json.loads(f.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    f.write_text(json.dumps(cfg))


def random_ids(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, seq))
