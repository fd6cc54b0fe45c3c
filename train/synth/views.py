"""Named views per anatomical region: C-arm positions and radiographs aimed at the region being treated.

Each view is a pose in the region's anatomical frame plus jitter: ``primary`` turns the beam about the
region's long axis (0 = detector anterior, +90 = detector on the patient's left, as DICOM's primary angle),
``secondary`` tilts it along that axis (+ = detector toward the head / the proximal end, as DICOM's
secondary angle; see ``geometry``). For the trunk, head, hips and shoulders the frame is the patient's
(long axis = +z, anterior = +y), so the angles *are* the DICOM ones; knees, wrists and hands take their
frame from their bones (``landmarks``), so a limb turned at its joint is still imaged AP or lateral. Views of
a right-sided part are mirror images of the left's (primary negated).

Radiographic tilts are named, as surgeons and radiographers do, after the beam of an AP tube in front of the
patient. A C-arm's source is under the table (beam posterior to anterior), so the same line through the
patient has the *detector* on the side the AP beam is tilted *from*: the pelvic inlet view ("beam 25-40°
caudal") is DICOM secondary +25..+40 (detector toward the head), the outlet view ("35-45° cranial") is
secondary -30..-45, and an AP cervical spine with its 15-20° cephalad tube is secondary -10..-20.
Judet views: the obturator oblique of the left acetabulum turns the detector toward the left (LAO +45),
which shows the left iliac wing edge-on; the iliac oblique is RAO -45 (mirrored for the right).

``sample_view`` draws one view, its camera (C-arm: SID 900-1200 mm, magnification 1.3-1.8, table shift;
radiograph: SID 1.0-1.8 m, the part a few cm from a large detector) and its detector look (image
intensifier with its round field and distortion, or flat panel; radiographs are DR plates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train.synth.geometry import Camera, angles_from_direction, carm_camera, sample_radiograph_camera
from train.synth.landmarks import ANTERIOR, SUPERIOR, Anatomy, anatomy_of, unit
from train.synth.physics import PhysicsParams, sample_look_physics
from train.synth.regions import REGIONS, regions_of
from train.synth.vocabulary import Vocabulary
from train.synth.volume import PreparedVolume

P_IMAGE_INTENSIFIER = 0.5  # share of C-arm views with an image intensifier's look (else a flat panel)


@dataclass(frozen=True)
class ViewSpec:
    """One named view of a region: a pose in the region's frame, drawn uniformly in the ranges + jitter."""

    name: str
    primary: tuple[float, float] = (0.0, 0.0)  # degrees, for the left side (mirrored for the right)
    secondary: tuple[float, float] = (0.0, 0.0)
    jitter: float = 3.0  # sd (degrees) added to both angles: a positioning that is never exact
    either_side: bool = False  # primary's sign drawn at random (laterals and obliques of midline parts)
    radiograph: bool = False
    weight: float = 1.0
    side: str | None = None  # aim at this side's part and mirror for the right (pelvic Judet views)


@dataclass(frozen=True)
class RegionImaging:
    """How a region is imaged: its frame, detector sizes, tube voltages, radiograph set-up and views."""

    frame: str  # "body" | "knee" | "hand"
    views: tuple[ViewSpec, ...]
    carm_detector_mm: tuple[float, float] = (300.0, 400.0)
    carm_kvp: tuple[int, int] = (70, 120)
    xr_sdd_mm: tuple[float, float] | None = (1000.0, 1150.0)  # None: the chest's erect/bedside mix
    xr_object_detector_mm: tuple[float, float] = (100.0, 180.0)
    xr_detector_mm: tuple[float, float] = (350.0, 430.0)
    xr_kvp: tuple[int, int] = (70, 90)
    shift_sd_mm: float = 15.0


def _lr(name: str, primary: tuple[float, float], **kw) -> ViewSpec:
    return ViewSpec(name, primary=primary, either_side=True, **kw)


