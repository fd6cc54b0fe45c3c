"""Where surgeons put tools, per region: sites built from a body's landmarks (``landmarks.Anatomy``).

Each site maker returns the tools of one surgical step, sized as real implants are:

* femoral neck: 2-3 parallel cannulated screws (6.5-7.3 mm, inverted triangle, tips 5-10 mm under the
  head's surface), guide K-wires, a drill bit, or a dynamic hip screw (lag screw + side plate + cortical
  screws) on the lateral femur;
* pelvis: sacroiliac screws (cannulated, from the lateral ilium into S1), their guide wires and drill, a
  symphyseal plate;
* spine: pedicle screws in bilateral pairs over 1-4 adjacent levels, converging into the bodies (lumbar
  5.5-7.5 mm, thoracic 4.5-6 mm), pedicle guide wires and drills; an anterior cervical plate;
* shoulder: proximal humerus plate and pinning K-wires, clavicle plate; knee: patellar tension-band
  K-wires, tibial plateau cannulated screws, proximal tibial plate; wrist: radial styloid K-wires, a volar
  distal radius plate, a scaphoid screw; hand: metacarpal K-wires (intramedullary and transverse), mini
  plates; skull: cranial mini plates, a ventricular catheter;
* guidewires and catheters along the body's vessels for the region, else along a femoral access path
  (femoral head, iliac, then in front of the lumbar spine).

K-wires are 1.0-2.5 mm. Every placed tool carries ``site``, ``target`` (the structure its tip is in) and
``tip``. A site the body lacks the anatomy for returns no tools; the sampler then tries another.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from train.synth.landmarks import (
    ANTERIOR,
    RIGHT,
    SUPERIOR,
    Anatomy,
    orthogonal,
    pca,
    side_sign,
    unit,
)
from train.synth.tools import Tool, _polyline_tool, _resample, _screw, vessel_centerline
from train.synth.vocabulary import Vocabulary
from train.synth.volume import PreparedVolume

Site = Callable[[np.random.Generator, Anatomy, str | None], list[Tool]]


@lru_cache(maxsize=1)
def _vocab() -> Vocabulary:
    return Vocabulary.load()


# ------------------------------------------------------------------------------------------ tool shapes
def _metal(rng: np.random.Generator, p_titanium: float = 0.6) -> str:
    return "titanium" if rng.random() < p_titanium else "stainless_steel"


def kwire(
    rng: np.random.Generator,
    tip: np.ndarray,
    out_dir: np.ndarray,
    length: float,
    site: str,
    target: str,
    r: float | None = None,
    p_bent: float = 0.2,
) -> Tool:
    """A 1.0-2.5 mm steel K-wire from ``tip`` along ``out_dir`` (toward and past the skin)."""
    r = float(rng.uniform(0.5, 1.25)) if r is None else r
    t = Tool("k_wire", 301, "stainless_steel", site=site, target=target, tip=np.asarray(tip, float))
    d = unit(out_dir)
    end = tip + d * length
    t.add_cylinder(tip, end, r)
    if rng.random() < p_bent:
        bent = unit(d * np.cos(np.deg2rad(rng.uniform(30, 90))) + _perp(rng, d))
        t.add_cylinder(end, end + bent * rng.uniform(10.0, 30.0), r)
    return t


def _perp(rng: np.random.Generator, a: np.ndarray) -> np.ndarray:
    return orthogonal(rng.normal(size=3), a)


def drill_bit(
    rng: np.random.Generator,
    tip: np.ndarray,
    out_dir: np.ndarray,
    length: float,
    r: float,
    site: str,
    target: str,
) -> Tool:
    """A twist drill: conical point, a fluted part (helical grooves as offset cut-outs) and a plain shank."""
    t = Tool("drill_bit", 307, "stainless_steel", site=site, target=target, tip=np.asarray(tip, float))
    d = unit(out_dir)
    u = _perp(rng, d)
    w = np.cross(d, u)
    cone = 1.2 * r
    for k, f in enumerate((0.35, 0.65, 0.9)):  # the point, as three stepped cylinders
        t.add_cylinder(tip + d * (cone * k / 3), tip + d * (cone * (k + 1) / 3), r * f)
    flute = float(min(length - cone, rng.uniform(30.0, 55.0)))
    start = tip + d * cone
    t.add_cylinder(start, start + d * flute, r)
    pitch = rng.uniform(3.0, 4.5) * 2 * r
    n = max(4, int(flute / (pitch / 6)))
    for i in range(n):  # one cut-out per sixth of a turn, rotating: the flutes' helix
        s0 = flute * i / n
        ang = 2 * np.pi * s0 / pitch
        off = (np.cos(ang) * u + np.sin(ang) * w) * 0.75 * r
        for sign in (1.0, -1.0):  # two flutes, opposite
            c0 = start + d * s0 + sign * off
            t.add_cylinder(c0, c0 + d * (flute / n), 0.45 * r, sign=-1.0)
    t.add_cylinder(start + d * flute, tip + d * length, r)
    return t


def cannulated_screw(
    rng: np.random.Generator,
    tip: np.ndarray,
    head_end: np.ndarray,
    r: float,
    site: str,
    target: str,
    thread_len: float | None = None,
    head: bool = True,
) -> Tool:
    """A cannulated screw (partly threaded unless ``thread_len`` is None), washer-like head, hollow core."""
    t = Tool("cannulated_screw", 308, _metal(rng), site=site, target=target, tip=np.asarray(tip, float))
    _screw(
        t, tip, head_end, r, 1.6 * r, rng.uniform(2.5, 4.0) if head else 0.0, thread_len, cannula_r=0.3 * r
    )
    return t


def cortical_screw(
    rng: np.random.Generator,
    tip: np.ndarray,
    head_end: np.ndarray,
    r: float,
    site: str,
    target: str,
    material: str,
) -> Tool:
    t = Tool("bone_screw", 302, material, site=site, target=target, tip=np.asarray(tip, float))
    _screw(t, tip, head_end, r, 1.7 * r, rng.uniform(1.5, 3.0))
    return t


def plate(
    rng: np.random.Generator,
    p0: np.ndarray,
    p1: np.ndarray,
    normal: np.ndarray,
    width: float,
    thick: float,
    site: str,
    target: str,
    bone: np.ndarray,
    screw_r: float,
    p_screw: float = 0.75,
    head: tuple[float, float] | None = None,
    screw_max: float = 200.0,
) -> list[Tool]:
    """A plate lying on the bone from ``p0`` to ``p1`` (its underside on those points), holes every 10-14 mm,
    cortical screws into the bone along ``-normal`` in most holes. ``head`` = (width, length) adds a wider
    transverse part at ``p0`` (T-plates of the distal radius, the proximal humerus/tibia). Each screw runs
    through the ``bone`` points under its hole to the far cortex (bicortical), at most ``screw_max`` mm."""
    a = unit(p1 - p0)
    n = orthogonal(normal, a)
    b = np.cross(n, a)
    length = float(np.linalg.norm(p1 - p0))
    mat = _metal(rng, 0.7)
    pl = Tool("plate", 304, mat, site=site, target=target, tip=np.asarray(p0, float))  # p0 lies on the bone
    centre = (p0 + p1) / 2 + n * thick / 2
    pl.add_box(centre, np.stack([a, b, n]), np.array([length / 2, width / 2, thick / 2]))
    holes: list[np.ndarray] = []
    pitch = rng.uniform(10.0, 14.0)
    k = max(2, int(length // pitch))
    holes += [centre + a * ((i - (k - 1) / 2) * pitch) for i in range(k)]
    if head is not None:
        hw, hl = head
        hc = p0 + a * (hl / 2) + n * thick / 2
        pl.add_box(hc, np.stack([a, b, n]), np.array([hl / 2, hw / 2, thick / 2]))
        m = max(2, int(hw // 7))
        holes += [hc + b * ((i - (m - 1) / 2) * (hw - 4) / max(m - 1, 1)) for i in range(m)]
    hole_r = min(screw_r * 1.15, width / 3)
    tools = [pl]
    for hc in holes:
        pl.add_cylinder(hc - n * thick / 2, hc + n * thick / 2, hole_r, sign=-1.0)
        ln = min(exit_distance(bone, hc - n * (thick / 2 + 0.5), -n) + 1.5, screw_max)
        if rng.random() < p_screw and ln >= 4.0:  # no screw where no bone lies under the hole
            top = hc + n * thick / 2
            tools.append(cortical_screw(rng, top - n * ln, top - n * 0.5, screw_r, site, target, mat))
    return tools


# ------------------------------------------------------------------------------------ bone geometry
def exit_distance(
    pts: np.ndarray, start: np.ndarray, d: np.ndarray, radius: float = 4.0, step: float = 2.0
) -> float:
    """How far from ``start`` along ``d`` the bone (its sample points) goes on: the last step with a point
    within ``radius`` mm, allowing one empty step (sampled points have gaps)."""
    last, t, misses = 0.0, 0.0, 0
    sub = pts[np.linalg.norm(np.cross(pts - start, d), axis=1) < radius]
    if len(sub) == 0:
        return 0.0
    along = (sub - start) @ d
    while t < 400.0:
        t += step
        if np.any(np.abs(along - t) < radius * 0.75):
            last, misses = t, 0
        else:
            misses += 1
            if misses > 2:
                break
    return last


def surface_point(
    pts: np.ndarray, c: np.ndarray, a: np.ndarray, t: float, d: np.ndarray, band: float = 6.0
) -> tuple[np.ndarray, float]:
    """The bone's surface on side ``d`` (unit, square to the axis) at axial level ``t`` from ``c``, and the
    bone's thickness along ``d`` there."""
    rel = pts - c
    u = rel @ a
    sel = rel[np.abs(u - t) < band]
    if len(sel) < 5:
        sel = rel[np.argsort(np.abs(u - t))[:20]]
    along = sel @ d
    return c + a * t + d * float(along.max()), float(np.ptp(along))


