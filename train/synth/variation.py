"""Per-case anatomical variation: one body becomes many patients.

A body is one CT; training on it alone teaches one patient's proportions, bone density and pose. For every
case ``sample_variation`` draws, and ``apply_variation`` applies to a ``PreparedVolume``:

* **joint pose**: a limb rotated at its joint where the body allows it (below);
* **smooth elastic deformation**: a cubic B-spline displacement field with control points every
  40-60 mm and an RMS amplitude of a few mm, its gradient capped so the map never folds;
* **anisotropic scaling** of up to ±15 % per world axis about the volume centre;
* **body habitus**: a thicker or thinner subcutaneous fat layer (fat added outside, or fat-density soft
  tissue removed inside, the body surface), scaled by the body's local thickness;
* **bone density** from osteoporotic to dense (the bone channel scaled, cancellous-density voxels more than
  cortical-density ones);
* **per-tissue density jitter**: fat-like and lean soft tissue and the air channel (lungs) apart.

Alignment: pose and elastic deformation are one spatial map, built once in world mm as a backward
displacement field on a coarse (~4 mm) *analysis grid*; the material grid is resampled through it
trilinearly and the label bit-field grid through the same field with nearest neighbour (bit-fields packed in
float32 must never be interpolated). Anchors and points, being world positions, go through the forward map,
found by Newton's method on the same interpolated field, so labels, densities and points move together.
Scaling is exact and free: it only changes the two grids' affines (and maps the points), so a body scaled
up is never cropped. Habitus and densities change only the material channels, never where a labelled
structure is.

What a body needs for a joint to turn (``JOINTS``; L/R each; see ``find_joints``):

=========  ======================  =====================  ====================================  ==========
joint      stays (socket side)     lever (centre, axis)   turns with it                         range (°)
=========  ======================  =====================  ====================================  ==========
hip        hip                     femur                  femur, patella, tibia, fibula, foot   ±15 ball
knee       femur                   tibia, fibula          patella, tibia, fibula, foot          -5..30 flex
ankle      tibia, fibula           tarsals, metatarsals   tarsals, metatarsals, toes            ±15 hinge
shoulder   scapula                 humerus                humerus, radius, ulna, hand           ±20 ball
elbow      humerus                 radius, ulna           radius, ulna, hand                    -10..40 flex
wrist      radius, ulna            carpals, metacarpals   carpals, metacarpals, phalanges       ±20
=========  ======================  =====================  ====================================  ==========

Both the socket and the lever bones must be labelled (>= 30 points each) and touch (lever voxels within
8 mm of the socket's), the joint must lie >= 25 mm inside the volume and the lever reach >= 60 mm from it:
a limb cut off at the joint cannot turn. Ball joints turn about the lever's head centre (the largest ball
inscribed in it near the contact) so the head turns in its socket; joints of one limb compose.

Pose as inverse skinning: every bone group (the static skeleton, and one group per distinct chain of
turned joints) owns the tissue around it with an inverse-square-distance weight, so a thigh's muscle and
skin turn with the femur while the buttock stays with the pelvis, and the tissue between them blends
smoothly instead of tearing. For an output point each moving group claims it with its ownership at the
rotated-back position, the static skeleton with its ownership at the point; bone beats soft tissue, a
moving group beats static soft tissue (tissue pushed aside), and where nobody claims much the claims are
normalised, which stretches the tissue in between.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from train.synth.volume import BITS_PER_CHANNEL, PreparedVolume

ANALYSIS_MM = 4.0  # spacing of the grid the spatial map and ownership fields are computed on
CHUNK_VOXELS = 1 << 20  # output voxels resampled per chunk: bounds the temporary grids to ~30 MB
OWNERSHIP_EPS_MM = 1.0  # inverse-distance weights 1 / (d + eps)^2: a bone owns itself outright
CONTACT_MM = 8.0  # a distal bone point this close to the proximal bone is part of the joint's contact
MIN_POINTS = 30  # fewer labelled points than this and a structure does not define a joint
MIN_LEVER_MM = 60.0  # the distal bone must reach this far from the joint centre (not just a cut-off head)
HEAD_SEARCH_MM = 30.0  # a ball joint's head centre is looked for this close to the contact
MIN_HEAD_MM = 6.0  # thinner than this (inscribed radius) and the lever has no head: the contact is the centre
JOINT_MARGIN_MM = 25.0  # the joint centre must lie this far inside the volume: a cut-off limb cannot turn
MAX_ELASTIC_GRAD = 0.4  # cap on the elastic field's Jacobian deviation (Frobenius): |grad u| < 1 cannot fold
HABITUS_BODY_DENSITY = 0.5  # g/cm³: total density above which a voxel is inside the body
HABITUS_RADII_MM = (10.0, 20.0, 30.0, 45.0, 60.0, 80.0, 100.0, 120.0)  # local half-thickness steps
HABITUS_FULL_MM = 120.0  # local half-thickness from which the drawn subcutaneous change applies in full
FAT_DENSITY = 0.93  # g/cm³: subcutaneous fat (about -70 HU) added by a thicker habitus
OUTSIDE_DENSITY = 0.1  # g/cm³: at or below this total density a voxel is air outside the body
FAT_LIKE_MAX = 0.98  # soft-tissue density at or below which a voxel counts as fat (may be thinned away)


# ---------------------------------------------------------------------------------------------- joints


@dataclass(frozen=True)
class JointSpec:
    """Which structures define a joint, and how it may move.

    ``proximal``: the bone(s) of the socket side, which stay put. ``lever``: the first distal bone(s); the
    joint centre is found where they touch ``proximal`` and their principal axis is the limb's axis.
    ``distal``: every structure that turns with the limb (lever included). ``kind``: "ball" turns about a
    random axis; "hinge" about the medio-lateral axis (world x made perpendicular to the limb), positive
    angles moving the limb's end towards ``flexion_dir``; "planar" about a random axis perpendicular to the
    limb. ``angle_deg``: (min, max) at strength 1.
    """

    name: str
    proximal: tuple[str, ...]
    lever: tuple[str, ...]
    distal: tuple[str, ...]
    kind: str
    angle_deg: tuple[float, float]
    flexion_dir: tuple[float, float, float] | None = None


def _joint_table() -> tuple[JointSpec, ...]:
    out: list[JointSpec] = []
    for s in ("left", "right"):
        foot = (f"tarsals_{s}", f"metatarsals_{s}", f"phalanges_feet_{s}")
        shank = (f"tibia_{s}", f"fibula_{s}", f"patella_{s}", *foot)
        hand = (f"carpals_{s}", f"metacarpals_{s}", f"phalanges_hand_{s}")
        forearm = (f"radius_{s}", f"ulna_{s}", *hand)
        out += [
            JointSpec(f"hip_{s}", (f"hip_{s}",), (f"femur_{s}",), (f"femur_{s}", *shank), "ball", (-15, 15)),
            # World frame RAS+: knee flexion takes the foot posterior (-y), elbow flexion the hand anterior.
            JointSpec(
                f"knee_{s}",
                (f"femur_{s}",),
                (f"tibia_{s}", f"fibula_{s}"),
                shank,
                "hinge",
                (-5, 30),
                (0, -1, 0),
            ),
            JointSpec(f"ankle_{s}", (f"tibia_{s}", f"fibula_{s}"), foot[:2], foot, "hinge", (-15, 15)),
            JointSpec(
                f"shoulder_{s}",
                (f"scapula_{s}",),
                (f"humerus_{s}",),
                (f"humerus_{s}", *forearm),
                "ball",
                (-20, 20),
            ),
            JointSpec(
                f"elbow_{s}",
                (f"humerus_{s}",),
                (f"radius_{s}", f"ulna_{s}"),
                forearm,
                "hinge",
                (-10, 40),
                (0, 1, 0),
            ),
            JointSpec(f"wrist_{s}", (f"radius_{s}", f"ulna_{s}"), hand[:2], hand, "planar", (-20, 20)),
        ]
    return tuple(out)


JOINTS: tuple[JointSpec, ...] = _joint_table()
JOINTS_BY_NAME: dict[str, JointSpec] = {j.name: j for j in JOINTS}


@lru_cache(maxsize=1)
def _vocab_ids() -> tuple[dict[str, int], frozenset[int]]:
    from train.synth.vocabulary import Vocabulary

    v = Vocabulary.load()
    names = {c.name: c.id for c in v.categories if c.kind == "structure"}
    return names, frozenset(v.leaf_ids("bones"))


@dataclass(frozen=True)
class JointPose:
    """One joint turned for a case: ``angle_deg`` about ``axis`` (unit, world) through ``centre`` (mm)."""

    name: str
    centre: tuple[float, float, float]
    axis: tuple[float, float, float]
    angle_deg: float

    def rotation(self) -> tuple[np.ndarray, np.ndarray]:
        """(R, t) of the forward map x -> R x + t."""
        r = _axis_angle(np.asarray(self.axis, dtype=np.float64), math.radians(self.angle_deg))
        c = np.asarray(self.centre, dtype=np.float64)
        return r, c - r @ c

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "centre_mm": [round(float(v), 3) for v in self.centre],
            "axis": [round(float(v), 6) for v in self.axis],
            "angle_deg": round(float(self.angle_deg), 4),
        }


def _axis_angle(axis: np.ndarray, angle: float) -> np.ndarray:
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


@dataclass(frozen=True)
class JointFrame:
    """A joint a body allows: its centre, the limb's axis (unit, pointing away from the joint) and reach."""

    spec: JointSpec
    centre: np.ndarray
    limb_axis: np.ndarray
    lever_mm: float