_SPINE_VIEWS = (
    ViewSpec("ap", weight=2.0),
    _lr("lateral", (85.0, 95.0), weight=2.0),
    _lr("oblique", (35.0, 50.0)),
)

IMAGING: dict[str, RegionImaging] = {
    "chest": RegionImaging(
        "body",
        (
            ViewSpec("ap", weight=2.0),
            _lr("lateral", (85.0, 95.0)),
            _lr("oblique", (25.0, 45.0)),
            ViewSpec("radiograph_pa", radiograph=True, weight=1.5),
            ViewSpec("radiograph_ap", radiograph=True),
            _lr("radiograph_lateral", (88.0, 92.0), radiograph=True),
        ),
        xr_sdd_mm=None,
        xr_object_detector_mm=(110.0, 200.0),
        xr_kvp=(80, 125),
    ),
    "pelvis": RegionImaging(
        "body",
        (
            ViewSpec("ap", weight=2.0),
            ViewSpec("inlet", secondary=(25.0, 40.0), weight=1.5),
            ViewSpec("outlet", secondary=(-45.0, -30.0), weight=1.5),
            ViewSpec("judet_obturator_left", primary=(40.0, 50.0), side="left"),
            ViewSpec("judet_obturator_right", primary=(40.0, 50.0), side="right"),
            ViewSpec("judet_iliac_left", primary=(-50.0, -40.0), side="left"),
            ViewSpec("judet_iliac_right", primary=(-50.0, -40.0), side="right"),
            ViewSpec("radiograph_ap", radiograph=True, weight=1.5),
        ),
    ),
    "lumbar_spine": RegionImaging(
        "body",
        (
            *_SPINE_VIEWS,
            ViewSpec("radiograph_ap", radiograph=True, weight=0.7),
            _lr("radiograph_lateral", (88.0, 92.0), radiograph=True, weight=0.7),
        ),
        xr_object_detector_mm=(90.0, 160.0),
        xr_kvp=(75, 100),
    ),
    "thoracic_spine": RegionImaging(
        "body",
        (*_SPINE_VIEWS, _lr("radiograph_lateral", (88.0, 92.0), radiograph=True, weight=0.7)),
        xr_kvp=(75, 100),
    ),
    "cervical_spine": RegionImaging(
        "body",
        (
            ViewSpec("ap", secondary=(-20.0, -10.0), weight=1.5),
            _lr("lateral", (85.0, 95.0), weight=2.0),
            _lr("oblique", (40.0, 50.0), secondary=(-20.0, -10.0)),
            _lr("radiograph_lateral", (88.0, 92.0), radiograph=True),
            ViewSpec("radiograph_ap", secondary=(-20.0, -10.0), radiograph=True, weight=0.5),
        ),
        carm_detector_mm=(230.0, 330.0),
        xr_sdd_mm=(1000.0, 1830.0),
        xr_object_detector_mm=(60.0, 150.0),
        xr_detector_mm=(240.0, 300.0),
        xr_kvp=(65, 85),
        shift_sd_mm=10.0,
    ),
    "skull": RegionImaging(
        "body",
        (
            _lr("lateral", (85.0, 95.0), weight=2.0),
            ViewSpec("pa_caldwell", secondary=(-20.0, -10.0)),
            ViewSpec("towne", secondary=(25.0, 35.0)),
            _lr("radiograph_lateral", (88.0, 92.0), radiograph=True),
        ),
        carm_detector_mm=(230.0, 330.0),
        xr_object_detector_mm=(70.0, 120.0),
        xr_detector_mm=(240.0, 300.0),
        xr_kvp=(70, 85),
        shift_sd_mm=10.0,
    ),
}

