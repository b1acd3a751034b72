"""Data sources, the seeded mixture, the batch stream and the passkey format."""

import json
import re

import numpy as np
import pytest

from fot.config import ConfigError, SourceConfig, config_from_dict
from fot.data import passkey
from fot.data.builtin import PasskeyCorpus, StdlibCorpus
from fot.data.pipeline import BatchStream, merge_states
from fot.data.sources import DataError, DocStream, Source, open_source
from fot.data.tokenizer import ByteTokenizer


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache of local files inside the test's tmp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def cfg_for(sources, window=32, batch=4, k=2, seed=0, min_doc_tokens=0, vocab=259):
    return config_from_dict({
        "model": {"vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "max_position_embeddings": 64},
        "train": {"batch_size": batch, "pack_size": k, "window": window},
        "data": {"sources": sources, "seed": seed, "min_doc_tokens": min_doc_tokens}})


def texts(n, lo=20, hi=200, seed=0):
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + "abcdefghij"[i % 10] * int(rng.integers(lo, hi)) for i in range(n)]


def write_jsonl(path, docs, column="text"):
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)


def read_all(src):
    """Every text of one epoch of a random-access source."""
    return [src.text(0, i) for i in range(src.length)]


# ------------------------------------------------------------------------------------------------
# Sources


def test_local_files_load(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = texts(12)
    jsonl = write_jsonl(tmp_path / "a.jsonl", docs)
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": docs}), parquet)
    for i, d in enumerate(docs[:3]):
        (tmp_path / f"t{i}.txt").write_text(d + "\nsecond line\n")

    src = open_source(SourceConfig(path=jsonl), seed=0)
    assert sorted(read_all(src)) == sorted(docs)
    src = open_source(SourceConfig(path=str(parquet), text_column="body"), seed=0)
    assert sorted(read_all(src)) == sorted(docs)
    # text files: a whole file is one document by default, one line per document on request
    src = open_source(SourceConfig(path=str(tmp_path / "t*.txt")), seed=0)
    assert sorted(read_all(src)) == sorted(d + "\nsecond line\n" for d in docs[:3])
    src = open_source(SourceConfig(path=str(tmp_path / "t0.txt"), sample_by="line"), seed=0)
    assert sorted(read_all(src)) == sorted([docs[0], "second line"])


def test_dataset_directory_and_offline_hub_name(tmp_path):
    # A directory goes through `datasets`' own loader, as a hub name would.
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", ["alpha", None, "gamma"])
    src = open_source(SourceConfig(path=str(tmp_path / "ds")), seed=0)
    assert sorted(read_all(src)) == ["", "alpha", "gamma"]  # a null cell is an empty document
    write_jsonl(tmp_path / "nums.jsonl", [1, 2])
    with pytest.raises(DataError, match="holds int, not text"):
        read_all(open_source(SourceConfig(path=str(tmp_path / "nums.jsonl")), seed=0))
    # Offline (tests set HF_DATASETS_OFFLINE), a hub name fails at once and says what to do.
    with pytest.raises(DataError, match=r"someone/no-such-dataset.*local"):
        open_source(SourceConfig(path="someone/no-such-dataset", name="en"), seed=0)


def test_streaming_local_file(tmp_path):
    docs = texts(30)
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    src = open_source(SourceConfig(path=path, streaming=True), seed=3)
    epoch0 = list(src.texts(0, 0))
    epoch1 = list(src.texts(1, 0))
    assert sorted(epoch0) == sorted(epoch1) == sorted(docs)
    assert epoch0 != epoch1  # reshuffled each epoch
    assert list(src.texts(0, 7)) == epoch0[7:]  # resuming inside an epoch skips exactly


def test_missing_column_names_column_source_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", texts(3), column="content")
    for streaming in (False, True):
        with pytest.raises(DataError) as e:
            src = open_source(SourceConfig(path=path, streaming=streaming), seed=0)
            next(src.texts(0, 0))
        msg = str(e.value)
        assert "'text'" in msg and "a.jsonl" in msg and "content" in msg and "id" in msg


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=re.escape(path)):
        open_source(SourceConfig(path=path), seed=0)
    with pytest.raises(DataError, match="file not found"):
        BatchStream(cfg_for([{"path": path}]))