def _points_of(vol: PreparedVolume, names: tuple[str, ...]) -> np.ndarray:
    ids, _ = _vocab_ids()
    pts = [vol.points[ids[n]] for n in names if n in ids and ids[n] in vol.points]
    return np.concatenate(pts).astype(np.float64) if pts else np.zeros((0, 3))


def _head_centre(vol: PreparedVolume, ids: list[int], near: np.ndarray) -> np.ndarray | None:
    """Centre of the largest ball inscribed in the ``ids`` bone within ``HEAD_SEARCH_MM`` of ``near``.

    Near a ball joint the widest part of the lever bone is its head (femoral head ~24 mm radius, neck and
    shaft ~12), so the deepest point of the bone's distance transform there is the head's centre: the
    point the head turns about in its socket. None when the bone is thinner than ``MIN_HEAD_MM`` there.
    """
    from scipy import ndimage

    aff = vol.labels_affine
    sp = np.linalg.norm(aff[:3, :3], axis=0)
    centre_idx = np.linalg.solve(aff[:3, :3], near - aff[:3, 3])
    half = np.ceil((HEAD_SEARCH_MM + 15.0) / sp).astype(int)
    shape = np.array(vol.label_bits.shape[1:])
    lo = np.clip(np.round(centre_idx).astype(int) - half, 0, shape)
    hi = np.clip(np.round(centre_idx).astype(int) + half + 1, 0, shape)
    if np.any(hi - lo < 3):
        return None
    box = vol.label_bits[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].to(torch.int32)
    row = {lid: n for n, lid in enumerate(vol.present_ids)}
    mask = torch.zeros(box.shape[1:], dtype=torch.bool)
    for lid in ids:
        c, b = divmod(row[lid], BITS_PER_CHANNEL)
        mask |= (box[c] & (1 << b)) != 0
    m = mask.numpy()
    if not m.any():
        return None
    depth = ndimage.distance_transform_edt(m, sampling=sp)
    ijk = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), -1)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    depth[np.linalg.norm(world - near, axis=-1) > HEAD_SEARCH_MM] = 0
    k = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return world[k].astype(np.float64) if depth[k] >= MIN_HEAD_MM else None


def find_joints(vol: PreparedVolume) -> list[JointFrame]:
    """Every joint of ``JOINTS`` this body allows: proximal and lever bones labelled, touching, long enough.

    The contact is where the lever bone touches the proximal one (its labelled points within
    ``CONTACT_MM`` of the proximal bone's). The centre is the contact's centroid, or for ball joints the
    centre of the head (``_head_centre``), so the femoral or humeral head turns in its socket. The joint
    must lie at least ``JOINT_MARGIN_MM`` inside the volume and the lever reach at least ``MIN_LEVER_MM``
    from it (the humeral head cut off at the corner of a chest CT does not count). The limb axis is the
    lever's principal axis, pointing from the centre to the lever's bulk. Cached per volume.
    """
    from scipy.spatial import cKDTree

    cache = _VolumeCache.get(vol)
    if "joints" in cache:
        return cache["joints"]
    names, _ = _vocab_ids()
    shape = np.array(vol.materials.shape[2:], dtype=np.float64) - 1
    corners = np.array([[a, b, c, 1.0] for a in (0, shape[0]) for b in (0, shape[1]) for c in (0, shape[2])])
    world = (vol.materials_affine @ corners.T).T[:, :3]
    lo, hi = world.min(0), world.max(0)
    out: list[JointFrame] = []
    for spec in JOINTS:
        prox, lever = _points_of(vol, spec.proximal), _points_of(vol, spec.lever)
        if len(prox) < MIN_POINTS or len(lever) < MIN_POINTS:
            continue
        d, _ = cKDTree(prox).query(lever, distance_upper_bound=CONTACT_MM)
        contact = lever[np.isfinite(d)]
        if len(contact) < 10:
            continue
        centre = contact.mean(0)
        if spec.kind == "ball":
            ids = [names[n] for n in spec.lever if n in names and names[n] in vol.present_ids]
            head = _head_centre(vol, ids, centre)
            centre = head if head is not None else centre
        mean = lever.mean(0)
        _, _, vt = np.linalg.svd(lever - mean, full_matrices=False)
        axis = vt[0] if vt[0] @ (mean - centre) >= 0 else -vt[0]
        reach = float(((lever - centre) @ axis).max())
        if (
            reach < MIN_LEVER_MM
            or np.any(centre < lo + JOINT_MARGIN_MM)
            or np.any(centre > hi - JOINT_MARGIN_MM)
        ):
            continue
        out.append(JointFrame(spec, centre, axis / np.linalg.norm(axis), reach))
    cache["joints"] = out
    return out


