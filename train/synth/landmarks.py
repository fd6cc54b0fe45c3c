"""Anatomical landmarks of a prepared body, from its labels' sample points: joints, bone axes, limb frames.

Views must be aimed at a hip joint, not at the centroid of a whole femur, and tools must go into a femoral
neck or a pedicle, so both need more than label centroids. Everything here is derived from
``PreparedVolume.points`` (up to 4000 voxel centres per label, world mm, NIfTI RAS+: +x patient's right,
+y anterior, +z superior) through the vocabulary's names, so it works for any body whatever its pose: a limb
turned at its joint moves its axes and frames with it. Results are cached per volume because views and tools
ask for the same landmarks for every image.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import cached_property

import numpy as np

from train.synth.vocabulary import Vocabulary
from train.synth.volume import PreparedVolume

SUPERIOR = np.array([0.0, 0.0, 1.0])
ANTERIOR = np.array([0.0, 1.0, 0.0])
RIGHT = np.array([1.0, 0.0, 0.0])  # RAS+: +x is the patient's right

# Vertebrae from the top down (vocabulary names); neighbours give the spine's local direction.
SPINE_ORDER = (
    *(f"vertebrae_C{i}" for i in range(1, 8)),
    *(f"vertebrae_T{i}" for i in range(1, 13)),
    *(f"vertebrae_L{i}" for i in range(1, 6)),
    "vertebrae_S1",
)


def unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if n < 1e-9:
        raise ValueError("cannot normalise a zero vector")
    return np.asarray(v, dtype=np.float64) / n


def orthogonal(v: np.ndarray, to: np.ndarray) -> np.ndarray:
    """``v`` with its component along the unit vector ``to`` removed, normalised."""
    return unit(v - (v @ to) * to)


def side_sign(side: str) -> float:
    """+1 for the patient's right (RAS +x), -1 for the left."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    return 1.0 if side == "right" else -1.0