def test_epochs_reshuffle_and_cover_everything():
    corpus = [f"t{i}" for i in range(20)]
    src = Source("test", corpus, len(corpus), seed=5)
    e0 = [src.text(0, i) for i in range(20)]
    e1 = [src.text(1, i) for i in range(20)]
    assert sorted(e0) == sorted(e1) == sorted(corpus)
    assert e0 != e1
    assert e0 == [Source("test", corpus, 20, seed=5).text(0, i) for i in range(20)]


def test_slot_shares_partition_every_epoch():
    corpus = [f"t{i}" for i in range(10)]
    src = Source("test", corpus, len(corpus), seed=5)
    assert src.share(0, 1) is src
    shares = [src.share(s, 4) for s in range(4)]
    assert [sh.length for sh in shares] == [3, 3, 2, 2]
    for epoch in (0, 1):
        got = [[sh.text(epoch, i) for i in range(sh.length)] for sh in shares]
        assert sorted(sum(got, [])) == sorted(corpus)  # each document in exactly one share
        assert all(int(t[1:]) % 4 == s for s, g in enumerate(got) for t in g)
    # fewer documents than slots: every slot still has one; unbounded: documents s, s+n, ...
    few = Source("few", ["a", "b", "c"], 3, seed=0)
    assert [few.share(s, 4).text(0, 0) for s in range(4)] == ["a", "b", "c", "a"]
    endless = Source("endless", PasskeyCorpus(1, 100, 200), None, seed=1)
    assert [endless.share(2, 4).index(0, i) for i in range(3)] == [2, 6, 10]


def test_mixture_weights_roughly_respected():
    a = Source("a", ["x" * 50] * 10, 10, seed=0)
    b = Source("b", ["y" * 50] * 10, 10, seed=1)
    stream = DocStream([a, b], [3.0, 1.0], ByteTokenizer(), seed=0, window=8)
    n = 4000
    from_a = sum(stream.next().addr[0] == 0 for _ in range(n)) / n
    assert abs(from_a - 0.75) < 0.03  # binomial sd ~0.007


def test_all_documents_shorter_than_window_is_an_error(tmp_path):
    """The stream fails once it has read a whole epoch of its (finite) sources, or 1000 documents of
    unbounded ones, and none reaches the window."""
    short = write_jsonl(tmp_path / "short.jsonl", ["tiny doc"] * 5)
    stream = BatchStream(cfg_for([{"path": short}], window=32))
    # pack slot 0 owns documents 0, 2, 4: it knows after its 3 and the next epoch's first
    with pytest.raises(DataError, match="first 4 documents read from .*short.jsonl.* at least 32 tokens"):
        next(stream)
    # long enough, but every document filtered out by min_doc_tokens
    path = write_jsonl(tmp_path / "mid.jsonl", ["m" * 100] * 5)
    stream = BatchStream(cfg_for([{"path": path}], window=32, min_doc_tokens=500))
    with pytest.raises(DataError, match="min_doc_tokens"):
        next(stream)
    # short documents are fine beside a source of window-long ones
    long = write_jsonl(tmp_path / "long.jsonl", ["L" * 100] * 5)
    stream = BatchStream(cfg_for([{"path": short}, {"path": long, "weight": 0.1}], window=64))
    for _ in range(200):
        next(stream)
    # an unbounded source (passkey) whose documents never reach the window; each pack slot reads
    # its own documents (~6 a step here), so slot 0 reaches its 1000th within 200 steps
    stream = BatchStream(cfg_for([{"path": "builtin:passkey", "min_chars": 300, "max_chars": 400}],
                                 window=1024))
    with pytest.raises(DataError, match="first 1000 documents"):
        for _ in range(200):
            next(stream)