for _side in ("left", "right"):
    IMAGING[f"hip_{_side}"] = RegionImaging(
        "body",
        (
            ViewSpec("ap", weight=2.0),
            # Cross-table lateral: beam horizontal and square to the femoral neck (which rises ~40° from
            # the horizontal toward the midline): detector on the hip's side and toward the head.
            ViewSpec("lateral", primary=(80.0, 100.0), secondary=(35.0, 50.0), weight=1.5),
            ViewSpec("radiograph_ap", radiograph=True),
        ),
        carm_detector_mm=(230.0, 330.0),
        carm_kvp=(70, 110),
        xr_detector_mm=(240.0, 350.0),
        shift_sd_mm=10.0,
    )
    IMAGING[f"shoulder_{_side}"] = RegionImaging(
        "body",
        (
            ViewSpec("ap"),
            # Grashey: beam square to the scapular plane (which faces 35-45° anterior), so the glenoid is
            # seen in profile; for the left shoulder the detector turns to the patient's right (RAO).
            ViewSpec("grashey", primary=(-45.0, -35.0), weight=1.5),
            # Scapular Y: beam along the scapular plane.
            ViewSpec("scapular_y", primary=(50.0, 65.0)),
            # Axillary: beam along the body from below, tilted 15-30° from the midline.
            ViewSpec("axillary", primary=(-90.0, -90.0), secondary=(60.0, 75.0), jitter=5.0),
            ViewSpec("radiograph_ap", radiograph=True, weight=0.7),
            ViewSpec("radiograph_grashey", primary=(-45.0, -35.0), radiograph=True, weight=0.5),
        ),
        carm_detector_mm=(230.0, 330.0),
        carm_kvp=(65, 100),
        xr_object_detector_mm=(50.0, 120.0),
        xr_detector_mm=(240.0, 300.0),
        xr_kvp=(65, 85),
        shift_sd_mm=10.0,
    )
    IMAGING[f"knee_{_side}"] = RegionImaging(
        "knee",
        (
            ViewSpec("ap", weight=1.5),
            ViewSpec("lateral", primary=(85.0, 95.0), weight=1.5),
            _lr("oblique", (35.0, 50.0), weight=0.7),
            ViewSpec("radiograph_ap", radiograph=True, weight=0.7),
            ViewSpec("radiograph_lateral", primary=(88.0, 92.0), radiograph=True, weight=0.7),
        ),
        carm_detector_mm=(200.0, 300.0),
        carm_kvp=(55, 80),
        xr_object_detector_mm=(30.0, 80.0),
        xr_detector_mm=(240.0, 300.0),
        xr_kvp=(60, 75),
        shift_sd_mm=8.0,
    )
    for _part, _hand_views in (
        (
            "wrist",
            (
                ViewSpec("pa", weight=1.5),
                ViewSpec("lateral", primary=(85.0, 95.0), weight=1.5),
                ViewSpec("oblique", primary=(40.0, 50.0), weight=0.7),
                ViewSpec("radiograph_pa", radiograph=True, weight=0.7),
                ViewSpec("radiograph_lateral", primary=(88.0, 92.0), radiograph=True, weight=0.7),
                ViewSpec("radiograph_oblique", primary=(40.0, 50.0), radiograph=True, weight=0.5),
            ),
        ),
        (
            "hand",
            (
                ViewSpec("pa", weight=1.5),
                ViewSpec("oblique", primary=(40.0, 50.0)),
                ViewSpec("lateral", primary=(85.0, 95.0), weight=0.7),
                ViewSpec("radiograph_pa", radiograph=True, weight=0.7),
                ViewSpec("radiograph_oblique", primary=(40.0, 50.0), radiograph=True, weight=0.5),
            ),
        ),
    ):
        IMAGING[f"{_part}_{_side}"] = RegionImaging(
            "hand",
            _hand_views,
            carm_detector_mm=(150.0, 250.0),
            carm_kvp=(50, 70),
            xr_object_detector_mm=(15.0, 45.0),
            xr_detector_mm=(180.0, 300.0),
            xr_sdd_mm=(1000.0, 1100.0),
            xr_kvp=(50, 65),
            shift_sd_mm=6.0,
        )

if set(IMAGING) != set(REGIONS):  # pragma: no cover - a region added without views fails at import
    raise RuntimeError(f"views and regions disagree: {sorted(set(IMAGING) ^ set(REGIONS))}")


