"""Datasets for training and evaluation, and the cached text features the trainer feeds the model.

Two on-disk layouts are read behind one small interface (``XrayDataset``):

* the labelled X-ray folder (``images/``, ``masks/<structure>/``, ``prompts.json``), documented in
  ``../shared/data/chest-xray-hannover/README.md``; any folder in that layout works;
* the FluoroSeg layout our synthetic engine writes (``docs/fluoroseg_format.md``).

A case knows which structures are *present* (non-empty mask) and which are *known absent*. Only
labels that were actually annotated can be absent: a labelled folder says nothing about what it
did not annotate, so absence there comes only from an existing all-zero mask file; FluoroSeg lists
every label of its CT, so an empty projection there is a real "not in view". Teaching
"absent" for an unannotated but visible structure would teach the model to ignore anatomy.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from fluorosam_rt.imageio import read_image
from fluorosam_rt.preprocess import Preprocessor
from fluorosam_rt.text.base import TextEncoder, normalize_prompt

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".bmp")


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


def _read_mask(path: Path) -> np.ndarray:
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise ValueError(f"cannot read mask {path}")
    if m.ndim == 3:
        m = m[..., 0]
    return m > 0


def _vocabulary_structures() -> dict[str, StructureInfo]:
    """Prompt texts from configs/vocabulary.yaml (empty if the vocabulary cannot be read)."""
    try:
        from train.synth.vocabulary import Vocabulary

        voc = Vocabulary.load()
    except Exception:  # the vocabulary is an optional source of phrasings
        return {}
    return {c.name: StructureInfo(c.name, c.prompt, tuple(c.phrasings), c.kind) for c in voc.categories}


class LabelledFolder(XrayDataset):
    """The simple labelled X-ray folder: images/<id>.<ext>, masks/<structure>/<id>.png, prompts.json.

    ``prompts`` (a mapping or a JSON file) overrides the folder's prompts.json, so the same masks
    can be evaluated under other phrasings. Phrasings for training come from the vocabulary when
    a structure folder is named like a vocabulary entry.
    """

    complete_labels = False

    def __init__(self, root: str | Path, prompts: str | Path | dict[str, str] | None = None) -> None:
        self.root = Path(root)
        img_dir = self.root / "images"
        if not img_dir.is_dir():
            raise FileNotFoundError(f"{self.root}: no images/ folder (labelled X-ray folder layout)")
        if prompts is None:
            pj = self.root / "prompts.json"
            mapping = json.loads(pj.read_text(encoding="utf-8")) if pj.is_file() else {}
        elif isinstance(prompts, dict):
            mapping = dict(prompts)
        else:
            mapping = json.loads(Path(prompts).read_text(encoding="utf-8"))
        mask_root = self.root / "masks"
        folders = sorted(p.name for p in mask_root.iterdir() if p.is_dir()) if mask_root.is_dir() else []
        for name in folders:
            mapping.setdefault(name, name.replace("_", " "))
        vocab = _vocabulary_structures()
        self.structures = {}
        for name, text in mapping.items():
            if not isinstance(text, str):
                raise ValueError(f"prompts: the prompt of {name!r} must be a string")
            phr = vocab[name].texts if name in vocab else ()
            self.structures[name] = StructureInfo(name, text, tuple(p for p in phr if p != text))
        self._images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        self._index: dict[int, tuple[list[str], list[str]]] = {}
        index_file = self.root / "index.json"
        self._meta: dict[str, dict[str, Any]] = {}
        if index_file.is_file():
            rows = json.loads(index_file.read_text(encoding="utf-8"))
            if isinstance(rows, dict):  # {"cases": [...]} or a bare list
                rows = rows.get("cases", [])
            for row in rows:
                if isinstance(row, dict) and "id" in row:
                    self._meta[str(row["id"])] = row

    def __len__(self) -> int:
        return len(self._images)

    def case_id(self, i: int) -> str:
        return self._images[i].stem

    def case_meta(self, i: int) -> dict[str, Any]:
        return self._meta.get(self.case_id(i), {})

    def _mask_path(self, name: str, case: str) -> Path | None:
        d = self.root / "masks" / name
        for ext in (".png", ".tif", ".tiff", ".bmp"):
            p = d / f"{case}{ext}"
            if p.is_file():
                return p
        return None

    def _scan(self, i: int) -> tuple[list[str], list[str]]:
        if i not in self._index:
            present, absent = [], []
            for name in self.structures:
                p = self._mask_path(name, self.case_id(i))
                if p is None:
                    continue
                (present if _read_mask(p).any() else absent).append(name)
            self._index[i] = (present, absent)
        return self._index[i]

    def present(self, i: int) -> list[str]:
        return list(self._scan(i)[0])

    def absent(self, i: int) -> list[str]:
        return list(self._scan(i)[1])

    def load(self, i: int, names: Sequence[str] | None = None) -> CaseData:
        case = self.case_id(i)
        image = read_image(self._images[i]).pixels
        want = self.present(i) if names is None else list(names)
        masks = {}
        for name in want:
            p = self._mask_path(name, case)
            if p is None:
                continue
            m = _read_mask(p)
            if m.shape != image.shape[:2]:
                raise ValueError(f"mask {p} is {m.shape}, image is {image.shape[:2]}")
            if m.any():
                masks[name] = m
        return CaseData(case, image, masks, self.absent(i), self.case_meta(i))


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


def open_dataset(path: str | Path, prompts: str | Path | None = None) -> XrayDataset:
    """Pick the reader by layout: FluoroSeg if its annotation files exist, else the labelled folder."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"dataset not found: {root}")
    from train.fluoroseg import FluoroSegDataset, is_fluoroseg

    if is_fluoroseg(root):
        ds = FluoroSegDataset(root)
        if prompts is not None:
            ds.override_prompts(json.loads(Path(prompts).read_text(encoding="utf-8")))
        return ds
    return LabelledFolder(root, prompts)


