"""An independent float64 NumPy implementation of LongLLaMA's window-by-window inference
(`_handle_long_input` + the generation-time local cache of src/modeling_longllama.py), for tests.

State: per memory layer a list of (keys, values) chunks; per layer a local cache of unrotated keys
and values whose positions are relative to the oldest cached token.
"""

from __future__ import annotations

import numpy as np
from flax import nnx


def params_of(module) -> dict:
    pure = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    flat = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + (str(k),))
            else:
                flat[".".join(prefix + (str(k),))] = np.asarray(v, np.float64)

    walk(pure, ())
    return flat


class LongLlamaRef:
    def __init__(self, module, window: int, last_context_length: int):
        cfg, mem = module.cfg, module.mem
        self.p = params_of(module)
        self.h, self.kv, self.d = cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head
        self.n_layers, self.eps = cfg.num_hidden_layers, cfg.rms_norm_eps
        self.inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, self.d, 2) / self.d)
        self.mem_layers, self.positionals = set(mem.layers), mem.positionals
        self.window, self.lcl = window, last_context_length
        self.memory = {l: [] for l in mem.layers}  # list of (k, v) [B, S, K, D]
        self.cache = None  # per layer (k, v) or None

    # -- pieces --
    def _w(self, name, layer=None):
        w = self.p[name]
        return w if layer is None else w[layer]

    def _rms(self, x, w):
        return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + self.eps))

    def _rot(self, x, pos):  # x [B, T, heads, D]; half-split layout
        f = pos[:, None] * self.inv_freq[None]
        emb = np.concatenate([f, f], -1)
        cos, sin = np.cos(emb)[None, :, None], np.sin(emb)[None, :, None]
        half = self.d // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def memory_kv(self, layer):
        chunks = self.memory[layer]
        return (np.concatenate([c[0] for c in chunks], 1), np.concatenate([c[1] for c in chunks], 1))

    def _run(self, ids, write_memory: bool):
        """One model call on ids [B, T] with the current local cache (may be None)."""
        b, t = ids.shape
        x = self.p["embed_tokens.embedding"][ids]
        g = self.h // self.kv
        new_cache = []
        for l in range(self.n_layers):
            a = "layers.self_attn."
            hdn = self._rms(x, self._w("layers.input_layernorm.weight", l))
            q = (hdn @ self._w(a + "q_proj.kernel", l)).reshape(b, t, self.h, self.d)
            k = (hdn @ self._w(a + "k_proj.kernel", l)).reshape(b, t, self.kv, self.d)
            v = (hdn @ self._w(a + "v_proj.kernel", l)).reshape(b, t, self.kv, self.d)
            pk, pv = (k[:, :0], v[:, :0]) if self.cache is None else self.cache[l]
            kk, vv = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
            new_cache.append((kk, vv))
            s_len, p_len = kk.shape[1], pk.shape[1]
            rel = np.arange(s_len)  # positions relative to the oldest cached token
            is_mem = l in self.mem_layers
            if not is_mem or self.positionals:
                q, kr = self._rot(q, rel[p_len:]), self._rot(kk, rel)
            else:
                kr = kk
            kr, vr = np.repeat(kr, g, 2), np.repeat(vv, g, 2)
            scores = np.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(self.d)
            causal = rel[None, :] <= rel[p_len:][:, None]
            scores = np.where(causal[None, None], scores, -np.inf)
            values = vr
            if is_mem and self.memory[l]:
                mk, mv = self.memory_kv(l)
                ms = np.einsum("bthd,bshd->bhts", q, np.repeat(mk, g, 2)) / np.sqrt(self.d)
                scores = np.concatenate([scores, ms], -1)
                values = np.concatenate([vr, np.repeat(mv, g, 2)], 1)
            pr = np.exp(scores - scores.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            o = np.einsum("bhts,bshd->bthd", pr, values).reshape(b, t, -1)
            x = x + o @ self._w(a + "o_proj.kernel", l)
            hdn = self._rms(x, self._w("layers.post_attention_layernorm.weight", l))
            m = "layers.mlp."
            gate = hdn @ self._w(m + "gate_proj.kernel", l)
            up = hdn @ self._w(m + "up_proj.kernel", l)
            x = x + (gate / (1 + np.exp(-gate)) * up) @ self._w(m + "down_proj.kernel", l)
            if write_memory and is_mem:  # after attention; RoPE at position 0 is the identity
                self.memory[l].append((k, v))
        x = self._rms(x, self.p["norm.weight"])
        head = self.p.get("lm_head.kernel")
        logits = x @ head if head is not None else x @ self.p["embed_tokens.embedding"].T
        return logits, new_cache

    def long(self, ids):
        """_handle_long_input on fresh ids [B, N]: logits [B, N, V]; leaves the local cache."""
        n = ids.shape[1]
        prefix = max(n - self.lcl, 0)
        outs = []
        self.cache = None
        for i in range(0, prefix, self.window):
            outs.append(self._run(ids[:, i:min(i + self.window, prefix)], write_memory=True)[0])
        if n > prefix:
            logits, self.cache = self._run(ids[:, prefix:], write_memory=False)
            outs.append(logits)
        return np.concatenate(outs, 1)

    def step(self, ids):
        """Generation step with the local cache: when cache + new exceeds the window, the whole
        cache moves to memory (memory layers) or is dropped."""
        if self.cache is not None and self.cache[0][0].shape[1] + ids.shape[1] > self.window:
            for l in self.mem_layers:
                self.memory[l].append(self.cache[l])
            self.cache = None
        logits, self.cache = self._run(ids, write_memory=False)
        return logits