def views_for_region(region: str) -> list[str]:
    """Full names (``<region>_<view>``) of every view of a region, e.g. ``pelvis_inlet``."""
    _check_region(region)
    return [f"{region}_{v.name}" for v in IMAGING[region].views]


def _check_region(region: str) -> None:
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; known regions: {', '.join(REGIONS)}")


def body_regions(vol: PreparedVolume, vocab: Vocabulary) -> list[str]:
    """Regions this body has (``regions.regions_of`` over its present structures)."""
    return regions_of(anatomy_of(vol, vocab).structure_names)


def require_region(vol: PreparedVolume, vocab: Vocabulary, region: str) -> Anatomy:
    """The body's anatomy, or a one-line error when the region is unknown or the body lacks it."""
    _check_region(region)
    anat = anatomy_of(vol, vocab)
    have = regions_of(anat.structure_names)
    if region not in have:
        raise ValueError(
            f"body {vol.name!r} has no region {region!r} (it has: {', '.join(have) or 'no known region'})"
        )
    return anat


def _side_of(region: str, spec: ViewSpec) -> str | None:
    if spec.side:
        return spec.side
    for s in ("left", "right"):
        if region.endswith("_" + s):
            return s
    return None


def region_aim(anat: Anatomy, region: str, side: str | None = None) -> np.ndarray:
    """Where the region's views are centred: its joint where it has one, else its aim structures' centre.

    Hips aim at the hip joint (the acetabulum when the scan has no femur), shoulders at the glenohumeral
    joint, knees at the knee joint; Judet views (``side`` given for the pelvis) at that side's acetabulum.
    Everything else at the mean centroid of the region's ``aim`` structures present (falling back to its
    ``requires`` structures).
    """
    reg = REGIONS[region]
    part = region.rsplit("_", 1)[0] if side else region
    joints = {
        "hip": (f"femur_{side}", f"hip_{side}"),
        "pelvis": (f"femur_{side}", f"hip_{side}"),
        "shoulder": (f"humerus_{side}", f"scapula_{side}"),
        "knee": (f"femur_{side}", f"tibia_{side}"),
    }
    if side and part in joints:
        j = anat.joint(*joints[part])
        if j is not None:
            return j
        if part == "knee" and anat.knee_frame(side) is not None:
            return anat.knee_frame(side)[0]  # type: ignore[index]
        if part in ("pelvis", "hip") and anat.has(f"hip_{side}"):
            return anat.acetabulum(side)  # type: ignore[return-value]
    c = anat.centroid(*reg.aim)
    if c is None:
        c = anat.centroid(*reg.requires)
    if c is None:  # pragma: no cover - require_region has checked the region is there
        raise ValueError(f"body {anat.vol.name!r} has no structure of region {region!r}")
    return c


