"""Contact sheets of a generated set, one PNG per region, with masks overlaid: the quickest sanity check.

Each sheet shows up to ``n`` images of its region from whichever splits exist (train first), each with up
to 6 masks as coloured contours (tools first) and its body, view and angles as the title. Images of sets
written before regions existed are grouped as ``all``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from train.synth.fluoroseg_io import decode_masks, read_case

NO_REGION = "all"


def _split_cases(root: Path) -> list[str]:
    cases: list[str] = []
    for split in ("train", "val"):
        f = root / f"{split}.txt"
        if f.exists():
            cases += [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
    return cases


def pick_images(root: Path, n: int, regions: list[str] | None = None) -> dict[str, list[tuple[str, dict]]]:
    """Region -> up to ``n`` (case, image entry) pairs; stops reading once every listed region is full."""
    picked: dict[str, list[tuple[str, dict]]] = {}
    for case in _split_cases(root):
        info = read_case(root / case)
        for entry in info["images"]:
            items = picked.setdefault(entry.get("region") or NO_REGION, [])
            if len(items) < n:
                items.append((case, {**entry, "body": info.get("body", info.get("ct", ""))}))
        if regions and all(len(picked.get(r, [])) >= n for r in regions):
            break
    return picked


def _draw(root: Path, items: list[tuple[str, dict]], cats: dict[int, dict[str, Any]], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(items))
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.cm.tab10(np.arange(10))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (case, entry) in zip(axes.ravel(), items):
        stem = Path(entry["file_name"]).stem
        img = tifffile.imread(root / case / entry["file_name"])
        rec = json.loads((root / case / f"{stem}.json").read_text())
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        masks = decode_masks(rec)
        tools = [c for c in masks if cats[c]["supercategory"] == "tool"]
        leaves = [c for c in masks if cats[c]["supercategory"] == "structure"]
        leaves.sort(key=lambda c: -masks[c].sum())
        show = (tools + leaves[::3])[:6]
        for k, cid in enumerate(show):
            ax.contour(masks[cid], levels=[0.5], colors=[colors[k % 10]], linewidths=0.8)
            ax.text(2, 12 + 14 * k, cats[cid]["prompt"], color=colors[k % 10], fontsize=6)
        cam = entry["camera"]
        view = entry.get("view") or cam["view"]
        title = f"{entry['body']} {view}\n{cam['primary_deg']:.0f}°/{cam['secondary_deg']:.0f}°"
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def contact_sheets(root: str | Path, n: int = 8, regions: list[str] | None = None) -> list[Path]:
    """Write ``root/contact_sheet_<region>.png`` for every region with images; returns the paths.

    ``regions`` (the regions known to be in the set) only lets the scan stop early on large sets.
    """
    root = Path(root)
    cats = {c["id"]: c for c in json.loads((root / "categories.json").read_text())}
    out = []
    for region, items in sorted(pick_images(root, n, regions).items()):
        png = root / f"contact_sheet_{region}.png"
        _draw(root, items, cats, png)
        out.append(png)
    return out