def test_min_doc_tokens_skips_short_documents(tmp_path):
    docs = ["s" * 10, "L" * 200, "M" * 300, "s" * 12]  # each of the 2 slots' shares has a long one
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    stream = BatchStream(cfg_for([{"path": path}], window=16, batch=2, k=1, min_doc_tokens=50))
    seen = set()
    for _ in range(30):
        seen |= set(stream.tokenizer.decode(next(stream)["inputs"].reshape(-1).tolist()))
    assert "s" not in seen and {"L", "M"} <= seen


def test_config_rejects_bad_sources():
    with pytest.raises(ConfigError, match="builtin:nope"):
        cfg_for([{"path": "builtin:nope"}])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight"):
        cfg_for([{"path": "builtin:stdlib", "weight": 0}])
    with pytest.raises(ConfigError, match="max_chars"):
        cfg_for([{"path": "builtin:passkey", "min_chars": 500, "max_chars": 100}])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].named must be in \[0, 1\], got 1.5"):
        cfg_for([{"path": "builtin:passkey", "named": 1.5}])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].key_digits must be in 1..18, got 0"):
        cfg_for([{"path": "builtin:passkey", "key_digits": 0}])


def test_tokenizer_larger_than_vocab_is_an_error():
    with pytest.raises(ConfigError, match="259 ids but model.vocab_size=128"):
        BatchStream(cfg_for([{"path": "builtin:stdlib"}], vocab=128))


# ------------------------------------------------------------------------------------------------
# Built-in sources