def region_frame(anat: Anatomy, region: str, side: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(long axis, anterior) unit vectors the region's view angles are measured in."""
    frame = IMAGING[region].frame
    got = None
    if frame == "knee" and side:
        kf = anat.knee_frame(side)
        got = None if kf is None else (kf[1], kf[2])
    elif frame == "hand" and side:
        hf = anat.hand_frame(side)
        got = None if hf is None else (hf[1], hf[2])
    return got if got is not None else (SUPERIOR.copy(), ANTERIOR.copy())


def beam_direction(
    long_axis: np.ndarray, anterior: np.ndarray, primary: float, secondary: float
) -> np.ndarray:
    """Isocentre->detector direction for angles in a frame; in the body frame this equals ``beam_axes``."""
    a, b = np.deg2rad(primary), np.deg2rad(secondary)
    left = np.cross(long_axis, anterior)  # +90° primary: the detector on the patient's left
    return unit(np.cos(b) * (np.cos(a) * anterior + np.sin(a) * left) + np.sin(b) * long_axis)


def view_pose(
    rng: np.random.Generator, anat: Anatomy, region: str, spec: ViewSpec
) -> tuple[np.ndarray, float, float]:
    """(aim point, DICOM primary, DICOM secondary) of one draw of a view."""
    side = _side_of(region, spec)
    prim = float(rng.uniform(*spec.primary) + rng.normal(0.0, spec.jitter))
    sec = float(rng.uniform(*spec.secondary) + rng.normal(0.0, spec.jitter))
    if spec.either_side and rng.random() < 0.5:
        prim = -prim
    if side == "right":
        prim = -prim
    long_axis, anterior = region_frame(anat, region, side)
    v = beam_direction(long_axis, anterior, prim, sec)
    p, s = angles_from_direction(v)
    return inside_volume(anat.vol, region_aim(anat, region, side)), p, s


def inside_volume(vol: PreparedVolume, point: np.ndarray, margin_mm: float = 60.0) -> np.ndarray:
    """``point`` moved, axis by axis, at least ``margin_mm`` inside the CT's extent (where the CT is wide
    enough), so a view of a structure cut by the scan's edge is not half empty."""
    shape = np.array(vol.materials.shape[2:], dtype=np.float64) - 1
    corners = np.array([[a, b, c, 1.0] for a in (0, shape[0]) for b in (0, shape[1]) for c in (0, shape[2])])
    w = (vol.materials_affine @ corners.T).T[:, :3]
    lo, hi = w.min(0) + margin_mm, w.max(0) - margin_mm
    out = np.asarray(point, dtype=np.float64).copy()
    ok = lo <= hi
    out[ok] = np.clip(out[ok], lo[ok], hi[ok])
    return out


def _spec(region: str, view: str) -> ViewSpec:
    short = view[len(region) + 1 :] if view.startswith(region + "_") else view
    for v in IMAGING[region].views:
        if v.name == short:
            return v
    known = ", ".join(views_for_region(region))
    raise ValueError(f"unknown view {view!r} of region {region!r}; its views: {known}")


def _usable(anat: Anatomy, spec: ViewSpec) -> bool:
    return spec.side is None or anat.has(f"hip_{spec.side}")


def sample_view(
    rng: np.random.Generator,
    vol: PreparedVolume,
    vocab: Vocabulary,
    region: str,
    size: int,
    view: str | None = None,
) -> tuple[Camera, PhysicsParams, str]:
    """One view of ``region`` of this body: (camera, physics, full view name such as ``pelvis_inlet``).

    ``view`` picks a named view (short or full name); None draws one by the region's view weights. Raises a
    one-line ``ValueError`` when the body has no such region.
    """
    anat = require_region(vol, vocab, region)
    img = IMAGING[region]
    if view is None:
        specs = [v for v in img.views if _usable(anat, v)]
        w = np.array([v.weight for v in specs])
        spec = specs[int(rng.choice(len(specs), p=w / w.sum()))]
    else:
        spec = _spec(region, view)
    name = f"{region}_{spec.name}"
    aim, prim, sec = view_pose(rng, anat, region, spec)
    if spec.radiograph:
        cam = sample_radiograph_camera(
            rng,
            aim,
            size,
            primary_deg=prim,
            secondary_deg=sec,
            sdd_mm=img.xr_sdd_mm,
            object_detector_mm=img.xr_object_detector_mm,
            detector_mm=img.xr_detector_mm,
            shift_sd_mm=img.shift_sd_mm * 0.6,
            view=name,
        )
        phys = sample_look_physics(rng, size, "radiograph", kvp=img.xr_kvp)
        return cam, phys, name
    look = "image_intensifier" if rng.random() < P_IMAGE_INTENSIFIER else "flat_panel"
    distortion = (0.0, 0.0)
    if look == "image_intensifier":
        distortion = (float(rng.uniform(0.02, 0.08)), float(rng.uniform(-0.05, 0.05)))
    cam = carm_camera(
        rng,
        aim,
        prim,
        sec,
        size,
        view=name,
        detector_mm=img.carm_detector_mm,
        shift_sd_mm=img.shift_sd_mm,
        distortion=distortion,
    )
    phys = sample_look_physics(rng, size, look, kvp=img.carm_kvp)
    return cam, phys, name
