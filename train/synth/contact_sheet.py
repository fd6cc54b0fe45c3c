"""A contact-sheet PNG of generated images with their masks overlaid: the quickest sanity check of a set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from train.synth.fluoroseg_io import decode_masks, iter_images


def contact_sheet(root: str | Path, out_png: str | Path, n: int = 8, split: str = "train") -> Path:
    """Draw up to ``n`` images in a grid, each with up to 6 leaf masks as coloured contours and labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    cats = {c["id"]: c for c in json.loads((root / "categories.json").read_text())}
    items = []
    for img, rec in iter_images(root, split):
        items.append((img, rec))
        if len(items) >= n:
            break
    if not items:
        raise ValueError(f"no images in the {split} split of {root}")
    cols = min(4, len(items))
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.cm.tab10(np.arange(10))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (img, rec) in zip(axes.ravel(), items):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        masks = decode_masks(rec)
        tools = [c for c in masks if cats[c]["supercategory"] == "tool"]
        leaves = [c for c in masks if cats[c]["supercategory"] == "structure"]
        leaves.sort(key=lambda c: -masks[c].sum())
        show = (tools + leaves[::3])[:6]
        for k, cid in enumerate(show):
            ax.contour(masks[cid], levels=[0.5], colors=[colors[k % 10]], linewidths=0.8)
            ax.text(2, 12 + 14 * k, cats[cid]["prompt"], color=colors[k % 10], fontsize=6)
        cam = rec["image"]["camera"]
        ax.set_title(f"{cam['view']} {cam['primary_deg']:.0f}°/{cam['secondary_deg']:.0f}°", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
