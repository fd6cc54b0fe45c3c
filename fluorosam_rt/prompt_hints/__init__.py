""" "Did you mean": flag a prompt that is far from everything the model was trained on.

The model has only seen its vocabulary's canonical prompts and training phrasings. A prompt whose text feature
(the text encoder's own output, which is what the model reads) is far from all of them is likely to be
misread, so ``segment``, the control socket's add/set replies and ``prompts add`` say so and name the nearest
vocabulary entries with their cosine similarity. The prompt still runs: the hint is advice, never a refusal.

The hint table holds one feature per canonical prompt and training phrasing (int8, unit length), computed
once per text encoder, because encoding the ~4,400 texts takes about a minute on two cores:

* ``train/ship.py`` writes it beside the embedded model (``assets/prompt_cache/``);
* ``python -m fluorosam_rt.prompt_hints build [--checkpoint PATH]`` writes it for any model's encoder into
  ``~/.cache/fluorosam-rt/prompt-hints`` (``FLUOROSAM_RT_HINT_CACHE`` overrides).

Where no table exists for the encoder, prompts run without hints (and a one-line note says how to build one).

The "far" threshold is calibrated when the table is built, with the same encoder: the held-out phrasings of
the vocabulary (never in the table) give the similarities of real paraphrases, a fixed list of unrelated
everyday phrases gives those of nonsense, and the threshold is set where at most 2% of held-out phrasings
would be flagged, but no lower than the point that flags 95% of the unrelated phrases (see ``calibrate``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..phrasings import expand_vocabulary
from ..text.base import TextEncoder, normalize_prompt

log = logging.getLogger(__name__)

FORMAT = "fluorosam-rt-prompt-hints/1"
ENV_VAR = "FLUOROSAM_RT_HINT_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/fluorosam-rt/prompt-hints")
SOURCE_VOCABULARY = Path(__file__).resolve().parents[2] / "configs" / "vocabulary.yaml"
N_NEAREST = 3
HELDOUT_FLAG_RATE = 0.02  # at most this share of held-out paraphrases may be called far
UNRELATED_CATCH_RATE = 0.95  # ... unless that would let more than 5% of nonsense through

# Calibration negatives: everyday phrases with nothing to do with anatomy or surgical hardware. Tests use a
# different list, so the flag rate they check is not measured on the calibration data.
# fmt: off
UNRELATED = (
    "banana split", "chocolate cake", "apple pie", "orange juice", "coffee cup", "cup of tea", "pizza slice",
    "cheese sandwich", "strawberry jam", "boiled egg", "fried rice", "tomato soup", "green salad", "red car",
    "bicycle wheel", "train station", "airport gate", "parking lot", "traffic light", "motorway exit",
    "sailing boat", "space rocket", "garden hose", "flower pot", "oak tree", "pine cone", "sunflower field",
    "blue sky", "rain cloud", "snow storm", "summer holiday", "winter coat", "birthday party", "wedding ring",
    "football match", "tennis racket", "golf ball", "chess board", "playing cards", "guitar string",
    "piano keys", "violin bow", "drum kit", "rock concert", "movie ticket", "television remote",
    "mobile phone", "laptop keyboard", "computer mouse", "printer paper", "office chair", "kitchen table",
    "living room", "front door", "window curtain", "bath towel", "toothbrush", "shampoo bottle",
    "washing machine", "vacuum cleaner", "light bulb", "electric kettle", "frying pan", "wooden spoon",
    "dinner plate", "wine glass", "beer bottle", "shopping list", "grocery bag", "credit card",
    "bank account", "tax return", "stock market", "job interview", "meeting agenda", "email inbox",
    "password reset", "software update", "cloud storage", "weather forecast", "news headline", "history book",
    "poetry reading", "math homework", "science fair", "school bus", "teacher", "lawyer", "police officer",
    "fire truck", "post office", "museum", "library card", "city map", "mountain trail", "beach umbrella",
    "ocean waves", "desert sand", "river bank", "lake house", "farm animals", "black cat", "small dog",
    "horse riding", "bird nest", "butterfly wings", "honey bee", "goldfish", "elephant", "giraffe", "penguin",
    "zebra crossing", "hello world", "good morning", "thank you", "how are you", "what time is it",
    "lorem ipsum", "asdf", "qwerty", "xyz", "test", "foo bar", "nothing", "something", "anything", "purple",
    "seventeen",
)
# fmt: on


@dataclass(frozen=True)
class Hint:
    """How close a prompt is to what the model was trained on, and the entries it is closest to."""

    text: str
    far: bool
    similarity: float  # to the closest trained text
    nearest: tuple[tuple[str, float], ...]  # (canonical prompt, best similarity to that entry), best first

    def to_dict(self) -> dict[str, Any]:
        return {
            "far": self.far,
            "similarity": round(self.similarity, 3),
            "nearest": [[p, round(s, 3)] for p, s in self.nearest],
        }

    def message(self) -> str:
        """One line for a person: what is far, and what they may have meant."""
        means = ", ".join(f"{p!r} ({s:.2f})" for p, s in self.nearest)
        return (
            f"{self.text!r} is far from every prompt the model was trained on "
            f"(best similarity {self.similarity:.2f}); did you mean {means}? It runs anyway."
        )


class HintTable:
    """Unit text features of the canonical prompts and training phrasings, and the 'far' threshold."""

    def __init__(
        self,
        texts: Sequence[str],
        entry_of: Sequence[int],
        prompts: Sequence[str],
        features: torch.Tensor,
        threshold: float,
        identity: str,
        vocabulary_digest: str,
        calibration: Mapping[str, Any] | None = None,
    ) -> None:
        self.texts = [normalize_prompt(t) for t in texts]
        self.index = {t: i for i, t in enumerate(self.texts)}
        self.entry_of = torch.as_tensor(list(entry_of), dtype=torch.long)
        self.prompts = list(prompts)
        self.features = F.normalize(features.float(), dim=1)
        self.threshold = float(threshold)
        self.identity = identity
        self.vocabulary_digest = vocabulary_digest
        self.calibration = dict(calibration or {})
        if self.features.shape[0] != len(self.texts) or self.entry_of.shape[0] != len(self.texts):
            raise ValueError("hint table: texts, entries and features disagree in length")

    def __len__(self) -> int:
        return len(self.texts)

    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """[Q, D] features -> [Q, entries] best cosine similarity to each entry's texts."""
        sims = F.normalize(features.float(), dim=1) @ self.features.T
        out = torch.full((sims.shape[0], len(self.prompts)), -1.0)
        index = self.entry_of.expand(sims.shape[0], -1)
        return out.scatter_reduce(1, index, sims, reduce="amax", include_self=True)

    def check(self, texts: Sequence[str], encoder: TextEncoder) -> list[Hint]:
        """A hint per prompt; trained texts need no encoding (their own feature is in the table)."""
        keys = [normalize_prompt(t) for t in texts]
        feats = torch.zeros(len(keys), self.features.shape[1])
        todo = [i for i, k in enumerate(keys) if k not in self.index]
        for i, k in enumerate(keys):
            if k in self.index:
                feats[i] = self.features[self.index[k]]
        if todo:
            feats[todo] = encoder.encode([keys[i] for i in todo]).cpu().float()
        per_entry = self.similarities(feats)
        hints = []
        for i, text in enumerate(texts):
            best = per_entry[i].topk(min(N_NEAREST, per_entry.shape[1]))
            nearest = tuple((self.prompts[j], float(s)) for s, j in zip(best.values, best.indices.tolist()))
            sim = 1.0 if keys[i] in self.index else float(best.values[0])
            hints.append(Hint(text, sim < self.threshold, sim, nearest))
        return hints

    # -- files --------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "identity": self.identity,
            "vocabulary_digest": self.vocabulary_digest,
            "threshold": repr(self.threshold),
            "texts": json.dumps(self.texts),
            "prompts": json.dumps(self.prompts),
            "calibration": json.dumps(self.calibration),
        }
        q = torch.round(self.features * 127).clamp(-127, 127).to(torch.int8)  # cosine error ~0.003
        tmp = path.with_suffix(".tmp")
        tensors = {"features": q.contiguous(), "entry": self.entry_of.to(torch.int32)}
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> HintTable:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                q, entry = f.get_tensor("features"), f.get_tensor("entry")
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            return cls(
                json.loads(meta["texts"]),
                entry.tolist(),
                json.loads(meta["prompts"]),
                q.float() / 127.0,
                float(meta["threshold"]),
                meta["identity"],
                meta.get("vocabulary_digest", ""),
                json.loads(meta.get("calibration", "{}")),
            )
        except Exception as exc:  # a damaged table is a missing one, with the reason
            raise ValueError(f"cannot read prompt-hint table {path}: {exc}") from exc


