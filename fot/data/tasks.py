"""RULER-style synthetic long-context tasks: seeded prompts of an exact token length.

The reference is RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
Language Models?", 2024; github.com/NVIDIA/RULER, `scripts/synthetic.yaml` and
`scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,freq_words_extraction}.py`):
its task families and their parameters (RULER's names in brackets), with fot's own wording and code
and no download: RULER's essay haystack is replaced by seeded prose from a built-in word list and by
the interpreter's own standard library (as builtin:stdlib).

- `niah`: needles "One of the magic numbers for KEY is VALUE." hidden in a haystack (`filler`: the
  passkey filler, RULER's noise; `prose`; `stdlib`; `needles`: the haystack is itself distractor
  needles, RULER's multikey_2/3). Options: `keys` (needles' keys, the others distractors;
  multikey), `values` per key (multivalue), `queries` (keys asked at once; multiquery), `key_kind`
  words | numbers | uuids, `value_kind` numbers | uuids. The expected strings are every value of
  every asked key.
- `vt` (variable_tracking): `chains` chains "VAR A = 12345.", "VAR B = VAR A.", ... of `hops` hops
  in a haystack; the expected strings are the names of the asked chain.
- `cwe` (common_words_extraction): a numbered list where `words` common words appear `freq` times
  and the others at most `rare_freq` times; expected: the common words.
- `fwe` (freq_words_extraction): words drawn from a Zipf law of exponent `alpha` over `vocab`
  coded words (the most frequent one is the noise "...."); expected: the `top` next most frequent.

Exact length: a prompt is the task's text at some size (haystack characters; list entries for cwe
and fwe), found by the secant method to within a few tokens of the target, and, unless that size
tokenizes to exactly the target, a pad of ". " units after the context that fills the rest. A
needle's depth d puts it at the start of the sentence (line, for line-based haystacks) that holds
the context character round(d * n), n the haystack's characters; the first needle of the first asked
key (vt: the asked chain's value) is the one at the asked depth, the others at seeded uniform depths
(vt: the asked chain's other assignments after its first, in order).

A trial is a pure function of (tokenizer, task, target tokens, depth, seed sequence).
"""

from __future__ import annotations

import dataclasses
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from fot.data import passkey
from fot.data.builtin import read_text, stdlib_files
from fot.data.tokenizer import ByteTokenizer

# A small vocabulary of our own for the prose haystack and for word keys (adjective-noun pairs).
ADJECTIVES = ("amber ancient bitter bold brave brief bright broad calm careful cheap clever cold "
              "curious damp dark deep distant dry dull eager early easy empty faint fair fierce "
              "flat fresh gentle glad golden grand green heavy hidden hollow honest huge humble "
              "idle jolly keen kind large late lazy light little lively lonely loud lucky mellow "
              "merry mild modern narrow neat noble odd old pale plain polite proud quick quiet "
              "rapid rare rich rough round royal rusty sharp shy silent silver simple slow small "
              "smooth soft solid sour spare steady steep still strange strong sudden sweet swift "
              "tall tame tender thick thin tidy tiny tired vast warm weary wet wide wild wise young").split()
NOUNS = ("anchor apple arrow badge barn basket beach bell berry bird blanket boat bottle bridge brook "
         "bucket cabin camera candle canyon castle cave cellar chair cliff clock cloud coat comet "
         "copper cottage crown desert door dragon drum eagle engine falcon feather fence field flame "
         "flower forest fountain garden gate glacier harbor hammer harvest helmet hill horse island "
         "jacket kettle key ladder lake lantern leaf letter lion market meadow mirror mountain needle "
         "ocean orchard owl painter palace pebble pencil piano pillow planet pond puzzle rabbit "
         "river road rocket saddle sail shadow shell ship shore signal sparrow spoon stable star "
         "stone storm street summit table temple thread tower train tunnel valley village violin "
         "wagon wall whale window wolf").split()