def test_builtin_stdlib_is_real_python_source():
    corpus = StdlibCorpus(min_chars=2000)
    assert len(corpus) > 100
    paths = [str(f) for f in corpus.files]
    assert paths == sorted(paths) and all(p.endswith(".py") for p in paths)
    assert not any("site-packages" in p for p in paths)
    for i in (0, len(corpus) // 2):
        text = corpus[i]
        assert len(text) >= 1500 and ("import " in text or "def " in text or "class " in text)


def test_builtin_passkey_documents():
    corpus = PasskeyCorpus(seed=7, min_chars=1000, max_chars=3000)
    pattern = re.compile(re.escape(passkey.INTRO) + r"\n(.*)\nThe pass key is (\d+)\. Remember it\. "
                         r"(\d+) is the pass key\.\n(.*)\n" + re.escape(passkey.QUESTION) + r" (\d+)\.",
                         re.S)
    depths, mixed = [], 0
    for i in range(40):
        doc = corpus[i]
        m = pattern.fullmatch(doc)
        assert m, doc[:300]
        k1, k2, k3 = int(m.group(2)), int(m.group(3)), int(m.group(5))
        assert k1 == k2 == k3 and 1 <= k1 <= 49999
        assert 1000 <= len(doc) <= 3000
        depths.append(len(m.group(1)) / (len(m.group(1)) + len(m.group(4))))
        prefix, suffix = m.group(1), m.group(4)
        mixed += not (prefix == passkey.filler(len(prefix)) and suffix == passkey.filler(len(suffix)))
    assert corpus[3] == PasskeyCorpus(seed=7, min_chars=1000, max_chars=3000)[3]  # deterministic
    assert corpus[3] != PasskeyCorpus(seed=8, min_chars=1000, max_chars=3000)[3]
    assert min(depths) < 0.2 and max(depths) > 0.8  # key at varied depths
    assert 0 < mixed < 40  # some documents mix in real text, some are pure filler


def test_builtin_passkey_documents_without_intro():
    corpus = PasskeyCorpus(seed=7, min_chars=110, max_chars=250, mixed_filler=0.0, intro=False)
    pattern = re.compile(r"(.*)\nThe pass key is (\d+)\. Remember it\. (\d+) is the pass key\.\n(.*)\n"
                         + re.escape(passkey.QUESTION) + r" (\d+)\.", re.S)
    for i in range(40):
        doc = corpus[i]
        m = pattern.fullmatch(doc)
        assert m and passkey.INTRO not in doc, doc
        assert int(m.group(2)) == int(m.group(3)) == int(m.group(5))
        assert 110 <= len(doc) <= 250
        assert m.group(1) == passkey.filler(len(m.group(1))) and m.group(4) == passkey.filler(len(m.group(4)))


def test_builtin_mixture_batches():
    cfg = cfg_for([{"path": "builtin:stdlib", "weight": 1.0},
                   {"path": "builtin:passkey", "min_chars": 200, "max_chars": 600, "weight": 1.0}],
                  window=64, batch=8, k=4)
    stream = BatchStream(cfg)
    text = "".join(stream.tokenizer.decode(next(stream)["inputs"].reshape(-1).tolist()) for _ in range(6))
    assert "The pass key is" in text and ("def " in text or "import " in text)


# ------------------------------------------------------------------------------------------------
# The batch stream


def test_batch_layout_and_determinism(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", texts(40, lo=30, hi=150))
    cfg = cfg_for([{"path": path}], window=16, batch=6, k=3, seed=1)
    s1, s2 = BatchStream(cfg), BatchStream(cfg)
    b = next(s1)
    assert set(b) == {"inputs", "targets", "loss_mask", "doc_ids"}
    assert all(v.shape == (6, 16) for v in b.values())
    assert b["inputs"].dtype == b["targets"].dtype == b["doc_ids"].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32
    # rows of a pack are consecutive windows of one stream
    for p in range(2):
        rows = b["inputs"][3 * p:3 * p + 3]
        np.testing.assert_array_equal(b["targets"][3 * p:3 * p + 2, -1], rows[1:, 0])
    batches1 = [b] + [next(s1) for _ in range(5)]
    batches2 = [next(s2) for _ in range(6)]
    for x, y in zip(batches1, batches2):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    other = BatchStream(cfg_for([{"path": path}], window=16, batch=6, k=3, seed=2))
    assert any(not np.array_equal(next(other)["inputs"], x["inputs"]) for x in batches1[:3])


@pytest.mark.parametrize("streaming", [False, True])
def test_exact_resume(tmp_path, streaming):
    # Several epochs of a small corpus mixed with passkey documents; state saved mid-document.
    path = write_jsonl(tmp_path / "a.jsonl", texts(8, lo=20, hi=120))
    cfg = cfg_for([{"path": path, "streaming": streaming, "weight": 2.0},
                   {"path": "builtin:passkey", "min_chars": 150, "max_chars": 300}],
                  window=24, batch=4, k=2, seed=3)
    stream = BatchStream(cfg)
    for _ in range(7):
        next(stream)
    state = json.loads(json.dumps(stream.state()))
    epochs = [stream.docs[s].cursors[0].epoch for s in (0, 1)]
    expected = [next(stream) for _ in range(20)]
    # the resumed part crosses an epoch boundary of each slot's share
    assert all(stream.docs[s].cursors[0].epoch > epochs[s] for s in (0, 1))
    resumed = BatchStream(cfg)
    resumed.restore(state)
    for x, y in zip(expected, [next(resumed) for _ in range(20)]):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    with pytest.raises(DataError, match="saved for"):
        BatchStream(cfg_for([{"path": path}], window=24, batch=4, k=2, seed=3)).restore(state)


def mixed_cfg(path, streaming=False, **kw):
    """A local corpus mixed with passkey documents, 8 rows in 4 pack slots of k=2."""
    return cfg_for([{"path": path, "streaming": streaming, "weight": 2.0},
                    {"path": "builtin:passkey", "min_chars": 100, "max_chars": 250}],
                   window=16, batch=8, k=2, seed=4, **kw)


@pytest.mark.parametrize("streaming", [False, True])
def test_slots_give_exactly_their_rows_of_the_global_batch(tmp_path, streaming):
    path = write_jsonl(tmp_path / "a.jsonl", texts(40, lo=30, hi=150))
    cfg = mixed_cfg(path, streaming)
    full = BatchStream(cfg)
    one, odd = BatchStream(cfg, slots=[1]), BatchStream(cfg, slots=[3, 1])
    assert odd.slots == [1, 3]
    owners = {}
    for _ in range(6):
        b, b1, b13 = next(full), next(one), next(odd)
        for key in b:
            assert b1[key].shape == (2, 16) and b13[key].shape == (4, 16)
            np.testing.assert_array_equal(b1[key], b[key][2:4])
            np.testing.assert_array_equal(b13[key], np.concatenate([b[key][2:4], b[key][6:8]]))
        for p in range(4):  # doc ids stay unique across slots: no id appears in two packs
            for d in set(b["doc_ids"][2 * p:2 * p + 2].ravel().tolist()):
                assert owners.setdefault(d, p) == p
    # processes' states joined restore any set of slots, and continue exactly
    lo, hi = BatchStream(cfg, slots=[0, 1]), BatchStream(cfg, slots=[2, 3])
    for _ in range(4):
        next(lo), next(hi)
    joined = json.loads(json.dumps(merge_states([lo.state(), hi.state()])))
    assert sorted(joined["slots"]) == ["0", "1", "2", "3"]
    for slots in (None, [2], [0, 3]):
        ref, again = BatchStream(cfg), BatchStream(cfg, slots=slots)
        for _ in range(4):
            next(ref)
        again.restore(joined)
        rows = np.concatenate([np.arange(2 * s, 2 * s + 2) for s in again.slots])
        for _ in range(3):
            x, y = next(ref), next(again)
            for key in x:
                np.testing.assert_array_equal(y[key], x[key][rows])
    with pytest.raises(DataError, match=r"holds pack slots \[0, 1\], not \[2\]"):
        BatchStream(cfg, slots=[2]).restore(lo.state())
    with pytest.raises(DataError, match="not all among the 4 slots"):
        BatchStream(cfg, slots=[4])


@pytest.mark.parametrize("streaming", [False, True])
def test_slots_tokenize_only_their_own_documents(tmp_path, monkeypatch, streaming):
    """A process building slots {0, 1} of 4 reads and tokenizes exactly the documents that slots
    0 and 1 of the global batch use: none of slot 2's or 3's."""
    path = write_jsonl(tmp_path / "a.jsonl", texts(40, lo=30, hi=150))
    cfg = mixed_cfg(path, streaming)
    seen, passkeys = [], []
    tokenize = DocStream.tokenize
    monkeypatch.setattr(DocStream, "tokenize", lambda self, text: seen.append((self.slot, text))
                        or tokenize(self, text))
    getitem = PasskeyCorpus.__getitem__
    monkeypatch.setattr(PasskeyCorpus, "__getitem__", lambda self, i: passkeys.append(i)
                        or getitem(self, i))

    def run(slots):
        seen.clear(), passkeys.clear()
        stream = BatchStream(cfg, slots=slots)
        for _ in range(8):
            next(stream)
        return list(seen), list(passkeys)

    full, full_keys = run(None)
    part, part_keys = run([0, 1])
    assert {s for s, _ in full} == {0, 1, 2, 3} and {s for s, _ in part} == {0, 1}
    assert sorted(t for _, t in part) == sorted(t for s, t in full if s in (0, 1))
    mine = {t for _, t in part}
    assert not mine & {t for s, t in full if s in (2, 3)}
    assert part_keys and all(i % 4 in (0, 1) for i in part_keys)  # passkey document i is slot i % 4's
    assert sorted(part_keys) == sorted(i for i in full_keys if i % 4 in (0, 1))
    if not streaming:  # local document i belongs to slot i % 4
        ids = [int(re.match(r"doc (\d+):", t).group(1)) for t in mine if t.startswith("doc ")]
        assert ids and all(i % 4 in (0, 1) for i in ids)


# ------------------------------------------------------------------------------------------------
# The passkey prompt


REFERENCE_PROMPT = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will "
    "quiz you about the important information there.\n"
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass \n"
    "The pass key is 12345. Remember it. 12345 is the pass key.\n"
    "The grass is green. The sky is\n"
    "What is the pass key? The pass key is")


def test_passkey_prompt_matches_reference_text():
    prompt, answer = passkey.passkey_prompt(100, 30, 12345)
    assert prompt == REFERENCE_PROMPT
    assert answer == "12345"
    long, _ = passkey.passkey_prompt(1000, 0, 7)
    filler = long.split("\n")[1]
    assert len(filler) == 1000 and filler.startswith(passkey.FILLER + " " + passkey.FILLER + " The")


def test_passkey_keys_uniform_range():
    rng = np.random.default_rng(0)
    keys = [passkey.sample_key(rng) for _ in range(20000)]
    assert min(keys) >= 1 and max(keys) <= 49999
    assert min(keys) < 100 and max(keys) > 49900


def test_passkey_key_digits_uniform_lengths():
    rng = np.random.default_rng(0)
    lengths = np.bincount([len(str(passkey.sample_key(rng, digits=6))) for _ in range(6000)])
    assert lengths[0] == 0 and len(lengths) == 7  # 1..6 digits, never 0 or 7
    assert all(900 <= n <= 1100 for n in lengths[1:])  # each about 1000
    corpus = PasskeyCorpus(0, 100, 125, mixed_filler=0.0, intro=False, key_digits=2)
    keys = {int(corpus[i].rsplit(" ", 1)[1].rstrip(".")) for i in range(200)}
    assert keys <= set(range(1, 100)) and len(keys) > 50


def test_passkey_named_documents():
    """named=1: every document names its key in the key line and the question, with the answer
    last; named=0.5: about half of them; the key and name of one document agree everywhere."""
    import re

    corpus = PasskeyCorpus(3, 100, 170, mixed_filler=0.0, intro=False, key_digits=6, named=1.0)
    for i in range(50):
        m = re.fullmatch(r"(?s).*The pass key of ([A-Z]{3}) is (\d+)\. Remember it\. \2 is the pass key of \1\."
                         r".*\nWhat is the pass key of \1\? The pass key of \1 is \2\.", corpus[i])
        assert m, corpus[i]
    half = PasskeyCorpus(3, 100, 170, mixed_filler=0.0, intro=False, named=0.5)
    named = sum("The pass key of " in half[i] for i in range(400))
    assert 160 <= named <= 240
    plain = PasskeyCorpus(3, 100, 170, mixed_filler=0.0, intro=False)
    assert all(re.search(r"\nWhat is the pass key\? The pass key is \d+\.$", plain[i]) for i in range(50))


def test_build_passkey_prompt_byte_tokenizer():
    tok = ByteTokenizer()
    p = passkey.build_passkey_prompt(tok, 500, depth=0.25, key=4321)
    assert len(p.ids) == 500  # one byte per token: the prompt fills the target exactly
    assert p.ids == tok.encode(p.text)
    assert p.answer == "4321" and tok.decode(p.answer_ids) == " 4321"
    before, after = p.text.split(passkey.key_line(4321))
    assert abs(len(before) - len(passkey.INTRO) - 2 - 0.25 * p.n_garbage) <= 1
    with pytest.raises(ValueError, match="too small"):
        passkey.build_passkey_prompt(tok, 100, depth=0.5, key=1)


def test_build_passkey_prompt_sentencepiece(v2_tokenizer_path):
    from fot.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(v2_tokenizer_path))
    p = passkey.build_passkey_prompt(tok, 1000, depth=0.5, key=31337)
    assert 990 <= len(p.ids) <= 1000
    bigger, _ = passkey.passkey_prompt(p.n_garbage // 2 + 40, p.n_garbage - p.n_garbage // 2 + 40, 31337)
    assert len(tok.encode(bigger)) > 1000  # maximal, up to a few characters
    assert tok.decode(p.answer_ids).strip() == "31337"