def pca(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, variances descending, unit axes as rows in the same order)."""
    c = points.mean(0)
    evals, evecs = np.linalg.eigh(np.cov((points - c).T))
    return c, evals[::-1], evecs[:, ::-1].T


def _nearest_dist(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Distance from each point of ``a`` to its nearest point of ``b`` (brute force, chunked)."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    bb = (b32 * b32).sum(1)
    out = np.empty(len(a32), dtype=np.float32)
    for i in range(0, len(a32), chunk):
        x = a32[i : i + chunk]
        d2 = (x * x).sum(1)[:, None] + bb[None] - 2.0 * x @ b32.T
        out[i : i + chunk] = np.sqrt(np.clip(d2.min(1), 0.0, None))
    return out


class Anatomy:
    """Landmarks of one prepared body, by vocabulary structure or group name."""

    def __init__(self, vol: PreparedVolume, vocab: Vocabulary):
        self.vol = vol
        self.vocab = vocab
        self._memo: dict[tuple, object] = {}

    # ------------------------------------------------------------------------------------------ basics
    def ids(self, *names: str) -> list[int]:
        """Label ids of these names' leaves that the body carries (unknown names raise)."""
        out: list[int] = []
        for n in names:
            out += [i for i in self.vocab.leaf_ids(n) if i in self.vol.points and len(self.vol.points[i])]
        return out

    def has(self, *names: str) -> bool:
        return bool(self.ids(*names))

    def points(self, *names: str) -> np.ndarray:
        """All sample points of these structures, (N, 3) float64 (N = 0 when none is present)."""
        ids = self.ids(*names)
        if not ids:
            return np.zeros((0, 3))
        return np.concatenate([self.vol.points[i] for i in ids]).astype(np.float64)

    def centroid(self, *names: str) -> np.ndarray | None:
        """Mean of the present structures' centroids (each structure counts once), or None."""
        ids = self.ids(*names)
        if not ids:
            return None
        return np.mean([np.asarray(self.vol.anchors[i], dtype=np.float64) for i in ids], axis=0)

    @cached_property
    def structure_names(self) -> set[str]:
        return {self.vocab.by_id[i].name for i in self.vol.points if i in self.vocab.by_id}

    @cached_property
    def midline_x(self) -> float:
        """The body's mid-sagittal x: from the spine, sacrum, sternum or skull, else from every label."""
        c = self.centroid("spine", "sacrum", "sternum", "skull")
        if c is not None:
            return float(c[0])
        return float(np.mean([a[0] for a in self.vol.anchors.values()]))

    # ------------------------------------------------------------------------------------------- bones
    def axis(self, name: str, toward: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """(centre, unit long axis, half length) of a bone; the axis points at ``toward`` when given.

        The axis is the points' first principal axis when the bone is elongated (variance 6x the next,
        about 2x longer than wide); a stub cut by the scan (the proximal humerus of a chest CT, a femoral
        head and neck) is not, and then the body's long axis stands in, along which a limb at rest runs.
        For an elongated bone the axis is refined on its middle half, so a femur's is its shaft's, not
        tilted toward the head.
        """
        key = ("axis", name)
        if key not in self._memo:
            pts = self.points(name)
            if len(pts) < 10:
                raise ValueError(f"body {self.vol.name!r} has no {name!r} to take an axis from")
            c, var, ev = pca(pts)
            elongated = bool(var[0] >= 6.0 * var[1])
            a = ev[0] if elongated else SUPERIOR.copy()
            if elongated:  # the shaft's own axis: the middle half, without head or condyles
                u = (pts - c) @ a
                mid = pts[np.abs(u - np.median(u)) < 0.25 * np.ptp(u)]
                if len(mid) >= 20:
                    _, mvar, mev = pca(mid)
                    if mvar[0] >= 8.0 * mvar[1]:  # a clean shaft (a cut stub's middle is not)
                        a = mev[0] if mev[0] @ a >= 0 else -mev[0]
            u = (pts - c) @ a
            lo, hi = np.quantile(u, [0.005, 0.995])
            self._memo[key] = (c + a * (lo + hi) / 2, a, float(hi - lo) / 2)
            self._memo[("stub", name)] = not elongated
        c, a, half = self._memo[key]  # type: ignore[misc]
        if toward is not None and (np.asarray(toward) - c) @ a < 0:
            a = -a
        return c, a, half

    def is_stub(self, name: str) -> bool:
        """Whether a bone is too short in this scan to take its axis from (see ``axis``)."""
        self.axis(name)
        return bool(self._memo[("stub", name)])

    def bone_end(self, name: str, toward: np.ndarray, frac: float = 0.15) -> np.ndarray:
        """Points of a long bone within ``frac`` of its length from the end nearer ``toward``."""
        c, a, half = self.axis(name, toward)
        pts = self.points(name)
        u = (pts - c) @ a
        return pts[u > half * (1.0 - 2.0 * frac)]

    def shaft_radius(self, name: str) -> float:
        """Radius of a long bone's middle third (from the spread of its points about the axis)."""
        key = ("shaft_r", name)
        if key not in self._memo:
            c, a, half = self.axis(name)
            pts = self.points(name)
            rel = pts - c
            u = rel @ a
            mid = rel[np.abs(u) < half / 3]
            if len(mid) < 10:
                mid = rel
            perp = np.linalg.norm(mid - np.outer(mid @ a, a), axis=1)
            self._memo[key] = float(np.clip(np.quantile(perp, 0.9), 2.0, 40.0))
        return self._memo[key]  # type: ignore[return-value]

    def joint(self, a: str, b: str, tol_mm: float = 8.0) -> np.ndarray | None:
        """Centre of the joint between bones ``a`` and ``b``: where their points come within ``tol_mm``.

        Mean of both bones' points that lie within ``tol_mm`` of the other (the articular surfaces); if
        they never come that close, the midpoint of a closest pair. None if either is missing.
        """
        key = ("joint", a, b, tol_mm)
        if key not in self._memo:
            pa, pb = self.points(a), self.points(b)
            if len(pa) == 0 or len(pb) == 0:
                self._memo[key] = None
            else:
                # Only points inside the other bone's box (grown by the tolerance) can be near it.
                ca = np.all((pa > pb.min(0) - tol_mm) & (pa < pb.max(0) + tol_mm), axis=1)
                cb = np.all((pb > pa.min(0) - tol_mm) & (pb < pa.max(0) + tol_mm), axis=1)
                near = np.zeros((0, 3))
                self._memo[("gap", a, b)] = np.inf
                if ca.any() and cb.any():
                    sa, sb = pa[ca], pb[cb]
                    da, db = _nearest_dist(sa, sb), _nearest_dist(sb, sa)
                    near = np.concatenate([sa[da <= tol_mm], sb[db <= tol_mm]])
                    self._memo[("gap", a, b)] = float(da.min())
                if len(near) >= 4:
                    self._memo[key] = near.mean(0)
                else:  # never that close: the midpoint of the two centroids' nearest points
                    ia = int(np.argmin(np.linalg.norm(pa - pb.mean(0), axis=1)))
                    ib = int(np.argmin(np.linalg.norm(pb - pa[ia], axis=1)))
                    self._memo[key] = (pa[ia] + pb[ib]) / 2
        out = self._memo[key]
        return None if out is None else np.asarray(out)

    def gap(self, a: str, b: str) -> float:
        """Closest distance (mm) between two bones' sample points (inf when they are far apart)."""
        self.joint(a, b)
        return float(self._memo.get(("gap", a, b), np.inf))  # type: ignore[arg-type]

    # ---------------------------------------------------------------------------------- hip and femur
    def femoral_head(self, side: str) -> tuple[np.ndarray, float] | None:
        """(centre, radius) of the femoral head: the ball of femur points around the hip joint."""
        key = ("fhead", side)
        if key not in self._memo:
            self._memo[key] = self._femoral_head(side)
        return self._memo[key]  # type: ignore[return-value]

    def _femoral_head(self, side: str) -> tuple[np.ndarray, float] | None:
        """The ball of femur points at the acetabulum; None without a hip bone to hold it (a femur cut
        above its neck, or a scan without the pelvis, has no head to find)."""
        femur, hip = f"femur_{side}", f"hip_{side}"
        if not (self.has(femur) and self.has(hip)):
            return None
        pts = self.points(femur)
        contact = self.joint(femur, hip)
        if contact is None or self.gap(femur, hip) > 8.0:
            return None
        centre, ball = contact, pts[:0]
        for _ in range(4):  # the ball of points within ~25 mm of its own centre
            ball = pts[np.linalg.norm(pts - centre, axis=1) < 25.0]
            if len(ball) < 10:
                return None
            centre = ball.mean(0)
        r = float(np.clip(np.quantile(np.linalg.norm(ball - centre, axis=1), 0.9), 15.0, 30.0))
        return centre, r

    def acetabulum(self, side: str) -> np.ndarray | None:
        """Centre of the hip socket: the femoral head where the scan has one, else the hip bone's lower,
        lateral part (the socket sits there, between ilium, ischium and pubis; the wing lifts the bone's
        centroid well above it)."""
        fh = self.femoral_head(side)
        if fh is not None:
            return fh[0]
        pts = self.points(f"hip_{side}")
        if len(pts) == 0:
            return None
        low = pts[pts @ SUPERIOR < np.median(pts @ SUPERIOR)]
        lat = np.abs(low[:, 0] - self.midline_x)
        return low[lat > np.median(lat)].mean(0)

    def femoral_neck(self, side: str) -> dict[str, np.ndarray | float] | None:
        """Femoral neck frame: head centre and radius, neck axis (toward the head), shaft axis (superior),
        lateral entry point on the shaft's lateral cortex, and the shaft radius.

        The neck axis is taken at a neck-shaft angle of 130° in the plane of the shaft axis and the head's
        offset from it, which carries the body's own anteversion.
        """
        key = ("fneck", side)
        if key in self._memo:
            return self._memo[key]  # type: ignore[return-value]
        out = None
        fh = self.femoral_head(side)
        if fh is not None:
            femur = f"femur_{side}"
            head, r_head = fh
            c, a, _ = self.axis(femur, head)
            foot = c + ((head - c) @ a) * a
            offset = head - foot
            if self.is_stub(femur) or np.linalg.norm(offset) < 30.0:
                # Too little shaft in the scan to measure: a typical offset of 42 mm, 12° anteverted.
                m = orthogonal(-side_sign(side) * RIGHT + ANTERIOR * np.tan(np.deg2rad(12.0)), a)
                offset = m * 42.0
            else:
                m = unit(offset)
            ang = np.deg2rad(130.0 - 90.0)
            n = unit(np.cos(ang) * m + np.sin(ang) * a)  # 40° above the perpendicular = 130° neck-shaft
            r_shaft = 14.0 if self.is_stub(femur) else self.shaft_radius(femur)
            t_lat = (float(np.linalg.norm(offset)) + r_shaft) / float(n @ m)
            out = {
                "head": head,
                "head_r": r_head,
                "neck": n,
                "shaft": a,
                "medial": m,
                "entry": head - n * t_lat,
                "shaft_r": r_shaft,
            }
        self._memo[key] = out
        return out

    # ------------------------------------------------------------------------------------------- spine
    def spine_direction(self, name: str) -> np.ndarray:
        """Unit superior direction of the spine at a vertebra, from its neighbours' centroids."""
        i = SPINE_ORDER.index(name)
        up = [n for n in SPINE_ORDER[max(0, i - 2) : i] if self.has(n)]
        down = [n for n in SPINE_ORDER[i + 1 : i + 3] if self.has(n)]
        if up or down:
            hi = self.centroid(*(up or [name]))
            lo = self.centroid(*(down or [name]))
            d = hi - lo  # type: ignore[operator]
            if np.linalg.norm(d) > 5.0:
                return unit(d)
        return SUPERIOR.copy()

    def vertebra(self, name: str) -> dict[str, np.ndarray | float] | None:
        """Vertebral frame: body centre, superior/anterior/left-right axes, body depth and width, and
        the body's posterior wall (found as the spinal canal: the gap in the midline points)."""
        key = ("vert", name)
        if key in self._memo:
            return self._memo[key]  # type: ignore[return-value]
        out = None
        pts = self.points(name)
        if len(pts) >= 50:
            c = pts.mean(0)
            s = self.spine_direction(name)
            a = orthogonal(ANTERIOR, s)
            r = np.cross(a, s)  # patient's right (x) for an upright RAS spine
            rel = pts - c
            ua, ur = rel @ a, rel @ r
            front = float(np.quantile(ua, 0.995))
            mid = np.sort(ua[np.abs(ur) < 4.0])
            wall = None
            if len(mid) > 10:
                gaps = np.diff(mid)
                k = int(np.argmax(gaps))
                if gaps[k] > 4.0 and mid[k + 1] > float(np.quantile(ua, 0.005)) + 3.0:
                    wall = float(mid[k + 1])  # front edge of the gap = the body's posterior wall
            if wall is None:
                wall = front - 0.45 * (front - float(np.quantile(ua, 0.005)))
            depth = max(front - wall, 6.0)
            body = rel[(ua >= wall) & (ua <= front)]
            width = float(np.ptp(np.quantile(body @ r, [0.03, 0.97]))) if len(body) > 10 else depth * 1.3
            centre = c + a * (wall + depth / 2) + r * float(np.median(body @ r) if len(body) else 0.0)
            out = {
                "centre": centre,
                "superior": s,
                "anterior": a,
                "right": r,
                "depth": depth,
                "width": max(width, 8.0),
                "wall": c + a * wall,
            }
        self._memo[key] = out
        return out

    # ------------------------------------------------------------------------------------------ limbs
    def _oriented_axis(self, name: str, toward: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, float]:
        """A bone's axis pointing at ``toward``, or superior when nothing is given."""
        if toward is None:
            toward = self.axis(name)[0] + SUPERIOR * 1e3
        return self.axis(name, toward)

    def knee_frame(self, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(joint centre, long axis toward the thigh, anterior) of a knee; anterior points at the patella."""
        key = ("knee", side)
        if key in self._memo:
            return self._memo[key]  # type: ignore[return-value]
        out = None
        tib, fem, pat = f"tibia_{side}", f"femur_{side}", f"patella_{side}"
        if self.has(tib) or self.has(fem):
            centre = self.joint(fem, tib)
            if self.has(tib):
                thigh = self.centroid(fem)
                c, long_axis, half = self._oriented_axis(
                    tib, thigh if thigh is not None else self.centroid(pat)
                )
                end = c + long_axis * half
            else:
                c, long_axis, half = self._oriented_axis(fem, self.centroid(f"hip_{side}"))
                end = c - long_axis * half
            if centre is None:
                centre = end
            ant = ANTERIOR
            if self.has(pat):
                d = self.centroid(pat) - centre  # type: ignore[operator]
                if np.linalg.norm(d - (d @ long_axis) * long_axis) > 5.0:
                    ant = d
            out = (np.asarray(centre), long_axis, orthogonal(ant, long_axis))
        self._memo[key] = out
        return out

    def hand_frame(self, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(hand centre, long axis toward the forearm, palm normal) of a hand.

        The long axis is the radius's (else the hand bones' first principal axis); the palm normal is the
        hand bones' thinnest principal axis, signed toward anterior (the palm's side in the anatomical
        position), so a PA hand view has its detector in front like a PA C-arm view.
        """
        key = ("hand", side)
        if key in self._memo:
            return self._memo[key]  # type: ignore[return-value]
        out = None
        hand = [
            n for n in (f"carpals_{side}", f"metacarpals_{side}", f"phalanges_hand_{side}") if self.has(n)
        ]
        if hand:
            pts = self.points(*hand)
            centre = pts.mean(0)
            _, var, ev = pca(pts)
            if self.has(f"radius_{side}"):
                c, long_axis, _ = self.axis(f"radius_{side}")
                if (c - centre) @ long_axis < 0:
                    long_axis = -long_axis
            else:
                fore = self.centroid(f"ulna_{side}", f"humerus_{side}")
                long_axis = ev[0]
                ref = (fore - centre) if fore is not None else SUPERIOR
                if ref @ long_axis < 0:
                    long_axis = -long_axis
            flat = len(hand) >= 2 and var[1] > 4.0 * max(var[2], 1e-6)
            normal = orthogonal(ev[2] if flat else ANTERIOR, long_axis)
            if normal @ ANTERIOR < 0:
                normal = -normal
            out = (centre, unit(long_axis), normal)
        self._memo[key] = out
        return out


_CACHE: OrderedDict[int, Anatomy] = OrderedDict()
_CACHE_SIZE = 2  # a worker renders one case at a time; the previous one may still be asked about


def anatomy_of(vol: PreparedVolume, vocab: Vocabulary) -> Anatomy:
    """The cached ``Anatomy`` of a volume (rebuilt when a different vocabulary object is passed).

    Bounded, most recent first: every varied case is a new volume, and an ``Anatomy`` holds its
    volume, so an unbounded cache (even one with weak references, which the Anatomy's own strong
    reference keeps alive) retained every case a worker ever drew: +100-150 MB per case.
    """
    hit = _CACHE.get(id(vol))
    if hit is not None and hit.vol is vol and hit.vocab is vocab:
        _CACHE.move_to_end(id(vol))
        return hit
    anat = Anatomy(vol, vocab)
    _CACHE[id(vol)] = anat
    _CACHE.move_to_end(id(vol))
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return anat