VERBS = ("admires builds carries chases cleans covers crosses drags drops finds follows gathers greets "
         "guards hides holds keeps leaves lifts mends moves opens paints passes pulls pushes reaches "
         "repairs sells sends shakes shapes shows sorts spots takes throws touches visits watches").split()
PREPOSITIONS = "above across after behind below beside beyond near past toward under within".split()

NOISE_WORD = "...."  # fwe: the most frequent word, to be ignored (RULER's "dots")
PAD_UNIT = ". "
PAD_SLACK = 8  # fit: the size search stops this many tokens short at most; the pad fills the rest


class TaskError(ValueError):
    """Bad task input; the message names the task and the option."""


# ------------------------------------------------------------------------------------------------
# Haystacks: the first n characters of a seeded, unbounded text


class Haystack:
    """`take(n)`: the first n characters of the haystack `kind` seeded with `seed`; `line`: needles
    go at line starts (stdlib, needles) rather than at sentence starts (filler, prose)."""

    KINDS = ("filler", "prose", "stdlib", "needles")

    def __init__(self, kind: str, seed: int, needle_line: Callable[[], str] | None = None):
        self.kind, self.line = kind, kind in ("stdlib", "needles")
        self.rng = np.random.default_rng([seed, zlib.crc32(kind.encode())])
        self.needle_line = needle_line
        self.parts: list[str] = []
        self.size = 0
        self.text = ""
        self._file = int(self.rng.integers(1 << 30))  # stdlib: the first file's index

    def take(self, n: int) -> str:
        if self.kind == "filler":
            return passkey.filler(n)
        if self.size < n:
            goal = max(n, 2 * self.size)  # grow geometrically: take() is called often
            while self.size < goal:
                part = self._next()
                self.parts.append(part)
                self.size += len(part)
            self.text = "".join(self.parts)
        return self.text[:n]

    def _next(self) -> str:
        if self.kind == "prose":
            return _sentence(self.rng) + " "
        if self.kind == "needles":
            return self.needle_line() + "\n"
        files = stdlib_files(2000, None)
        self._file += 1
        return read_text(files[self._file % len(files)]).strip("\n") + "\n\n"


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _sentence(rng: np.random.Generator) -> str:
    """One sentence of a few seeded shapes over the word lists."""
    adj, noun, verb, prep = (lambda w=w: _pick(rng, w) for w in (ADJECTIVES, NOUNS, VERBS, PREPOSITIONS))
    shape = int(rng.integers(4))
    if shape == 0:
        s = f"the {adj()} {noun()} {verb()} the {noun()}"
    elif shape == 1:
        s = f"a {noun()} {prep()} the {adj()} {noun()} {verb()} a {adj()} {noun()}"
    elif shape == 2:
        s = f"every {adj()} {noun()} {verb()} the {noun()} {prep()} the {noun()}"
    else:
        s = f"the {noun()} is {adj()} and the {noun()} is {adj()}"
    return s[0].upper() + s[1:] + "."


def insert(hay: str, items: Sequence[tuple[float, str]], line: bool) -> tuple[str, list[int]]:
    """`hay` with each (depth, text) at the start of the sentence (after ". " or a newline; with
    `line`, of the line) that holds character round(depth * len(hay)), followed by a space (a
    newline); items at one place keep their order. Returns the text and each item's start in it."""
    n, sep = len(hay), "\n" if line else " "
    places = []
    for i, (depth, _) in enumerate(items):
        p = int(round(depth * n))
        b = hay.rfind("\n", 0, p) + 1
        j = -1 if line else hay.rfind(". ", 0, p)
        b = max(b, j + 2 if j >= 0 else 0)
        places.append((b, i))
    pieces, starts, at, size = [], [0] * len(items), 0, 0
    for b, i in sorted(places):
        pieces.append(hay[at:b])
        size += b - at
        starts[i] = size
        pieces.append(items[i][1] + sep)
        size += len(items[i][1]) + 1
        at = b
    pieces.append(hay[at:])
    return "".join(pieces), starts


# ------------------------------------------------------------------------------------------------
# Exact token length


