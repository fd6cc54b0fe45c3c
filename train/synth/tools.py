"""Procedural surgical tools as analytic solids, placed relative to anatomy and ray-traced exactly.

Tools are unions of capped cylinders, hollow tubes and boxes (minus hole cylinders), so each ray's path length
through a tool is closed-form: no voxelisation, sub-millimetre wires stay sharp at any image size, and the
tool adds to its material's line integral in the same projector pass as the anatomy.

Placement (``tool_sampling.sample_tools``): without a region tools go anywhere on the anatomy (``TOOL_MAKERS``
here). With a region, each tool goes where a surgeon puts it for that region, from the body's own landmarks
(``tool_sites``): cannulated screws and K-wires in the femoral neck, sacroiliac screws, pedicle screws in
bilateral pairs, plates on the distal radius, clavicle, proximal humerus and tibia, drill bits on those
trajectories, guidewires and catheters along the body's vessels (or the path a femoral access takes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from train.synth.volume import PreparedVolume

EPS = 1e-9


def _cyl_len(src: torch.Tensor, d: torch.Tensor, p0: np.ndarray, p1: np.ndarray, r: float) -> torch.Tensor:
    """Length (mm) of each ray src + t·d (t ≥ 0, |d| = 1) inside the capped cylinder p0-p1 of radius r."""
    p0t = torch.as_tensor(p0, dtype=d.dtype, device=d.device)
    ax = torch.as_tensor(p1 - p0, dtype=d.dtype, device=d.device)
    length = float(torch.linalg.norm(ax))
    a = ax / max(length, EPS)
    w = src - p0t
    wa = w @ a
    da = d @ a
    wp = w - wa * a
    dp = d - da[:, None] * a
    qa = (dp * dp).sum(-1)
    qb = dp @ wp
    qc = float(wp @ wp) - r * r
    disc = qb * qb - qa * qc
    sq = torch.sqrt(disc.clamp_min(0.0))
    qa_safe = qa.clamp_min(EPS)
    t0 = torch.where(qa > EPS, (-qb - sq) / qa_safe, torch.full_like(qa, -1e9 if qc < 0 else 1e9))
    t1 = torch.where(qa > EPS, (-qb + sq) / qa_safe, torch.full_like(qa, 1e9 if qc < 0 else -1e9))
    ok = (disc >= 0) | (qa <= EPS)
    da_safe = torch.where(da.abs() > EPS, da, torch.full_like(da, EPS))
    u0 = (0.0 - wa) / da_safe
    u1 = (length - wa) / da_safe
    lo = torch.maximum(torch.minimum(u0, u1), t0).clamp_min(0.0)
    hi = torch.minimum(torch.maximum(u0, u1), t1)
    out = (hi - lo).clamp_min(0.0)
    return torch.where(ok, out, torch.zeros_like(out))


def _box_len(src: torch.Tensor, d: torch.Tensor, center: np.ndarray, axes: np.ndarray, half: np.ndarray):
    """Length of each ray inside an oriented box (axes: rows are the box's unit axes)."""
    r = torch.as_tensor(axes, dtype=d.dtype, device=d.device)
    o = (src - torch.as_tensor(center, dtype=d.dtype, device=d.device)) @ r.T
    dl = d @ r.T
    h = torch.as_tensor(half, dtype=d.dtype, device=d.device)
    inv = 1.0 / torch.where(dl.abs() > EPS, dl, torch.full_like(dl, EPS))
    ta, tb = (-h - o) * inv, (h - o) * inv
    t0 = torch.minimum(ta, tb).amax(-1).clamp_min(0.0)
    t1 = torch.maximum(ta, tb).amin(-1)
    return (t1 - t0).clamp_min(0.0)


def _part_sphere(kind: str, p: dict[str, Any]) -> tuple[np.ndarray, float]:
    """A sphere (centre, radius) holding one solid, with a millimetre to spare for rounding."""
    if kind == "cyl":
        return 0.5 * (p["p0"] + p["p1"]), 0.5 * float(np.linalg.norm(p["p1"] - p["p0"])) + p["r"] + 1.0
    return p["center"], float(np.linalg.norm(p["half"])) + 1.0


@dataclass
class Tool:
    """A tool instance: solids (kind, params, sign) whose signed path lengths add up to the tool's."""

    name: str
    category_id: int
    material: str
    parts: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)
    site: str = ""  # where it was placed (e.g. "femoral_neck"); "" for region-free placement
    target: str = ""  # the structure its tip is in (vocabulary name)
    tip: np.ndarray | None = None  # the point meant to lie in ``target`` (world mm)

    def segments(self) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """(p0, p1, radius) of the positive cylinders: the centre lines the projector rasterises so thin
        parts (wires) keep a continuous mask of at least one pixel at any image size."""
        return [(p["p0"], p["p1"], float(p["r"])) for k, p, sgn in self.parts if k == "cyl" and sgn > 0]

    def add_cylinder(self, p0, p1, radius: float, sign: float = 1.0) -> None:
        self.parts.append(
            ("cyl", {"p0": np.asarray(p0, float), "p1": np.asarray(p1, float), "r": radius}, sign)
        )

    def add_box(self, center, axes, half, sign: float = 1.0) -> None:
        self.parts.append(
            (
                "box",
                {
                    "center": np.asarray(center, float),
                    "axes": np.asarray(axes, float),
                    "half": np.asarray(half),
                },
                sign,
            )
        )

    def bounds(self) -> tuple[np.ndarray, float]:
        """Bounding sphere (centre, radius), used to skip rays that cannot touch the tool."""
        pts, pad = [], 0.0
        for kind, p, _ in self.parts:
            if kind == "cyl":
                pts += [p["p0"], p["p1"]]
                pad = max(pad, p["r"])
            else:
                pts += [p["center"] + s * (p["axes"].T @ (p["half"] * np.array(c))) for s in (1,) for c in
                        [(a, b, e) for a in (-1, 1) for b in (-1, 1) for e in (-1, 1)]]  # fmt: skip
        pts_a = np.array(pts)
        c = pts_a.mean(0)
        return c, float(np.linalg.norm(pts_a - c, axis=1).max() + pad + 1.0)

    def path_length(self, src: torch.Tensor, dirs: torch.Tensor, min_radius: float = 0.0) -> torch.Tensor:
        """Path length (mm) per ray.

        Cylinders thinner than ``min_radius`` (about half a pixel's footprint) are traced at ``min_radius``
        with lengths scaled by (r / min_radius)², which keeps their integrated attenuation but stops
        sub-pixel wires from breaking into dashes between pixel-centre rays."""
        c, rad = self.bounds()
        rad += min_radius
        ct = torch.as_tensor(c, dtype=dirs.dtype, device=dirs.device)
        w = ct - src
        along = dirs @ w
        dist2 = (w @ w) - along * along
        near = torch.nonzero(dist2 <= rad * rad).squeeze(1)
        out = torch.zeros(dirs.shape[0], dtype=dirs.dtype, device=dirs.device)
        if near.numel() == 0:
            return out
        d = dirs[near]
        acc = torch.zeros(d.shape[0], dtype=dirs.dtype, device=dirs.device)
        for kind, p, sign in self.parts:
            # Each part is traced only on the rays that pass its own bounding sphere: a tool has tens of
            # small parts (threads, holes), each crossing a few per cent of the tool's rays.
            pc, prad = _part_sphere(kind, p)
            if kind == "cyl":
                r = p["r"]
                prad += max(0.0, min_radius - r)
            w_p = torch.as_tensor(pc, dtype=d.dtype, device=d.device) - src
            along_p = d @ w_p
            idx = torch.nonzero((w_p @ w_p) - along_p * along_p <= prad * prad).squeeze(1)
            if idx.numel() == 0:
                continue
            dp = d[idx]
            if kind == "cyl":
                if r < min_radius:
                    seg = _cyl_len(src, dp, p["p0"], p["p1"], min_radius) * (r / min_radius) ** 2
                else:
                    seg = _cyl_len(src, dp, p["p0"], p["p1"], r)
            else:
                seg = _box_len(src, dp, **p)
            acc.index_add_(0, idx, seg, alpha=sign)
        out[near] = acc.clamp_min(0.0)
        return out

    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.site:
            extra["site"] = self.site
        if self.target:
            extra["target"] = self.target
        if self.tip is not None:
            extra["tip"] = [float(x) for x in self.tip]
        return {
            "name": self.name,
            "category_id": self.category_id,
            "material": self.material,
            **extra,
            "parts": [
                {
                    "kind": k,
                    "sign": s,
                    **{n: (v.tolist() if isinstance(v, np.ndarray) else v) for n, v in p.items()},
                }
                for k, p, s in self.parts
            ],
        }


