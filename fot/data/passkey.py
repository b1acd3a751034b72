"""The passkey retrieval prompt in the LongLLaMA/landmark format, shared by training data and evaluation.

Format facts (LongLLaMA `examples/utils/landmark_prompt.py`, after landmark-attention): five parts joined
by "\\n": the task description, a filler prefix, the key line, a filler suffix and the question. Filler is
the unit sentence group repeated with single spaces and cut to a number of *characters*; prefix and
suffix are both cut from the start of that repetition. The key is uniform in 1..49999 and the answer
is its decimal string.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
KEY_LOW, KEY_HIGH = 1, 50000  # half-open: keys 1..49999


def filler(n_chars: int) -> str:
    """The first `n_chars` characters of FILLER repeated with single spaces between repetitions."""
    reps = n_chars // (len(FILLER) + 1) + 1
    return " ".join([FILLER] * reps)[:n_chars]


NAME_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def key_line(key: int, name: str | None = None) -> str:
    """The key line; with `name`, the named variant of the multi-document task ("the pass key of
    QXZ is ...")."""
    if name is None:
        return f"The pass key is {key}. Remember it. {key} is the pass key."
    return f"The pass key of {name} is {key}. Remember it. {key} is the pass key of {name}."


def question(name: str | None = None) -> str:
    return QUESTION if name is None else f"What is the pass key of {name}? The pass key of {name} is"


def sample_name(rng: np.random.Generator, n_letters: int = 3) -> str:
    return "".join(NAME_LETTERS[int(i)] for i in rng.integers(0, len(NAME_LETTERS), n_letters))


def assemble(prefix: str, suffix: str, key: int, intro: bool = True, name: str | None = None) -> str:
    """The five parts joined by newlines, with the given filler texts around the key line (four
    without the task description when `intro` is false)."""
    return "\n".join([INTRO] * intro + [prefix, key_line(key, name), suffix, question(name)])


def passkey_prompt(n_garbage_prefix: int, n_garbage_suffix: int, key: int) -> tuple[str, str]:
    """(prompt, answer) with `n_garbage_prefix`/`n_garbage_suffix` filler characters around the key."""
    if n_garbage_prefix < 0 or n_garbage_suffix < 0:
        raise ValueError(f"filler lengths must be >= 0, got {n_garbage_prefix}, {n_garbage_suffix}")
    return assemble(filler(n_garbage_prefix), filler(n_garbage_suffix), key), str(key)


def sample_key(rng: np.random.Generator, digits: int | None = None) -> int:
    """A pass key uniform in 1..49999 (landmark's `randint(1, 50000)`); with `digits`, one with a
    number of digits uniform in 1..digits, then uniform among the numbers of that length."""
    if digits is None:
        return int(rng.integers(KEY_LOW, KEY_HIGH))
    n = int(rng.integers(1, digits + 1))
    return int(rng.integers(max(10 ** (n - 1), KEY_LOW), 10 ** n))


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str  # the prompt, ending with QUESTION
    answer: str  # str(key)
    ids: list[int]  # tokenized prompt, with BOS
    answer_ids: list[int]  # the tokens that continue `ids` with " {key}" (what greedy decoding must emit)
    n_garbage: int  # filler characters, prefix + suffix
    depth: float  # requested relative position of the key line in the filler
    key_span: tuple[int, int]  # the asked key line's tokens: ids[start:end] (BOS counted)


def _key_span(tokenizer, text: str, line: str) -> tuple[int, int]:
    # The last occurrence is the asked line (distractor lines come before it).
    start = text.rindex(line)
    return (len(tokenizer.encode(text[:start], bos=True)),
            len(tokenizer.encode(text[:start + len(line)], bos=True)))


def _answer_ids(tokenizer, prompt_ids: list[int], text: str, answer: str) -> list[int]:
    # The continuation of the prompt as it appears in a training document ("... is {K}"). Tokenizers
    # that merge across the boundary fall back to the answer encoded alone (the reference's choice).
    full = tokenizer.encode(text + " " + answer, bos=True)
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids):]
    return tokenizer.encode(answer, bos=False)


def build_passkey_prompt(tokenizer, target_tokens: int, depth: float, key: int) -> PasskeyPrompt:
    """The longest prompt whose tokenization (with BOS) has at most `target_tokens` tokens.

    Binary search over the total filler length in characters; the key line sits after
    round(depth * n_garbage) filler characters (depth 0 = right after the intro, 1 = before the question).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth}")

    def make(n: int) -> tuple[str, list[int]]:
        prefix = int(round(depth * n))
        text, _ = passkey_prompt(prefix, n - prefix, key)
        return text, tokenizer.encode(text, bos=True)

    text, ids = make(0)
    if len(ids) > target_tokens:
        raise ValueError(f"passkey prompt needs at least {len(ids)} tokens without filler; "
                         f"target_tokens={target_tokens} is too small")
    lo, hi = 0, 1024  # invariant: make(lo) fits; find hi that does not
    while len(make(hi)[1]) <= target_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(make(mid)[1]) <= target_tokens:
            lo = mid
        else:
            hi = mid
    text, ids = make(lo)
    answer = str(key)
    return PasskeyPrompt(text, answer, ids, _answer_ids(tokenizer, ids, text, answer), lo, depth,
                         _key_span(tokenizer, text, key_line(key)))


# The named-key multi-document task: D other documents, each a named key line after some filler, then
# the asked document, filler that pushes it out of the local window, and a question that names it.
DOC_FILLER_CHARS = 100


def named_tail(window: int) -> int:
    """Filler characters after the asked document: two windows (of bytes), so that the asked key,
    like the others, is read into memory before the question."""
    return 2 * window


def sample_named_keys(rng: np.random.Generator, n: int) -> list[tuple[str, int]]:
    """n (name, key) pairs, names and keys all distinct; the last one is the asked pair."""
    names: dict[str, int] = {}
    keys: set[int] = set()
    while len(names) < n:
        name, key = sample_name(rng), sample_key(rng)
        if name not in names and key not in keys:
            names[name] = key
            keys.add(key)
    return list(names.items())


def multidoc_text(docs: list[tuple[str, int]], tail_chars: int) -> str:
    """Every (name, key) as a document of filler and its key line, in order, then `tail_chars` of
    filler and the question naming the last one."""
    parts = [f"{filler(DOC_FILLER_CHARS)}\n{key_line(key, name)}" for name, key in docs]
    return "\n".join([*parts, filler(tail_chars), question(docs[-1][0])])


def build_multidoc_prompt(tokenizer, docs: list[tuple[str, int]], tail_chars: int) -> PasskeyPrompt:
    """The named-key prompt of `docs` (the last is asked); depth is that of the asked key line."""
    name, key = docs[-1]
    text = multidoc_text(docs, tail_chars)
    ids = tokenizer.encode(text, bos=True)
    answer = str(key)
    span = _key_span(tokenizer, text, key_line(key, name))
    return PasskeyPrompt(text, answer, ids, _answer_ids(tokenizer, ids, text, answer), tail_chars,
                         span[0] / len(ids), span)
