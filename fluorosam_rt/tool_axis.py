"""Centre line, tip and axis of a linear tool's mask (K-wire, guidewire, catheter, drill bit, screw).

Why not a skeleton: thinning (OpenCV has it only in contrib) erodes the ends by half the tool's
width, branches on every bump of the outline, and costs an iteration per pixel of width. A tool
in a fluoroscopy frame is a tube that runs along one direction, so its centre line is found
directly, in one vectorised pass over the traced outline:

1. the principal direction u of the filled outline (its second moments);
2. the outline's boundary pixels are binned by their position t along u; in each slice the
   centre is the midpoint of the two edges and the width their distance, so the centre line is
   the medial axis sampled every ~2 px, and the widths tell a line from a blob (length/width)
   and from a shape that folds back (slices much wider than the tube);
3. the axis is a robust (Huber) line fit to the centre points: over the whole line for a rigid
   tool, over the last six widths before the tip for a flexible one (a guidewire's tip
   direction is local);
4. each end is the outline's extreme point along that line, so the tip is where the mask ends,
   not where a thinned skeleton stops. (Along a cut end many boundary pixels sit side by side, and
   the most advanced centre lies within a few tenths of a pixel of the edge: measured unbiased on
   antialiased synthetic wires, so no half-pixel is added.)

Which end is the tip is decided by the caller with the instance's track (tracking.py): an end cut
by the image border is never the tip; a track keeps the tip it had; otherwise the narrower end
(a trocar or drill point tapers); otherwise the end nearer the image centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from bridge.prompt_geometry import Instance, Spacing

from .outlines import Part, to_source

TAPER_RATIO = 0.8  # an end this much narrower than the other is the tip
# A flexible tool's axis is the direction at its tip: fitted over the last FLEX_WIDTHS widths of
# its centre line (at least FLEX_MIN_PX source pixels); a rigid tool's over the whole line.
FLEX_WIDTHS = 6.0
FLEX_MIN_PX = 48.0
MAX_EDGES = 3.0  # boundary runs crossing a slice: 2 for a tube, 4 where it folds back (a U)


@dataclass
class End:
    point: np.ndarray  # [2] source pixels
    direction: np.ndarray  # [2] unit, pointing out of the tool through this end
    at_border: bool
    width: float  # mean width near this end, source pixels


@dataclass
class ToolFit:
    centre: np.ndarray  # [n, 2] source pixels, from end 0 to end 1 (ends included)
    ends: tuple[End, End]
    length_px: float
    width_px: float
    flexible: bool = False
    mask_pixel: int = 1  # the downsampling factor: one mask pixel in source pixels


def _fit_direction(pts: np.ndarray, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(point, unit direction) of a Huber line fit, oriented like ``fallback``."""
    if len(pts) < 2:
        return (pts[0] if len(pts) else np.zeros(2)), fallback
    vx, vy, x0, y0 = cv2.fitLine(pts.astype(np.float32), cv2.DIST_HUBER, 0, 0.01, 0.01).ravel()
    direction = np.array([vx, vy], dtype=np.float64)
    n = np.linalg.norm(direction)
    if not np.isfinite(n) or n < 1e-9:
        return pts.mean(axis=0), fallback
    direction /= n
    if direction @ fallback < 0:
        direction = -direction
    return np.array([x0, y0], dtype=np.float64), direction