# ----------------------------------------------------------------------------------------- placement
# helpers
BONE_IDS = [*range(25, 51), *range(69, 79), 91, *range(92, 117)]
LONG_BONE_IDS = [69, 70, 73, 74, 75, 76, 116, *range(92, 116)]
VERTEBRA_IDS = list(range(27, 44))  # L5 .. T1: pedicle screws
VESSEL_IDS = [52, 62, 63, 59, 60, 55, 56, 57, 58, 65, 66, 67, 68]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), EPS)


def _random_perp(rng: np.random.Generator, a: np.ndarray) -> np.ndarray:
    v = rng.normal(size=3)
    return _unit(v - (v @ a) * a)


def _pca(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = points.mean(0)
    evals, evecs = np.linalg.eigh(np.cov((points - c).T))
    return c, evals[::-1], evecs[:, ::-1].T


def make_kwire(rng: np.random.Generator, vol: PreparedVolume) -> Tool | None:
    """A 1.5–2.5 mm steel K-wire with its tip in a bone, sometimes with a bent outer end."""
    ids = [i for i in BONE_IDS if i in vol.points]
    if not ids:
        return None
    pts = vol.points[int(rng.choice(ids))]
    tip = pts[rng.integers(len(pts))].astype(float)
    d = _unit(rng.normal(size=3))
    length = rng.uniform(90.0, 200.0)
    r = rng.uniform(0.75, 1.25)
    t = Tool("k_wire", 301, "stainless_steel")
    end = tip - d * length
    t.add_cylinder(tip, end, r)
    if rng.random() < 0.3:
        bent = _unit(-d * np.cos(np.deg2rad(rng.uniform(30, 90))) + _random_perp(rng, d))
        t.add_cylinder(end, end + bent * rng.uniform(15.0, 40.0), r)
    return t


def _screw(
    tool: Tool,
    tip: np.ndarray,
    head_end: np.ndarray,
    r: float,
    head_r: float,
    head_h: float,
    thread_len: float | None = None,
    cannula_r: float = 0.0,
) -> None:
    """A screw from ``tip`` to ``head_end``: core, thread crests over ``thread_len`` from the tip (all of it
    when None), a head of ``head_r`` x ``head_h`` (none when ``head_h`` is 0) and an optional cannulation."""
    axis = _unit(head_end - tip)
    length = float(np.linalg.norm(head_end - tip))
    threaded = length if thread_len is None else float(np.clip(thread_len, 2.5, length))
    n = int(np.clip(threaded / 2.5, 4, 24)) if thread_len is None else max(2, round(threaded / 2.5))
    core = 0.72 * r
    tool.add_cylinder(tip, head_end, core)
    for i in range(n):  # thread crests: short full-radius rings, one per pitch
        a = tip + axis * (threaded * (i + 0.25) / n)
        tool.add_cylinder(a, a + axis * (0.5 * threaded / n), r)
        tool.add_cylinder(a, a + axis * (0.5 * threaded / n), core, sign=-1.0)
    if head_h > 0:
        tool.add_cylinder(head_end, head_end + axis * head_h, head_r)
    if cannula_r > 0:
        tool.add_cylinder(tip, head_end + axis * head_h, cannula_r, sign=-1.0)


def make_bone_screw(rng: np.random.Generator, vol: PreparedVolume) -> Tool | None:
    """A 4–7 mm screw across a bone (perpendicular to its long axis), with a head."""
    ids = [i for i in BONE_IDS if i in vol.points and len(vol.points[i]) > 200]
    if not ids:
        return None
    pts = vol.points[int(rng.choice(ids))].astype(float)
    _, _, ev = _pca(pts)
    centre = pts[rng.integers(len(pts))]
    axis = _random_perp(rng, ev[0])
    length = rng.uniform(20.0, 50.0)
    r = rng.uniform(2.0, 3.5)
    t = Tool("bone_screw", 302, "titanium" if rng.random() < 0.6 else "stainless_steel")
    _screw(t, centre - axis * length / 2, centre + axis * length / 2, r, 1.8 * r, rng.uniform(2.5, 4.0))
    return t


def make_pedicle_screws(rng: np.random.Generator, vol: PreparedVolume) -> list[Tool]:
    """Pedicle screws through a thoracic/lumbar vertebra: posterior-lateral entry, converging anteriorly."""
    ids = [i for i in VERTEBRA_IDS if i in vol.points and len(vol.points[i]) > 500]
    if not ids:
        return []
    pts = vol.points[int(rng.choice(ids))].astype(float)
    c = pts.mean(0)
    body = c + np.array([0.0, rng.uniform(8.0, 14.0), 0.0])  # RAS: +y anterior
    sides = [-1.0, 1.0] if rng.random() < 0.7 else [float(rng.choice([-1.0, 1.0]))]
    r = rng.uniform(2.25, 3.5)
    out = []
    for s in sides:
        entry = c + np.array([s * rng.uniform(14.0, 22.0), -rng.uniform(18.0, 26.0), rng.normal(0, 2.0)])
        tip = body + np.array([s * rng.uniform(0.0, 5.0), rng.uniform(0.0, 6.0), 0.0])
        t = Tool("pedicle_screw", 303, "titanium")
        _screw(t, tip, entry, r, r * 2.2, 0.0)
        axis = _unit(entry - tip)
        # Tulip head: a hollow cylinder sitting on the entry point.
        t.add_cylinder(entry, entry + axis * 12.0, r * 2.2)
        t.add_cylinder(entry + axis * 3.0, entry + axis * 12.0, r * 1.4, sign=-1.0)
        out.append(t)
    return out


def make_plate(rng: np.random.Generator, vol: PreparedVolume) -> list[Tool]:
    """A bone plate with holes on a long bone's surface, with screws in some holes."""
    ids = [i for i in LONG_BONE_IDS if i in vol.points and len(vol.points[i]) > 300]
    if not ids:
        return []
    pts = vol.points[int(rng.choice(ids))].astype(float)
    c, ev_, ev = _pca(pts)
    a = ev[0]
    radius = 1.5 * np.sqrt(max(ev_[1], 1.0))
    n = _random_perp(rng, a)
    b = np.cross(n, a)
    bone_len = 3.0 * np.sqrt(ev_[0])
    length = float(np.clip(rng.uniform(50.0, 120.0), 30.0, max(30.0, bone_len)))
    width, thick = rng.uniform(9.0, 14.0), rng.uniform(2.5, 4.0)
    centre = c + a * rng.normal(0, 0.1 * bone_len) + n * (radius + thick / 2)
    plate = Tool("plate", 304, "titanium" if rng.random() < 0.7 else "stainless_steel")
    plate.add_box(centre, np.stack([a, b, n]), np.array([length / 2, width / 2, thick / 2]))
    pitch = rng.uniform(10.0, 14.0)
    n_holes = max(2, int(length // pitch))
    hole_r = rng.uniform(2.0, 2.6)
    tools = [plate]
    for i in range(n_holes):
        x = (i - (n_holes - 1) / 2) * pitch
        hc = centre + a * x
        plate.add_cylinder(hc - n * thick / 2, hc + n * thick / 2, hole_r, sign=-1.0)
        if rng.random() < 0.5:
            s = Tool("bone_screw", 302, plate.material)
            top = hc + n * thick / 2
            _screw(s, top - n * rng.uniform(14.0, 30.0), top - n * 1.0, hole_r * 0.8, hole_r * 1.3, 1.5)
            tools.append(s)
    return tools


def vessel_centerline(points: np.ndarray, bin_mm: float = 6.0, reach_mm: float = 15.0) -> np.ndarray:
    """A rough centre line: bin voxels along the principal axis, following the cluster nearest the last."""
    c, _, ev = _pca(points)
    u = (points - c) @ ev[0]
    order = np.argsort(u)
    edges = np.arange(u.min(), u.max() + bin_mm, bin_mm)
    line: list[np.ndarray] = []
    for lo in edges:
        sel = points[order][(u[order] >= lo) & (u[order] < lo + bin_mm)]
        if len(sel) == 0:
            continue
        if line:
            near = sel[np.linalg.norm(sel - line[-1], axis=1) < reach_mm]
            if len(near) == 0:
                break
            sel = near
        else:
            # start in the densest cluster of the first bin
            sel = sel[np.linalg.norm(sel - np.median(sel, 0), axis=1) < reach_mm]
        line.append(sel.mean(0))
    return np.array(line)


def _polyline_tool(tool: Tool, pts: np.ndarray, r: float, r_inner: float = 0.0) -> None:
    for p, q in itertools.pairwise(pts):
        tool.add_cylinder(p, q, r)
        if r_inner > 0:
            tool.add_cylinder(p, q, r_inner, sign=-1.0)


def _resample(line: np.ndarray, step: float) -> np.ndarray:
    seg = np.linalg.norm(np.diff(line, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] < step:
        return line
    q = np.arange(0.0, s[-1], step)
    return np.stack([np.interp(q, s, line[:, k]) for k in range(3)], 1)


def make_endovascular(rng: np.random.Generator, vol: PreparedVolume) -> list[Tool]:
    """A guidewire and/or catheter following a vessel's centre line, with a little wander."""
    ids = [i for i in VESSEL_IDS if i in vol.points and len(vol.points[i]) > 300]
    if not ids:
        return []
    line = vessel_centerline(vol.points[int(rng.choice(ids))].astype(float))
    if len(line) < 3:
        return []
    if rng.random() < 0.5:
        line = line[::-1]
    line = _resample(line, 4.0)
    line = line + rng.normal(0, 0.6, size=line.shape).cumsum(0) * 0.3
    n = len(line)
    keep = max(3, int(n * rng.uniform(0.5, 1.0)))
    out: list[Tool] = []
    kind = rng.random()
    if kind < 0.7:
        g = Tool("guidewire", 305, "nitinol")
        _polyline_tool(g, line[:keep], rng.uniform(0.18, 0.45))
        out.append(g)
    if kind > 0.4:
        cat_end = max(2, int(keep * rng.uniform(0.4, 0.9)))
        c = Tool("catheter", 306, "polymer")
        ro = rng.uniform(0.65, 1.35)
        _polyline_tool(c, line[: cat_end + 1], ro, 0.6 * ro)
        out.append(c)
    return out


TOOL_MAKERS = {
    "k_wire": lambda rng, vol: [t for t in [make_kwire(rng, vol)] if t],
    "bone_screw": lambda rng, vol: [t for t in [make_bone_screw(rng, vol)] if t],
    "pedicle_screw": make_pedicle_screws,
    "plate": make_plate,
    "endovascular": make_endovascular,
}
