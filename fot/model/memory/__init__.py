"""The FoT memory layer, in one place.

- `store.py`: the memory at inference: fixed-capacity key/value buffers (write, evict the oldest,
  copy via `Memory.state`/`set_state`) and the retrieval modes (dense, exact kNN, IVF) that return
  a softmax partial (fot/model/partials.py) for the layer to merge with its local window.
- `faiss_ivf.py`: IVF through faiss on the CPU (`retrieval.ivf_library`): host indexes searched
  from the jitted steps by a callback; `store.py` attends to what they find.
- `keys.py`: what both sources share: keys encoded "as if first" (RoPE at position 0 when
  memory.positionals) and the gate lookup.
- `crossbatch.py`: the training source: a row reads the preceding rows of its batch (one rule,
  `extra_contexts`, also used by fot/flops.py).
- `session.py`: the inference source: a window reads the store, then its keys are written to it.

The layer's attention itself is fot/model/attention.py (local partial + memory partials, one
softmax); fot/model/llama.py calls a source's callback in each memory layer.
"""
