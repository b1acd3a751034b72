"""The RULER-style suite: exact prompt lengths, needle depths, task definitions checked by
independent solvers, RULER's string-match scoring, effective length, the CLI, training sources."""

import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from fot.config import SourceConfig
from fot.data import tasks
from fot.data.sources import DataError, DocStream, open_source
from fot.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from fot.eval import suite
from test_eval import tiny_model

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = re.compile(r"One of the magic (?:numbers|UUIDs|words) for (\S+) is (\S+)\.[ \n]")
VAR = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.")
ALL = list(tasks.TASKS)


def split(p):
    """(header, context, question) of a prompt: its first line, the middle, its last line."""
    head, rest = p.text.split("\n", 1)
    context, question = rest.rsplit("\n", 1)
    return head, context, question


# ------------------------------------------------------------------------------------------------
# Independent solvers: what a perfect reader of the prompt answers


def solve_niah(p):
    keys = re.search(r"for (.+)\? The magic", split(p)[2]).group(1).replace(", and ", ", ").split(", ")
    found = NEEDLE.findall(split(p)[1] + "\n")
    return [v for k in keys for key, v in found if key == k]


def run_vars(text):
    """A tiny interpreter: VAR statements in text order; each name's final value."""
    env = {}
    for name, ref, value in VAR.findall(text):
        env[name] = env[ref] if ref else value  # an unassigned reference would raise KeyError
    return env


def solve_vt(p):
    value = re.search(r"assigned the value (\d+) in", p.text).group(1)
    return [n for n, v in run_vars(split(p)[1]).items() if v == value]


def cwe_counts(p):
    entries = re.findall(r"(\d+)\. ([a-z]+)", split(p)[1])
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))  # numbered 1..m
    return Counter(w for _, w in entries)


def fwe_counts(p):
    return Counter(w for w in split(p)[1].split() if w.strip("."))  # the dots are noise


def solve(p):
    name = p.task.split(":")[0]
    if name.startswith("niah"):
        return solve_niah(p)
    if name == "vt":
        return solve_vt(p)
    counts = cwe_counts(p) if name == "cwe" else fwe_counts(p)
    return [w for w, _ in counts.most_common(len(p.expected))]


# ------------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize("name", ALL)
def test_byte_prompts_have_the_exact_length_and_the_solvers_answer(name):
    task, tok = tasks.parse_task(name), ByteTokenizer()
    for length in (1100, 1601, 4200):
        for j, depth in enumerate((0.0, 0.37, 1.0)):
            p = task.build(tok, length, depth, [7, length, j])
            assert len(p.ids) == length and p.ids == tok.encode(p.text, bos=True)
            assert sorted(solve(p)) == sorted(p.expected), (name, length, depth)
            assert p.answer == " " + ", ".join(p.expected) + "."


def test_a_haystack_fits_bytes_in_two_whole_prompt_encodes_without_a_pad():
    """The search's first step assumes a character per token: exact for bytes, so a needle
    prompt takes the minimal prompt, one full prompt and the needle's prefix, and no pad."""
    calls = []

    class Counting(ByteTokenizer):
        def encode(self, text, bos=True, eos=False):
            calls.append(len(text))
            return super().encode(text, bos, eos)

    for name in ("niah_prose", "niah_stdlib", "vt"):
        calls.clear()
        p = tasks.parse_task(name).build(Counting(), 20000, 0.5, [1])
        assert len(p.ids) == 20000 and p.info["pad"] == 0
        assert sum(n > 1000 for n in calls) == 2, (name, calls)


