"""Overlay images: what a person looks at to judge a segmentation."""

from __future__ import annotations

import re
from collections.abc import Sequence

import cv2
import numpy as np

from bridge.prompt_geometry import PromptGeometry

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
    outline: bool = True,
) -> np.ndarray:
    """BGR uint8 image with each mask tinted, outlined (unless ``outline`` is False: the caller
    draws published contours instead, draw_geometry), and named in a legend."""
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
    for i, mask in enumerate(masks if outline else ()):
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


def draw_geometry(
    img_bgr: np.ndarray, geometries: Sequence[PromptGeometry | None], downsample: int = 1
) -> np.ndarray:
    """Draw published geometry on an overlay (in place, returned): each prompt's contours in its
    colour (holes thinner), and each tool's centre line, tip (a ringed dot) and axis (an arrow
    ending at the tip), labelled with the instance's tracked id. Geometry is in source pixels;
    the image is at mask size, so coordinates are divided by the downsampling factor."""
    thickness = max(1, round(max(img_bgr.shape[:2]) / 400))
    d = float(downsample)

    def px(pts: np.ndarray) -> np.ndarray:
        return np.rint((np.asarray(pts, dtype=np.float64) - (d - 1) / 2.0) / d).astype(np.int32)

    for k, g in enumerate(geometries):
        if g is None:
            continue
        color = PALETTE_BGR[k % len(PALETTE_BGR)]
        for poly in g.contours:
            for r, ring in enumerate(poly):
                cv2.polylines(
                    img_bgr, [px(ring).reshape(-1, 1, 2)], True, color, thickness if r else thickness + 1
                )
        for inst in g.instances:
            if inst.polyline is not None:
                cv2.polylines(
                    img_bgr, [px(inst.polyline).reshape(-1, 1, 2)], False, (255, 255, 255), thickness
                )
            if inst.tip is None:
                continue
            tip = px(np.array([inst.tip]))[0]
            if inst.axis is not None:
                back = px(np.array([inst.tip]) - 12 * d * thickness * np.array([inst.axis]))[0]
                cv2.arrowedLine(
                    img_bgr, tuple(map(int, back)), tuple(map(int, tip)), color, thickness, tipLength=0.4
                )
            cv2.circle(
                img_bgr, tuple(map(int, tip)), 3 + 2 * thickness, (0, 0, 0), thickness + 1, cv2.LINE_AA
            )
            cv2.circle(img_bgr, tuple(map(int, tip)), 2 + thickness, color, -1, cv2.LINE_AA)
            cv2.putText(
                img_bgr,
                f"#{inst.id}",
                (int(tip[0]) + 4 + 2 * thickness, int(tip[1]) - 4),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.35 * thickness + 0.1,
                color,
                1,
                cv2.LINE_AA,
            )
    return img_bgr