def pad(k: int) -> str:
    """The first k characters of ". . . ": one token per character for the byte tokenizer, and
    never two spaces in a row (OpenLLaMA v1's tokenizer merges them), whatever precedes it."""
    return (PAD_UNIT * (k // 2 + 1))[:k]


def fit(tokenizer, target: int, make: Callable[[int, str], str], min_size: int, where: str
        ) -> tuple[int, str, str, list[int]]:
    """(size, pad, text, ids) with len(ids) == target (BOS counted): make(size, pad) at the size
    found by the secant method from min_size (within the bracket once a size overshoots; a
    bisection if it keeps landing on one side) until it is at most PAD_SLACK tokens short, then,
    unless it hits the target, the pad that fills the rest (at that size or a few below). Each step
    encodes the whole prompt, so the steps are few: the first assumes the minimal prompt's units of
    size per token (one character per token when min_size is 0: exact for bytes), later ones go
    through the last two points; near the target a size step moves the count by 0-2 tokens, and a
    pad unit by one."""
    def count(size: int, p: str = "") -> tuple[str, list[int]]:
        text = make(size, p)
        return text, tokenizer.encode(text, bos=True)

    text, ids = count(min_size)
    if len(ids) > target:
        raise TaskError(f"{where}: length {target} is below the task's minimal prompt ({len(ids)} "
                        f"tokens with this tokenizer)")
    lo, t_lo, hi, best = min_size, len(ids), None, (min_size, text, ids)
    last = [(min_size, len(ids))]  # the points the secant goes through, newest last
    sides = ""  # which end of the bracket each step moved ("l"/"h")
    while t_lo < target - PAD_SLACK and (hi is None or hi - lo > 1):
        if len(last) == 1:  # the minimal prompt's units per token (cwe, fwe: words), else one
            x = lo + max(round((target - t_lo) * (lo / t_lo if lo else 1.0)), 1)
        elif hi is not None and sides[-3:] in ("lll", "hhh"):  # the secant stuck on one side: bisect
            x, sides = (lo + hi) // 2, ""
        else:  # aim at the middle of the pad's range
            (x0, t0), (x1, t1) = last[-2:]
            x = x1 + round((target - PAD_SLACK // 2 - t1) * (x1 - x0) / (t1 - t0)) if t1 != t0 else x1 + 1
        x = max(x, lo + 1) if hi is None else min(max(x, lo + 1), hi - 1)
        text, ids = count(x)
        last.append((x, len(ids)))
        if len(ids) <= target:
            lo, t_lo, best, sides = x, len(ids), (x, text, ids), sides + "l"
        else:
            hi, sides = x, sides + "h"
    if t_lo == target:
        return best[0], "", best[1], best[2]
    per_char = len(tokenizer.encode(pad(64), bos=False)) / 64
    for size in range(lo, max(lo - 8, min_size - 1), -1):
        gap = target - (t_lo if size == lo else len(count(size)[1]))
        k, tried = max(round(gap / per_char), 1), set()
        while k >= 1 and k not in tried:  # walk k towards the target until it is hit or crossed
            text, ids = count(size, pad(k))
            tried.add(k)
            if len(ids) == target:
                return size, pad(k), text, ids
            k += 1 if len(ids) < target else -1
    raise TaskError(f"{where}: no prompt of exactly {target} tokens found with this tokenizer")


# ------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class TaskPrompt:
    task: str  # the task's spec ("niah_multikey", "vt:hops=2")
    text: str  # the prompt, ending with the answer's lead-in
    ids: list[int]  # tokenized with BOS: exactly the target length
    expected: list[str]  # the reference strings (scored by string match)
    answer: str  # the canonical continuation (a training document is text + answer)
    depth: float | None  # the asked depth (None: cwe, fwe)
    needle_token: int | None  # the first token of the needle at that depth (BOS counted)
    info: dict  # task-specific: keys, values, names, the haystack's characters, the pad


class _Draws:
    """Distinct keys and values for one prompt (a distractor never equals an asked key or value)."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.seen = rng, set()

    def draw(self, kind: str, digits: int = 7) -> str:
        while True:
            if kind == "words":
                s = f"{_pick(self.rng, ADJECTIVES)}-{_pick(self.rng, NOUNS)}"
            elif kind == "numbers":  # seven digits, as RULER's needles
                s = str(int(self.rng.integers(10 ** (digits - 1), 10 ** digits)))
            elif kind == "uuids":
                s = str(uuid.UUID(bytes=self.rng.bytes(16), version=4))
            else:
                raise TaskError(f"kind {kind!r} is not one of words, numbers, uuids")
            if s not in self.seen:
                self.seen.add(s)
                return s


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def _listed(items: Sequence[str]) -> str:
    return " " + ", ".join(items) + "."


@dataclass(frozen=True)
class Layout:
    """What a family draws for one trial before the length is fitted: make(size, pad) -> (text,
    start of the needle at the asked depth or None)."""

    make: Callable[[int, str], tuple[str, int | None]]
    min_size: int
    expected: list[str]
    info: dict


class Family:
    """A task family: options as dataclass fields, `layout` draws one trial."""

    def check(self, where: str) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v < 1:
                raise TaskError(f"{where}: option {f.name} must be >= 1, got {v}")
        if getattr(self, "haystack", Haystack.KINDS[0]) not in Haystack.KINDS:
            raise TaskError(f"{where}: option haystack={self.haystack!r} is not one of "
                            f"{', '.join(Haystack.KINDS)}")

    def layout(self, rng: np.random.Generator, depth: float, target: int) -> Layout:
        raise NotImplementedError


@dataclass(frozen=True)
class Niah(Family):
    haystack: str = "filler"
    keys: int = 1
    values: int = 1
    queries: int = 1
    key_kind: str = "words"
    value_kind: str = "numbers"

    def check(self, where: str) -> None:
        super().check(where)
        if self.queries > self.keys:
            raise TaskError(f"{where}: option queries={self.queries} exceeds keys={self.keys}")
        for name in ("key_kind", "value_kind"):
            if getattr(self, name) not in ("words", "numbers", "uuids"):
                raise TaskError(f"{where}: option {name}={getattr(self, name)!r} is not one of words, "
                                f"numbers, uuids")

    def layout(self, rng, depth, target):
        noun = {"numbers": "number", "uuids": "UUID", "words": "word"}[self.value_kind]
        draws = _Draws(rng)
        keys = [draws.draw(self.key_kind) for _ in range(self.keys)]
        values = [[draws.draw(self.value_kind) for _ in range(self.values)] for _ in keys]
        asked = [int(i) for i in rng.permutation(self.keys)[:self.queries]]
        line = lambda k, v: f"One of the magic {noun}s for {k} is {v}."  # noqa: E731
        needles = [line(keys[asked[0]], values[asked[0]][0])]
        needles += [line(k, v) for i, k in enumerate(keys) for j, v in enumerate(values[i])
                    if (i, j) != (asked[0], 0)]
        items = [(depth, needles[0])] + [(float(rng.random()), s) for s in needles[1:]]
        hay = Haystack(self.haystack, int(rng.integers(1 << 31)),
                       lambda: line(draws.draw(self.key_kind), draws.draw(self.value_kind)))
        expected = [v for i in asked for v in values[i]]
        query = _and([keys[i] for i in asked])
        one = len(expected) == 1
        head = f"{'A magic ' + noun + ' is' if one else 'Some magic ' + noun + 's are'} hidden in the " \
               f"text below. Memorize {'it' if one else 'them'}: a question about {'it' if one else 'them'} follows."
        question = (f"What is the magic {noun} for {query}? The magic {noun} for {query} is" if one else
                    f"What are all the magic {noun}s for {query}? The magic {noun}s for {query} are")

        def make(n: int, p: str) -> tuple[str, int]:
            context, starts = insert(hay.take(n), items, hay.line)
            return f"{head}\n{context}{p}\n{question}", len(head) + 1 + starts[0]

        return Layout(make, 0, expected, {"keys": keys, "values": values, "asked": [keys[i] for i in asked],
                                          "haystack": self.haystack})


@dataclass(frozen=True)
class VariableTracking(Family):
    haystack: str = "filler"
    chains: int = 1
    hops: int = 4

    def layout(self, rng, depth, target):
        draws = _Draws(rng)
        names, values, lines, items = [], [], [], []
        for c in range(self.chains):
            chain = []
            while len(chain) < self.hops + 1:  # five capital letters, distinct over all chains
                s = "".join(chr(65 + int(i)) for i in rng.integers(0, 26, 5))
                if s not in draws.seen:
                    draws.seen.add(s)
                    chain.append(s)
            value = draws.draw("numbers", 5)  # five digits, as RULER's; distinct over the chains
            names.append(chain)
            values.append(value)
            stmts = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
            # The asked chain (0) starts at the asked depth, its later hops after it; others anywhere.
            first = depth if c == 0 else float(rng.random())
            rest = np.sort(rng.uniform(first, 1.0, self.hops))
            items += list(zip([first, *map(float, rest)], stmts))
            lines.append(stmts)
        hay = Haystack(self.haystack, int(rng.integers(1 << 31)))
        head = "Track the chains of variable assignments hidden in the text below."
        question = (f"Question: which variables are assigned the value {values[0]} in the text above? "
                    f"Answer: the {self.hops + 1} variables assigned the value {values[0]} are")

        def make(n: int, p: str) -> tuple[str, int]:
            context, starts = insert(hay.take(n), items, hay.line)
            return f"{head}\n{context}{p}\n{question}", len(head) + 1 + starts[0]

        return Layout(make, 0, names[0], {"chains": names, "values": values, "haystack": self.haystack})


def _pseudo_words(rng: np.random.Generator, taken: set[str]):
    """Unbounded distinct lowercase words: the built-in lists shuffled, then consonant-vowel syllables."""
    for w in rng.permutation(sorted(set(ADJECTIVES + NOUNS + VERBS))):
        if w not in taken:
            taken.add(str(w))
            yield str(w)
    cons, vows = "bdfgklmnprstvz", "aeiou"
    while True:
        w = "".join(cons[int(rng.integers(len(cons)))] + vows[int(rng.integers(len(vows)))]
                    for _ in range(int(rng.integers(2, 5))))
        if w not in taken:
            taken.add(w)
            yield w


@dataclass(frozen=True)
class CommonWords(Family):
    """RULER's defaults: 10 common words 30 times, the others 3 times; below 4096 tokens 6 and 1."""

    words: int = 10
    freq: int | None = None
    rare_freq: int | None = None

    def check(self, where: str) -> None:
        super().check(where)
        if self.freq is not None and self.rare_freq is not None and self.rare_freq >= self.freq:
            raise TaskError(f"{where}: option rare_freq={self.rare_freq} must be below freq={self.freq}")

    def layout(self, rng, depth, target):
        freq = self.freq or (30 if target >= 4096 else 6)
        rare = self.rare_freq or (3 if target >= 4096 else 1)
        if rare >= freq:
            raise TaskError(f"cwe: option rare_freq={rare} must be below freq={freq}")
        pool = _pseudo_words(rng, set())
        common = [next(pool) for _ in range(self.words)]
        rares: list[str] = []
        base = int(rng.integers(1 << 31))
        head = ("Below is a numbered list of words; some of them occur more often than the others. "
                "Memorize the most frequent ones.")
        question = (f"Question: which {self.words} words occur most often in the list above? Answer: "
                    f"the {self.words} most frequent words are")

        def make(m: int, p: str) -> tuple[str, None]:
            n_rare = -(-(m - len(common) * freq) // rare)
            while len(rares) < n_rare:
                rares.append(next(pool))
            entries = (common * freq + [w for w in rares[:n_rare] for _ in range(rare)])[:m]
            order = np.random.default_rng([base, m]).permutation(m)
            listed = " ".join(f"{i + 1}. {entries[j]}" for i, j in enumerate(order))
            return f"{head}\n{listed}{p}\n{question}", None

        return Layout(make, self.words * freq, common, {"freq": freq, "rare_freq": rare})


@dataclass(frozen=True)
class FrequentWords(Family):
    """RULER's defaults: alpha 2, 2000 coded words of six letters, the top 3 after the noise."""

    alpha: float = 2.0
    vocab: int = 2000
    top: int = 3

    def check(self, where: str) -> None:
        super().check(where)
        if not self.alpha > 0:
            raise TaskError(f"{where}: option alpha must be positive, got {self.alpha}")
        if self.top + 1 >= self.vocab:
            raise TaskError(f"{where}: option top={self.top} needs vocab > {self.top + 1}")

    def counts(self, m: int) -> np.ndarray:
        """Occurrences of rank k (0 = the noise) among about m words: floor(m k^-alpha / H)."""
        w = np.arange(1, self.vocab + 1, dtype=np.float64) ** -self.alpha
        return np.floor(m * w / w.sum()).astype(np.int64)

    def min_words(self) -> int:
        """The fewest words whose top + 1 first counts strictly decrease (a well-defined answer)."""
        m = 1
        while not np.all(np.diff(self.counts(m)[:self.top + 2]) < 0):
            m += 1
        return m

    def layout(self, rng, depth, target):
        vocab: list[str] = [NOISE_WORD]
        seen = {NOISE_WORD}
        base = int(rng.integers(1 << 31))
        head = ("Read the coded text below and keep track of how often each coded word occurs; ignore "
                f"the dots '{NOISE_WORD}'.")
        question = (f"Question: which {self.top} coded words occur most often in the text above? "
                    f"Answer: the {self.top} most frequent coded words are")

        def word() -> str:
            while True:
                w = "".join(chr(97 + int(i)) for i in rng.integers(0, 26, 6))
                if w not in seen:
                    seen.add(w)
                    return w

        def make(m: int, p: str) -> tuple[str, None]:
            counts = self.counts(m)
            used = int(np.count_nonzero(counts))
            while len(vocab) < max(used, self.top + 1):
                vocab.append(word())
            bag = [vocab[k] for k in range(used) for _ in range(int(counts[k]))]
            order = np.random.default_rng([base, m]).permutation(len(bag))
            return f"{head}\n{' '.join(bag[i] for i in order)}{p}\n{question}", None

        for _ in range(self.top + 1):
            vocab.append(word())
        return Layout(make, self.min_words(), vocab[1:self.top + 1], {"alpha": self.alpha})


# name: (family, preset options); an option given in a spec overrides the preset.
TASKS: dict[str, tuple[type[Family], dict[str, Any]]] = {
    "niah_filler": (Niah, {"haystack": "filler"}),  # RULER niah_single_1 (noise)
    "niah_prose": (Niah, {"haystack": "prose"}),  # niah_single_2, with prose for the essay
    "niah_stdlib": (Niah, {"haystack": "stdlib"}),
    "niah_multikey": (Niah, {"haystack": "prose", "keys": 4}),  # niah_multikey_1
    "niah_multikey_dense": (Niah, {"haystack": "needles"}),  # niah_multikey_2
    "niah_multivalue": (Niah, {"haystack": "prose", "values": 4}),
    "niah_multiquery": (Niah, {"haystack": "prose", "keys": 4, "queries": 4}),
    "vt": (VariableTracking, {}),
    "cwe": (CommonWords, {}),
    "fwe": (FrequentWords, {}),
}


@dataclass(frozen=True)
class Task:
    spec: str  # as given: NAME[:OPTION=VALUE...]
    family: Family

    def build(self, tokenizer, target: int, depth: float | None, seed: Sequence[int]) -> TaskPrompt:
        """The trial's prompt of exactly `target` tokens; every draw comes from default_rng(seed)."""
        has_depth = not isinstance(self.family, (CommonWords, FrequentWords))
        if has_depth and (depth is None or not 0.0 <= depth <= 1.0):
            raise TaskError(f"{self.spec}: depth must be in [0, 1], got {depth}")
        lay = self.family.layout(np.random.default_rng(list(seed)), depth if has_depth else 0.0, target)
        size, p, text, ids = fit(tokenizer, target, lambda s, q: lay.make(s, q)[0], lay.min_size, self.spec)
        self._check_lossless(tokenizer, text, ids)
        start = lay.make(size, p)[1]
        token = None if start is None else len(tokenizer.encode(text[:start], bos=True))
        answer = _listed(lay.expected)
        return TaskPrompt(self.spec, text, ids, list(lay.expected), answer, depth if has_depth else None,
                          token, {**lay.info, "size": size, "pad": len(p)})

    def _check_lossless(self, tokenizer, text: str, ids: list[int]) -> None:
        """A tokenizer that loses characters (unknown pieces; OpenLLaMA v1 merges runs of spaces, so
        code loses its indentation) would show the model another prompt than the one scored."""
        back = tokenizer.decode(ids)
        if back != text:
            i = next((i for i, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
            hay = getattr(self.family, "haystack", "filler")
            raise TaskError(f"task {self.spec!r}: option haystack={hay!r}: this tokenizer cannot encode the "
                            f"prompt (character {i}, {text[i:i + 12]!r}, decodes as {back[i:i + 12]!r}); "
                            f"choose another haystack")

    def min_tokens(self, tokenizer, target: int) -> int:
        """Tokens of the shortest prompt for a `target` length (cwe's frequencies depend on it)."""
        lay = self.family.layout(np.random.default_rng(0), 0.0, target)
        return len(tokenizer.encode(lay.make(lay.min_size, "")[0], bos=True))


def parse_task(spec: str) -> Task:
    """'NAME' or 'NAME:OPTION=VALUE:...' (e.g. 'niah_multikey:keys=8:haystack=stdlib')."""
    name, *opts = spec.strip().split(":")
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    family, preset = TASKS[name]
    fields = {f.name: f for f in dataclasses.fields(family)}
    values = dict(preset)
    for opt in opts:
        key, eq, raw = opt.partition("=")
        if not eq or key not in fields:
            raise TaskError(f"task {spec!r}: {opt!r} is not OPTION=VALUE with OPTION one of "
                            f"{', '.join(fields)}")
        default = fields[key].default
        try:
            values[key] = (float(raw) if isinstance(default, float) else
                           raw if isinstance(default, str) else int(raw))
        except ValueError:
            raise TaskError(f"task {spec!r}: option {key}={raw!r} is not a number") from None
    fam = family(**values)
    fam.check(f"task {spec!r}")
    return Task(spec.strip(), fam)


def task_seed(task: Task, *rest: int) -> list[int]:
    """The seed sequence of a trial: the task's name hashed (stable across runs), then `rest`."""
    return [zlib.crc32(task.spec.encode()), *rest]


class TaskCorpus:
    """Training documents of a suite task (the `builtin:task:SPEC` source): document i is a prompt
    and its canonical answer, drawn from default_rng([seed, i]): its length uniform in
    min_chars..max_chars bytes (fitted with the byte tokenizer, so the documents do not depend on
    the training tokenizer), its depth uniform; unbounded, random access."""

    def __init__(self, spec: str, seed: int, min_chars: int, max_chars: int | None = None):
        self.task, self.seed, self.tok = parse_task(spec), seed, ByteTokenizer()
        self.min_chars = min_chars
        self.max_chars = max_chars if max_chars is not None else 4 * min_chars
        need = self.task.min_tokens(self.tok, self.min_chars + 1) - 1
        if self.min_chars < need:
            raise TaskError(f"task {spec!r}: min_chars={min_chars} is below the task's shortest prompt "
                            f"({need} bytes)")

    def __getitem__(self, i: int) -> str:
        rng = np.random.default_rng([self.seed, i])
        n = int(rng.integers(self.min_chars, self.max_chars + 1))
        p = self.task.build(self.tok, n + 1, float(rng.random()), [self.seed, i, 1])  # + 1: BOS
        return p.text + p.answer
