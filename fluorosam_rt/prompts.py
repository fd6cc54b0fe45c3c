"""Prompts and the prompt-token cache.

Text encoding (a CLIP or MiniLM forward, then the MLP and VQ) costs far more than decoding a
mask, and its result depends only on the text. So each normalised prompt is encoded once,
off the frame path, and its final token is kept in memory and on disk. The cache is keyed by
the identity of everything that produced the token (text encoder, MLP, codebook), so a token
made by other weights is never reused.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .text.base import normalize_prompt as _normalize

MAX_PROMPT_CHARS = 200


class PromptError(ValueError):
    """A prompt that cannot be used (empty, too long, malformed points)."""


class PromptNotCachedError(KeyError):
    """A frame-path lookup of a prompt that was never encoded (it must be added first)."""


def normalize_prompt(text: str) -> str:
    """Cache key of a prompt (the text encoders' normalisation) with the node's length limit."""
    try:
        norm = _normalize(text)
    except (TypeError, ValueError) as exc:
        raise PromptError(str(exc)) from exc
    if len(norm) > MAX_PROMPT_CHARS:
        raise PromptError(f"prompt is {len(norm)} characters long; the limit is {MAX_PROMPT_CHARS}")
    return norm


@dataclass(frozen=True)
class Prompt:
    """A text prompt with optional clicks. Points are (x, y) in the input image's pixels."""

    text: str
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    id: str = field(default="")

    def __post_init__(self) -> None:
        normalize_prompt(self.text)
        if len(self.points) != len(self.labels):
            raise PromptError(f"{len(self.points)} points but {len(self.labels)} labels")
        for p in self.points:
            if len(p) != 2 or not all(isinstance(v, (int, float)) for v in p):
                raise PromptError(f"point {p!r} is not an (x, y) pair")
        for lb in self.labels:
            if lb not in (0, 1):
                raise PromptError(f"point label {lb!r} must be 1 (positive) or 0 (negative)")
        if not self.id:
            object.__setattr__(self, "id", self.key)

    @property
    def key(self) -> str:
        return normalize_prompt(self.text)

    @classmethod
    def coerce(cls, p: str | Prompt) -> Prompt:
        return p if isinstance(p, Prompt) else cls(text=p)


def tensor_digest(tensors: Iterable[torch.Tensor], extra: str = "") -> str:
    """Stable hash of tensor contents (shape, dtype and bytes) plus a string."""
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


TokenFn = Callable[[list[str]], torch.Tensor]


class PromptCache:
    """Normalised prompt text -> final prompt token [C], in memory and optionally on disk."""

    def __init__(
        self, identity: str, directory: str | Path | None = None, seed: str | Path | None = None
    ) -> None:
        """``directory``: where this cache persists itself. ``seed``: a read-only folder whose file for
        the same identity is loaded first (the shipped model's vocabulary tokens), so its prompts start
        without running the text encoder; a file for another identity is ignored."""
        self.identity = identity
        self.directory = Path(directory) if directory is not None else None
        self._tokens: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.encode_count = 0
        self.seeded_count = 0
        if seed is not None:
            self._tokens.update(self._read(self._file_in(Path(seed))))
            self.seeded_count = len(self._tokens)
        if self.directory is not None:
            self._tokens.update(self._read(self.path))

    def _file_in(self, directory: Path) -> Path:
        return directory / f"prompt-tokens-{self.identity[:24]}.safetensors"

    @property
    def path(self) -> Path | None:
        if self.directory is None:
            return None
        return self._file_in(self.directory)

    def __contains__(self, text: str) -> bool:
        return normalize_prompt(text) in self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def texts(self) -> list[str]:
        return sorted(self._tokens)

    def encode(self, texts: Sequence[str], token_fn: TokenFn) -> torch.Tensor:
        """Tokens for texts, encoding only the ones not cached yet (off the frame path)."""
        keys = [normalize_prompt(t) for t in texts]
        with self._lock:
            todo = sorted({k for k in keys if k not in self._tokens})
        if todo:
            new = token_fn(todo).detach().cpu().float()
            if new.shape[0] != len(todo):
                raise RuntimeError(f"token function returned {new.shape[0]} tokens for {len(todo)} prompts")
            with self._lock:
                for k, tok in zip(todo, new):
                    self._tokens[k] = tok.clone()
                self.encode_count += len(todo)
            self.save()
        return self.lookup(keys)

    def lookup(self, texts: Sequence[str]) -> torch.Tensor:
        """Frame-path lookup: never encodes. Raises PromptNotCachedError for unknown prompts."""
        keys = [normalize_prompt(t) for t in texts]
        with self._lock:
            missing = [k for k in keys if k not in self._tokens]
            if missing:
                raise PromptNotCachedError(f"prompts not encoded yet: {missing}")
            if not keys:
                return torch.empty(0)
            return torch.stack([self._tokens[k] for k in keys])

    def save(self) -> None:
        if self.path is None:
            return
        from safetensors.torch import save_file

        with self._lock:
            keys = sorted(self._tokens)
            if not keys:
                return
            tokens = torch.stack([self._tokens[k] for k in keys]).contiguous()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file(
            {"tokens": tokens}, str(tmp), metadata={"identity": self.identity, "texts": json.dumps(keys)}
        )
        tmp.replace(self.path)

    def _read(self, p: Path | None) -> dict[str, torch.Tensor]:
        """Tokens stored in ``p`` for this identity; nothing for a missing, damaged or foreign file."""
        if p is None or not p.is_file():
            return {}
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tokens = f.get_tensor("tokens")
            texts = json.loads(meta["texts"])
        except Exception:  # a damaged cache file is rebuilt, never trusted
            return {}
        if meta.get("identity") != self.identity or len(texts) != tokens.shape[0]:
            return {}
        return {t: tok.clone() for t, tok in zip(texts, tokens)}


def prompt_texts_from_yaml(path: str | Path, include_phrasings: bool = True) -> list[str]:
    """Prompts to warm the cache with, read from a YAML file.

    Accepts either ``prompts: [text, ...]`` or the vocabulary layout (``structures``, ``groups``,
    ``tools`` entries with ``prompt`` and ``phrasings``), so the node can warm the canonical prompts
    and the hand-written phrasings (the variants ``fluorosam_rt.phrasings`` derives from them are
    encoded on first use). Duplicates (after normalisation) are removed; order is preserved.
    """
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PromptError(f"cannot read prompt list {p}: {exc}") from exc
    if not isinstance(doc, dict):
        raise PromptError(f"{p}: expected a mapping with 'prompts' or vocabulary sections")
    texts: list[str] = []
    if "prompts" in doc:
        if not isinstance(doc["prompts"], list):
            raise PromptError(f"{p}: 'prompts' must be a list of strings")
        texts.extend(doc["prompts"])
    for section in ("structures", "groups", "tools"):
        for entry in doc.get(section) or []:
            texts.append(entry["prompt"])
            if include_phrasings:
                texts.extend(entry.get("phrasings") or [])
    if not texts:
        raise PromptError(f"{p}: no prompts found")
    seen: dict[str, str] = {}
    for t in texts:
        seen.setdefault(normalize_prompt(t), t)
    return list(seen.values())
