"""Tiny deterministic data sets (FluoroSeg layout and labelled folder) for tests and smoke runs.

Shapes stand in for anatomy: a bright disk ("heart"), two dark ellipses ("left_lung",
"right_lung", and their union "lungs") and a thin bright line ("k_wire") in some images. They
are learnable within a few dozen steps, so a fit -> eval round trip can show a real effect.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

TOY_CATEGORIES = [
    {
        "id": 51,
        "name": "heart",
        "supercategory": "structure",
        "prompt": "heart",
        "phrasings": ["cardiac silhouette"],
    },
    {"id": 201, "name": "lungs", "supercategory": "group", "prompt": "lungs", "phrasings": ["both lungs"]},
    {
        "id": 202,
        "name": "left_lung",
        "supercategory": "group",
        "prompt": "left lung",
        "phrasings": ["L lung"],
    },
    {
        "id": 203,
        "name": "right_lung",
        "supercategory": "group",
        "prompt": "right lung",
        "phrasings": ["R lung"],
    },
    {
        "id": 301,
        "name": "k_wire",
        "supercategory": "tool",
        "prompt": "K-wire",
        "phrasings": ["Kirschner wire"],
    },
]


def toy_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One image in [0, 1] (bone bright) and its masks by category name."""
    img = np.full((size, size), 0.55, np.float32) + rng.normal(0, 0.02, (size, size)).astype(np.float32)
    masks: dict[str, np.ndarray] = {}
    c = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    ax = (int(size * rng.uniform(0.13, 0.18)), int(size * rng.uniform(0.25, 0.32)))
    for name, sx in (("right_lung", -1), ("left_lung", 1)):  # patient's right is on the image's left
        m = np.zeros((size, size), np.uint8)
        cv2.ellipse(m, (int(c[0] + sx * size * 0.2), int(c[1])), ax, 0, 0, 360, 1, -1)
        masks[name] = m > 0
        img[masks[name]] -= 0.3
    masks["lungs"] = masks["left_lung"] | masks["right_lung"]
    h = np.zeros((size, size), np.uint8)
    cv2.circle(h, (int(c[0] + size * 0.05), int(c[1] + size * 0.12)), int(size * 0.1), 1, -1)
    masks["heart"] = h > 0
    img[masks["heart"]] += 0.25
    if rng.random() < 0.5:
        w = np.zeros((size, size), np.uint8)
        p0 = rng.integers(size // 8, size - size // 8, 2)
        p1 = rng.integers(size // 8, size - size // 8, 2)
        cv2.line(w, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 1, max(2, size // 40))
        masks["k_wire"] = w > 0
        img[masks["k_wire"]] = 0.98
    return np.clip(img, 0, 1), masks


def write_toy_fluoroseg(
    root: str | Path, n_train: int = 6, n_val: int = 2, size: int = 64, seed: int = 0
) -> Path:
    """A FluoroSeg root with one case per image (split by case, as the engine does)."""
    import tifffile

    from train.synth import rle

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ids = {c["name"]: c["id"] for c in TOY_CATEGORIES}
    cases = []
    for i in range(n_train + n_val):
        rng = np.random.default_rng([seed, i])
        img, masks = toy_image(rng, size)
        case = f"case_{i:05d}"
        (root / case).mkdir(exist_ok=True)
        tifffile.imwrite(root / case / "000000.tiff", img.astype(np.float32))
        anns = [
            {
                "id": k + 1,
                "image_id": i,
                "category_id": ids[n],
                "area": int(m.sum()),
                "segmentation": rle.encode(m),
                "bbox": rle.bbox(m),
                "iscrowd": 0,
            }
            for k, (n, m) in enumerate(sorted(masks.items()))
        ]
        absent = [ids[n] for n in ids if n not in masks]
        info = {"id": i, "file_name": "000000.tiff", "height": size, "width": size}
        rec = {"image": info, "annotations": anns, "absent_category_ids": absent, "dropped_category_ids": []}
        (root / case / "000000.json").write_text(json.dumps(rec))
        (root / case / "case.json").write_text(json.dumps({"case": case, "images": [info]}))
        cases.append(case)
    (root / "train.txt").write_text("".join(c + "\n" for c in cases[:n_train]))
    (root / "val.txt").write_text("".join(c + "\n" for c in cases[n_train:]))
    (root / "categories.json").write_text(json.dumps(TOY_CATEGORIES))
    return root


def write_toy_folder(root: str | Path, n: int = 3, size: int = 80, seed: int = 1) -> Path:
    """A labelled X-ray folder (images/, masks/<structure>/, prompts.json) with 8-bit PNGs."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = ("lungs", "left_lung", "right_lung")
    for name in names:
        (root / "masks" / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, masks = toy_image(np.random.default_rng([seed, i]), size)
        cid = f"img{i:03d}"
        cv2.imwrite(str(root / "images" / f"{cid}.png"), (img * 255).astype(np.uint8))
        for name in names:
            cv2.imwrite(str(root / "masks" / name / f"{cid}.png"), masks[name].astype(np.uint8) * 255)
    (root / "prompts.json").write_text(
        json.dumps({"lungs": "lungs", "left_lung": "left lung", "right_lung": "right lung"})
    )
    return root