@pytest.mark.parametrize("spm", ["open_llama_v1.model", "open_llama_v2.model"])
def test_sentencepiece_prompts_have_the_exact_length(spm):
    from conftest import SHARED_TOKENIZERS

    if not (SHARED_TOKENIZERS / spm).is_file():
        pytest.skip("../shared/tokenizers is absent")
    tok = SentencePieceTokenizer(SHARED_TOKENIZERS / spm)
    for name in ALL:
        task = tasks.parse_task(name)
        if spm == "open_llama_v1.model" and name == "niah_stdlib":  # v1 merges runs of spaces
            with pytest.raises(tasks.TaskError, match="haystack='stdlib': this tokenizer cannot encode"):
                task.build(tok, 3001, 0.5, [3, 0])
            continue
        for length in (1000, 3001, 4096):
            for j in range(2):
                p = task.build(tok, length, j / 2, [3, j])
                assert len(p.ids) == length, (name, length, j)
                assert p.ids == tok.encode(p.text, bos=True)
                assert sorted(solve(p)) == sorted(p.expected), (name, length)


def boundaries(hay, line):
    """Starts of sentences (after '. ' or a newline), or of lines: where a needle may go."""
    ends = [m.end() for m in re.finditer(r"\n" if line else r"\. |\n", hay)]
    return [0, *ends]


@pytest.mark.parametrize("name", ["niah_filler", "niah_prose", "niah_stdlib", "niah_multikey",
                                  "niah_multikey_dense", "niah_multiquery", "vt"])
