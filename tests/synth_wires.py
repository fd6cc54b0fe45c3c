"""Tool masks with known geometry for the tip/axis tests: analytic wires, and the demo sweep's K-wire.

A wire is a straight tube from its tip back along a direction: its projection is a band of the
wire's width with a flat end (as the synthesis engine's cylinders project), or a point that
tapers over ``taper`` pixels (a trocar tip). Masks are antialiased by 4x4 supersampling and
thresholded at half coverage, as a model's probability map is thresholded. Pixel centres are at
integer coordinates (x = column, y = row), the node's convention.

The demo sweep (fluorosam_rt/assets/demo/chest_sweep.json) records the K-wire's 3-D segment (tip
first) and each frame's camera (P = K [R | t], pixel centres at integer + 0.5); ``sweep_wire``
projects it into a frame scaled to any size: the truth the synthesis engine rendered.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SWEEP_JSON = REPO / "fluorosam_rt" / "assets" / "demo" / "chest_sweep.json"


def wire_mask(
    tip: tuple[float, float],
    theta: float,
    length: float,
    width: float,
    shape: tuple[int, int] = (1024, 1024),
    taper: float = 0.0,
    ss: int = 4,
) -> np.ndarray:
    """uint8 mask of a wire whose tip is at ``tip`` and which points along angle ``theta``
    (radians, image axes: x right, y down): the wire lies behind the tip, at -direction."""
    h, w = shape
    d = np.array([math.cos(theta), math.sin(theta)])
    n = np.array([-d[1], d[0]])
    tail = np.asarray(tip) - d * length
    lo = np.floor(np.minimum(tip, tail) - width - 1).astype(int)
    hi = np.ceil(np.maximum(tip, tail) + width + 1).astype(int)
    x0, y0 = max(lo[0], 0), max(lo[1], 0)
    x1, y1 = min(hi[0], w - 1), min(hi[1], h - 1)
    m = np.zeros(shape, np.uint8)
    if x1 < x0 or y1 < y0:
        return m
    offs = (np.arange(ss) + 0.5) / ss - 0.5
    ys = (np.arange(y0, y1 + 1)[:, None] + offs[None, :]).ravel()
    xs = (np.arange(x0, x1 + 1)[:, None] + offs[None, :]).ravel()
    X, Y = np.meshgrid(xs, ys)
    rx, ry = X - tip[0], Y - tip[1]
    back = -(rx * d[0] + ry * d[1])  # distance behind the tip, along the wire
    side = np.abs(rx * n[0] + ry * n[1])
    half = np.full_like(back, width / 2.0)
    if taper > 0:
        half = np.where(back < taper, width / 2.0 * np.clip(back / taper, 0.0, 1.0), half)
    inside = (back >= 0) & (back <= length) & (side <= half)
    cov = inside.reshape(y1 - y0 + 1, ss, x1 - x0 + 1, ss).mean(axis=(1, 3))
    m[y0 : y1 + 1, x0 : x1 + 1] = cov >= 0.5
    return m


def angle_deg(a: np.ndarray | tuple[float, float], b: np.ndarray | tuple[float, float]) -> float:
    """Angle between two directions, degrees (orientation included)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    c = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def sweep() -> dict:
    return json.loads(SWEEP_JSON.read_text())


def sweep_wire(
    frame: int, size: int = 1024, shift_to_isocenter_mm: float = 0.0
) -> tuple[np.ndarray, np.ndarray, float]:
    """(tip, tail, width) of the demo sweep's K-wire in frame ``frame`` of a ``size``² image,
    in pixel-centre-at-integer coordinates. ``shift_to_isocenter_mm`` moves the 3-D wire that far
    towards the sweep's isocentre (the recorded wire lies outside the field of view)."""
    doc = sweep()
    cam = doc["cameras"][frame]
    part = dict(doc["tools"][0]["parts"][0])
    if shift_to_isocenter_mm:
        iso = np.asarray(doc["cameras"][0]["isocenter"], float)
        towards = iso - np.asarray(part["p0"], float)
        move = towards / np.linalg.norm(towards) * shift_to_isocenter_mm
        part["p0"] = (np.asarray(part["p0"]) + move).tolist()
        part["p1"] = (np.asarray(part["p1"]) + move).tolist()
    scale = size / cam["width"]
    K = np.array(cam["intrinsic"]) * np.array([[scale], [scale], [1.0]])
    P = K @ np.array(cam["extrinsic"])[:3]

    def project(p: list[float]) -> np.ndarray:
        u = P @ np.r_[np.asarray(p, float), 1.0]
        return u[:2] / u[2] - 0.5

    tip, tail = project(part["p0"]), project(part["p1"])
    # the wire's diameter at the detector: 2 r x magnification / pixel size
    mid = (np.asarray(part["p0"]) + np.asarray(part["p1"])) / 2.0
    depth = float((np.array(cam["extrinsic"])[:3] @ np.r_[mid, 1.0])[2])
    width = 2 * part["r"] * K[0, 0] / depth
    return tip, tail, width


def draw_segment(tip: np.ndarray, tail: np.ndarray, width: float, shape: tuple[int, int]) -> np.ndarray:
    d = tip - tail
    return wire_mask(tuple(tip), math.atan2(d[1], d[0]), float(np.hypot(*d)), width, shape)
