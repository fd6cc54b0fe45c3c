"""From per-label hit masks to FluoroSeg annotations: groups as unions, size filtering, absent categories."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from train.synth import rle
from train.synth.vocabulary import Vocabulary

MIN_FRACTION = 0.001  # FluoroSeg drops masks under 0.1% ...
MAX_FRACTION = 0.90  # ... or over 90% of the image


@dataclass
class ImageAnnotations:
    """COCO-style annotations of one image plus what training needs to learn "not present"."""

    annotations: list[dict[str, Any]] = field(default_factory=list)
    absent_category_ids: list[int] = field(default_factory=list)
    dropped_category_ids: list[int] = field(default_factory=list)
    masks: dict[int, np.ndarray] = field(default_factory=dict)


def build_annotations(
    vocab: Vocabulary,
    leaf_masks: dict[int, torch.Tensor],
    image_id: int,
    fov: torch.Tensor | None = None,
    keep_masks: bool = False,
) -> ImageAnnotations:
    """Annotate leaves (structures, tools) and every group as the union of its leaves.

    ``absent`` = vocabulary categories whose mask is empty in this view (including those missing from the CT);
    ``dropped`` = present but outside FluoroSeg's size limits: neither a positive nor a safe negative.
    """
    first = next(iter(leaf_masks.values()), None)
    if first is None:
        raise ValueError("no masks to annotate")
    h, w = first.shape
    n_pix = h * w
    masks: dict[int, torch.Tensor] = {}
    for cid, m in leaf_masks.items():
        m = m & fov if fov is not None else m
        masks[cid] = masks[cid] | m if cid in masks else m
    for gid, members in vocab.group_member_ids().items():
        got = [masks[i] for i in members if i in masks]
        if got:
            masks[gid] = torch.stack(got).any(0)
    out = ImageAnnotations()
    for cat in vocab.categories:
        m = masks.get(cat.id)
        n = int(m.sum()) if m is not None else 0
        if n == 0:
            out.absent_category_ids.append(cat.id)
            continue
        frac = n / n_pix
        if frac < MIN_FRACTION or frac > MAX_FRACTION:
            out.dropped_category_ids.append(cat.id)
            continue
        mn = m.cpu().numpy()
        enc = rle.encode(mn)
        out.annotations.append(
            {
                "id": len(out.annotations) + 1,
                "image_id": image_id,
                "category_id": cat.id,
                "bbox": rle.bbox(mn),
                "area": n,
                "segmentation": enc,
                "iscrowd": 0,
            }
        )
        if keep_masks:
            out.masks[cat.id] = mn
    return out
