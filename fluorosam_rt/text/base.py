"""The one interface every text encoder implements, and the prompt key the prompt cache uses.

Text features are computed off the frame path and cached per (encoder identity, normalised prompt).
The identity therefore has to change whenever anything that changes the features changes: the kind,
the tokenizer's vocabulary and every weight.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
from abc import ABC, abstractmethod

import torch
from torch import nn

_WHITESPACE = re.compile(r"\s+")


def normalize_prompt(text: str) -> str:
    """Canonical cache key for a prompt, so "Left  Femur " and "left femur" share one entry.

    NFC first so that composed and decomposed accents compare equal, then lowercase and whitespace
    folding. Both encoders lowercase themselves, so this never merges prompts they would tell apart.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    # NFC again after lower(): case folding can emit combining marks (e.g. "\u0130" -> "i\u0307")
    lowered = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).lower())
    out = _WHITESPACE.sub(" ", lowered).strip()
    if not out:
        raise ValueError("empty prompt: a text prompt needs at least one non-whitespace character")
    return out


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor, independent of its device and strides."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the bit pattern is what matters
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class TextEncoder(nn.Module, ABC):
    """Prompt strings -> one feature row per prompt, frozen and deterministic.

    Subclasses set ``kind`` and ``feature_dim`` and implement ``_encode`` and ``_tokenizer_fingerprint``.
    """

    kind: str
    feature_dim: int

    def __init__(self) -> None:
        super().__init__()
        self._identity: str | None = None
        self._identity_stamp: tuple | None = None

    @abstractmethod
    def _encode(self, texts: list[str]) -> torch.Tensor:
        """Features for a non-empty batch; called in eval mode under no_grad."""

    @abstractmethod
    def _tokenizer_fingerprint(self) -> bytes:
        """Bytes that change whenever tokenisation would (vocabulary, merges, max length...)."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[K, feature_dim] float32 on the encoder's device; grads off because the encoder is frozen."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of prompts, not a single str")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"prompts must be str, got {type(t).__name__}")
        device = self._device()
        if not texts:
            return torch.empty(0, self.feature_dim, dtype=torch.float32, device=device)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self._encode(texts).float()
        finally:
            self.train(was_training)
        if out.shape != (len(texts), self.feature_dim):
            want = (len(texts), self.feature_dim)
            raise RuntimeError(f"{type(self).__name__} produced {tuple(out.shape)}, expected {want}")
        return out

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _weight_stamp(self) -> tuple:
        """Cheap witness of the weights: replaced or in-place modified tensors change it.

        Writes through ``tensor.data`` bypass the version counter; call ``invalidate_identity`` then.
        """
        tensors = itertools.chain(self.named_parameters(), self.named_buffers())
        return tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in tensors)

    def invalidate_identity(self) -> None:
        """Force the next ``identity()`` to re-hash (needed only after ``.data`` writes)."""
        self._identity = None
        self._identity_stamp = None

    def identity(self) -> str:
        """sha256 hex of kind + tokenizer + weights: the prompt cache's key for this encoder.

        Hashing every weight is expensive (~0.1-0.5 s), so it is done once and reused until a
        weight tensor is replaced or modified in place.
        """
        stamp = self._weight_stamp()
        if self._identity is None or stamp != self._identity_stamp:
            h = hashlib.sha256()
            h.update(b"kind\0" + self.kind.encode() + b"\0")
            h.update(b"dim\0" + str(self.feature_dim).encode() + b"\0")
            h.update(b"tok\0" + hashlib.sha256(self._tokenizer_fingerprint()).digest())
            for name, t in self.state_dict().items():
                h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
                h.update(_tensor_bytes(t))
            self._identity = h.hexdigest()
            self._identity_stamp = stamp
        return self._identity
