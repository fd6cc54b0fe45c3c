"""OpenAI CLIP byte-level BPE tokenizer, re-derived from the algorithm.

The released FluoroSAM checkpoint was trained on the ids the official tokenizer produces, so every
step here (text clean-up, pre-tokeniser, byte map, merge order, vocabulary order) must agree with it
exactly; a single differing id changes the text feature. The vocabulary file is not vendored: it is
read from an installed ``open_clip`` (or OpenAI ``clip``) package without importing that package.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import itertools
from pathlib import Path

import ftfy
import regex
import torch

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
# CLIP keeps the first 49152 - 256 - 2 merges of the file; with the 2 x 256 byte symbols and the two
# special tokens the vocabulary has 49408 entries.
NUM_MERGES = 49152 - 256 - 2

_PRETOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_END_OF_WORD = "</w>"


def _byte_alphabet() -> tuple[list[int], dict[int, str]]:
    """Each byte -> one printable character, so BPE can work on str without whitespace/control chars.

    Bytes that already print as themselves keep their character; the others are moved to
    U+0100 onwards in ascending order. The returned byte order (printable first) is the order in
    which the 256 base symbols occupy vocabulary ids 0..255.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    printable_set = set(printable)
    others = [b for b in range(256) if b not in printable_set]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return printable + others, mapping


def default_vocab_path() -> Path:
    """Locate the BPE vocabulary shipped inside open_clip (or OpenAI clip) without importing it.

    Importing open_clip pulls in its heavy dependency tree (and fails in this environment); only
    the data file is needed, so the package directory is found through its import spec.
    """
    searched: list[str] = []
    for package in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            searched.append(f"{package} (not installed)")
            continue
        for location in spec.submodule_search_locations:
            candidate = Path(location) / VOCAB_FILENAME
            if candidate.is_file():
                return candidate
            searched.append(str(candidate))
    raise FileNotFoundError(
        f"CLIP BPE vocabulary {VOCAB_FILENAME} not found (looked in: {', '.join(searched)}). "
        "Install open_clip_torch (--no-deps is enough) or pass vocab_path explicitly."
    )


def clean_text(text: str) -> str:
    """The official clean-up: ftfy, html-unescape twice, strip, collapse whitespace, lowercase."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class ClipTokenizer:
    """Prompt strings -> CLIP token ids ([SOT] + BPE ids + [EOT], zero padded)."""

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        self.vocab_path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        with gzip.open(self.vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # line 0 is a "#version" header
        merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{self.vocab_path}: not a CLIP BPE merges file")

        byte_order, self._byte_to_char = _byte_alphabet()
        self._char_to_byte = {c: b for b, c in self._byte_to_char.items()}
        base = [self._byte_to_char[b] for b in byte_order]
        vocab = (
            base + [s + _END_OF_WORD for s in base] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        )
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        if len(self.encoder) != len(vocab) or self.encoder[SOT_TOKEN] != SOT_ID:
            raise ValueError(f"{self.vocab_path}: unexpected vocabulary layout")
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self._ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        self._cache: dict[str, tuple[str, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def fingerprint(self) -> bytes:
        """The vocabulary file's bytes; identical vocabularies hash identically wherever installed."""
        return self.vocab_path.read_bytes()

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Greedy BPE on one pre-token: repeatedly merge every occurrence of the best-ranked pair."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = [*word[:-1], word[-1] + _END_OF_WORD]
        ranks = self._ranks
        while len(symbols) > 1:
            best_rank, best = None, None
            for pair in itertools.pairwise(symbols):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        result = tuple(symbols)
        self._cache[word] = result
        return result

    def encode(self, text: str) -> list[int]:
        """BPE ids of one prompt, without SOT/EOT."""
        ids: list[int] = []
        for piece in _PRETOKENIZE.findall(clean_text(text)):
            if piece in (SOT_TOKEN, EOT_TOKEN):
                ids.append(self.encoder[piece])
                continue
            mapped = "".join(self._byte_to_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(mapped))
        return ids

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Inverse of ``encode`` up to clean-up; SOT/EOT/padding are dropped. For debugging and tests."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        specials = {0, SOT_ID, EOT_ID}
        text = "".join(self.decoder[i] for i in ids if i not in specials)
        words = [bytes(self._char_to_byte[c] for c in w) for w in text.split(_END_OF_WORD)]
        return b" ".join(words).decode("utf-8", errors="replace").strip()

    def tokenize(self, texts: str | list[str], context_length: int = 77) -> torch.Tensor:
        """[K, context_length] int64. Over-long prompts raise instead of truncating silently: a cut
        prompt would lose its EOT, and the feature is read at the EOT position."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT_ID, *self.encode(text), EOT_ID]
            if len(ids) > context_length:
                raise ValueError(
                    f"prompt {text[:60]!r} is {len(ids)} CLIP tokens, more than the context length "
                    f"{context_length}; shorten it"
                )
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