# -------------------------------------------------------------------------------------------- sites
def _sides(anat: Anatomy, side: str | None, need: str) -> list[str]:
    sides = [side] if side else ["left", "right"]
    return [s for s in sides if anat.has(f"{need}_{s}")]


def site_femoral_neck(rng: np.random.Generator, anat: Anatomy, side: str | None, kind: str) -> list[Tool]:
    """Screws, wires, a drill bit or a dynamic hip screw along the femoral neck."""
    sides = [s for s in _sides(anat, side, "femur") if anat.femoral_neck(s) is not None]
    if not sides:
        return []
    s = str(rng.choice(sides))
    fn = anat.femoral_neck(s)
    assert fn is not None
    head, r_head, n, shaft = fn["head"], float(fn["head_r"]), fn["neck"], fn["shaft"]
    entry = fn["entry"]
    target = f"femur_{s}"
    e_inf = orthogonal(-shaft, n)
    e_ant = np.cross(n, e_inf)
    e_ant = e_ant if e_ant @ ANTERIOR >= 0 else -e_ant
    tip0 = head + n * (r_head - rng.uniform(5.0, 10.0))
    length = float((tip0 - entry) @ n)
    if kind == "dhs":
        r = rng.uniform(5.5, 6.5)
        lag = cannulated_screw(
            rng, tip0, entry, r, "dynamic_hip_screw", target, rng.uniform(20, 28), head=False
        )
        tools = [lag]
        c, a, _ = anat.axis(target, head)
        lat = -orthogonal(fn["medial"], a)
        pts = anat.points(target)
        t_entry = float((entry - c) @ a)
        plen = rng.uniform(70.0, 140.0)
        top, _ = surface_point(pts, c, a, t_entry - 8.0, lat)
        bot, _ = surface_point(pts, c, a, t_entry - 8.0 - plen, lat)
        pl = plate(
            rng,
            top,
            bot,
            lat,
            rng.uniform(16.0, 20.0),
            rng.uniform(5.0, 6.5),
            "dynamic_hip_screw",
            target,
            pts,
            rng.uniform(2.0, 2.5),
            0.85,
        )
        # The barrel: a tube around the lag screw's shaft, from the plate into the lateral cortex.
        pl[0].add_cylinder(entry - n * 6.0, entry + n * rng.uniform(25.0, 38.0), r * 0.95)
        pl[0].add_cylinder(entry - n * 6.0, entry + n * 40.0, r * 0.72, sign=-1.0)
        return tools + pl
    offs = [np.zeros(3)]
    if kind in ("screws", "wires"):
        k = int(rng.integers(2, 4))
        d = rng.uniform(6.5, 9.0)
        tri = [e_inf * d, -e_inf * d / 2 + e_ant * d * 0.87, -e_inf * d / 2 - e_ant * d * 0.87]
        offs = tri[:k]
    tools: list[Tool] = []
    for off in offs:
        tip = tip0 + off + rng.normal(0.0, 0.7, 3)
        if kind == "screws":
            r = rng.uniform(3.25, 3.65)
            tools.append(
                cannulated_screw(
                    rng,
                    tip,
                    tip - n * (length + rng.uniform(-3, 3)),
                    r,
                    "femoral_neck",
                    target,
                    rng.uniform(16.0, 32.0),
                )
            )
        elif kind == "wires":
            tools.append(kwire(rng, tip, -n, length + rng.uniform(40.0, 150.0), "femoral_neck", target))
        else:  # drill
            depth = length * rng.uniform(0.3, 0.9)
            tip = entry + n * depth
            tools.append(
                drill_bit(
                    rng,
                    tip,
                    -n,
                    depth + rng.uniform(60.0, 120.0),
                    rng.uniform(1.6, 2.6),
                    "femoral_neck",
                    target,
                )
            )
            if rng.random() < 0.5:  # over a guide wire already in the head
                tools.append(kwire(rng, tip0, -n, length + rng.uniform(90.0, 180.0), "femoral_neck", target))
    return tools


