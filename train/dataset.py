"""The dataset interface every reader implements, and several data sets read as one.

A case knows which structures are *present* (non-empty mask) and which are *known absent*. Only
labels that were actually annotated can be absent: a labelled folder says nothing about what it
did not annotate, so absence there comes only from an existing all-zero mask file; FluoroSeg lists
every label of its CT, so an empty projection there is a real "not in view". Teaching
"absent" for an unannotated but visible structure would teach the model to ignore anatomy.

Readers: ``train.labelled_folder`` and ``train.fluoroseg``; ``train.data.open_dataset`` picks one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class StructureInfo:
    """How a structure is prompted: its canonical text and alternative phrasings."""

    name: str
    prompt: str
    phrasings: tuple[str, ...] = ()
    kind: str = "structure"  # structure | group | tool

    @property
    def texts(self) -> tuple[str, ...]:
        return (self.prompt, *[p for p in self.phrasings if p != self.prompt])


@dataclass
class CaseData:
    """One image with the masks asked for (present structures) and its known-absent structures."""

    id: str
    image: np.ndarray
    masks: dict[str, np.ndarray]
    absent: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


class XrayDataset(ABC):
    """Cases with per-structure masks. ``load`` decodes only the masks it is asked for."""

    structures: dict[str, StructureInfo]
    complete_labels: bool  # whether unlisted-but-annotated structures can be treated as absent

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def case_id(self, i: int) -> str: ...

    @abstractmethod
    def present(self, i: int) -> list[str]:
        """Structures with a non-empty mask in case i (from an index, without decoding)."""

    @abstractmethod
    def absent(self, i: int) -> list[str]:
        """Structures known to be absent from case i."""

    @abstractmethod
    def load(self, i: int, names: Sequence[str] | None = None) -> CaseData:
        """Image and masks of the requested present structures (all present ones if None)."""

    def case_meta(self, i: int) -> dict[str, Any]:
        return {}


class ConcatXray(XrayDataset):
    """Several data sets read as one (their structure tables are merged)."""

    def __init__(self, sets: list[XrayDataset]) -> None:
        self.sets = sets
        self.structures = {}
        for s in sets:
            self.structures.update(s.structures)
        self.complete_labels = all(s.complete_labels for s in sets)
        self._offsets = np.cumsum([0] + [len(s) for s in sets])

    def _loc(self, i: int) -> tuple[XrayDataset, int]:
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return self.sets[k], i - int(self._offsets[k])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def case_id(self, i: int) -> str:
        s, j = self._loc(i)
        return s.case_id(j)

    def present(self, i: int) -> list[str]:
        s, j = self._loc(i)
        return s.present(j)

    def absent(self, i: int) -> list[str]:
        s, j = self._loc(i)
        return s.absent(j)

    def area_fraction(self, i: int, name: str) -> float:
        s, j = self._loc(i)
        fn = getattr(s, "area_fraction", None)
        return fn(j, name) if fn is not None else 1.0

    def load(self, i: int, names=None):
        s, j = self._loc(i)
        return s.load(j, names)
