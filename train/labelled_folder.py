"""Reader for the labelled X-ray folder: ``images/``, ``masks/<structure>/``, ``prompts.json``.

The layout is documented in ``../shared/data/chest-xray-hannover/README.md``; any folder in it works.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fluorosam_rt.imageio import read_image
from train.dataset import CaseData, StructureInfo, XrayDataset

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".bmp")


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
