"""Reading and writing the FluoroSeg layout (documented in docs/fluoroseg_format.md).

root/train.txt, root/val.txt   case folder names, one per line
root/categories.json           COCO categories (id, name, supercategory, prompt, phrasings)
root/<case>/case.json          case info, CT source, and one entry per image with camera parameters
root/<case>/<image>.tiff       float32 image in [0, 1]
root/<case>/<image>.json       COCO-style {"image", "annotations", "absent_category_ids", ...}

"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from train.synth import rle


def write_image(case_dir: Path, stem: str, image: np.ndarray, record: dict[str, Any]) -> None:
    """Write one image's .tiff and .json (record = {"image": ..., "annotations": ..., ...})."""
    tifffile.imwrite(case_dir / f"{stem}.tiff", image.astype(np.float32), compression=None)
    with open(case_dir / f"{stem}.json", "w") as f:
        json.dump(record, f, separators=(",", ":"))


def write_case(case_dir: Path, case: dict[str, Any]) -> None:
    with open(case_dir / "case.json", "w") as f:
        json.dump(case, f, indent=1)


def write_splits(root: Path, train: list[str], val: list[str]) -> None:
    (root / "train.txt").write_text("".join(f"{c}\n" for c in sorted(train)))
    (root / "val.txt").write_text("".join(f"{c}\n" for c in sorted(val)))


def read_split(root: str | Path, split: str) -> list[str]:
    return [ln.strip() for ln in (Path(root) / f"{split}.txt").read_text().splitlines() if ln.strip()]


def read_case(case_dir: str | Path) -> dict[str, Any]:
    with open(Path(case_dir) / "case.json") as f:
        return json.load(f)


def iter_images(root: str | Path, split: str = "train") -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Yield (image, record) for every image of a split; masks decode with ``decode_masks``."""
    root = Path(root)
    for case in read_split(root, split):
        info = read_case(root / case)
        for entry in info["images"]:
            stem = Path(entry["file_name"]).stem
            with open(root / case / f"{stem}.json") as f:
                rec = json.load(f)
            yield tifffile.imread(root / case / entry["file_name"]), rec


def decode_masks(record: dict[str, Any]) -> dict[int, np.ndarray]:
    """category id -> bool mask for one image record."""
    return {a["category_id"]: rle.decode(a["segmentation"]) for a in record["annotations"]}