# -- text features -------------------------------------------------------------------------------------
class TextFeatureBank:
    """Normalised prompt text -> frozen text-encoder feature, computed once for every phrasing.

    The trainer never runs the text encoder per step; it indexes this table. The file is keyed by
    the encoder's identity, so features from another encoder are never reused.
    """

    def __init__(self, texts: Sequence[str], features: torch.Tensor, identity: str) -> None:
        self.texts = [normalize_prompt(t) for t in texts]
        self.index = {t: i for i, t in enumerate(self.texts)}
        self.features = features.float()
        self.identity = identity

    def __len__(self) -> int:
        return len(self.texts)

    def idx(self, text: str) -> int:
        return self.index[normalize_prompt(text)]

    @classmethod
    def build(
        cls, texts: Iterable[str], encoder: TextEncoder, cache_file: str | Path | None = None
    ) -> TextFeatureBank:
        uniq = sorted({normalize_prompt(t) for t in texts})
        ident = encoder.identity()
        if cache_file is not None and Path(cache_file).is_file():
            saved = torch.load(cache_file, map_location="cpu", weights_only=True)
            if saved.get("identity") == ident and set(uniq) <= set(saved["texts"]):
                return cls(saved["texts"], saved["features"], ident)
        with torch.no_grad():
            feats = encoder.encode(uniq).cpu().float()
        bank = cls(uniq, feats, ident)
        if cache_file is not None:
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"texts": uniq, "features": feats, "identity": ident}, cache_file)
        return bank


def all_prompt_texts(datasets: Iterable[XrayDataset]) -> list[str]:
    """Every text training may use: prompts and phrasings, minus the vocabulary's held-out phrasings
    (they must not reach the text-feature bank, nor the VQ codebook snapped from it)."""
    from train.synth.vocabulary import default_heldout_keys

    heldout = default_heldout_keys()
    out: set[str] = set()
    for ds in datasets:
        for info in ds.structures.values():
            out.add(info.prompt)
            out.update(p for p in info.phrasings if normalize_prompt(p) not in heldout)
    return sorted(out)


# -- geometry shared by training and evaluation --------------------------------------------------------
def mask_to_model_frame(mask: np.ndarray, img_size: int) -> np.ndarray:
    """Bool mask at the image's size -> float [S, S] in the padded model frame (area-resampled).

    Mirrors Preprocessor's geometry (longest side to S, pad bottom/right), so a target lines up
    with the low-res logits exactly as the predictor maps them back.
    """
    from fluorosam_rt.preprocess import resized_shape

    h, w = mask.shape
    (rh, rw), _ = resized_shape(h, w, img_size)
    small = cv2.resize(mask.astype(np.float32), (rw, rh), interpolation=cv2.INTER_AREA)
    out = np.zeros((img_size, img_size), np.float32)
    out[:rh, :rw] = small
    return out


def preprocess_for(model_cfg: Any) -> Preprocessor:
    """The node's preprocessing for a model config: training must see exactly what the node sees."""
    pp = model_cfg.preprocess
    return Preprocessor(model_cfg.image_encoder.img_size, windowing=pp.windowing, window_at=pp.window_at)