# ------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class VariationParams:
    """Everything drawn for one case; ``to_json`` goes into the case JSON so a case can be reproduced.

    Spatial: ``joints`` (applied first), the elastic field (regenerated from ``elastic_seed``), then
    ``scale`` per world axis about ``scale_centre``. Densities (factors on g/cm³): ``bone_factor`` in full
    on cancellous-density bone and ``cortical_share`` of its change on cortical-density bone;
    ``fat_factor`` / ``lean_factor`` on fat-like / lean soft tissue (blended between 0.95 and 1.02 g/cm³);
    ``air_factor`` on the air channel (mostly lung). ``subcutaneous_mm``: fat layer added (> 0) outside the
    body surface or fat removed (< 0) inside it.
    """

    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale_centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    elastic_seed: int = 0
    elastic_spacing_mm: float = 50.0
    elastic_rms_mm: float = 0.0
    joints: tuple[JointPose, ...] = ()
    subcutaneous_mm: float = 0.0
    bone_factor: float = 1.0
    cortical_share: float = 0.5
    fat_factor: float = 1.0
    lean_factor: float = 1.0
    air_factor: float = 1.0
    analysis_mm: float = ANALYSIS_MM

    @property
    def is_spatial(self) -> bool:
        """Whether the volume must be resampled (scaling alone only changes affines)."""
        return self.elastic_rms_mm > 0 or any(j.angle_deg != 0 for j in self.joints)

    def to_json(self) -> dict[str, Any]:
        return {
            "scale": [round(float(s), 6) for s in self.scale],
            "scale_centre_mm": [round(float(c), 3) for c in self.scale_centre],
            "elastic": {
                "seed": int(self.elastic_seed),
                "spacing_mm": round(float(self.elastic_spacing_mm), 3),
                "rms_mm": round(float(self.elastic_rms_mm), 4),
            },
            "joints": [j.to_json() for j in self.joints],
            "subcutaneous_mm": round(float(self.subcutaneous_mm), 3),
            "bone_factor": round(float(self.bone_factor), 5),
            "cortical_share": round(float(self.cortical_share), 4),
            "fat_factor": round(float(self.fat_factor), 5),
            "lean_factor": round(float(self.lean_factor), 5),
            "air_factor": round(float(self.air_factor), 5),
            "analysis_mm": float(self.analysis_mm),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VariationParams:
        """Inverse of ``to_json`` (to rebuild a case's volume from its JSON)."""
        e = d.get("elastic", {})
        return cls(
            scale=tuple(float(s) for s in d["scale"]),  # type: ignore[arg-type]
            scale_centre=tuple(float(c) for c in d["scale_centre_mm"]),  # type: ignore[arg-type]
            elastic_seed=int(e.get("seed", 0)),
            elastic_spacing_mm=float(e.get("spacing_mm", 50.0)),
            elastic_rms_mm=float(e.get("rms_mm", 0.0)),
            joints=tuple(
                JointPose(j["name"], tuple(j["centre_mm"]), tuple(j["axis"]), float(j["angle_deg"]))
                for j in d.get("joints", [])
            ),
            subcutaneous_mm=float(d.get("subcutaneous_mm", 0.0)),
            bone_factor=float(d.get("bone_factor", 1.0)),
            cortical_share=float(d.get("cortical_share", 0.5)),
            fat_factor=float(d.get("fat_factor", 1.0)),
            lean_factor=float(d.get("lean_factor", 1.0)),
            air_factor=float(d.get("air_factor", 1.0)),
            analysis_mm=float(d.get("analysis_mm", ANALYSIS_MM)),
        )


def volume_centre(vol: PreparedVolume) -> np.ndarray:
    """World position of the material grid's centre (the scaling centre)."""
    shape = np.array(vol.materials.shape[2:], dtype=np.float64) - 1
    return (vol.materials_affine @ np.append(shape / 2, 1.0))[:3]


def sample_variation(rng: np.random.Generator, vol: PreparedVolume, strength: float = 1.0) -> VariationParams:
    """Draw one case's variation; ``strength`` scales every range (0: identity, 1: the ranges below).

    At strength 1: scale 0.85-1.15 per axis; elastic control spacing 40-60 mm, RMS 1.5-5 mm; each joint the
    body allows turned with probability 0.7 within its ``JointSpec.angle_deg`` (ball joints away from the
    body's midline: a hip or shoulder abducts, it does not drive the limb into the trunk); subcutaneous
    fat -6..+15 mm (where the body is thick: scaled down to 20 % on thin limbs); bone density x0.6-1.3;
    fat and lean soft tissue x0.97-1.03 each (about ±30 HU); air channel x0.8-1.25.
    The same number of draws is made whatever the strength, so a seed's other draws do not shift.
    """
    if not (strength >= 0 and math.isfinite(strength)):
        raise ValueError(f"variation strength must be a finite number >= 0, got {strength}")
    s = float(strength)

    def around(lo: float, hi: float, x: float) -> float:  # a draw in [lo, hi] pulled towards 1 by strength
        return 1.0 + (x * (hi - lo) + lo - 1.0) * s

    scale = tuple(around(0.85, 1.15, float(u)) for u in rng.random(3))
    elastic_seed = int(rng.integers(2**31))
    spacing = float(rng.uniform(40.0, 60.0))
    rms = float(rng.uniform(1.5, 5.0)) * s
    subcut = float(rng.uniform(-6.0, 15.0)) * s
    bone = around(0.6, 1.3, float(rng.random()))
    fat = around(0.97, 1.03, float(rng.random()))
    lean = around(0.97, 1.03, float(rng.random()))
    air = around(0.8, 1.25, float(rng.random()))
    joints: list[JointPose] = []
    mid_x = float(np.mean([a[0] for a in vol.anchors.values()])) if vol.anchors else 0.0  # the body's midline
    for jf in find_joints(vol):
        use, u, v = rng.random(), rng.random(), rng.normal(size=3)
        if use >= 0.7:
            continue
        lo, hi = jf.spec.angle_deg
        angle = (lo + u * (hi - lo)) * s
        axis = _joint_axis(jf, v)
        if jf.spec.kind == "ball" and angle != 0:  # abduct, never adduct a limb into the trunk
            tip = jf.centre + jf.limb_axis * jf.lever_mm
            moved = _axis_angle(axis, math.radians(angle)) @ (tip - jf.centre) + jf.centre
            if abs(moved[0] - mid_x) < abs(tip[0] - mid_x):
                angle = -angle
        if jf.spec.flexion_dir is not None:  # positive angle moves the limb's end towards flexion_dir
            r = _axis_angle(axis, math.radians(5.0))
            tip = jf.centre + jf.limb_axis * jf.lever_mm
            moved = r @ (tip - jf.centre) + jf.centre - tip
            if moved @ np.asarray(jf.spec.flexion_dir) < 0:
                axis = -axis
        if angle != 0:
            joints.append(
                JointPose(jf.spec.name, tuple(map(float, jf.centre)), tuple(map(float, axis)), angle)
            )
    return VariationParams(
        scale=scale,  # type: ignore[arg-type]
        scale_centre=tuple(map(float, volume_centre(vol))),  # type: ignore[arg-type]
        elastic_seed=elastic_seed,
        elastic_spacing_mm=spacing,
        elastic_rms_mm=rms,
        joints=tuple(joints),
        subcutaneous_mm=subcut,
        bone_factor=bone,
        fat_factor=fat,
        lean_factor=lean,
        air_factor=air,
    )


def _joint_axis(jf: JointFrame, v: np.ndarray) -> np.ndarray:
    a = jf.limb_axis
    if jf.spec.kind == "ball":
        axis = v
    elif jf.spec.kind == "hinge":
        axis = np.array([1.0, 0.0, 0.0])
        axis = axis - (axis @ a) * a
        if np.linalg.norm(axis) < 0.3:  # limb along world x: any axis across the limb
            axis = v - (v @ a) * a
    else:
        axis = v - (v @ a) * a
    n = np.linalg.norm(axis)
    if n < 1e-9:  # a degenerate draw: any axis across the limb
        axis = np.cross(a, [0.0, 0.0, 1.0]) if abs(a[2]) < 0.9 else np.cross(a, [1.0, 0.0, 0.0])
        n = np.linalg.norm(axis)
    return axis / n


# ------------------------------------------------------------------------------------------ grid helpers


@dataclass
class _Grid:
    """A voxel grid: shape (x, y, z) and its voxel -> world affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def world_to_norm(self) -> np.ndarray:
        """4x4: world mm -> grid_sample coordinates (z, y, x order, align_corners=True, -1..1)."""
        n = np.array(self.shape, dtype=np.float64)
        norm = np.eye(4)
        norm[:3, :3] = np.diag(2.0 / np.maximum(n - 1, 1))
        norm[:3, 3] = -1.0
        perm = np.eye(4)[[2, 1, 0, 3]]
        return perm @ norm @ np.linalg.inv(self.affine)

    def world(self) -> torch.Tensor:
        """(X, Y, Z, 3) float32 world mm of every voxel centre."""
        idx = torch.stack(
            torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in self.shape), indexing="ij")
        )
        a = torch.from_numpy(self.affine)
        w = torch.einsum("ij,jxyz->xyzi", a[:3, :3], idx) + a[:3, 3]
        return w.float()

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def _analysis_grid(vol: PreparedVolume, mm: float) -> tuple[_Grid, tuple[int, int, int]]:
    """A ~``mm`` lattice of the label grid: every ``f``-th label voxel from voxel 0, one plane past the end.

    Being a lattice of the label grid, the map's values there are the label grid's resampling lattice
    (no interpolation needed) and bone masks are read from the label bits by striding.
    """
    lab = _Grid(tuple(vol.label_bits.shape[1:]), vol.labels_affine)  # type: ignore[arg-type]
    f = tuple(max(1, round(mm / float(s))) for s in lab.spacing)
    shape = tuple((n - 1 + k - 1) // k + 2 for n, k in zip(lab.shape, f))
    return _Grid(shape, lab.affine @ np.diag([*f, 1.0])), f  # type: ignore[arg-type]


def _sample(field_: torch.Tensor, grid: _Grid, pts: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Trilinear values of ``field_`` (C, X, Y, Z) on ``grid`` at world points (N, 3) -> (N, C)."""
    m = torch.from_numpy(grid.world_to_norm()).float()
    g = pts.float() @ m[:3, :3].T + m[:3, 3]
    out = F.grid_sample(
        field_[None], g.view(1, -1, 1, 1, 3), mode="bilinear", padding_mode=padding, align_corners=True
    )
    return out[0, :, :, 0, 0].T


def _grad(u: torch.Tensor, spacing: np.ndarray) -> torch.Tensor:
    """(C, 3, X, Y, Z) central differences (one-sided at the edges) of (C, X, Y, Z) per mm of each axis."""
    out = torch.zeros(u.shape[0], 3, *u.shape[1:], dtype=u.dtype)
    for k in range(3):
        n = u.shape[1 + k]
        if n < 2:
            continue
        d = out[:, k]
        d.narrow(1 + k, 1, n - 2).copy_((u.narrow(1 + k, 2, n - 2) - u.narrow(1 + k, 0, n - 2)) / 2)
        d.narrow(1 + k, 0, 1).copy_(u.narrow(1 + k, 1, 1) - u.narrow(1 + k, 0, 1))
        d.narrow(1 + k, n - 1, 1).copy_(u.narrow(1 + k, n - 1, 1) - u.narrow(1 + k, n - 2, 1))
        d /= float(spacing[k])
    return out


def _solve3(d: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Solve (I + d) s = r for batches of 3x3 ``d`` (N, 3, 3) by Cramer's rule (batched LAPACK is slower)."""
    a = d + torch.eye(3)
    c0, c1, c2 = a[:, :, 0], a[:, :, 1], a[:, :, 2]
    det = (c0 * torch.linalg.cross(c1, c2)).sum(1).clamp_min(1e-6)
    return (
        torch.stack(
            [
                (r * torch.linalg.cross(c1, c2)).sum(1),
                (c0 * torch.linalg.cross(r, c2)).sum(1),
                (c0 * torch.linalg.cross(c1, r)).sum(1),
            ],
            1,
        )
        / det[:, None]
    )


def _bspline_matrix(n_out: int, extent_mm: float, spacing_mm: float) -> torch.Tensor:
    """(n_out, n_ctrl) cubic B-spline weights: a control lattice every ``spacing_mm`` read at n_out points."""
    n_span = max(1, math.ceil(extent_mm / spacing_mm))
    t = np.linspace(0.0, n_span, n_out) if n_out > 1 else np.zeros(1)
    i = np.minimum(np.floor(t).astype(int), n_span - 1)
    u = t - i
    w = np.stack([(1 - u) ** 3, 3 * u**3 - 6 * u**2 + 4, -3 * u**3 + 3 * u**2 + 3 * u + 1, u**3], 1) / 6.0
    m = np.zeros((n_out, n_span + 3))
    for k in range(4):
        m[np.arange(n_out), i + k] = w[:, k]
    return torch.from_numpy(m).float()


def elastic_field(params: VariationParams, grid: _Grid) -> torch.Tensor:
    """(3, X, Y, Z) world-mm backward displacement on ``grid``: B-spline of normal control displacements,
    scaled to ``elastic_rms_mm`` and then down, if needed, so its Jacobian deviation stays under
    ``MAX_ELASTIC_GRAD`` (then ``x + u(x)`` is one-to-one: no folds)."""
    ext = (np.array(grid.shape) - 1) * grid.spacing
    mats = [_bspline_matrix(n, float(e), params.elastic_spacing_mm) for n, e in zip(grid.shape, ext)]
    rng = np.random.default_rng(params.elastic_seed)
    ctrl = torch.from_numpy(rng.standard_normal((3, *(m.shape[1] for m in mats)))).float()
    u = torch.einsum("xa,cabd->cxbd", mats[0], ctrl)
    u = torch.einsum("yb,cxbd->cxyd", mats[1], u)
    u = torch.einsum("zd,cxyd->cxyz", mats[2], u)
    rms = float(u.square().sum(0).mean().sqrt())
    u = u * (params.elastic_rms_mm / max(rms, 1e-12))
    g = float(_grad(u, grid.spacing).square().sum((0, 1)).sqrt().max()) if u.numel() > 1 else 0.0
    if g > MAX_ELASTIC_GRAD:
        u = u * (MAX_ELASTIC_GRAD / g)
    return u


# -------------------------------------------------------------------------------------------- the map


@dataclass
class _Segment:
    """Bones moving with one chain of joints, and that chain's forward rigid map x -> R x + t."""

    ids: list[int]
    rot: np.ndarray
    trans: np.ndarray


def _segments(vol: PreparedVolume, joints: tuple[JointPose, ...]) -> list[_Segment]:
    """Group the posed bones by the chain of joints that moves them; compose each chain distal-first."""
    names, _ = _vocab_ids()
    active = [j for j in joints if j.angle_deg != 0]
    for j in active:
        if j.name not in JOINTS_BY_NAME:
            raise ValueError(
                f"unknown joint {j.name!r} in variation params (known: {', '.join(JOINTS_BY_NAME)})"
            )
    order = {j.name: n for n, j in enumerate(JOINTS)}  # proximal before distal within a limb
    active.sort(key=lambda j: order[j.name])
    present = set(vol.present_ids)
    chains: dict[tuple[str, ...], list[int]] = {}
    for name, lid in names.items():
        if lid not in present:
            continue
        chain = tuple(j.name for j in active if name in JOINTS_BY_NAME[j.name].distal)
        if chain:
            chains.setdefault(chain, []).append(lid)
    by_name = {j.name: j for j in active}
    segs = []
    for chain, ids in sorted(chains.items()):
        r, t = np.eye(3), np.zeros(3)
        for jn in chain:  # x -> R_prox (... (R_dist x + t_dist) ...) + t_prox
            rj, tj = by_name[jn].rotation()
            r, t = r @ rj, r @ tj + t
        segs.append(_Segment(sorted(ids), r, t))
    return segs


class _VolumeCache:
    """What depends only on the body, not on the case: computed once per volume, reused for every case.

    Keyed by the identity of the volume's tensors and dropped when they are freed, so a worker that keeps
    one ``PreparedVolume`` and varies it per case pays the distance transforms once.
    """

    _store: ClassVar[dict[int, dict[str, Any]]] = {}

    @classmethod
    def get(cls, vol: PreparedVolume) -> dict[str, Any]:
        key = id(vol.label_bits)
        entry = cls._store.get(key)
        if (
            entry is None
            or entry["materials"]() is not vol.materials
            or entry["bits"]() is not vol.label_bits
        ):
            entry = {"materials": weakref.ref(vol.materials), "bits": weakref.ref(vol.label_bits), "own": {}}
            cls._store[key] = entry
            weakref.finalize(vol.label_bits, cls._store.pop, key, None)
        return entry


def _analysis(vol: PreparedVolume, mm: float) -> tuple[_Grid, tuple[int, int, int]]:
    c = _VolumeCache.get(vol)
    if c.get("grid_mm") != mm:
        c["grid"], c["grid_f"], c["grid_mm"] = *_analysis_grid(vol, mm), mm
        for k in ("sd", "labelled", "density", "occupied"):
            c.pop(k, None)
        c["own"] = {}
    return c["grid"], c["grid_f"]


def _group_mask(
    bits: torch.Tensor, vol: PreparedVolume, ids: set[int], f: tuple[int, int, int], shape: tuple[int, ...]
) -> np.ndarray:
    """Bool mask of any of ``ids`` on the analysis grid: the label grid read every ``f`` voxels, grown by one
    analysis voxel so a bone thinner than the stride is not lost (ownership is coarse anyway)."""
    row = {lid: n for n, lid in enumerate(vol.present_ids)}
    masks = torch.zeros(bits.shape[0], dtype=torch.int32)
    for lid in ids:
        if lid in row:
            c, b = divmod(row[lid], BITS_PER_CHANNEL)
            masks[c] |= 1 << b
    sub = bits[:, :: f[0], :: f[1], :: f[2]]
    hit = torch.zeros(shape, dtype=torch.bool)
    view = hit[: sub.shape[1], : sub.shape[2], : sub.shape[3]]
    for c in torch.nonzero(masks).flatten().tolist():
        view |= (sub[c].to(torch.int32) & masks[c]) != 0
    grown = F.max_pool3d(hit[None, None].float(), kernel_size=3, stride=1, padding=1)
    return grown[0, 0].numpy() > 0


def _ownership(
    vol: PreparedVolume, segs: list[_Segment], grid: _Grid, f: tuple[int, int, int]
) -> torch.Tensor:
    """(1 + K, X, Y, Z) weights on the analysis grid: static skeleton, then each segment; sum 1 per voxel.

    Inverse-square distance to each bone group: inside a bone its group owns the voxel outright; in soft
    tissue the nearer bone dominates and the weights cross over smoothly halfway between bones.
    """
    from scipy import ndimage

    cache = _VolumeCache.get(vol)["own"]
    key = tuple(tuple(s.ids) for s in segs)
    if key in cache:
        return cache[key]
    _, bone_ids = _vocab_ids()
    moving = {i for s in segs for i in s.ids}
    groups = [set(bone_ids) - moving] + [set(s.ids) for s in segs]
    inv = []
    for ids in groups:
        m = _group_mask(vol.label_bits, vol, ids, f, grid.shape)
        if not m.any():
            inv.append(np.zeros(grid.shape, dtype=np.float32))
            continue
        d = ndimage.distance_transform_edt(~m, sampling=grid.spacing)
        inv.append((1.0 / (d + OWNERSHIP_EPS_MM) ** 2).astype(np.float32))
    w = torch.from_numpy(np.stack(inv))
    w = w / w.sum(0, keepdim=True).clamp_min(1e-30)
    if len(cache) >= 8:
        cache.pop(next(iter(cache)))
    cache[key] = w
    return w


def _body_density(vol: PreparedVolume, grid: _Grid) -> np.ndarray:
    """Total density (g/cm³) of ``vol`` read at the analysis grid's voxel centres (cached per volume)."""
    c = _VolumeCache.get(vol)
    if "density" not in c:
        mgrid = _Grid(tuple(vol.materials.shape[2:]), vol.materials_affine)  # type: ignore[arg-type]
        total = vol.materials[0].float().sum(0, keepdim=True)
        d = _sample(total, mgrid, grid.world().reshape(-1, 3), padding="zeros")[:, 0].reshape(grid.shape)
        c["density"] = d.numpy()
    return c["density"]


def _body_distance(vol: PreparedVolume, grid: _Grid) -> torch.Tensor:
    """(2, X, Y, Z) on the analysis grid: signed distance (mm, negative inside) to the body surface, and
    the habitus scale there (cached per volume).

    The body is the largest connected region of total density > 0.5 g/cm³ (so a couch is not body). The
    habitus scale is the body's local half-thickness (the radius of the largest inscribed ball covering
    the voxel, in steps of ``HABITUS_RADII_MM``) over ``HABITUS_FULL_MM``, clipped to 0.2..1: a trunk takes
    the drawn subcutaneous change in full, a forearm about a quarter of it, so 10 mm more fat is an obese
    abdomen, not a forearm doubled in width.
    """
    from scipy import ndimage

    c = _VolumeCache.get(vol)
    if "sd" in c:
        return c["sd"]
    body = _body_density(vol, grid) > HABITUS_BODY_DENSITY
    lab, n = ndimage.label(body)
    if n > 1:
        body = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    if n == 0:
        sd = np.full(grid.shape, 1e4, dtype=np.float32)
        scale = np.zeros(grid.shape, dtype=np.float32)
    else:
        sp = grid.spacing
        inside = ndimage.distance_transform_edt(body, sampling=sp)
        outside, nearest = ndimage.distance_transform_edt(~body, sampling=sp, return_indices=True)
        # Distances to the nearest voxel centre across the surface overshoot the surface by half a voxel.
        half = float(sp.min()) / 2
        sd = np.where(body, half - inside, outside - half)
        # Local thickness: the radius of the largest ball inside the body that covers the voxel, from
        # balls of radius r grown back (by r) from the voxels at least r deep; outside, the nearest inside
        # voxel's value.
        thick = np.zeros(grid.shape, dtype=np.float32)
        for r in HABITUS_RADII_MM:
            core = inside >= r
            if not core.any():
                break
            thick[ndimage.distance_transform_edt(~core, sampling=sp) <= r] = r
        thick = thick[tuple(nearest)]
        scale = np.clip(thick / HABITUS_FULL_MM, 0.2, 1.0)
    c["sd"] = torch.from_numpy(np.stack([sd, scale]).astype(np.float32))
    return c["sd"]


def _occupied(vol: PreparedVolume, grid: _Grid, margin_mm: float) -> torch.Tensor:
    """(1, X, Y, Z) 0/1: analysis voxels within ``margin_mm`` (plus one voxel) of anything denser than air."""
    c = _VolumeCache.get(vol).setdefault("occupied", {})
    cells = math.ceil(margin_mm / float(grid.spacing.min())) + 1
    if cells not in c:
        m = torch.from_numpy(_body_density(vol, grid) > OUTSIDE_DENSITY).float()[None, None]
        c[cells] = F.max_pool3d(m, 2 * cells + 1, stride=1, padding=cells)[0]
    return c[cells]


def _outside_fill(vol: PreparedVolume) -> torch.Tensor:
    """(3,) mean densities of the voxels outside the body: what the map's air is filled with."""
    c = _VolumeCache.get(vol)
    if "fill" not in c:
        m = vol.materials[0].float()
        out = (m.sum(0) <= OUTSIDE_DENSITY).to(m.dtype)
        n = float(out.sum())
        # Masked sums, not m[out]: boolean indexing gathers a copy of most of the volume per channel.
        sums = torch.stack([(ch * out).sum(dtype=torch.float64) for ch in m])
        c["fill"] = (sums / n).float() if n > 0 else m.new_zeros(m.shape[0])
    return c["fill"]


def _labelled(vol: PreparedVolume, grid: _Grid) -> torch.Tensor:
    """(1, X, Y, Z) 0/1: analysis voxels within ~2 voxels of a label (where resampled bits may be set)."""
    c = _VolumeCache.get(vol)
    if "labelled" not in c:
        _, f = _analysis(vol, float(c["grid_mm"]))
        any_label = (vol.label_bits != 0).any(0)[None, None].float()
        k = tuple(2 * x + 1 for x in f)  # analysis voxel j covers label voxels f*j - f .. f*j + f
        m = F.max_pool3d(any_label, k, stride=f, padding=f)  # type: ignore[arg-type]
        m = F.pad(
            m, [0, grid.shape[2] - m.shape[4], 0, grid.shape[1] - m.shape[3], 0, grid.shape[0] - m.shape[2]]
        )
        c["labelled"] = F.max_pool3d(m, 5, stride=1, padding=2)[0]
    return c["labelled"]


def _pose_backward(z: torch.Tensor, segs: list[_Segment], own: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """Source positions (N, 3) of posed points ``z`` (N, 3) by inverse skinning (see the module doc).

    Each moving segment claims a point with its ownership at the point's rotated-back position, the
    static skeleton with its ownership at the point itself. Bone beats soft tissue (a static bone is not
    overwritten by turned soft tissue, a turned bone moves rigidly through static soft tissue); between
    soft tissues the moving segment takes precedence; where nobody claims much, the claims are normalised,
    which stretches the tissue in between.
    """
    if not segs:
        return z
    cands, ws = [], []
    for k, s in enumerate(segs):
        r, t = torch.from_numpy(s.rot).float(), torch.from_numpy(s.trans).float()
        x = (z - t) @ r  # R^T (z - t), as rows
        cands.append(x)
        ws.append(_sample(own[1 + k : 2 + k], grid, x)[:, 0])
    w_mov = torch.stack(ws).clamp(0, 1)  # (K, N)
    w0 = _sample(own[:1], grid, z)[:, 0].clamp(0, 1)
    static_bone = _smoothstep(w0, 0.8, 0.95)
    w_mov = w_mov * (1.0 - static_bone * (1.0 - _smoothstep(w_mov, 0.8, 0.95)))
    w0 = w0 * torch.prod(1.0 - w_mov, 0)
    num = (w0 + 1e-6)[:, None] * z
    for w, x in zip(w_mov, cands):
        num = num + w[:, None] * x
    return num / (w0 + w_mov.sum(0) + 1e-6)[:, None]


@dataclass
class SpatialMap:
    """Backward displacement D on the analysis grid: output world y came from source world y + D(y).

    ``disp`` is None for the identity (no pose, no elastic deformation).
    """

    grid: _Grid
    disp: torch.Tensor | None  # (3, X, Y, Z) mm
    segments: list[_Segment] = field(default_factory=list)
    ownership: torch.Tensor | None = None

    def backward(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.disp is None else y + _sample(self.disp, self.grid, y)

    def forward(self, x: np.ndarray, iters: int = 10, tol_mm: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
        """Output positions of source world points ``x`` (N, 3) and the residual |B(y) - x| (mm).

        Starts from the forward blend of the segments' rigid maps (exact for rigidly moved bone), then
        solves B(y) = x by Newton's method on the same interpolated field the grids are resampled through
        (its Jacobian from central differences on the analysis grid), iterating only unconverged points.
        """
        xt = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 3))
        if len(xt) == 0 or self.disp is None:
            return xt.numpy().copy(), np.zeros(len(xt), np.float32)
        y = xt.clone()
        if self.segments and self.ownership is not None:
            w = _sample(self.ownership, self.grid, xt)  # (N, 1+K)
            y = w[:, :1] * xt
            for k, s in enumerate(self.segments):
                r, t = torch.from_numpy(s.rot).float(), torch.from_numpy(s.trans).float()
                y = y + w[:, 1 + k : 2 + k] * (xt @ r.T + t)
        if not hasattr(self, "_dj"):  # displacement and its Jacobian (world axes), 3 + 9 channels
            inv = torch.from_numpy(np.linalg.inv(self.grid.affine[:3, :3])).float()  # d index / d world
            jac = torch.einsum("ckxyz,kw->cwxyz", _grad(self.disp, np.ones(3)), inv)  # dD_c / d world_w
            self._dj = torch.cat([self.disp, jac.reshape(9, *self.disp.shape[1:])])
        # Chord method: the Jacobian is read once, at the start (exact for rigid bone, and the elastic part
        # changes little over the few mm a point moves); each step then reads only the displacement.
        jac = _sample(self._dj[3:], self.grid, y).reshape(-1, 3, 3)
        act = torch.arange(len(y))
        err = torch.zeros(len(y))
        for it in range(iters + 1):
            res = self.backward(y[act]) - xt[act]
            err[act] = res.norm(dim=1)
            keep = res.abs().amax(1) >= tol_mm
            if it == iters or not bool(keep.any()):
                break
            act, res = act[keep], res[keep]
            y[act] = y[act] - _solve3(jac[act], res).clamp(-50, 50)
        return y.numpy(), err.numpy()


def build_map(vol: PreparedVolume, params: VariationParams) -> SpatialMap:
    """The pose + elastic backward map of ``params`` on ``vol``'s analysis grid."""
    grid, f = _analysis(vol, params.analysis_mm)
    if not params.is_spatial:
        return SpatialMap(grid, None)
    y = grid.world().reshape(-1, 3)
    z = y
    if params.elastic_rms_mm > 0:
        z = y + elastic_field(params, grid).permute(1, 2, 3, 0).reshape(-1, 3)
    segs = _segments(vol, params.joints)
    own = _ownership(vol, segs, grid, f) if segs else None
    x = _pose_backward(z, segs, own, grid) if own is not None else z
    disp = (x - y).T.reshape(3, *grid.shape).contiguous()
    return SpatialMap(grid, disp, segs, own)


def _lerp_axis(a: torch.Tensor, axis: int, n_out: int, step: int) -> torch.Tensor:
    """Linear upsampling along ``axis`` of lattice values every ``step`` voxels to ``n_out`` voxels.

    Broadcast lerp between neighbouring lattice planes (no gathers: index_select on inner axes is slow on
    CPU); the lattice must reach past the last voxel: (n - 1) * step >= n_out.
    """
    if step == 1:
        return a.narrow(axis, 0, n_out)
    n = a.shape[axis]
    lo = a.narrow(axis, 0, n - 1).unsqueeze(axis + 1)
    hi = a.narrow(axis, 1, n - 1).unsqueeze(axis + 1)
    shape = [1] * lo.dim()
    shape[axis + 1] = step
    w = (torch.arange(step, dtype=a.dtype) / step).view(shape)
    out = torch.lerp(lo, hi, w)
    return out.flatten(axis, axis + 1).narrow(axis, 0, n_out)


def _pull_rows(
    target: _Grid, smap: SpatialMap, extra: torch.Tensor | None = None, occupied: torch.Tensor | None = None
):
    """Yield (i0, i1, (y0, y1, z0, z1), grid_sample grid (1, r, y1-y0, z1-z0, 3), extra (r, ..., E)) for row
    chunks of ``target``.

    The map is read on a lattice every ~4 mm of ``target`` (the analysis grid itself for the label grid)
    and upsampled linearly, axis by axis: trilinear like a full-resolution read, at a fraction of the cost.
    ``extra`` (E, ...) fields on the analysis grid are read at the source positions alongside. With
    ``occupied`` (a 0/1 field on the analysis grid, already grown by a margin) only the box of each chunk
    whose source may be occupied is yielded (None for a chunk with none): everything outside stays zero.
    """
    shape = np.array(target.shape)
    step = np.maximum(1, np.round(smap.grid.spacing.min() / target.spacing)).astype(int)
    n_lat = (shape - 1 + step - 1) // step + 2  # one lattice plane past the grid: see _lerp_axis
    to_norm = torch.from_numpy(target.world_to_norm()).float()
    on_grid = tuple(n_lat) == smap.grid.shape and np.allclose(
        target.affine @ np.diag([*step, 1]), smap.grid.affine
    )
    if on_grid:  # the analysis grid is this grid's lattice: read the map directly
        y = smap.grid.world().reshape(-1, 3)
        x = y if smap.disp is None else y + smap.disp.permute(1, 2, 3, 0).reshape(-1, 3)
    else:
        idx = [torch.arange(n, dtype=torch.float64) * s for n, s in zip(n_lat, step)]
        lat = torch.stack(torch.meshgrid(*idx, indexing="ij"), -1).reshape(-1, 3)
        aff = torch.from_numpy(target.affine)
        x = smap.backward((lat @ aff[:3, :3].T + aff[:3, 3]).float())
    coords = (x @ to_norm[:3, :3].T + to_norm[:3, 3]).reshape(*n_lat, 3)
    fields = [coords] if extra is None else [coords, _sample(extra, smap.grid, x).reshape(*n_lat, -1)]
    occ = None
    if occupied is not None:
        occ = _sample(occupied, smap.grid, x).reshape(1, 1, *n_lat) > 0
        occ = F.max_pool3d(occ.float(), 3, stride=1, padding=1)[0, 0] > 0  # one lattice cell of margin
    fields = [
        _lerp_axis(_lerp_axis(v, 2, int(shape[2]), int(step[2])), 1, int(shape[1]), int(step[1]))
        for v in fields
    ]
    rows = max(1, CHUNK_VOXELS // int(shape[1] * shape[2]))
    rows = max(int(step[0]), rows - rows % int(step[0]))
    box = (0, int(shape[1]), 0, int(shape[2]))
    for i0 in range(0, int(shape[0]), rows):
        i1 = min(i0 + rows, int(shape[0]))
        j0, j1 = i0 // step[0], min((i1 - 1) // step[0] + 2, n_lat[0])
        if occ is not None:
            o = occ[j0:j1].any(0)
            if not bool(o.any()):
                yield i0, i1, None, None, None
                continue
            ys, zs = torch.nonzero(o.any(1)).flatten(), torch.nonzero(o.any(0)).flatten()
            box = (
                int(ys[0]) * int(step[1]),
                min(int(ys[-1]) * int(step[1]) + 1, int(shape[1])),
                int(zs[0]) * int(step[2]),
                min(int(zs[-1]) * int(step[2]) + 1, int(shape[2])),
            )
        off = i0 - j0 * int(step[0])
        parts = [
            _lerp_axis(v[j0:j1, box[0] : box[1], box[2] : box[3]], 0, i1 - j0 * int(step[0]), int(step[0]))[
                off:
            ]
            for v in fields
        ]
        yield i0, i1, box, parts[0].unsqueeze(0).contiguous(), (parts[1] if len(parts) > 1 else None)


def _pull(data: torch.Tensor, g: torch.Tensor, mode: str) -> torch.Tensor:
    """``data`` (C, X, Y, Z) read at grid ``g``. Past the grid's faces the face is repeated: a limb cut off
    by the CT and turned (or pushed out by the elastic field) shows a continued limb, not a slot of air,
    and labels (read the same way) continue with it."""
    return F.grid_sample(data[None], g, mode=mode, padding_mode="border", align_corners=True)[0]


# ----------------------------------------------------------------------------------------- densities


def _smoothstep(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    t = ((x - lo) / (hi - lo)).clamp(0, 1)
    return t * t * (3 - 2 * t)


def _habitus(mat: torch.Tensor, sd: torch.Tensor, scale: torch.Tensor, h_mm: float, delta: float) -> None:
    """Thicker (``delta`` > 0 mm) or thinner (< 0) subcutaneous fat on a (3, ...) air/soft/bone chunk.

    ``sd`` is the signed distance (mm, negative inside) to the source body surface at each voxel's source
    position and ``scale`` the local habitus scale there (see ``_body_distance``), so the change is
    d = delta * scale. A thicker habitus fills the shell 0 < sd < d with fat; a thinner one removes
    fat-like soft tissue (<= 0.98 g/cm³, no bone) within |d| inside the surface, so no labelled organ or
    muscle loses density. A one-voxel (``h_mm``) ramp keeps the new skin smooth.
    """
    air, soft, bone = mat[0], mat[1], mat[2]
    d = scale * delta
    if delta > 0:
        cover = ((d - sd) / h_mm + 0.5).clamp(0, 1) * (sd > -h_mm)
        add = (cover - ((soft + bone) / FAT_DENSITY).clamp(0, 1)).clamp_min(
            0
        )  # share of the voxel not tissue
        soft.add_(add * FAT_DENSITY)
        air.mul_(1.0 - add)
    elif delta < 0:
        remove = ((sd - d) / h_mm + 0.5).clamp(0, 1) * (sd < h_mm)
        remove = remove * ((soft <= FAT_LIKE_MAX) & (bone <= 1e-3))
        soft.mul_(1.0 - remove)


def _tissue_factors(mat: torch.Tensor, params: VariationParams) -> None:
    """Bone density and tissue jitter on (3, ...) air/soft/bone densities, in place.

    Bone: cancellous-density voxels (<= 1.35 g/cm³) get the full ``bone_factor``, cortical-density ones
    (>= 1.75) ``cortical_share`` of its change. Soft tissue: ``fat_factor`` at <= 0.95 g/cm³ blending to
    ``lean_factor`` at >= 1.02. Air channel: ``air_factor``.
    """
    air, soft, bone = mat[0], mat[1], mat[2]
    if params.bone_factor != 1.0:
        idx = bone.nonzero(as_tuple=True)  # bone is a few % of the voxels
        b = bone[idx]
        cort = _smoothstep(b, 1.35, 1.75)
        bone[idx] = b * (1.0 + (params.bone_factor - 1.0) * (1.0 - (1.0 - params.cortical_share) * cort))
    if params.fat_factor != 1.0 or params.lean_factor != 1.0:
        t = soft.sub(0.95).div_(0.07).clamp_(0, 1)  # smoothstep 0.95 -> 1.02 in place (a full-volume pass)
        t2 = t * t
        t.mul_(-2.0).add_(3.0).mul_(t2)
        soft.mul_(t.mul_(params.lean_factor - params.fat_factor).add_(params.fat_factor))
    if params.air_factor != 1.0:
        air.mul_(params.air_factor)


# ------------------------------------------------------------------------------------------------- api


def apply_variation(vol: PreparedVolume, params: VariationParams) -> PreparedVolume:
    """A new ``PreparedVolume`` with ``params`` applied; ``vol`` is left untouched.

    One map for both grids (materials trilinear, label bits nearest, read in row chunks straight into the
    output); density edits on each materials chunk as it is made; scaling last, as the grids' affines.
    Anchors and points go through the forward map, then the scaling.
    """
    if any(not (s > 0 and math.isfinite(s)) for s in params.scale):
        raise ValueError(f"variation scale factors must be finite and > 0, got {params.scale}")
    smap = build_map(vol, params)
    mats_in = vol.materials[0].float()
    mgrid = _Grid(tuple(mats_in.shape[1:]), vol.materials_affine)  # type: ignore[arg-type]
    delta = params.subcutaneous_mm
    sd = _body_distance(vol, smap.grid) if delta != 0 else None
    mats = mats_in.clone() if smap.disp is None else torch.empty_like(mats_in)
    if smap.disp is not None or sd is not None:
        # Only the box of each row chunk whose source is body (or within the habitus margin) is read;
        # the rest is air outside the body, filled with the body's mean outside densities.
        h = float(mgrid.spacing.max())
        occ = _occupied(vol, smap.grid, max(delta, 0.0) + 2 * h)
        fill = _outside_fill(vol).view(3, 1, 1, 1)
        for i0, i1, box, g, extra in _pull_rows(mgrid, smap, sd, occ):
            if smap.disp is not None:
                mats[:, i0:i1] = fill
            if g is not None:
                part = mats[:, i0:i1, box[0] : box[1], box[2] : box[3]]
                if smap.disp is not None:
                    part.copy_(_pull(mats_in, g, "bilinear"))
                if extra is not None:
                    _habitus(part, extra[..., 0], extra[..., 1], h, delta)
            _tissue_factors(mats[:, i0:i1], params)  # chunk by chunk, while it is in cache
    else:
        _tissue_factors(mats, params)
    if smap.disp is None:
        bits = vol.label_bits.clone()
        anchors = {k: np.array(v, dtype=np.float64) for k, v in vol.anchors.items()}
        points = {k: np.array(v, dtype=np.float32) for k, v in vol.points.items()}
    else:
        bits = torch.zeros_like(vol.label_bits)
        lgrid = _Grid(tuple(bits.shape[1:]), vol.labels_affine)  # type: ignore[arg-type]
        for i0, i1, box, g, _ in _pull_rows(lgrid, smap, occupied=_labelled(vol, smap.grid)):
            if g is not None:
                y0, y1, z0, z1 = box
                bits[:, i0:i1, y0:y1, z0:z1] = _pull(vol.label_bits, g, "nearest")
        ids = list(vol.anchors)
        a, _ = smap.forward(np.stack([vol.anchors[i] for i in ids])) if ids else (np.zeros((0, 3)), None)
        anchors = {i: a[n].astype(np.float64) for n, i in enumerate(ids)}
        keys = list(vol.points)
        sizes = [len(vol.points[k]) for k in keys]
        flat = np.concatenate([vol.points[k] for k in keys]) if keys else np.zeros((0, 3), np.float32)
        p, _ = smap.forward(flat)
        points = {k: s.astype(np.float32) for k, s in zip(keys, np.split(p, np.cumsum(sizes)[:-1]))}
    s = np.diag([*params.scale, 1.0])
    c = np.asarray(params.scale_centre, dtype=np.float64)
    s[:3, 3] = c - np.asarray(params.scale) * c
    return PreparedVolume(
        name=vol.name,
        materials=mats[None].contiguous(),
        materials_affine=s @ vol.materials_affine,
        label_bits=bits,
        labels_affine=s @ vol.labels_affine,
        present_ids=list(vol.present_ids),
        anchors={k: s[:3, :3] @ v + s[:3, 3] for k, v in anchors.items()},
        points={k: (v @ s[:3, :3].T + s[:3, 3]).astype(np.float32) for k, v in points.items()},
    )


# --------------------------------------------------------------------------------------------- preview


def preview(
    vol: PreparedVolume,
    seeds: list[int],
    out_dir: str,
    size: int = 320,
    strength: float = 1.0,
    field_mm: float = 400.0,
) -> list[str]:
    """Before/after DRRs of ``vol`` (AP and lateral, aimed at the first turned joint or the volume centre)
    for each seed, each also with
    its bone label outlines drawn over it: the check that labels stayed on the deformed anatomy."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    from train.synth.geometry import Camera
    from train.synth.physics import PhysicsParams, form_image
    from train.synth.projector import Projector

    _, bone_ids = _vocab_ids()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phys = PhysicsParams()

    def render(v: PreparedVolume, prim: float) -> tuple[np.ndarray, np.ndarray]:
        cam = Camera(size, size, field_mm / size, 1200.0, 900.0, prim, 0.0, centre, view="preview")
        p = Projector(v).project(cam)
        img = form_image(p.line_integrals, phys, torch.Generator().manual_seed(0)).numpy()
        bones = [i for n, i in enumerate(p.label_ids) if i in bone_ids]
        lab = np.zeros((size, size), np.int32)
        for i in bones:
            lab[p.label_hits[p.label_ids.index(i)].numpy()] = i
        return img, lab

    paths = []
    for seed in seeds:
        params = sample_variation(np.random.default_rng(seed), vol, strength)
        # aimed at the first turned joint, if any (that is what to look at), else the volume's centre
        centre = params.joints[0].centre if params.joints else tuple(float(v) for v in volume_centre(vol))
        t0 = time.perf_counter()
        var = apply_variation(vol, params)
        dt = time.perf_counter() - t0
        fig, axes = plt.subplots(2, 4, figsize=(20, 10))
        for row, prim in enumerate((0.0, 90.0)):
            view = "AP" if prim == 0 else "lateral"
            for col, (v, title) in enumerate(((vol, "body"), (var, "varied"))):
                img, lab = render(v, prim)
                edges = ((lab != np.roll(lab, 1, 0)) | (lab != np.roll(lab, 1, 1))) & (lab > 0)
                overlay = np.zeros((size, size, 4))
                overlay[edges] = (1.0, 0.2, 0.2, 0.9)
                for k, show in enumerate((False, True)):
                    ax = axes[row, 2 * col + k]
                    ax.imshow(img, cmap="gray")
                    if show:
                        ax.imshow(overlay)
                    ax.set_title(f"{title} ({view}){' + bone labels' if show else ''}")
                    ax.axis("off")
        j = params.to_json()
        joints = ", ".join(f"{p['name']} {p['angle_deg']:.0f}°" for p in j["joints"]) or "none"
        fig.suptitle(
            f"seed {seed}: scale {j['scale']}, elastic {j['elastic']['rms_mm']:.1f} mm @ "
            f"{j['elastic']['spacing_mm']:.0f} mm, joints {joints}, subcut {j['subcutaneous_mm']:+.1f} mm, "
            f"bone x{j['bone_factor']:.2f}, fat x{j['fat_factor']:.2f}, lean x{j['lean_factor']:.2f}, "
            f"air x{j['air_factor']:.2f} ({dt:.2f} s)",
            fontsize=9,
        )
        fig.tight_layout()
        path = out / f"{vol.name}_seed{seed}.png"
        fig.savefig(path, dpi=70)
        plt.close(fig)
        paths.append(str(path))
    return paths


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="before/after DRRs of a body under per-case variation")
    ap.add_argument("--out", default="out/variation_preview")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument(
        "--volume", default=None, help="a saved PreparedVolume (.npz); default: the bundled chest CT"
    )
    a = ap.parse_args()
    if a.volume:
        v = PreparedVolume.load(a.volume)
    else:
        from train.synth.ct_source import load_ct
        from train.synth.volume import prepare_volume

        v = prepare_volume(load_ct("bundled"))
    print("\n".join(preview(v, a.seeds, a.out, strength=a.strength)))