def site_sacroiliac(rng: np.random.Generator, anat: Anatomy, side: str | None, kind: str) -> list[Tool]:
    """Iliosacral screws (or their guide wires / drill) from the lateral ilium into the S1 body."""
    if not anat.has("sacrum"):
        return []
    sides = _sides(anat, side, "hip") or ["left", "right"]
    s = str(rng.choice(sides))
    sac = anat.points("sacrum", "vertebrae_S1")
    z = sac @ SUPERIOR
    s1 = sac[z > np.quantile(z, 0.75)]
    c1 = s1.mean(0)
    lat = RIGHT * side_sign(s)
    tools: list[Tool] = []
    n_screws = int(rng.integers(1, 3)) if kind == "screws" else 1
    for i in range(n_screws):
        level = c1 - SUPERIOR * (i * rng.uniform(18.0, 26.0))
        tip = level - lat * rng.uniform(-15.0, 20.0) + ANTERIOR * rng.uniform(-4.0, 6.0)
        out = unit(lat + ANTERIOR * rng.uniform(-0.2, 0.1) + SUPERIOR * rng.uniform(-0.1, 0.2))
        length = rng.uniform(75.0, 110.0)
        if kind == "screws":
            tools.append(
                cannulated_screw(
                    rng,
                    tip,
                    tip + out * length,
                    rng.uniform(3.25, 3.65),
                    "sacroiliac",
                    "sacrum",
                    rng.uniform(16.0, 32.0),
                )
            )
        elif kind == "wires":
            tools.append(kwire(rng, tip, out, length + rng.uniform(60.0, 160.0), "sacroiliac", "sacrum"))
        else:
            bones = ("sacrum", f"hip_{s}")
            for _ in range(10):  # part-way from the ilium to the S1 body, in bone (not in the joint)
                start = tip + out * length * rng.uniform(0.1, 0.6)
                bone = nearest_structure(anat, start, bones)
                if np.linalg.norm(anat.points(bone) - start, axis=1).min() < 3.0:
                    break
            d = length - float((start - tip) @ out)
            tools.append(
                drill_bit(
                    rng, start, out, d + rng.uniform(60.0, 120.0), rng.uniform(1.6, 2.6), "sacroiliac", bone
                )
            )
    return tools


def nearest_structure(anat: Anatomy, point: np.ndarray, names: tuple[str, ...]) -> str:
    """Which of these structures lies nearest ``point`` (the bone a part-way tip is in)."""
    have = [n for n in names if anat.has(n)]
    return min(have, key=lambda n: float(np.linalg.norm(anat.points(n) - point, axis=1).min()))


def site_symphysis_plate(rng: np.random.Generator, anat: Anatomy, side: str | None) -> list[Tool]:
    """A plate across the pubic symphysis on the pubic bodies' anterior-superior surface."""
    if not (anat.has("hip_left") and anat.has("hip_right")):
        return []
    pubis, front = [], []
    for s in ("left", "right"):
        pts = anat.points(f"hip_{s}")
        f = pts[pts @ ANTERIOR > np.quantile(pts @ ANTERIOR, 0.85)]
        front.append(f[np.abs(f[:, 0] - anat.midline_x) < 60.0])
        pubis.append(f[np.argsort(np.abs(f[:, 0] - anat.midline_x))[:60]])
    mid = np.concatenate(pubis).mean(0)
    region = np.concatenate(front)
    normal = unit(ANTERIOR + SUPERIOR * rng.uniform(0.2, 0.8))
    half = rng.uniform(25.0, 40.0)
    # Each end on the pubic body's surface under it (the plate may tilt to follow the bone).
    p0 = surface_point(region, mid, RIGHT, -half, normal, band=5.0)[0] + normal * 0.3
    p1 = surface_point(region, mid, RIGHT, half, normal, band=5.0)[0] + normal * 0.3
    thick = rng.uniform(2.5, 3.5)

    near_all = np.concatenate([anat.points("hip_left"), anat.points("hip_right")])
    width, screw_r = rng.uniform(9.0, 11.0), rng.uniform(1.6, 1.9)
    tools = plate(rng, p0, p1, normal, width, thick, "symphysis", "hip_left", near_all, screw_r)
    for t in tools[1:]:  # each screw is in the pubic body of its own side
        t.target = "hip_left" if t.tip[0] < anat.midline_x else "hip_right"  # type: ignore[index]
    return tools


_LUMBAR = tuple(f"vertebrae_L{i}" for i in range(1, 6))
_THORACIC = tuple(f"vertebrae_T{i}" for i in range(1, 13))
_CERVICAL = tuple(f"vertebrae_C{i}" for i in range(3, 8))


def _levels(rng: np.random.Generator, anat: Anatomy, names: tuple[str, ...], k_max: int) -> list[str]:
    present = [n for n in names if anat.vertebra(n) is not None]
    if not present:
        return []
    k = int(rng.integers(1, min(k_max, len(present)) + 1))
    i = int(rng.integers(0, len(present) - k + 1))
    return present[i : i + k]


