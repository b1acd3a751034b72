"""The copy probe marks exactly the key's digits and trains end to end."""

import numpy as np
import pytest

from fot.experiments import copy_probe
from fot import ConfigError
from fot.data.tokenizer import load_tokenizer


def test_marked_positions_predict_exactly_the_key_digits():
    tok = load_tokenizer("byte")
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids, answer, second = copy_probe.passkey_row(tok, rng, 320)
        assert len(ids) <= 321
        text = tok.decode(ids)
        key = text.rsplit(" ", 1)[1].rstrip(".")
        # position p predicts token p + 1
        assert tok.decode([ids[p + 1] for p in answer]) == key
        assert tok.decode([ids[p + 1] for p in second]) == key
        assert tok.decode(ids[second[-1] + 2:second[-1] + 6]) == " is "


def test_window_too_short_for_a_passkey_document_is_an_error():
    with pytest.raises(ValueError, match="shorter than a passkey document"):
        copy_probe.passkey_row(load_tokenizer("byte"), np.random.default_rng(0), 200)


def test_probe_runs_and_reports(capsys):
    assert copy_probe.main(["configs/tiny.yaml", "--steps", "2", "--batch", "2", "--every", "1",
                            "--lists", "0.5"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert len(lines) == 2 and "answer digits" in lines[-1]


def test_induction_rows_repeat_their_prefix_exactly_where_marked():
    from fot.experiments import induction_probe

    rng = np.random.default_rng(0)
    for variable in (False, True):
        x, mask = induction_probe.make_batch(rng, 8, 16, 26, variable)
        for row, m in zip(x, mask):
            n = int(m.sum())
            assert (n == 16) or (variable and 4 <= n <= 16)
            assert (row[1 + n:1 + 2 * n] == row[1:1 + n]).all()
            assert m[n:2 * n].all() and (row[1:] >= induction_probe.FIRST_ID).all()


def test_induction_probe_runs_and_rejects_a_too_large_alphabet(capsys, monkeypatch):
    from fot.experiments import induction_probe

    built = []
    real_init = induction_probe.init_model
    monkeypatch.setattr(induction_probe, "init_model",
                        lambda cfg, mem, seed: built.append((cfg, mem)) or real_init(cfg, mem, seed=seed))

    assert induction_probe.main(["configs/tiny.yaml", "--steps", "2", "--every", "1", "--half", "8",
                                 "--batch", "2"]) == 0
    assert "second-copy accuracy" in capsys.readouterr().out
    assert built[-1][1] is None  # no memory layers: RoPE everywhere
    # overrides reach the model; --memory-layers passes the config's memory layers (tiny's: no RoPE,
    # as they train); --short-steps trains on short copies first
    assert induction_probe.main(["configs/tiny.yaml", "model.num_attention_heads=2", "--memory-layers",
                                 "--short-steps", "1", "--short-half", "4", "--steps", "2", "--every", "1",
                                 "--half", "8", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "step 1  half 4 " in out and "step 2  half 8 " in out
    cfg, mem = built[-1]
    assert cfg.num_attention_heads == 2 and cfg.max_position_embeddings == 17
    assert mem.layers == (1,) and not mem.positionals
    with pytest.raises(ConfigError, match="nope"):
        induction_probe.main(["configs/tiny.yaml", "model.nope=1", "--steps", "1"])
    with pytest.raises(ValueError, match="does not fit the vocabulary"):
        induction_probe.main(["configs/tiny.yaml", "--alphabet", "300"])