def table_filename(identity: str) -> str:
    return f"prompt-hints-{identity[:24]}.safetensors"


def resolve_cache_dir(override: str | Path | None = None) -> Path:
    """Where built tables are kept: explicit path, else $FLUOROSAM_RT_HINT_CACHE, else ~/.cache/..."""
    raw = override if override is not None else os.environ.get(ENV_VAR) or DEFAULT_CACHE_DIR
    return Path(raw).expanduser()


# -- building ----------------------------------------------------------------------------------------------
def vocabulary_rows(doc: Mapping[str, Any]) -> tuple[list[str], list[int], list[str], list[str]]:
    """(table texts, entry index of each, canonical prompt per entry, held-out phrasings) of a vocabulary."""
    expanded = expand_vocabulary(doc)
    texts: list[str] = []
    entry_of: list[int] = []
    prompts: list[str] = []
    heldout: list[str] = []
    seen: set[str] = set()
    for e, ex in enumerate(expanded.values()):
        prompts.append(ex.prompt)
        for t in (ex.prompt, *ex.train):
            k = normalize_prompt(t)
            if k not in seen:
                seen.add(k)
                texts.append(k)
                entry_of.append(e)
        heldout.extend(ex.heldout_phrasings)
    return texts, entry_of, prompts, heldout