def pedicle_path(rng: np.random.Generator, v: dict, s: float, lumbar: bool) -> tuple[np.ndarray, np.ndarray]:
    """(tip, entry) of a pedicle screw on side ``s`` (+1 right): posterior-lateral entry over the pedicle,
    converging (lumbar 15-25°, thoracic 5-15°) to a tip in the anterior half of the body."""
    a, r, sup = v["anterior"], v["right"], v["superior"]
    depth, width = float(v["depth"]), float(v["width"])
    tip = v["centre"] + a * depth * rng.uniform(0.15, 0.3) + r * s * width * rng.uniform(0.02, 0.12)
    tip = tip + sup * rng.normal(0.0, 1.5)
    pedicle = v["wall"] + r * s * width * rng.uniform(0.3, 0.36) - a * rng.uniform(4.0, 8.0)
    d = unit(pedicle - tip)
    length = rng.uniform(40.0, 50.0) if lumbar else rng.uniform(30.0, 42.0)
    length = max(length, float(np.linalg.norm(pedicle - tip)) + 10.0)
    return tip, tip + d * length


def site_pedicles(rng: np.random.Generator, anat: Anatomy, names: tuple[str, ...], kind: str) -> list[Tool]:
    """Pedicle screws (bilateral pairs, 1-4 adjacent levels), or a pedicle guide wire / drill."""
    lumbar = names is _LUMBAR
    levels = _levels(rng, anat, names, 4 if kind == "screws" else 2)
    tools: list[Tool] = []
    bilateral = rng.random() < 0.85
    one = float(rng.choice([-1.0, 1.0]))
    for name in levels:
        v = anat.vertebra(name)
        assert v is not None
        for s in (-1.0, 1.0) if bilateral else (one,):
            tip, entry = pedicle_path(rng, v, s, lumbar)
            out = unit(entry - tip)
            if kind == "screws":
                r = rng.uniform(2.75, 3.75) if lumbar else rng.uniform(2.25, 3.0)
                t = Tool("pedicle_screw", 303, "titanium", site="pedicle", target=name, tip=tip)
                _screw(t, tip, entry, r, r * 2.2, 0.0)
                t.add_cylinder(entry, entry + out * 12.0, r * 2.2)  # tulip head: a hollow cylinder
                t.add_cylinder(entry + out * 3.0, entry + out * 12.0, r * 1.4, sign=-1.0)
                tools.append(t)
            elif kind == "wires":
                deep = tip - out * rng.uniform(-10.0, 0.0)
                tools.append(kwire(rng, deep, out, rng.uniform(120.0, 220.0), "pedicle", name, p_bent=0.0))
            else:
                d = float(np.linalg.norm(entry - tip)) * rng.uniform(0.3, 0.8)
                start = entry - out * d
                tools.append(
                    drill_bit(
                        rng, start, out, d + rng.uniform(80.0, 140.0), rng.uniform(1.5, 2.0), "pedicle", name
                    )
                )
    return tools


def site_cervical_plate(rng: np.random.Generator, anat: Anatomy, side: str | None) -> list[Tool]:
    """An anterior cervical plate over 2-3 vertebral bodies, two screws per body."""
    present = [n for n in _CERVICAL if anat.vertebra(n) is not None]
    if len(present) < 2:
        return []
    k = int(rng.integers(2, min(3, len(present)) + 1))
    i = int(rng.integers(0, len(present) - k + 1))
    vs = [anat.vertebra(n) for n in present[i : i + k]]
    fronts = [v["centre"] + v["anterior"] * (float(v["depth"]) / 2 + 1.0) for v in vs]  # type: ignore[index]
    a = unit(fronts[0] - fronts[-1])
    p0, p1 = fronts[0] + a * 6.0, fronts[-1] - a * 6.0
    normal = vs[0]["anterior"]  # type: ignore[index]
    mat = _metal(rng, 0.9)
    pl = Tool("plate", 304, mat, site="anterior_cervical", target=present[i], tip=fronts[0])
    b = np.cross(normal, a)
    n = orthogonal(normal, a)
    width, thick = rng.uniform(15.0, 18.0), rng.uniform(2.0, 2.6)
    pl.add_box(
        (p0 + p1) / 2 + n * thick / 2,
        np.stack([a, b, n]),
        np.array([np.linalg.norm(p1 - p0) / 2, width / 2, thick / 2]),
    )
    tools = [pl]
    for v, f, name in zip(vs, fronts, present[i : i + k]):
        for s in (-1.0, 1.0):
            top = f + b * s * width * 0.3
            d = unit(-v["anterior"] - b * s * 0.15)  # type: ignore[index]
            ln = min(float(v["depth"]) * 0.85, rng.uniform(12.0, 16.0))  # type: ignore[index]
            tools.append(
                cortical_screw(rng, top + d * ln, top, rng.uniform(1.8, 2.1), "anterior_cervical", name, mat)
            )
    return tools


def _long_bone_plate(
    rng: np.random.Generator,
    anat: Anatomy,
    bone: str,
    toward: np.ndarray,
    side_dir: np.ndarray,
    from_end: tuple[float, float],
    length: tuple[float, float],
    site: str,
    screw_r: tuple[float, float],
    head: tuple[float, float] | None = None,
    width: tuple[float, float] = (10.0, 14.0),
    thick: tuple[float, float] = (2.5, 4.0),
) -> list[Tool]:
    """A plate on a long bone's ``side_dir`` surface, starting ``from_end`` mm from the end nearer
    ``toward`` and running ``length`` mm along the shaft; its ends sit on the bone's surface, so it follows
    a flaring metaphysis; screws go across the bone (bicortical)."""
    c, a, half = anat.axis(bone, toward)
    d = orthogonal(side_dir, a)
    pts = anat.points(bone)
    t0 = half - rng.uniform(*from_end)
    t1 = t0 - rng.uniform(*length)
    top, _ = surface_point(pts, c, a, t0, d)
    bot, _ = surface_point(pts, c, a, max(t1, -half + 5.0), d)
    return plate(
        rng,
        top,
        bot,
        d,
        rng.uniform(*width),
        rng.uniform(*thick),
        site,
        bone,
        pts,
        rng.uniform(*screw_r),
        head=head,
    )


def _lateral(side: str) -> np.ndarray:
    return RIGHT * side_sign(side)


