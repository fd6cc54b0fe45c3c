"""Vocabulary phrasings as people type them: hand-written synonyms expanded by rule, and a held-out split.

configs/vocabulary.yaml holds, per entry, only what a person has to know: the canonical prompt and a short
list of synonyms, abbreviations and lay terms (left/right always the patient's). The systematic variants
people also type -- "L femur", "the patient's left femur", "femur, left", "lt femur", "L3", "third lumbar
vertebra", "K-wires", "femer" -- are generated here, deterministically, so the YAML stays short enough to
review and a new entry gets its variants for free.

The expansion is done at load time rather than written back into the YAML: the file is hand-edited by
several people, a generated section would go stale with every edit, and expanding costs a few milliseconds.
It lives in ``fluorosam_rt`` (pure Python, no torch) because both sides need the same answer: training
samples the training phrasings, and the node's "did you mean" hints compare a prompt with them. Each FluoroSeg
data set also records its own training and held-out phrasings in categories.json.

A deterministic ~20% of each entry's phrasings is *held out*: chosen by a stable hash of (entry, text), never
used in training and kept for the robustness evaluation. The held-out part always includes a laterality
pattern and a spelling error where an entry has several, so the evaluation measures those too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .text.base import normalize_prompt

HELDOUT_FRACTION = 0.2
SECTIONS = (("structure", "structures"), ("group", "groups"), ("tool", "tools"))

# Where a variant came from: what the robustness evaluation can break its numbers down by.
# fmt: off
SOURCES = ("synonym", "laterality", "number", "plural", "article", "template", "spelling", "misspelling",
           "typo")
_SPELLING_ERRORS = ("misspelling", "typo")

_SIDE = {"left": ("L", "lt"), "right": ("R", "rt")}
_ORDINAL_WORDS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
                  "tenth", "eleventh", "twelfth")
_NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve")
# fmt: on
_REGIONS = {"C": "cervical", "T": "thoracic", "L": "lumbar", "S": "sacral"}
_VERTEBRA = re.compile(r"^vertebrae_([CTLS])(\d+)$")
_RIB = re.compile(r"^rib_(left|right)_(\d+)$")
_DETERMINERS = {"the", "a", "an", "both", "all", "bilateral"}
_HYPHEN = re.compile(r"(?<=[a-z])-(?=[a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class Phrasing:
    """One way of asking for an entry, with the rule that made it."""

    text: str
    source: str
    key: str  # normalize_prompt(text), the prompt cache's key


@dataclass(frozen=True)
class EntryPhrasings:
    """An entry's phrasings (canonical prompt excluded), split into training and held-out parts."""

    name: str
    kind: str
    prompt: str
    synonyms: tuple[str, ...]  # the hand-written list from the YAML
    phrasings: tuple[Phrasing, ...]  # every phrasing, in generation order
    heldout: frozenset[str] = field(default_factory=frozenset)  # normalised keys

    @property
    def train(self) -> tuple[str, ...]:
        return tuple(p.text for p in self.phrasings if p.key not in self.heldout)

    @property
    def heldout_phrasings(self) -> tuple[str, ...]:
        return tuple(p.text for p in self.phrasings if p.key in self.heldout)


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def plural(phrase: str) -> str:
    """English plural of a phrase's last word: wire -> wires, K-wire -> K-wires, box -> boxes."""
    head, _, last = phrase.rpartition(" ")
    low = last.lower()
    if low.endswith(("s", "x", "ch", "sh")):
        last = last + "es"
    elif low.endswith("y") and low[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last = last + "s"
    return f"{head} {last}" if head else last


def is_plural(phrase: str) -> bool:
    """Whether a phrase's last word looks plural: ribs, vertebrae, humeri (not pelvis, thorax, radius)."""
    last = phrase.rpartition(" ")[2].lower()
    if last.endswith(("is", "us", "ss")):
        return False
    return last.endswith(("s", "ae")) or (last.endswith("i") and len(last) > 3)


def split_side(text: str) -> tuple[str | None, str]:
    """'left femur' -> ('left', 'femur'); a text not starting with a side -> (None, text)."""
    first, _, rest = text.partition(" ")
    if first.lower() in _SIDE and rest:
        return first.lower(), rest
    return None, text


def _stable_rank(name: str, key: str) -> str:
    return hashlib.sha256(f"{name}\0{key}".encode()).hexdigest()


def transposition_typo(word: str, salt: str) -> str | None:
    """A keyboard slip: two neighbouring interior letters swapped, the place chosen by a stable hash."""
    if len(word) < 5 or not word.isalpha():
        return None
    slots = [i for i in range(1, len(word) - 2) if word[i] != word[i + 1]]
    if not slots:
        return None
    i = slots[int(_stable_rank(salt, word)[:8], 16) % len(slots)]
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


class _Collector:
    """Ordered, de-duplicated (by prompt key) phrasings of one entry, excluding the canonical prompt."""

    def __init__(self, prompt: str) -> None:
        self._seen = {normalize_prompt(prompt)}
        self.items: list[Phrasing] = []

    def add(self, text: str, source: str) -> None:
        text = " ".join(text.split())
        if not text:
            return
        key = normalize_prompt(text)
        if key not in self._seen:
            self._seen.add(key)
            self.items.append(Phrasing(text, source, key))


def _laterality(c: _Collector, side: str, bases: Sequence[str]) -> None:
    short, abbr = _SIDE[side]
    for k, b in enumerate(bases):
        c.add(f"{side} {b}", "synonym" if k else "laterality")
        c.add(f"{short} {b}", "laterality")
        c.add(f"the {side} {b}", "laterality")
        c.add(f"{b}, {side}", "laterality")
        if k >= 2:
            continue
        c.add(f"{abbr} {b}", "laterality")
        c.add(f"the patient's {side} {b}", "laterality")
        c.add(f"patient's {side} {b}", "laterality")
        c.add(f"{b} on the {side}", "laterality")
        if k == 0:
            c.add(f"patients {side} {b}", "laterality")  # typed without the apostrophe
            c.add(f"{b} ({side})", "laterality")
            c.add(f"{side} side {b}", "laterality")


def _vertebra(c: _Collector, letter: str, n: int) -> None:
    region = _REGIONS[letter]
    word, num = _ORDINAL_WORDS[n - 1], ordinal(n)
    lv = f"{letter}{n}"
    for text in (
        lv,
        f"{letter}-{n}",
        f"{letter} {n}",
        f"vertebra {lv}",
        f"the {lv} vertebra",
        f"{lv} vertebral body",
        f"{lv} body",
        f"{lv} level",
        f"{lv} vert",
        f"{word} {region} vertebra",
        f"{num} {region} vertebra",
        f"{region} vertebra {n}",
        f"{region} {n}",
        f"{word} {region} vertebral body",
    ):
        c.add(text, "number")
    if letter == "T":  # dorsal = thoracic, the older notation some reports still use
        c.add(f"D{n}", "number")
        c.add(f"dorsal vertebra {n}", "number")


def _rib(c: _Collector, side: str, n: int) -> None:
    short, abbr = _SIDE[side]
    word, num = _ORDINAL_WORDS[n - 1], ordinal(n)
    for text in (
        f"{side} {num} rib",
        f"{side} {word} rib",
        f"{word} {side} rib",
        f"{num} {side} rib",
        f"rib {n} on the {side}",
        f"{num} rib on the {side}",
        f"{word} rib, {side}",
        f"{side} rib number {n}",
        f"{side} rib {_NUMBER_WORDS[n - 1]}",
        f"{short} {num} rib",
        f"{abbr} rib {n}",
        f"the patient's {side} {word} rib",
        f"{side} {word} costa",
    ):
        c.add(text, "number")


def _bilateral_singular(entry: Mapping[str, Any], prompts: Mapping[str, str]) -> str | None:
    """'femur' for a group whose members are exactly 'left femur' and 'right femur', else None."""
    members = list(entry.get("members") or ())
    if len(members) != 2:
        return None
    sides = [split_side(prompts.get(m, "")) for m in members]
    if {s for s, _ in sides} == {"left", "right"} and sides[0][1] == sides[1][1]:
        return sides[0][1]
    return None


def _misspell(text: str, table: Mapping[str, Sequence[str]]) -> list[str]:
    words = text.split(" ")
    out = []
    for i, w in enumerate(words):
        for variant in table.get(w.lower(), ()):
            out.append(" ".join([*words[:i], variant, *words[i + 1 :]]))
    return out


def expand_entry(
    entry: Mapping[str, Any],
    kind: str,
    prompts: Mapping[str, str] | None = None,
    misspellings: Mapping[str, Sequence[str]] | None = None,
) -> list[Phrasing]:
    """Every phrasing of one vocabulary entry (canonical prompt excluded), deterministic and de-duplicated.

    ``prompts`` maps every entry name to its canonical prompt (groups of a left/right pair use it to say
    "left and right femur"); ``misspellings`` maps a correctly spelt word to its usual misspellings.
    """
    prompts = prompts or {}
    table = {k.lower(): list(v) for k, v in (misspellings or {}).items()}
    name, prompt = str(entry["name"]), str(entry["prompt"])
    synonyms = [str(s) for s in entry.get("phrasings") or ()]
    c = _Collector(prompt)
    for s in synonyms:
        c.add(s, "synonym")

    side, base = split_side(prompt)
    if side is not None:
        bases = [base] + [b for s, b in map(split_side, synonyms) if s == side]
        _laterality(c, side, list(dict.fromkeys(bases)))
    m = _VERTEBRA.match(name)
    if m:
        _vertebra(c, m.group(1), int(m.group(2)))
    m = _RIB.match(name)
    if m:
        _rib(c, m.group(1), int(m.group(2)))

    heads = [prompt, *synonyms[:2]]
    if side is None:
        for h in heads[:2]:
            if h.split(" ")[0].lower() not in _DETERMINERS:
                c.add(f"the {h}", "article")
    if kind == "tool":
        for h in heads:
            c.add(plural(h), "plural")
            c.add(f"a {h}" if h[:1].lower() not in "aeiou" else f"an {h}", "article")
    if kind == "group":
        sing = _bilateral_singular(entry, prompts)
        if sing is not None:
            many = prompt if prompt != sing or is_plural(prompt) else plural(prompt)
            for text in (
                f"both {many}",
                f"bilateral {many}",
                f"{many} bilaterally",
                f"{many}, both sides",
                f"left and right {sing}",
                f"right and left {sing}",
                f"{sing}, both sides",
                sing,
            ):
                c.add(text, "plural")
        elif side is None:  # "all cervical vertebrae", "the whole spine"
            for q in ("all", "all the") if is_plural(prompt) else ("whole", "entire"):
                c.add(f"{q} {prompt}", "article")
    for verb in ("segment", "show", "outline"):
        c.add(f"{verb} the {prompt}", "template")

    for h in heads:
        if _HYPHEN.search(h):
            c.add(_HYPHEN.sub(" ", h), "spelling")
            c.add(_HYPHEN.sub("", h), "spelling")
    sources = [prompt, *synonyms[:4]]
    if side is not None:
        sources.append(f"{_SIDE[side][0]} {base}")
    n_miss = 0
    for s in sources:
        for variant in _misspell(s, table):
            if n_miss < 6:
                before = len(c.items)
                c.add(variant, "misspelling")
                n_miss += len(c.items) - before
    for s in heads[:2]:
        words = [w for w in s.split(" ") if w.isalpha()]
        if not words:
            continue
        longest = max(words, key=len)
        typo = transposition_typo(longest, name)
        if typo is not None:
            c.add(s.replace(longest, typo, 1), "typo")
    return c.items


def split_heldout(
    name: str,
    phrasings: Sequence[Phrasing],
    protected: Iterable[str] = (),
    fraction: float = HELDOUT_FRACTION,
) -> frozenset[str]:
    """Normalised keys of the held-out part of one entry's phrasings.

    Ranked by sha256(entry name, key), so the split does not depend on order and a new phrasing moves at
    most one other. About ``fraction`` of the phrasings (at least one when there are three or more), always
    including one laterality pattern and one spelling error where the entry has at least two of either.
    ``protected`` keys (canonical prompts, each entry's first synonym) always stay in training.
    """
    keep = set(protected)
    cands = sorted((_stable_rank(name, p.key), p.key, p.source) for p in phrasings)
    cands = [r for r in cands if r[1] not in keep]
    n = len(phrasings)
    k = round(fraction * n)
    if n >= 3:
        k = max(k, 1)
    out: list[str] = []
    for group in (("laterality",), _SPELLING_ERRORS):
        of_group = [r for r in cands if r[2] in group]
        if len(of_group) >= 2:
            out.append(of_group[0][1])
    for r in cands:
        if len(out) >= k:
            break
        if r[1] not in out:
            out.append(r[1])
    return frozenset(out)


def expand_vocabulary(doc: Mapping[str, Any]) -> dict[str, EntryPhrasings]:
    """Entry name -> its phrasings and held-out split, for a vocabulary document (the YAML, loaded).

    A text that two entries would share is kept only where it is the canonical prompt, or where it was
    written by hand if exactly one entry lists it; otherwise it is dropped, so every phrasing names one entry.
    """
    table = doc.get("misspellings") or {}
    entries = [(kind, e) for kind, key in SECTIONS for e in doc.get(key) or ()]
    prompts = {str(e["name"]): str(e["prompt"]) for _, e in entries}
    canonical = {normalize_prompt(p): n for n, p in prompts.items()}
    expanded = {str(e["name"]): expand_entry(e, kind, prompts, table) for kind, e in entries}
    owners: dict[str, list[str]] = {}
    for n, items in expanded.items():
        for p in items:
            owners.setdefault(p.key, []).append(n)
    hand = {str(e["name"]): {normalize_prompt(str(s)) for s in e.get("phrasings") or ()} for _, e in entries}

    def owner(key: str) -> str | None:
        if key in canonical:
            return canonical[key]
        names = owners[key]
        if len(names) == 1:
            return names[0]
        by_hand = [n for n in names if key in hand[n]]
        return by_hand[0] if len(by_hand) == 1 else None

    out: dict[str, EntryPhrasings] = {}
    for kind, e in entries:
        n = str(e["name"])
        items = tuple(p for p in expanded[n] if owner(p.key) == n)
        synonyms = tuple(str(s) for s in e.get("phrasings") or ())
        protected = set(canonical)
        if synonyms:
            protected.add(normalize_prompt(synonyms[0]))
        out[n] = EntryPhrasings(
            name=n,
            kind=kind,
            prompt=prompts[n],
            synonyms=synonyms,
            phrasings=items,
            heldout=split_heldout(n, items, protected),
        )
    return out