def fit_tool(part: Part, downsample: int, flexible: bool, min_elongation: float = 3.0) -> ToolFit | str:
    """The centre line and both ends of one instance, or the reason there is none."""
    d = downsample
    P = part.points
    if len(P) < 3 or part.area * d * d < 6:
        return "too small to have an axis"
    evals, evecs = np.linalg.eigh(part.cov)
    if not np.all(np.isfinite(evals)) or evals[1] <= 0:
        return "too small to have an axis"
    u = evecs[:, 1]
    v = np.array([-u[1], u[0]])
    rel = P - part.center
    t, s = rel @ u, rel @ v
    b = 2.0  # slice width, mask pixels
    tmin = float(t.min())
    idx = ((t - tmin) / b).astype(np.int64)
    order = np.argsort(idx, kind="stable")
    idx_s = idx[order]
    starts = np.flatnonzero(np.r_[True, idx_s[1:] != idx_s[:-1]])
    counts = np.diff(np.r_[starts, len(idx_s)])
    smin = np.minimum.reduceat(s[order], starts)
    smax = np.maximum.reduceat(s[order], starts)
    tc = np.add.reduceat(t[order], starts) / counts
    width = smax - smin + 1.0
    mid = (smin + smax) / 2.0
    nb = len(starts)
    inner = slice(1, nb - 1) if nb > 4 else slice(0, nb)
    w_med = float(np.median(width[inner]))
    span = float(t.max()) - tmin + 1.0
    if span / w_med < min_elongation:
        return f"a blob, not a line (length/width {span / w_med:.1f} < {min_elongation:g})"
    # A traced edge along u has max(|ux|, |uy|) boundary pixels per unit of t.
    edges = counts[inner] / (b * max(abs(u[0]), abs(u[1])))
    if float(np.median(edges)) > MAX_EDGES or np.count_nonzero(width[inner] > 2.5 * w_med + 2.0) > 0.15 * nb:
        return "does not follow one line (it folds back, branches or crosses another part)"
    centre = part.center + np.outer(tc, u) + np.outer(mid, v)  # mask pixels, ordered along u
    core = centre[inner] if nb > 4 else centre
    H, W = part.mask_hw
    on_border = (P[:, 0] <= 0) | (P[:, 1] <= 0) | (P[:, 0] >= W - 1) | (P[:, 1] >= H - 1)
    k = len(core)
    if flexible:
        k = min(k, max(3, math.ceil(max(FLEX_WIDTHS * w_med, FLEX_MIN_PX / d) / b)))
    n_end = max(2, math.ceil(w_med / b))  # slices that tell a tapered end: about one width
    ends = []
    for sign, seg in ((-1.0, core[:k]), (1.0, core[-k:])):
        p0, direction = _fit_direction(seg, sign * u)
        proj = (P - p0) @ direction
        reach = float(proj.max())
        near = proj >= reach - 1.5
        point = p0 + reach * direction
        w_end = width[1 : 1 + n_end] if sign < 0 else width[max(1, nb - 1 - n_end) : nb - 1]
        ends.append(
            End(
                point=to_source(point, d),
                direction=direction,
                at_border=bool(on_border[near].any()),
                width=float(np.mean(w_end)) * d if len(w_end) else w_med * d,
            )
        )
    line = np.vstack([ends[0].point, to_source(core, d), ends[1].point])
    # A rigid tool is straight: its length is the distance between its ends. A flexible one's is
    # measured along its centre line simplified to one mask pixel, because the slice midpoints
    # wobble by a fraction of a pixel and summing that wobble would lengthen the line.
    if flexible:
        length = float(np.sum(np.hypot(*np.diff(simplify(line, float(d)), axis=0).T)))
    else:
        length = float(np.linalg.norm(ends[1].point - ends[0].point))
    return ToolFit(
        centre=line,
        ends=(ends[0], ends[1]),
        length_px=length,
        width_px=w_med * d,
        flexible=flexible,
        mask_pixel=d,
    )


def simplify(line: np.ndarray, tolerance_px: float) -> np.ndarray:
    """Douglas-Peucker on an open polyline, end points kept (float64 in, float64 out)."""
    if tolerance_px <= 0 or len(line) < 3:
        return line
    out = cv2.approxPolyDP(line.astype(np.float32).reshape(-1, 1, 2), tolerance_px, False).reshape(-1, 2)
    out = out.astype(np.float64)
    out[0], out[-1] = line[0], line[-1]  # exact ends (float32 would round the tip)
    return out


def choose_tip(
    fit: ToolFit, previous_tip: tuple[float, float] | None, image_centre: tuple[float, float]
) -> tuple[int | None, str, str]:
    """(index of the tip end or None, rule that chose it, reason when there is no tip)."""
    a, b = fit.ends
    if a.at_border and b.at_border:
        return None, "", "both ends leave the image"
    if a.at_border or b.at_border:
        return (1 if a.at_border else 0), "border", ""
    if previous_tip is not None:
        prev = np.asarray(previous_tip)
        return int(np.linalg.norm(b.point - prev) < np.linalg.norm(a.point - prev)), "track", ""
    if min(a.width, b.width) < TAPER_RATIO * max(a.width, b.width):
        return int(b.width < a.width), "taper", ""
    c = np.asarray(image_centre)
    return int(np.linalg.norm(b.point - c) < np.linalg.norm(a.point - c)), "centre", ""


def polyline_length_mm(line: np.ndarray, spacing: Spacing) -> float:
    dx, dy = np.diff(line, axis=0).T
    return float(np.sum(np.hypot(dx * spacing.col_mm, dy * spacing.row_mm)))


def apply_tool(
    inst: Instance,
    fit: ToolFit,
    tip_end: int | None,
    tip_by: str,
    no_tip_reason: str,
    spacing: Spacing | None,
    tolerance_px: float,
) -> None:
    """Write a fitted tool onto its published instance: tip first, axis towards the tip."""
    if tip_end is None:  # no tip: the line keeps its order, the axis points from its start to its end
        line, direction = fit.centre, fit.ends[1].direction
    else:  # tip first, the axis pointing out through the tip
        line = fit.centre if tip_end == 0 else fit.centre[::-1]
        direction = fit.ends[tip_end].direction
    d = fit.mask_pixel
    inst.polyline = simplify(line, max(tolerance_px, d))
    inst.axis = (float(direction[0]), float(direction[1]))
    inst.length_px = fit.length_px
    inst.width_px = fit.width_px
    inst.ends_at_border = int(fit.ends[0].at_border) + int(fit.ends[1].at_border)
    if tip_end is None:
        inst.absent["tip"] = no_tip_reason
    else:
        p = fit.ends[tip_end].point
        inst.tip = (float(p[0]), float(p[1]))
        inst.tip_by = tip_by
    if spacing is not None:
        inst.length_mm = polyline_length_mm(
            simplify(line, float(d)) if fit.flexible else line[[0, -1]], spacing
        )
    else:
        inst.absent["length_mm"] = "no pixel spacing"
