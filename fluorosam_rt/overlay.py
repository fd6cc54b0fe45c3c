"""Overlay images: what a person looks at to judge a segmentation."""

from __future__ import annotations

import re
from collections.abc import Sequence

import cv2
import numpy as np

# Distinct, colour-blind-friendly colours (Okabe-Ito), BGR for OpenCV.
PALETTE_BGR: tuple[tuple[int, int, int], ...] = (
    (0, 159, 230),
    (233, 180, 86),
    (115, 158, 0),
    (66, 228, 240),
    (178, 114, 0),
    (0, 94, 213),
    (167, 121, 204),
    (255, 255, 255),
)


def to_display_u8(pixels: np.ndarray) -> np.ndarray:
    """Any-range gray image -> uint8 by min-max (a display helper, not model preprocessing)."""
    img = np.asarray(pixels, dtype=np.float32)
    if img.ndim == 3:
        img = img.mean(axis=2)
    lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    if hi <= lo:
        return np.zeros(img.shape, dtype=np.uint8)
    return np.clip((img - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def slugify(text: str) -> str:
    """File-name-safe slug of a prompt, e.g. "Left femur" -> "left_femur"."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:60] or "prompt"


def render_overlay(
    pixels: np.ndarray,
    masks: Sequence[np.ndarray],
    labels: Sequence[str],
    alpha: float = 0.4,
) -> np.ndarray:
    """BGR uint8 image with each mask tinted, outlined, and named in a legend."""
    base = cv2.cvtColor(to_display_u8(pixels), cv2.COLOR_GRAY2BGR)
    out = base.astype(np.float32)
    for i, mask in enumerate(masks):
        if mask.shape != base.shape[:2]:
            raise ValueError(f"mask {i} has shape {mask.shape}, image is {base.shape[:2]}")
        color = np.array(PALETTE_BGR[i % len(PALETTE_BGR)], dtype=np.float32)
        m = mask.astype(bool)
        out[m] = (1 - alpha) * out[m] + alpha * color
    out_u8 = np.clip(out, 0, 255).astype(np.uint8)
    thickness = max(1, round(max(base.shape[:2]) / 400))
    for i, mask in enumerate(masks):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out_u8, contours, -1, PALETTE_BGR[i % len(PALETTE_BGR)], thickness)
    scale = max(0.4, max(base.shape[:2]) / 1000)
    y = int(24 * scale) + 4
    for i, label in enumerate(labels):
        color = PALETTE_BGR[i % len(PALETTE_BGR)]
        cv2.putText(
            out_u8, label, (8, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA
        )
        cv2.putText(out_u8, label, (8, y), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness, cv2.LINE_AA)
        y += int(28 * scale) + 4
    return out_u8
