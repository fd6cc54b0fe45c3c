"""Reader for the FluoroSeg layout (docs/fluoroseg_format.md): our synthetic sets and the released data.

The per-image JSON records are parsed once and kept (RLE strings are compact); a mask is decoded
only when a prompt for it is drawn. A folder whose sub-folders are FluoroSeg roots (e.g. data
generated in several seeded chunks) reads as one data set.

Absent and dropped categories come from the record: ``absent_category_ids`` are empty projections
(safe negatives), ``dropped_category_ids`` are present but outside FluoroSeg's size limits, so
they are neither used as positives nor as negatives.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train.dataset import CaseData, StructureInfo, XrayDataset


def _is_root(p: Path) -> bool:
    return (p / "categories.json").is_file() and ((p / "train.txt").is_file() or (p / "val.txt").is_file())


def fluoroseg_roots(path: str | Path) -> list[Path]:
    """The FluoroSeg roots at path: itself, or its immediate sub-folders that are roots."""
    p = Path(path)
    if _is_root(p):
        return [p]
    if p.is_dir():
        return sorted(c for c in p.iterdir() if c.is_dir() and _is_root(c))
    return []


def is_fluoroseg(path: str | Path) -> bool:
    return bool(fluoroseg_roots(path))


def _rle_decode(seg: dict[str, Any]) -> np.ndarray:
    from train.synth import rle

    return rle.decode(seg)


def _rle_area(seg: dict[str, Any]) -> int:
    from train.synth import rle

    return rle.area(seg)


class FluoroSegDataset(XrayDataset):
    """All images of one split (``train``, ``val`` or ``all``) of one or more FluoroSeg roots."""

    complete_labels = True

    def __init__(self, path: str | Path, split: str = "train") -> None:
        roots = fluoroseg_roots(path)
        if not roots:
            raise FileNotFoundError(f"{path}: not a FluoroSeg root (categories.json + train.txt/val.txt)")
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split!r}")
        self.split = split
        cats = json.loads((roots[0] / "categories.json").read_text(encoding="utf-8"))
        self.id_to_name = {int(c["id"]): str(c["name"]) for c in cats}
        self.structures = {
            str(c["name"]): StructureInfo(
                str(c["name"]),
                str(c.get("prompt") or c["name"].replace("_", " ")),
                tuple(c.get("phrasings") or ()),
                str(c.get("supercategory", "structure")),
            )
            for c in cats
        }
        self._items: list[tuple[Path, str, dict[str, Any]]] = []
        self._areas: dict[int, dict[str, float]] = {}
        for root in roots:
            splits = ["train", "val"] if split == "all" else [split]
            for sp in splits:
                f = root / f"{sp}.txt"
                if not f.is_file():
                    continue
                for case in [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]:
                    info = json.loads((root / case / "case.json").read_text(encoding="utf-8"))
                    for entry in info["images"]:
                        stem = Path(entry["file_name"]).stem
                        rec = json.loads((root / case / f"{stem}.json").read_text(encoding="utf-8"))
                        self._items.append(
                            (root / case / entry["file_name"], f"{root.name}/{case}/{stem}", rec)
                        )

    def override_prompts(self, mapping: dict[str, str]) -> None:
        """Evaluate the same masks under other phrasings (``--prompts FILE``)."""
        for name, text in mapping.items():
            if name in self.structures:
                old = self.structures[name]
                self.structures[name] = StructureInfo(name, str(text), old.phrasings, old.kind)

    def __len__(self) -> int:
        return len(self._items)

    def case_id(self, i: int) -> str:
        return self._items[i][1]

    def present(self, i: int) -> list[str]:
        return [self.id_to_name[a["category_id"]] for a in self._items[i][2]["annotations"]]

    def absent(self, i: int) -> list[str]:
        return [self.id_to_name[c] for c in self._items[i][2].get("absent_category_ids", [])]

    def area_fraction(self, i: int, name: str) -> float:
        """Mask area as a fraction of the image, from the RLE (no decoding of the full mask)."""
        areas = self._areas.get(i)
        if areas is None:
            rec = self._items[i][2]
            n_pix = float(rec["image"]["height"] * rec["image"]["width"])
            areas = {
                self.id_to_name[a["category_id"]]: (
                    a["area"] if "area" in a else _rle_area(a["segmentation"])
                )
                / n_pix
                for a in rec["annotations"]
            }
            self._areas[i] = areas
        return float(areas.get(name, 0.0))

    def case_meta(self, i: int) -> dict[str, Any]:
        img = self._items[i][2]["image"]
        return {
            "view": img.get("camera", {}).get("view"),
            "height": img.get("height"),
            "width": img.get("width"),
        }

    def load(self, i: int, names: Sequence[str] | None = None) -> CaseData:
        import tifffile

        path, cid, rec = self._items[i]
        image = np.asarray(tifffile.imread(path), dtype=np.float32)
        want = set(self.present(i) if names is None else names)
        masks = {}
        for a in rec["annotations"]:
            name = self.id_to_name[a["category_id"]]
            if name in want:
                masks[name] = _rle_decode(a["segmentation"])
        return CaseData(cid, image, masks, self.absent(i), self.case_meta(i))