def test_the_asked_needle_is_at_the_asked_depth(name):
    tok, line = ByteTokenizer(), name in ("niah_stdlib", "niah_multikey_dense")
    pattern = VAR if name == "vt" else re.compile(NEEDLE.pattern[:-5])  # the sentence, no separator
    for j, depth in enumerate((0.0, 0.1, 0.5, 0.83, 1.0)):
        p = tasks.parse_task(name).build(tok, 3000, depth, [j])
        head, context, _ = split(p)
        start = p.text.index(p.info["chains"][0][0] + " = " if name == "vt" else
                             f"for {p.info['asked'][0]} is {p.info['values'][p.info['keys'].index(p.info['asked'][0])][0]}.")
        start = p.text.rfind("VAR " if name == "vt" else "One of", 0, start) - len(head) - 1
        # Remove the inserted sentences (each with its separator): what is left is the haystack.
        ours = {f"One of the magic numbers for {k} is {v}." for k, vs in zip(p.info.get("keys", []),
                                                                         p.info.get("values", [])) for v in vs}
        sep = "\n" if line else " "
        # The haystack of niah_multikey_dense is needles: only the drawn ones were inserted.
        spans = [(m.start(), m.end() + 1) for m in pattern.finditer(context) if context[m.end():m.end() + 1] == sep
                 and (name != "niah_multikey_dense" or m.group(0) in ours)]
        hay, shift, at = "", 0, 0
        for a, b in spans:
            hay += context[at:a]
            if a < start:
                shift += b - a
            at = b
        hay += context[at:]
        n = p.info["size"]
        assert len(hay) == n + p.info["pad"]
        hay = hay[:n]
        if name in ("niah_filler", "vt"):
            assert hay == " ".join([FILLER] * (n // len(FILLER) + 1))[:n]
        target = round(depth * n)
        assert start - shift == max(b for b in boundaries(hay, line) if b <= target)
    assert abs(p.needle_token / len(p.ids) - (len(head) + 1 + start) / len(p.text)) < 1e-3


@pytest.mark.parametrize("name", ["niah_multikey", "niah_multikey_dense", "niah_multivalue", "niah_multiquery",
                                  "niah_multikey:key_kind=uuids:value_kind=uuids:keys=6:queries=2"])
def test_each_key_once_and_distractors_distinct(name):
    task = tasks.parse_task(name)
    for j in range(4):
        p = task.build(ByteTokenizer(), 2500, 0.5, [j])
        found = NEEDLE.findall(split(p)[1] + "\n")
        keys = Counter(k for k, _ in found)
        values = [v for _, v in found]
        assert len(set(values)) == len(values)  # every value once
        per_key = task.family.values
        assert all(keys[k] == per_key for k in p.info["asked"])  # each asked key: its values, once each
        assert all(c == per_key for c in keys.values())  # every key (distractors too) only in its needles
        if name != "niah_multikey_dense":
            assert sorted(keys) == sorted(p.info["keys"])
        assert len(p.expected) == task.family.queries * per_key
        distractors = [v for k, v in found if k not in p.info["asked"]]
        assert not set(distractors) & set(p.expected)
        if name.startswith("niah_multikey"):
            assert distractors  # there are distractors


@pytest.mark.parametrize("spec", ["vt", "vt:chains=3:hops=2", "vt:hops=7:haystack=prose"])
def test_variable_tracking_chains_resolve_to_the_listed_names(spec):
    task = tasks.parse_task(spec)
    for j in range(5):
        p = task.build(ByteTokenizer(), 2000, j / 4, [j])
        env = run_vars(split(p)[1])
        assert len(env) == task.family.chains * (task.family.hops + 1)  # names distinct over chains
        assert sorted(solve_vt(p)) == sorted(p.expected) and len(p.expected) == task.family.hops + 1
        assert len(set(env.values())) == task.family.chains  # one value per chain, distinct


def test_common_and_frequent_word_counts():
    for length, freq, rare in ((1500, 6, 1), (4096, 30, 3)):  # RULER's defaults below / from 4096
        p = tasks.parse_task("cwe").build(ByteTokenizer(), length, None, [length])
        counts = cwe_counts(p)
        assert all(counts[w] == freq for w in p.expected) and len(p.expected) == 10
        assert max(c for w, c in counts.items() if w not in p.expected) <= rare
    p = tasks.parse_task("cwe:words=5:freq=4:rare_freq=2").build(ByteTokenizer(), 900, None, [0])
    assert all(cwe_counts(p)[w] == 4 for w in p.expected) and len(p.expected) == 5
    for spec in ("fwe", "fwe:top=5:alpha=1.5"):
        task = tasks.parse_task(spec)
        p = task.build(ByteTokenizer(), 3000, None, [1])
        ranked = fwe_counts(p).most_common()
        k = task.family.top
        assert [w for w, _ in ranked[:k]] == p.expected
        assert ranked[k - 1][1] > ranked[k][1]  # strictly: the answer is well defined
        assert Counter(split(p)[1].split())["...."] > ranked[0][1]  # the noise is the most frequent


def test_prompts_are_seeded():
    tok = ByteTokenizer()
    for name in ALL:
        task = tasks.parse_task(name)
        a, b, c = (task.build(tok, 1300, 0.4, s) for s in ([1, 2], [1, 2], [1, 3]))
        assert a == b and a.text != c.text
    plan = suite.plan_trials(suite.parse_tasks("vt,cwe"), [1200, 2000], 3, "uniform", 5)
    alone = suite.plan_trials(suite.parse_tasks("cwe"), [2000], 3, "uniform", 5)
    assert [t["seq"] for t in plan[-3:]] == [t["seq"] for t in alone]  # independent of other cells
    assert [t["depth"] for t in plan[-3:]] == [t["depth"] for t in alone]


@pytest.mark.parametrize("spec, message", [
    ("niah_single", "unknown task 'niah_single'"),
    ("niah_multikey:queries=5", "queries=5 exceeds keys=4"),
    ("vt:depth=2", "'depth=2' is not OPTION=VALUE"),
    ("vt:hops=0", "hops must be >= 1"),
    ("vt:haystack=essay", "haystack='essay' is not one of filler, prose"),
    ("cwe:freq=3:rare_freq=3", "rare_freq=3 must be below freq=3"),
    ("niah_filler:key_kind=colors", "key_kind='colors' is not one of words"),
])
def test_bad_task_input(spec, message):
    with pytest.raises(tasks.TaskError, match=re.escape(message)):
        tasks.parse_task(spec)


def test_more_keys_than_fit():
    with pytest.raises(tasks.TaskError, match=r"below the task's minimal prompt \(\d+ tokens"):
        tasks.parse_task("niah_multikey:keys=40").build(ByteTokenizer(), 1500, 0.5, [0])


class SpaceMergingTokenizer(ByteTokenizer):
    """Bytes after collapsing runs of spaces, as OpenLLaMA v1's SentencePiece model does."""

    def encode(self, text, bos=True, eos=False):
        return super().encode(re.sub(" +", " ", text), bos, eos)


def test_a_tokenizer_that_cannot_encode_the_haystack():
    lossy = SpaceMergingTokenizer()
    suite.check_lengths(lossy, suite.parse_tasks("niah_prose,vt"), [1500, 3000])  # no runs of spaces
    with pytest.raises(tasks.TaskError) as e:
        suite.check_lengths(lossy, suite.parse_tasks("niah_stdlib"), [1500, 3000])  # indented code
    assert str(e.value).startswith("task 'niah_stdlib': option haystack='stdlib': this tokenizer cannot "
                                   "encode the prompt (character ") and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# Scoring and report


def test_string_match_follows_ruler():
    # RULER, scripts/eval/synthetic/constants.py: per sample, all = found / len(refs), part = any
    # found, case-insensitive substring; the corpus score is the mean x 100.
    refs = ["1234567", "Blue-Owl", "999"]
    assert suite.string_match_all("The numbers: 1234567 and blue-owl.", refs) == pytest.approx(2 / 3)
    assert suite.string_match_part("The numbers: 1234567 and blue-owl.", refs) == 1.0
    assert suite.string_match_all("nothing here", refs) == 0.0 == suite.string_match_part("nothing", refs)
    assert suite.string_match_all("x12345678", ["1234567"]) == 1.0  # a substring counts, as in RULER
    preds = ["a b", "b", "c"]
    refs = [["a", "b"], ["a", "b"], ["d"]]
    ruler_all = round(sum([1.0, 0.5, 0.0]) / 3 * 100, 2)  # 50.0
    assert round(np.mean([suite.string_match_all(p, r) for p, r in zip(preds, refs)]) * 100, 2) == ruler_all


def test_effective_length():
    acc = {1024: 1.0, 2048: 0.9, 4096: 0.5, 8192: 0.95}
    assert suite.effective_length(acc, 0.85) == 2048  # 8k passes, but 4k already failed
    assert suite.effective_length(acc, 0.95) == 1024
    assert suite.effective_length({1024: 0.5}, 0.85) is None
    assert suite.effective_length({4096: 0.85, 1024: 0.9}, 0.85) == 4096  # sorted, >= inclusive


class Oracle:
    """The generate interface: answers what the independent solvers find (right) or nothing."""

    tokenizer = ByteTokenizer()

    def __init__(self, right=True):
        self.right = right

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0):
        text = self.tokenizer.decode(prompt_ids)
        head, rest = text.split("\n", 1)
        task = next(n for n in ALL if n.startswith("niah")) if "magic" in head else \
            "vt" if "VAR" in text else "cwe" if "numbered" in head else "fwe"
        top = {"cwe": 10, "fwe": 3}.get(task, 0)  # the default options' answer sizes
        p = tasks.TaskPrompt(task, text, [], [""] * top, "", None, None, {})
        answer = " " + ", ".join(solve(p)) if self.right else " no idea"
        return self.tokenizer.encode(answer, bos=False)[:max_new_tokens]


def test_run_suite_scores_and_report(tmp_path):
    specs = suite.parse_tasks("niah_multiquery,vt,cwe,fwe")
    right = suite.run_suite(Oracle(True), specs, [1200, 1500], 2, seed=0, method="oracle", progress=False)
    wrong = suite.run_suite(Oracle(False), specs, [1200, 1500], 2, seed=0, method="none", progress=False)
    assert len(right) == 16 and all(t["score"] == 1.0 and t["correct"] for t in right)
    assert all(t["score"] == 0.0 and t["prompt_tokens"] == t["length"] for t in wrong)
    assert [t["expected"] for t in right] == [t["expected"] for t in wrong]
    paths = suite.write_suite_report(tmp_path, right + wrong, {"command": "x"}, name="suite", threshold=0.85)
    data = json.loads(paths["json"].read_text())
    assert data["tasks"]["oracle"]["vt"]["effective_length"] == 1500
    assert data["tasks"]["none"]["vt"]["effective_length"] is None
    md = paths["md"].read_text()
    assert "| vt | 1.00 [0.34, 1.00] 2/2 | 1.00 [0.34, 1.00] 2/2 | 1500 |" in md
    assert "| vt | 0.00 [0.00, 0.66] 0/2 | 0.00 [0.00, 0.66] 0/2 | — |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# CLI and training source


def test_cli_writes_outputs_and_rejects_bad_input(tmp_path, capsys):
    tiny_model(memory_layers=[1]).save(tmp_path / "fot")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fot.eval.suite", str(tmp_path / "fot"), "--tasks", "niah_filler,vt:hops=2,named",
           "--lengths", "300", "--trials", "2", "--distractors", "1", "retrieval.last_context_length=64",
           "--no-progress", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads((out / "results.json").read_text())
    assert [(t["task"], t["method"]) for t in data["trials"]] == [("niah_filler", "fot-dense")] * 2 + \
        [("vt:hops=2", "fot-dense")] * 2 + [("named", "fot-dense")] * 2
    for t in data["trials"]:
        assert {"task", "length", "depth", "seed", "prompt_tokens", "expected", "prediction", "score"} <= set(t)
    assert all(t["prompt_tokens"] == 300 for t in data["trials"][:4])
    # 300 tokens, the last 64 in the local context: the others were read into the memory.
    assert [t["key_in"] for t in data["trials"][:4]] == ["memory" if t["needle_token"] < 300 - 64 else "local"
                                                       for t in data["trials"][:4]]
    assert "| vt:hops=2 |" in (out / "results.md").read_text() and (out / "score.png").stat().st_size > 0
    model = str(tmp_path / "fot")
    for args, message in ((["--tasks", "needle"], "unknown task 'needle'"),
                          (["--tasks", "cwe", "--lengths", "500"], "--lengths 500: task cwe needs at least"),
                          (["--trials", "0"], "--trials must be positive"),
                          (["--tasks", "vt:hops=x"], "hops='x' is not a number")):
        assert suite.main([model, "--out", str(tmp_path / "bad"), "--lengths", "300", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_task_training_source():
    cfg = SourceConfig(path="builtin:task:niah_multikey:keys=3", min_chars=400, max_chars=700)
    src = open_source(cfg, seed=4)
    again = open_source(cfg, seed=4)
    for i in range(5):
        doc = src.text(0, i)
        assert doc == again.text(0, i)
        prompt, answer = doc.rsplit(" is ", 1)
        assert 400 <= len(prompt + " is") <= 700  # the prompt fitted to 400..700 bytes
        p = tasks.TaskPrompt("niah", prompt + " is", [], [], "", None, None, {})
        assert answer == ", ".join(solve_niah(p)) + "."  # the document ends with its own answer
    stream = DocStream([src], [1.0], ByteTokenizer(), seed=0, window=128)
    assert all(stream.refetch(d.addr).tolist() == d.tokens.tolist() for d in (stream.next() for _ in range(3)))
    with pytest.raises(DataError, match="unknown task 'nope'"):
        open_source(SourceConfig(path="builtin:task:nope"), seed=0)
    with pytest.raises(DataError, match="min_chars=100 is below the task's shortest prompt"):
        open_source(SourceConfig(path="builtin:task:cwe", min_chars=100), seed=0)


def test_task_sources_in_a_config():
    from fot.config import ConfigError, config_from_dict

    cfg = config_from_dict({"data": {"sources": [{"path": "builtin:task:niah_multikey:keys=8"}]}})
    assert cfg.data.sources[0].path == "builtin:task:niah_multikey:keys=8"
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path = 'builtin:task:nope': unknown task 'nope'"):
        config_from_dict({"data": {"sources": [{"path": "builtin:task:nope"}]}})