def site_proximal_humerus(rng: np.random.Generator, anat: Anatomy, side: str | None, kind: str) -> list[Tool]:
    sides = _sides(anat, side, "humerus")
    if not sides:
        return []
    s = str(rng.choice(sides))
    bone = f"humerus_{s}"
    joint = anat.joint(bone, f"scapula_{s}")
    toward = joint if joint is not None else anat.axis(bone)[0] + SUPERIOR * 1e3
    if kind == "plate":
        return _long_bone_plate(
            rng, anat, bone, toward, _lateral(s), (8.0, 15.0), (80.0, 130.0), "proximal_humerus", (1.75, 2.0)
        )
    _, a, _ = anat.axis(bone, toward)
    head = anat.bone_end(bone, toward, frac=0.08).mean(0)
    pts = anat.points(bone)
    lat = orthogonal(_lateral(s), a)
    tools = []
    for _ in range(int(rng.integers(2, 4))):
        tip = head + rng.normal(0.0, 5.0, 3) - a * rng.uniform(0.0, 8.0)
        out = unit(
            lat * np.cos(np.deg2rad(rng.uniform(35, 55))) - a * np.sin(np.deg2rad(rng.uniform(35, 55)))
        )
        inside = exit_distance(pts, tip, out)
        tools.append(kwire(rng, tip, out, inside + rng.uniform(30.0, 100.0), "proximal_humerus", bone))
    return tools


def site_clavicle_plate(rng: np.random.Generator, anat: Anatomy, side: str | None) -> list[Tool]:
    sides = _sides(anat, side, "clavicula")
    if not sides:
        return []
    bone = f"clavicula_{rng.choice(sides)}"
    c, a, half = anat.axis(bone)
    pts = anat.points(bone)
    d = orthogonal(SUPERIOR + ANTERIOR * rng.uniform(-0.3, 0.6), a)
    t0 = rng.uniform(-0.2, 0.5) * half
    t1 = t0 - rng.uniform(60.0, 100.0)
    t1 = max(t1, -half + 5.0)
    top, _ = surface_point(pts, c, a, t0, d)
    bot, _ = surface_point(pts, c, a, t1, d)
    return plate(
        rng,
        top,
        bot,
        d,
        rng.uniform(9.0, 11.0),
        rng.uniform(2.5, 3.5),
        "clavicle",
        bone,
        pts,
        rng.uniform(1.6, 1.9),
    )