def calibrate(heldout: np.ndarray, unrelated: np.ndarray) -> tuple[float, dict[str, Any]]:
    """The 'far' threshold from best-similarity samples of held-out paraphrases and unrelated phrases.

    Flag at most ``HELDOUT_FLAG_RATE`` of real paraphrases: the threshold is that quantile of the held-out
    similarities, unless the unrelated phrases reach that high, in which case it is raised to the point that
    still flags ``UNRELATED_CATCH_RATE`` of them (missing a paraphrase's hint costs less than a silent
    misreading of nonsense). The returned summary is stored with the table and reported.
    """
    t = float(np.quantile(heldout, HELDOUT_FLAG_RATE))
    t_unrel = float(np.quantile(unrelated, UNRELATED_CATCH_RATE))
    rule = "heldout"
    if t <= t_unrel:
        t, rule = t_unrel + 1e-6, "unrelated"
    q = lambda a, p: round(float(np.quantile(a, p)), 4)  # noqa: E731
    summary = {
        "rule": rule,
        "threshold": round(t, 4),
        "heldout_n": int(heldout.size),
        "heldout_q01_q05_q50": [q(heldout, 0.01), q(heldout, 0.05), q(heldout, 0.5)],
        "heldout_flagged": round(float((heldout < t).mean()), 4),
        "unrelated_n": int(unrelated.size),
        "unrelated_q50_q95_max": [q(unrelated, 0.5), q(unrelated, 0.95), round(float(unrelated.max()), 4)],
        "unrelated_flagged": round(float((unrelated < t).mean()), 4),
    }
    return t, summary


def vocabulary_digest(texts: Sequence[str], entry_of: Sequence[int], prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([list(texts), list(entry_of), list(prompts)]).encode()).hexdigest()


def build_table(encoder: TextEncoder, doc: Mapping[str, Any]) -> HintTable:
    """Encode a vocabulary's canonical prompts and training phrasings and calibrate the threshold."""
    texts, entry_of, prompts, heldout = vocabulary_rows(doc)
    if not texts:
        raise ValueError("the vocabulary has no prompts")
    feats = F.normalize(encoder.encode(texts).cpu().float(), dim=1)
    table = HintTable(texts, entry_of, prompts, feats, 0.0, encoder.identity(), "")
    table.vocabulary_digest = vocabulary_digest(texts, entry_of, prompts)

    def best(batch: Sequence[str]) -> np.ndarray:
        if not batch:
            return np.zeros(0)
        return table.similarities(encoder.encode(list(batch)).cpu()).max(1).values.numpy()

    pos, neg = best(heldout), best(UNRELATED)
    if pos.size == 0:  # a vocabulary too small to hold anything out: calibrate on nonsense alone
        pos = np.ones(1)
    table.threshold, table.calibration = calibrate(pos, neg)
    return table


def load_vocabulary(path: str | Path) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a vocabulary (expected a mapping with structures/groups/tools)")
    return doc


# -- finding a table at run time ---------------------------------------------------------------------------
class PromptHints:
    """The hint table for one text encoder, found lazily; checking never raises and never builds.

    ``search``: the folders tables ship in (the model's prompt_cache/, the package's own), looked in before
    the default user cache and after a cache folder named explicitly (argument or $FLUOROSAM_RT_HINT_CACHE).
    A missing table means ``check`` returns None and ``note`` says how to build one.
    """

    def __init__(
        self, encoder: TextEncoder, search: Sequence[Path | None] = (), cache_dir: str | Path | None = None
    ) -> None:
        self.encoder = encoder
        self.search = [Path(p) for p in search if p is not None]
        self.cache_dir = cache_dir
        self._table: HintTable | None = None
        self._looked = False
        self._lock = threading.Lock()
        self.note = ""

    def table(self) -> HintTable | None:
        with self._lock:
            if not self._looked:
                self._looked = True
                self._table = self._find()
            return self._table

    def _find(self) -> HintTable | None:
        ident = self.encoder.identity()
        name = table_filename(ident)
        cache = resolve_cache_dir(self.cache_dir)
        chosen = self.cache_dir is not None or bool(os.environ.get(ENV_VAR))
        # A folder the user names explicitly wins over the shipped tables; the default cache comes last.
        for d in [cache, *self.search] if chosen else [*self.search, cache]:
            p = d / name
            if not p.is_file():
                continue
            try:
                t = HintTable.load(p)
            except ValueError as exc:
                log.warning("%s", exc)
                continue
            if t.identity == ident:
                log.info("prompt hints: %d trained texts from %s", len(t), p)
                return t
        self.note = (
            "no prompt-hint table for this text encoder, so prompts are not checked against the vocabulary; "
            "build one with: python -m fluorosam_rt.prompt_hints build"
        )
        return None

    def check(self, texts: Sequence[str]) -> list[Hint] | None:
        """Hints for texts, or None when no table exists or checking failed (the prompts run regardless)."""
        table = self.table()
        if table is None:
            return None
        try:
            return table.check(list(texts), self.encoder)
        except Exception:  # advice must never break the command it accompanies
            log.exception("prompt hints failed")
            return None
