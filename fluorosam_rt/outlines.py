"""A mask's outlines, instances, bounding box, centroid and areas: what navigation consumes.

Everything comes from one ``cv2.findContours`` pass (two-level hierarchy: outlines and their
holes) over the part of the mask that can hold pixels (the node bounds it from the
low-resolution logits); bounding box, pixel counts and centroids are computed from the traced
contours, so the pixels are read once per prompt, not once per quantity:

* **instances** are the outer contours: with 8-connected foreground they are exactly the mask's
  connected components (a labelling pass with statistics costs ~8 ms CPU per 1024² mask here,
  the trace ~0.1-0.3 ms and yields the outlines too);
* **pixel areas** (of instances, and of the prompt: their sum, specks included) come from Pick's
  theorem on the traced contours: a contour
  through B boundary-pixel centres enclosing polygon area A covers A + B/2 + 1 pixels, and a
  hole's contour encloses A − B/2 + 1 pixels that are not part of the instance (exact for
  8-connected regions, one-pixel-wide necks included; checked against a labelling in the tests);
* **centroids** are those of the outline polygons with holes subtracted; the prompt's is the
  instances' centroids weighted by their pixel areas (within a pixel of the pixels' centre of
  mass, checked in the tests; an exact centre of mass would cost another pass over the pixels);
* **contours** are traced as straight 8-connected runs and simplified with Douglas-Peucker to a
  stated tolerance in source pixels; only linear tools keep every boundary pixel (tool_axis.py).

Coordinates are source pixels (bridge/prompt_geometry.py): a mask downsampled by d maps its
pixel (i, j) to source (i·d + (d−1)/2, j·d + (d−1)/2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from bridge.prompt_geometry import Instance, PromptGeometry, Spacing


@dataclass(frozen=True)
class OutlineSettings:
    tolerance_px: float = 1.0  # Douglas-Peucker tolerance of the published contours, source pixels
    min_instance_px: int = 25  # parts smaller than this (source pixels) are counted as specks
    max_instances: int = 32  # per prompt, largest first; the rest are counted as specks


@dataclass
class Part:
    """What the tool fit needs of one instance, in mask pixels (kept off the wire)."""

    points: np.ndarray  # [n, 2] float64 outer contour, every boundary pixel (a dense trace)
    center: np.ndarray  # [2] polygon centroid, mask pixels
    cov: np.ndarray  # [2, 2] second central moments of the filled outline per unit area
    area: float  # pixel count, mask pixels
    mask_hw: tuple[int, int]


@dataclass
class Outline:
    geometry: PromptGeometry
    parts: list[Part] = field(default_factory=list)  # one per geometry.instances entry


def to_source(points: np.ndarray, d: int) -> np.ndarray:
    """Mask-pixel coordinates -> source-pixel coordinates (float)."""
    pts = np.asarray(points, dtype=np.float64)
    return pts if d == 1 else pts * d + (d - 1) / 2.0


def _ring(contour: np.ndarray, d: int, eps: float) -> np.ndarray:
    simple = cv2.approxPolyDP(contour, eps, True) if eps > 0 and len(contour) > 2 else contour
    pts = simple.reshape(-1, 2)
    return pts.astype(np.int32) if d == 1 else np.rint(to_source(pts, d)).astype(np.int32)


def _bbox_source(
    x: int, y: int, w: int, h: int, d: int, src_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    x0, y0 = x * d, y * d
    return (x0, y0, min((x + w) * d, src_hw[1]) - x0, min((y + h) * d, src_hw[0]) - y0)


def _pixel_areas(contours: Sequence[np.ndarray], dense: bool) -> list[tuple[float, float]]:
    """Per traced contour: (pixels on or inside it, pixels strictly inside it), by Pick's theorem
    from its polygon area A and boundary pixel count B: A + B/2 + 1 and A - B/2 + 1.

    B, the boundary pixel count, is the number of points of a dense trace; a simplified trace
    (CHAIN_APPROX_SIMPLE) keeps only the ends of straight 8-connected runs, and a run from a to b
    covers max(|dx|, |dy|) pixel steps. All contours are done in one vectorised pass.
    """
    lens = np.fromiter((len(c) for c in contours), dtype=np.int64, count=len(contours))
    if dense:
        bnd = lens
    else:
        pts = np.concatenate(contours).reshape(-1, 2)
        starts = np.r_[0, np.cumsum(lens)[:-1]]
        nxt = np.arange(1, len(pts) + 1)
        nxt[starts + lens - 1] = starts  # each contour closes on its first point
        steps = np.abs(pts[nxt] - pts).max(axis=1)
        bnd = np.add.reduceat(steps, starts)
    out = []
    for c, b in zip(contours, bnd.tolist()):
        a = abs(cv2.contourArea(c))
        out.append((1.0, 0.0) if b <= 1 else (a + b / 2.0 + 1.0, max(0.0, a - b / 2.0 + 1.0)))
    return out


def _moments(c: np.ndarray) -> tuple[float, float, float, float, float, float]:
    m = cv2.moments(c)
    s = -1.0 if m["m00"] < 0 else 1.0
    return (s * m["m00"], s * m["m10"], s * m["m01"], s * m["m20"], s * m["m11"], s * m["m02"])


def empty_geometry(reason: str) -> PromptGeometry:
    return PromptGeometry(absent={"geometry": reason})


def outline_mask(
    mask: np.ndarray,
    downsample: int = 1,
    spacing: Spacing | None = None,
    settings: OutlineSettings = OutlineSettings(),
    roi: tuple[int, int, int, int] | None = None,
    source_hw: tuple[int, int] | None = None,
    dense: bool = False,
) -> Outline:
    """Geometry of one mask (uint8/bool [h, w], nonzero inside).

    ``roi`` (x0, y0, x1, y1 in mask pixels, exclusive ends) is a promise that no set pixel lies
    outside it; the node derives it from the low-resolution logits so that a small structure in a
    large frame is never scanned whole. ``source_hw`` is the source frame's size (mask size x d
    when not given). ``dense`` keeps every boundary pixel of each instance in ``parts`` (the tool
    fit needs them); otherwise contours are traced as straight runs, which is cheaper.
    """
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        return Outline(empty_geometry(f"mask is not a non-empty 2-D array (shape {m.shape})"))
    if m.dtype != np.uint8:
        m = m.view(np.uint8) if m.dtype == np.bool_ else (m != 0).view(np.uint8)
    d = int(downsample)
    H, W = m.shape
    src_hw = source_hw or (H * d, W * d)
    # One pass over the pixels: the trace. Everything else is computed from the contours.
    ox = oy = 0
    search = m
    if roi is not None:
        ox, oy = max(0, int(roi[0])), max(0, int(roi[1]))
        search = m[oy : max(oy, min(H, int(roi[3]))), ox : max(ox, min(W, int(roi[2])))]
    if search.size == 0:
        return Outline(empty_geometry("empty mask"))
    method = cv2.CHAIN_APPROX_NONE if dense else cv2.CHAIN_APPROX_SIMPLE
    contours, hier = cv2.findContours(search, cv2.RETR_CCOMP, method, offset=(ox, oy))
    if not contours:
        return Outline(empty_geometry("empty mask"))
    h = hier[0].tolist()
    d2 = d * d
    outers = [k for k, e in enumerate(h) if e[3] == -1]
    if len(outers) == 1:  # one part: the pixels inside its bounding box are all its own
        bx, by, bw, bh = cv2.boundingRect(contours[outers[0]])
        count = cv2.countNonZero(m[by : by + bh, bx : bx + bw])
        areas = None
    else:  # Pick's theorem per contour; a hole's contour runs through the part's own pixels, so
        # only its A - B/2 + 1 inner pixels are removed
        areas = _pixel_areas(contours, dense)
    found = []  # (pixel area in mask pixels, outer index, hole indices)
    for k in outers:
        holes = []
        child = h[k][2]
        while child != -1:
            holes.append(child)
            child = h[child][0]
        found.append(
            (float(count) if areas is None else areas[k][0] - sum(areas[j][1] for j in holes), k, holes)
        )
    if areas is not None:
        count = round(sum(f[0] for f in found))
        span = np.concatenate([contours[k] for k in outers]).reshape(-1, 2)
        bx, by = (int(v) for v in span.min(axis=0))
        bw, bh = (int(v) + 1 for v in span.max(axis=0) - (bx, by))
    found.sort(key=lambda f: -f[0])
    min_px = settings.min_instance_px / d2
    kept = [f for f in found if f[0] >= min_px][: settings.max_instances]
    # Downsampled masks: never finer than one mask pixel (d source pixels).
    eps = (settings.tolerance_px if d == 1 else max(settings.tolerance_px, d)) / d
    mm2 = spacing.row_mm * spacing.col_mm if spacing is not None else None

    g = PromptGeometry(
        area_px=count * d2,
        bbox=_bbox_source(bx, by, bw, bh, d, src_hw),
        specks=len(found) - len(kept),
    )
    if mm2 is not None:
        g.area_mm2 = g.area_px * mm2
    else:
        g.absent["area_mm2"] = "no pixel spacing"
    out = Outline(g)
    weight = sx = sy = 0.0
    for idx, (px, k, holes) in enumerate(kept):
        outer = contours[k]
        g.contours.append([_ring(outer, d, eps), *(_ring(contours[j], d, eps) for j in holes)])
        x, y, w, hh = cv2.boundingRect(outer)
        m00, m10, m01, m20, m11, m02 = _moments(outer)
        for j in holes:
            hm = _moments(contours[j])
            m00, m10, m01 = m00 - hm[0], m10 - hm[1], m01 - hm[2]
            m20, m11, m02 = m20 - hm[3], m11 - hm[4], m02 - hm[5]
        pts = outer.reshape(-1, 2)
        if m00 > 0.5:
            cx, cy = m10 / m00, m01 / m00
        else:  # a one-pixel-wide part: the polygon has no area, its boundary pixels are the part
            cx, cy = (float(v) for v in pts.mean(axis=0))
        scx, scy = (cx, cy) if d == 1 else (cx * d + (d - 1) / 2.0, cy * d + (d - 1) / 2.0)
        weight, sx, sy = weight + px, sx + px * scx, sy + px * scy
        area_px = max(1, round(px * d2))
        inst = Instance(
            id=0,
            contour=idx,
            area_px=area_px,
            bbox=_bbox_source(x, y, w, hh, d, src_hw),
            centroid=(scx, scy),
            border=x == 0 or y == 0 or x + w == W or y + hh == H,
        )
        if mm2 is not None:
            inst.area_mm2 = area_px * mm2
        g.instances.append(inst)
        if dense:
            if m00 > 0.5:
                cov = np.array(
                    [[m20 / m00 - cx * cx, m11 / m00 - cx * cy], [m11 / m00 - cx * cy, m02 / m00 - cy * cy]]
                )
            else:
                cov = np.cov(pts.T.astype(np.float64)) if len(pts) > 1 else np.zeros((2, 2))
            part = Part(pts.astype(np.float64), np.array([cx, cy]), cov, px, (H, W))
            out.parts.append(part)
    if kept:
        g.centroid = (sx / weight, sy / weight)
    else:
        g.absent["instances"] = f"every part is smaller than {settings.min_instance_px} px"
        pts = np.concatenate([contours[k] for k in outers]).reshape(-1, 2)
        g.centroid = tuple(float(v) for v in to_source(pts.mean(axis=0), d))  # specks: their pixels
    return out


def finite_or_none(v: float | None) -> float | None:
    """NaN or infinite geometry is never published: the field is left absent instead."""
    return v if v is not None and math.isfinite(v) else None