def site_knee(rng: np.random.Generator, anat: Anatomy, side: str | None, kind: str) -> list[Tool]:
    sides = [s for s in _sides(anat, side, "tibia") if anat.knee_frame(s) is not None]
    if not sides:
        return []
    s = str(rng.choice(sides))
    centre, up, ant = anat.knee_frame(s)  # type: ignore[misc]
    lat = np.cross(up, ant) * (1.0 if s == "left" else -1.0)  # the limb's lateral side
    tib = f"tibia_{s}"
    if kind == "patella":  # tension band: two parallel longitudinal wires through the patella
        pat = f"patella_{s}"
        if not anat.has(pat):
            return []
        pts = anat.points(pat)
        pc = pts.mean(0)
        tools = []
        gap = rng.uniform(4.0, 6.0)
        for off in (-gap, gap):
            mid = pc + lat * off
            lo, hi = exit_distance(pts, mid, -up), exit_distance(pts, mid, up)
            below, above = rng.uniform(5.0, 15.0), rng.uniform(10.0, 30.0)
            w = kwire(
                rng,
                mid - up * (lo + below),
                up,
                lo + hi + below + above,
                "patella",
                pat,
                r=rng.uniform(0.8, 1.0),
                p_bent=0.5,
            )
            w.tip = mid
            tools.append(w)
        return tools
    if kind == "plate":
        return _long_bone_plate(
            rng,
            anat,
            tib,
            centre,
            lat,
            (5.0, 15.0),
            (70.0, 140.0),
            "proximal_tibia",
            (1.75, 2.25),
            head=(rng.uniform(25.0, 32.0), rng.uniform(12.0, 18.0)),
        )
    c, a, half = anat.axis(tib, centre)
    pts = anat.points(tib)
    tools = []
    n = int(rng.integers(2, 4))
    level = half - rng.uniform(8.0, 15.0)
    for i in range(n):
        t = level - (i // 2) * rng.uniform(10.0, 14.0)
        ant_off = ant * ((i % 2) * 2 - 1) * rng.uniform(4.0, 8.0)
        side_pt, width = surface_point(pts, c, a, t, lat)
        entry = side_pt + ant_off + lat * 1.0
        depth = max(width - 6.0, 20.0)
        tip = entry - lat * depth
        if kind == "screws":
            tools.append(
                cannulated_screw(
                    rng, tip, entry, rng.uniform(3.25, 3.5), "tibial_plateau", tib, rng.uniform(16.0, 32.0)
                )
            )
        elif kind == "wires":
            tools.append(kwire(rng, tip, lat, depth + rng.uniform(40.0, 120.0), "tibial_plateau", tib))
        else:
            dd = depth * rng.uniform(0.4, 0.9)
            tools.append(
                drill_bit(
                    rng,
                    entry - lat * dd,
                    lat,
                    dd + rng.uniform(60.0, 110.0),
                    rng.uniform(1.6, 2.0),
                    "tibial_plateau",
                    tib,
                )
            )
            break
    return tools


def site_wrist(rng: np.random.Generator, anat: Anatomy, side: str | None, kind: str) -> list[Tool]:
    sides = [s for s in _sides(anat, side, "radius") if anat.hand_frame(s) is not None]
    if not sides:
        return []
    s = str(rng.choice(sides))
    bone = f"radius_{s}"
    hand_c, prox, palm = anat.hand_frame(s)  # type: ignore[misc]
    c, a, half = anat.axis(bone, hand_c)  # a: toward the hand (distal)
    if anat.has(f"ulna_{s}"):
        radial = orthogonal(c - anat.centroid(f"ulna_{s}"), a)  # type: ignore[operator]
    else:
        radial = orthogonal(np.cross(prox, palm) * (1.0 if s == "left" else -1.0), a)
    pts = anat.points(bone)
    if kind == "plate":
        return _long_bone_plate(
            rng,
            anat,
            bone,
            hand_c,
            palm,
            (2.0, 6.0),
            (40.0, 65.0),
            "distal_radius",
            (1.1, 1.4),
            head=(rng.uniform(20.0, 28.0), rng.uniform(10.0, 14.0)),
            width=(9.0, 11.0),
            thick=(1.8, 2.5),
        )
    if kind == "scaphoid":
        carp = f"carpals_{s}"
        if not anat.has(carp):
            return []
        cp = anat.points(carp)
        styl = c + a * half + radial * 10.0
        near = cp[np.argsort(np.linalg.norm(cp - styl, axis=1))[: max(20, len(cp) // 6)]]
        sc, _, ev = pca(near)
        ax = ev[0] if ev[0] @ a > 0 else -ev[0]
        ln = rng.uniform(20.0, 26.0)
        return [
            cannulated_screw(
                rng,
                sc + ax * ln / 2,
                sc - ax * ln / 2,
                rng.uniform(1.5, 1.75),
                "scaphoid",
                carp,
                None,
                head=False,
            )
        ]
    dist = pts[((pts - c) @ a) > half * 0.8]
    tools = []
    for k in range(int(rng.integers(1, 4))):
        toward = radial if k != 1 else -radial
        corner = dist[int(np.argmax((dist - c) @ (toward + 0.5 * a)))]
        th = np.deg2rad(rng.uniform(30.0, 50.0))
        d_in = unit(-a * np.cos(th) - toward * np.sin(th) + palm * rng.normal(0.0, 0.15))
        start = corner - d_in * 1.0
        inside = exit_distance(pts, start, d_in)
        tip = start + d_in * (inside + rng.uniform(0.0, 3.0))
        if kind == "wires":
            tools.append(kwire(rng, tip, -d_in, inside + rng.uniform(20.0, 70.0), "distal_radius", bone))
        else:
            tools.append(
                drill_bit(
                    rng,
                    start + d_in * inside * rng.uniform(0.3, 0.8),
                    -d_in,
                    inside + rng.uniform(60.0, 110.0),
                    rng.uniform(1.0, 1.4),
                    "distal_radius",
                    bone,
                )
            )
            break
    return tools


def _metacarpal_lines(anat: Anatomy, side: str) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(centre, axis toward the wrist, half length) of each metacarpal.

    The metacarpals converge at their bases, so they are told apart in a slice across their middles (by the
    gaps between them across the hand); each is then fitted to the points near its line.
    """
    name = f"metacarpals_{side}"
    hf = anat.hand_frame(side)
    if not anat.has(name) or hf is None:
        return []
    _, prox, palm = hf
    across = np.cross(prox, palm)
    pts = anat.points(name)
    u = pts @ prox
    lo, hi = np.quantile(u, [0.05, 0.95])
    mid = pts[np.abs(u - (lo + hi) / 2) < (hi - lo) / 6]
    w = mid @ across
    order = np.argsort(w)
    cuts = np.nonzero(np.diff(w[order]) > 1.5)[0]
    out = []
    for g in np.split(order, cuts + 1):
        if len(g) < 8:
            continue
        c, ax = mid[g].mean(0), prox
        for radius in (6.0, 5.0):  # points near the line, refitted
            sel = pts[np.linalg.norm(np.cross(pts - c, ax), axis=1) < radius]
            if len(sel) < 15:
                break
            c, _, ev = pca(sel)
            ax = ev[0] if ev[0] @ prox > 0 else -ev[0]
        sel = pts[np.linalg.norm(np.cross(pts - c, ax), axis=1) < 5.0]
        if len(sel) >= 15:
            v = (sel - c) @ ax
            out.append((c + ax * float(v.max() + v.min()) / 2, ax, float(np.ptp(v)) / 2))
    return out


def site_hand(rng: np.random.Generator, anat: Anatomy, side: str | None, kind: str) -> list[Tool]:
    sides = [s for s in _sides(anat, side, "metacarpals") if _metacarpal_lines(anat, s)]
    if not sides:
        return []
    s = str(rng.choice(sides))
    lines = _metacarpal_lines(anat, s)
    _, _, palm = anat.hand_frame(s)  # type: ignore[misc]
    target = f"metacarpals_{s}"
    k = int(rng.integers(len(lines)))
    c, ax, half = lines[k]
    if kind == "plate":
        pts = anat.points(target)
        near = pts[np.linalg.norm(np.cross(pts - c, ax), axis=1) < 6.0]
        d = -palm
        t0 = rng.uniform(-0.1, 0.4) * half
        top, _ = surface_point(near, c, ax, t0, d, band=3.0)
        bot, _ = surface_point(near, c, ax, t0 - rng.uniform(25.0, 40.0), d, band=3.0)
        return plate(
            rng,
            top,
            bot,
            d,
            rng.uniform(5.5, 7.0),
            rng.uniform(1.2, 1.6),
            "metacarpal",
            target,
            near,
            rng.uniform(0.75, 1.0),
        )
    if kind == "transverse" and len(lines) >= 2:
        j = k + 1 if k + 1 < len(lines) else k - 1
        c2 = lines[j][0]
        t = rng.uniform(-0.5, 0.5) * half
        p1 = c + ax * t
        p2 = c2 + ax * t
        across = unit(p2 - p1)
        tip = p2 + across * rng.uniform(0.0, 3.0)
        return [
            kwire(
                rng,
                tip,
                -across,
                float(np.linalg.norm(p2 - p1)) + rng.uniform(20.0, 60.0),
                "metacarpal",
                target,
                r=rng.uniform(0.5, 0.8),
            )
        ]
    # Intramedullary, driven from the metacarpal head toward the base: the wire leaves the head on its
    # dorsal side (the finger is flexed out of the way) and is cut 10-30 mm above the skin.
    tip = c + ax * half * rng.uniform(0.5, 0.8)
    out = unit(-ax - palm * np.tan(np.deg2rad(rng.uniform(8.0, 20.0))))
    pts = anat.points(target)
    inside = exit_distance(pts[np.linalg.norm(np.cross(pts - c, ax), axis=1) < 8.0], tip, out)
    return [
        kwire(rng, tip, out, inside + rng.uniform(10.0, 30.0), "metacarpal", target, r=rng.uniform(0.5, 0.8))
    ]


def site_skull(rng: np.random.Generator, anat: Anatomy, side: str | None, kind: str) -> list[Tool]:
    if not anat.has("skull"):
        return []
    pts = anat.points("skull")
    centre = pts.mean(0)
    if kind == "catheter":  # ventricular drain through Kocher's point toward the frontal horn
        s = float(rng.choice([-1.0, 1.0]))
        d = unit(SUPERIOR * 0.85 + ANTERIOR * 0.45 + RIGHT * s * 0.25)
        rel = pts - centre
        cone = rel[(rel @ d) > 0.97 * np.linalg.norm(rel, axis=1)]
        entry = centre + d * (float((cone @ d).max()) if len(cone) else 70.0)
        aim = centre + RIGHT * s * 12.0 + ANTERIOR * 10.0 - SUPERIOR * 5.0
        depth = rng.uniform(55.0, 70.0)
        tipd = unit(aim - entry)
        tip = entry + tipd * depth
        outside = [entry + (entry - centre) * 0.06]
        tang = orthogonal(-ANTERIOR + rng.normal(0, 0.3, 3), unit(entry - centre))
        for _ in range(5):
            outside.append(outside[-1] + tang * 15.0 + unit(outside[-1] - centre) * 0.5)
        line = _resample(np.array([tip, entry, *outside]), 4.0)
        t = Tool("catheter", 306, "polymer", site="ventricular_drain", target="skull", tip=entry)
        ro = rng.uniform(1.3, 1.6)
        _polyline_tool(t, line, ro, 0.6 * ro)
        return [t]
    tools: list[Tool] = []
    for _ in range(int(rng.integers(1, 4))):  # cranial mini plates
        d = unit(rng.normal(size=3) + SUPERIOR * 0.8 + ANTERIOR * 0.5)
        rel = pts - centre
        cone = rel[(rel @ d) > 0.98 * np.linalg.norm(rel, axis=1)]
        if len(cone) < 3:
            continue
        surf = centre + d * float((cone @ d).max())
        tang = _perp(rng, d)
        ln = rng.uniform(15.0, 35.0)
        tools += plate(
            rng,
            surf - tang * ln / 2,
            surf + tang * ln / 2,
            d,
            rng.uniform(4.0, 5.5),
            rng.uniform(0.6, 1.0),
            "cranial",
            "skull",
            pts,
            rng.uniform(0.75, 0.85),
            screw_max=rng.uniform(4.0, 6.0),  # monocortical: the outer table only
        )
    return tools


REGION_VESSELS = {
    "chest": (
        "superior_vena_cava",
        "brachiocephalic_vein_left",
        "brachiocephalic_vein_right",
        "aorta",
        "subclavian_artery_left",
        "subclavian_artery_right",
        "inferior_vena_cava",
    ),
    "pelvis": ("iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "aorta"),
    "lumbar_spine": ("aorta", "inferior_vena_cava", "iliac_artery_left", "iliac_artery_right"),
    "thoracic_spine": ("aorta", "inferior_vena_cava", "superior_vena_cava"),
    "cervical_spine": ("common_carotid_artery_left", "common_carotid_artery_right", "brachiocephalic_trunk"),
    "hip": ("iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right"),
}


ACCESS_REGIONS = ("pelvis", "hip", "lumbar_spine", "thoracic_spine")  # a femoral access path shows there


def access_path(rng: np.random.Generator, anat: Anatomy) -> np.ndarray | None:
    """Where a femoral access runs without labelled vessels: over the femoral head, along the pelvic brim
    to the iliac bifurcation, then up in front of the lumbar spine, a little to the left (the aorta)."""
    pts: list[np.ndarray] = []
    s = str(rng.choice(["left", "right"]))
    fh = anat.femoral_head(s)
    if fh is not None:
        head = fh[0]
        med = -RIGHT * side_sign(s)
        pts += [head + ANTERIOR * 25 + med * 10 - SUPERIOR * 70, head + ANTERIOR * 25 + med * 15]
    for name in (
        "vertebrae_L5",
        "vertebrae_L4",
        "vertebrae_L3",
        "vertebrae_L2",
        "vertebrae_L1",
        "vertebrae_T12",
        "vertebrae_T11",
        "vertebrae_T10",
    ):
        v = anat.vertebra(name)
        if v is not None:
            pts.append(v["centre"] + v["anterior"] * (float(v["depth"]) / 2 + 12.0) - RIGHT * 15.0)  # type: ignore[operator]
    if len(pts) < 2:
        return None
    return _resample(np.array(pts), 4.0)


def site_endovascular(rng: np.random.Generator, anat: Anatomy, region: str) -> list[Tool]:
    """A guidewire and/or catheter along a vessel of the region, else along a femoral access path."""
    key = region.rsplit("_", 1)[0] if region.startswith("hip_") else region
    names = [n for n in REGION_VESSELS.get(key, ()) if anat.has(n) and len(anat.points(n)) > 300]
    line = None
    site = "vessel"
    if names:
        line = vessel_centerline(anat.points(str(rng.choice(names))))
        if len(line) >= 3 and rng.random() < 0.5:
            line = line[::-1]
    if line is None or len(line) < 3:
        if key not in ACCESS_REGIONS:
            return []
        line = access_path(rng, anat)
        site = "femoral_access"
        if line is None or len(line) < 3:
            return []
    line = _resample(line, 4.0)
    line = line + rng.normal(0, 0.6, size=line.shape).cumsum(0) * 0.3
    keep = max(3, int(len(line) * rng.uniform(0.5, 1.0)))
    out: list[Tool] = []
    kind = rng.random()
    if kind < 0.7:
        g = Tool("guidewire", 305, "nitinol", site=site, tip=line[keep - 1])
        _polyline_tool(g, line[:keep], rng.uniform(0.18, 0.45))
        out.append(g)
    if kind > 0.4:
        cat_end = max(2, int(keep * rng.uniform(0.4, 0.9)))
        c = Tool("catheter", 306, "polymer", site=site, tip=line[cat_end])
        ro = rng.uniform(0.65, 1.35)
        _polyline_tool(c, line[: cat_end + 1], ro, 0.6 * ro)
        out.append(c)
    return out


def site_rib_plate(rng: np.random.Generator, anat: Anatomy, side: str | None) -> list[Tool]:
    ribs = [n for n in anat.vocab.leaves("ribs") if anat.has(n) and len(anat.points(n)) > 200]
    if not ribs:
        return []
    name = str(rng.choice(ribs))
    pts = anat.points(name)
    p = pts[rng.integers(len(pts))]
    near = pts[np.linalg.norm(pts - p, axis=1) < 25.0]
    if len(near) < 20:
        return []
    c, _, ev = pca(near)
    body = anat.centroid("spine", "sternum", "heart")
    out = orthogonal(c - (body if body is not None else c - ANTERIOR), ev[0])
    top, _ = surface_point(near, c, ev[0], 0.0, out, band=10.0)
    ln = rng.uniform(40.0, 70.0)
    return plate(
        rng,
        top + ev[0] * ln / 2,
        top - ev[0] * ln / 2,
        out,
        rng.uniform(8.0, 10.0),
        rng.uniform(1.5, 2.2),
        "rib",
        name,
        near,
        rng.uniform(1.1, 1.4),
    )


def site_cervical_pins(rng: np.random.Generator, anat: Anatomy, side: str | None) -> list[Tool]:
    """Distraction pins (K-wire-like, 2-2.5 mm) driven into two adjacent vertebral bodies from the front,
    as for an anterior cervical discectomy, standing 40-70 mm out of the neck."""
    present = [n for n in _CERVICAL if anat.vertebra(n) is not None]
    if len(present) < 2:
        return []
    i = int(rng.integers(0, len(present) - 1))
    tools = []
    for name in present[i : i + 2]:
        v = anat.vertebra(name)
        assert v is not None
        front = v["centre"] + v["anterior"] * float(v["depth"]) / 2  # type: ignore[operator]
        out = unit(v["anterior"] + v["superior"] * rng.normal(0.0, 0.1) + v["right"] * rng.normal(0.0, 0.1))
        depth = float(v["depth"]) * rng.uniform(0.5, 0.75)  # type: ignore[arg-type]
        tip = front - out * depth
        tools.append(kwire(rng, tip, out, depth + rng.uniform(40.0, 70.0), "cervical_body", name,
                           r=rng.uniform(1.0, 1.25), p_bent=0.0))  # fmt: skip
    return tools


# region part -> [(weight, maker(rng, anat, side))]
REGION_SITES: dict[str, list[tuple[float, Site]]] = {
    "pelvis": [
        (2.0, lambda r, a, s: site_sacroiliac(r, a, s, "screws")),
        (1.0, lambda r, a, s: site_sacroiliac(r, a, s, "wires")),
        (0.6, lambda r, a, s: site_sacroiliac(r, a, s, "drill")),
        (0.8, site_symphysis_plate),
        (0.7, lambda r, a, s: site_femoral_neck(r, a, s, "screws")),
        (0.7, lambda r, a, s: site_endovascular(r, a, "pelvis")),
    ],
    "hip": [
        (2.0, lambda r, a, s: site_femoral_neck(r, a, s, "screws")),
        (1.5, lambda r, a, s: site_femoral_neck(r, a, s, "wires")),
        (0.7, lambda r, a, s: site_femoral_neck(r, a, s, "drill")),
        (1.5, lambda r, a, s: site_femoral_neck(r, a, s, "dhs")),
        (0.5, lambda r, a, s: site_endovascular(r, a, "hip")),
    ],
    "lumbar_spine": [
        (3.0, lambda r, a, s: site_pedicles(r, a, _LUMBAR, "screws")),
        (1.0, lambda r, a, s: site_pedicles(r, a, _LUMBAR, "wires")),
        (0.7, lambda r, a, s: site_pedicles(r, a, _LUMBAR, "drill")),
        (0.6, lambda r, a, s: site_endovascular(r, a, "lumbar_spine")),
    ],
    "thoracic_spine": [
        (3.0, lambda r, a, s: site_pedicles(r, a, _THORACIC, "screws")),
        (1.0, lambda r, a, s: site_pedicles(r, a, _THORACIC, "wires")),
        (0.7, lambda r, a, s: site_pedicles(r, a, _THORACIC, "drill")),
        (0.6, lambda r, a, s: site_endovascular(r, a, "thoracic_spine")),
    ],
    "cervical_spine": [
        (2.0, site_cervical_plate),
        (0.7, site_cervical_pins),
        (0.7, lambda r, a, s: site_endovascular(r, a, "cervical_spine")),
    ],
    "shoulder": [
        (2.0, lambda r, a, s: site_proximal_humerus(r, a, s, "plate")),
        (1.5, lambda r, a, s: site_proximal_humerus(r, a, s, "wires")),
        (1.5, site_clavicle_plate),
    ],
    "knee": [
        (1.5, lambda r, a, s: site_knee(r, a, s, "patella")),
        (1.5, lambda r, a, s: site_knee(r, a, s, "screws")),
        (1.0, lambda r, a, s: site_knee(r, a, s, "wires")),
        (0.5, lambda r, a, s: site_knee(r, a, s, "drill")),
        (1.5, lambda r, a, s: site_knee(r, a, s, "plate")),
    ],
    "wrist": [
        (2.0, lambda r, a, s: site_wrist(r, a, s, "wires")),
        (2.0, lambda r, a, s: site_wrist(r, a, s, "plate")),
        (0.8, lambda r, a, s: site_wrist(r, a, s, "scaphoid")),
        (0.5, lambda r, a, s: site_wrist(r, a, s, "drill")),
    ],
    "hand": [
        (2.0, lambda r, a, s: site_hand(r, a, s, "intramedullary")),
        (1.5, lambda r, a, s: site_hand(r, a, s, "transverse")),
        (1.0, lambda r, a, s: site_hand(r, a, s, "plate")),
    ],
    "skull": [
        (1.5, lambda r, a, s: site_skull(r, a, s, "plates")),
        (1.0, lambda r, a, s: site_skull(r, a, s, "catheter")),
    ],
    "chest": [
        (2.5, lambda r, a, s: site_endovascular(r, a, "chest")),
        (1.0, site_clavicle_plate),
        (0.8, site_rib_plate),
        (0.8, lambda r, a, s: site_pedicles(r, a, _THORACIC, "screws")),
    ],
}


def region_part_and_side(region: str) -> tuple[str, str | None]:
    for s in ("left", "right"):
        if region.endswith("_" + s):
            return region[: -len(s) - 1], s
    return region, None


def sample_region_tools(
    rng: np.random.Generator, vol: PreparedVolume, region: str, p_none: float = 0.3, max_kinds: int = 3
) -> list[Tool]:
    """1-``max_kinds`` different tool sites of ``region`` (none with probability ``p_none``)."""
    from train.synth.views import require_region  # one place checks regions and words the error

    anat = require_region(vol, _vocab(), region)
    if rng.random() < p_none:
        return []
    part, side = region_part_and_side(region)
    sites = REGION_SITES[part]
    w = np.array([x[0] for x in sites])
    k = int(rng.integers(1, max_kinds + 1))
    order = rng.choice(len(sites), size=len(sites), replace=False, p=w / w.sum())
    out: list[Tool] = []
    used = 0
    for i in order:
        got = sites[int(i)][1](rng, anat, side)
        if got:
            out += got
            used += 1
            if used >= k:
                break
    return out
