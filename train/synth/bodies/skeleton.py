"""Skeleton bodies voxelised from OpenSim's bone meshes, inside a synthetic soft-tissue envelope.

Source: ``opensim-org/opensim-models``, the full-body model of Rajagopal et al. (2016)
(``Models/Rajagopal/Rajagopal2016.osim``): pelvis, legs, feet, a torso with skull, jaw, spine and rib cage,
and arms with every carpal, metacarpal and phalanx. Its meshes sit in each segment's frame; ``osim.py``
composes the joints from ground to every segment for a pose, ``voxelise.py`` fills the meshes on a grid.

Several meshes hold several bones, which are split into connected pieces and named by anatomy:

* ``hat_spine.vtp``: 24 vertebrae (pieces with >= 100 vertices; the rest are intervertebral discs, which
  are not bone and are left out), C1..C7, T1..T12, L1..L5 from the top down;
* ``hat_ribs_scap.vtp``: the sternum (the piece across the midline), per side the scapula and clavicle
  (the two largest pieces) and 12 ribs, numbered by the height of their vertebral end (costal cartilage is
  part of each rib mesh, so it is labelled rib);
* ``r_foot.vtp`` / ``l_foot.vtp``: 5 metatarsals (long pieces in the forefoot) and the other tarsals;
  ``*_bofoot.vtp``: the toe phalanges.

Laterality: OpenSim's ground has x anterior, y superior, z to the model's right. The project's world is
NIfTI RAS+ (``train/synth/geometry.py``; the bundled chest CT has its heart and left lung at -x), so
RAS = (z, x, y) in millimetres and a right bone lands at +x. Each build checks that every ``*_left`` bone
lies at -x of every ``*_right`` one.

A whole skeleton at 1 mm would be ~500 x 300 x 1700 voxels, so it is registered as several bodies (regions
with their own pose and voxel size), each under ~31 M voxels so one loads in a few hundred MB.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from train.synth.bodies import BodySpec, register
from train.synth.bodies.osim import OsimModel, read_osim
from train.synth.bodies.voxelise import MeshError, repair_mesh, split_components, voxelise
from train.synth.bodies.vtp import TriMesh, read_vtp

SOURCE_KEY = "opensim-models"
MODEL = "Models/Rajagopal/Rajagopal2016.osim"
SOURCE = f"https://github.com/opensim-org/opensim-models, {MODEL} and the .vtp meshes it references"
LICENCE = (
    "not stated for this model: the repository has no licence file, Rajagopal2016.osim and "
    "Models/Rajagopal/README.txt name authors and the publication (Rajagopal et al. 2016, IEEE TBME) only. "
    "The same mesh files (hat_spine, hat_skull, hat_jaw, femur, patella, fibula, foot) are used by models in "
    "the same repository whose <credits> state 'License: Creative Commons (CCBY 3.0)' (gait2392, gait2354, "
    "leg6dof9musc, arm26); OpenSim software itself is Apache-2.0"
)
USE = (
    "research use with attribution to Rajagopal et al. (2016) and the OpenSim team; CC BY 3.0 (commercial "
    "use allowed, with credit) where the repository states it; confirm the Rajagopal model's terms at "
    "simtk.org/projects/full_body before redistributing built volumes"
)

# OpenSim ground (x anterior, y superior, z right) in metres -> NIfTI RAS+ in millimetres.
OPENSIM_TO_RAS = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]) * 1000.0

# The skull mesh is the outer surface of the whole head's bone, so filled it would be a solid block of bone;
# the cranial vault is a shell ~5-7 mm thick (diploe included) around the brain, so only the outer
# HOLLOW_MM of it is kept as skull and the inside is left to soft tissue.
HOLLOW_MM = {"hat_skull.vtp": 6.0}

# Rajagopal's own right femur (Models/Rajagopal/Geometry/r_femur.vtp) is a 132-vertex stand-in with 15
# non-manifold edges, while its left femur is the closed 456-vertex mesh; Geometry/femur_r.vtp is that
# mesh's mirror in the same frame (bounding boxes agree within 4 mm), so both sides get the same bone.
MESH_SUBSTITUTES = {"r_femur.vtp": "femur_r.vtp"}

CARPALS = ("pisiform", "lunate", "scaphoid", "triquetrum", "hamate", "capitate", "trapezoid", "trapezium")
_FINGER = re.compile(
    r"^(index|middle|ring|little)_(proximal|medial|distal)_[rl]vs\.vtp$|^thumb_(proximal|distal)_[rl]vs\.vtp$"
)
_WHOLE = {  # mesh file (side stripped) -> structure stem; the side is appended
    "pelvis": "hip",
    "femur": "femur",
    "tibia": "tibia",
    "fibula": "fibula",
    "patella": "patella",
    "talus": "tarsals",
    "humerus": "humerus",
    "ulna": "ulna",
    "radius": "radius",
}
_MIDLINE = {"sacrum.vtp": "sacrum", "hat_skull.vtp": "skull", "hat_jaw.vtp": "skull"}
SPINE = [f"vertebrae_C{i}" for i in range(1, 8)] + [f"vertebrae_T{i}" for i in range(1, 13)]
SPINE += [f"vertebrae_L{i}" for i in range(1, 6)]


@dataclass
class Piece:
    """One bone ready to voxelise: its structure, mesh (RAS mm, closed), and the mesh file it came from."""

    structure: str
    mesh: TriMesh
    source: str
    repairs: list[str] = field(default_factory=list)


def side_of(mesh_file: str) -> str | None:
    """'right' / 'left' from OpenSim's naming (``r_x``, ``x_r``, ``x_rv``, ``x_rvs``), else None."""
    stem = Path(mesh_file).stem
    if re.match(r"^r_", stem) or re.search(r"_r(v|vs)?$", stem):
        return "right"
    if re.match(r"^l_", stem) or re.search(r"_l(v|vs)?$", stem):
        return "left"
    return None


def structure_of(mesh_file: str) -> str | None:
    """Vocabulary structure of a single-bone mesh file, or None when the file holds several bones."""
    name = Path(mesh_file).name
    if name in _MIDLINE:
        return _MIDLINE[name]
    side = side_of(name)
    if side is None:
        return None
    stem = re.sub(r"^[rl]_|_[rl](v|vs)?$", "", Path(name).stem)
    if stem in _WHOLE:
        return f"{_WHOLE[stem]}_{side}"
    if stem in CARPALS:
        return f"carpals_{side}"
    if re.fullmatch(r"metacarpal[1-5]", stem):
        return f"metacarpals_{side}"
    if _FINGER.match(name):
        return f"phalanges_hand_{side}"
    if stem == "bofoot":
        return f"phalanges_feet_{side}"
    return None


def opensim_to_ras(points_m: np.ndarray) -> np.ndarray:
    """OpenSim ground coordinates (m) -> NIfTI RAS+ world (mm)."""
    return np.asarray(points_m, dtype=np.float64) @ OPENSIM_TO_RAS.T


# ---------------------------------------------------------------------------------------------------------
# Splitting the multi-bone meshes (coordinates in the mesh's own segment frame: x anterior, y up, z right)


def _spine(parts: list[TriMesh]) -> list[tuple[str, TriMesh]]:
    vertebrae = [m for m in parts if len(m.vertices) >= 100]
    if len(vertebrae) != len(SPINE):
        raise MeshError(f"{parts[0].source}: expected {len(SPINE)} vertebrae, found {len(vertebrae)}")
    vertebrae.sort(key=lambda m: -m.vertices[:, 1].mean())
    return list(zip(SPINE, vertebrae, strict=True))


def _ribcage(parts: list[TriMesh]) -> list[tuple[str, TriMesh]]:
    src = parts[0].source
    mid = [m for m in parts if m.vertices[:, 2].min() < 0 < m.vertices[:, 2].max()]
    if len(mid) != 1:
        raise MeshError(f"{src}: expected one piece across the midline (sternum), found {len(mid)}")
    out = [("sternum", mid[0])]
    for side, sign in (("right", 1.0), ("left", -1.0)):
        pieces = [m for m in parts if m is not mid[0] and np.sign(m.vertices[:, 2].mean()) == sign]
        pieces.sort(key=lambda m: -len(m.vertices))
        if len(pieces) != 14:
            raise MeshError(
                f"{src}: expected scapula, clavicle and 12 ribs on the {side}, found {len(pieces)} pieces"
            )
        scap, clav, ribs = pieces[0], pieces[1], pieces[2:]
        ext = np.ptp(clav.vertices, axis=0)
        if not (ext[2] > ext[0] and ext[2] > ext[1] and np.ptp(scap.vertices[:, 1]) > 0.1):
            raise MeshError(f"{src}: the {side} scapula/clavicle pieces do not have their expected shape")

        def head_height(m: TriMesh) -> float:  # height of the rib's vertebral (most posterior) end
            x = m.vertices[:, 0]
            return float(m.vertices[x < x.min() + 0.01, 1].mean())

        ribs.sort(key=lambda m: -head_height(m))
        out += [(f"scapula_{side}", scap), (f"clavicula_{side}", clav)]
        out += [(f"rib_{side}_{i + 1}", r) for i, r in enumerate(ribs)]
    return out


def _foot(parts: list[TriMesh], side: str) -> list[tuple[str, TriMesh]]:
    out = []
    for m in parts:
        x = m.vertices[:, 0]
        long_forefoot = np.ptp(x) > 0.05 and x.min() > 0.03
        out.append((f"{'metatarsals' if long_forefoot else 'tarsals'}_{side}", m))
    if sum(s.startswith("metatarsals") for s, _ in out) != 5:
        raise MeshError(f"{parts[0].source}: expected 5 metatarsals among {len(parts)} pieces")
    return out


def label_pieces(mesh_file: str, mesh: TriMesh) -> list[tuple[str, TriMesh]]:
    """(structure, single-bone mesh) for every bone in one mesh file (segment frame)."""
    name = Path(mesh_file).name
    single = structure_of(name)
    if single is not None:
        return [(single, mesh)]
    if name == "hat_spine.vtp":
        return _spine(split_components(mesh))
    if name == "hat_ribs_scap.vtp":
        return _ribcage(split_components(mesh))
    if re.fullmatch(r"[rl]_foot\.vtp", name):
        return _foot(split_components(mesh), side_of(name) or "")
    raise MeshError(f"{mesh_file}: no vocabulary structure is known for this mesh")


# ---------------------------------------------------------------------------------------------------------
# Bodies


@dataclass(frozen=True)
class SkeletonBody:
    """One registered region of the skeleton: which bones, in which pose, at which voxel size."""

    name: str
    description: str
    structures: tuple[str, ...]  # vocabulary structures (or prefixes ending in '*') to include
    spacing_mm: float
    pose_deg: tuple[tuple[str, float], ...] = ()  # coordinate -> degrees (rotations) / mm (translations)
    crop_mm: tuple[tuple[float, float], ...] | None = None  # per RAS axis (lo, hi) in the model's world
    axis: int = 2  # long axis of the body part (for the envelope)
    muscle_mm: float = 25.0  # mean soft-tissue layers of the envelope (a hand's are thinner than a hip's)
    fat_mm: float = 15.0
    margin_mm: float = 55.0  # room around the bones for muscle, fat and skin

    def wants(self, structure: str) -> bool:
        return any(
            structure == s or (s.endswith("*") and structure.startswith(s[:-1])) for s in self.structures
        )


ARM_R = (
    "humerus_right",
    "ulna_right",
    "radius_right",
    "carpals_right",
    "metacarpals_right",
    "phalanges_hand_right",
)
_INF = (-1e9, 1e9)

BODIES = (
    SkeletonBody(
        "opensim_head_neck",
        "skull with mandible and the cervical spine down to T2, 1.0 mm, voxelised from OpenSim meshes",
        ("skull", "vertebrae_C*", "vertebrae_T1", "vertebrae_T2"),
        spacing_mm=1.0,
    ),
    SkeletonBody(
        "opensim_thorax_shoulders",
        "rib cage, sternum, thoracic spine, clavicles, scapulae and humeri (arms at the sides), 1.5 mm",
        (
            "rib_*",
            "sternum",
            "vertebrae_T*",
            "vertebrae_C7",  # (no L1: a lone L1 would give the body a lumbar region it cannot frame)
            "clavicula_*",
            "scapula_*",
            "humerus_*",
        ),
        spacing_mm=1.5,
    ),
    SkeletonBody(
        "opensim_lumbar_pelvis",
        "lumbar spine, sacrum, hip bones and proximal femurs, 1.5 mm",
        ("vertebrae_T11", "vertebrae_T12", "vertebrae_L*", "sacrum", "hip_*", "femur_*"),
        spacing_mm=1.5,
        crop_mm=(_INF, _INF, (650.0, 1e9)),
    ),
    SkeletonBody(
        "opensim_knees",
        "both knees: distal femurs, patellae, proximal tibiae and fibulae, 1.25 mm",
        ("femur_*", "patella_*", "tibia_*", "fibula_*"),
        spacing_mm=1.25,
        crop_mm=(_INF, _INF, (270.0, 630.0)),
    ),
    SkeletonBody(
        "opensim_knee_right_flexed",
        "right knee flexed 30 degrees (the usual lateral knee position), 1.0 mm",
        ("femur_right", "patella_right", "tibia_right", "fibula_right"),
        spacing_mm=1.0,
        pose_deg=(("knee_angle_r", 30.0),),
        crop_mm=(_INF, _INF, (280.0, 620.0)),
    ),
    SkeletonBody(
        "opensim_legs_feet",
        "both legs from the distal femur down: knees, lower legs, ankles and feet, 1.5 mm",
        # whole knees (not just the tibial plateau), since any tibia gives the body a knee region
        ("femur_*", "patella_*", "tibia_*", "fibula_*", "tarsals_*", "metatarsals_*", "phalanges_feet_*"),
        spacing_mm=1.5,
        crop_mm=(_INF, _INF, (-1e9, 560.0)),
    ),
    SkeletonBody(
        "opensim_forearm_hand_right",
        "right forearm, wrist and hand hanging at the side, elbow straight, supinated (palm forward), 1.0 mm",
        ARM_R[1:],
        spacing_mm=1.0,
        muscle_mm=9.0,
        fat_mm=5.0,
        margin_mm=30.0,
    ),
    SkeletonBody(
        "opensim_forearm_hand_left",
        "left forearm, wrist and hand, elbow flexed 90 degrees, forearm turned thumb up, 1.0 mm",
        tuple(s.replace("_right", "_left") for s in ARM_R[1:]),
        spacing_mm=1.0,
        # the model's pro_sup 0 is full supination; its maximum, 90, turns the palm to face the body
        pose_deg=(("elbow_flex_l", 90.0), ("pro_sup_l", 90.0)),
        axis=1,
        muscle_mm=9.0,
        fat_mm=5.0,
        margin_mm=30.0,
    ),
)


def _resolve_source(sources_dir: Path) -> Path:
    root = Path(sources_dir) / SOURCE_KEY
    if (root / MODEL).is_file():
        return root
    if (root / "HEAD").is_file() or (
        root / "repo" / "HEAD"
    ).is_file():  # a bare mirror: check out what we read
        git_dir = root if (root / "HEAD").is_file() else root / "repo"
        out = Path(sources_dir) / f"{SOURCE_KEY}-files"
        if not (out / MODEL).is_file():
            out.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(
                ["git", f"--git-dir={git_dir}", "archive", "HEAD", "Models/Rajagopal", "Geometry"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
        return out
    raise MeshError(f"{root}: no {MODEL}; run: fluorosam-train bodies fetch (clones {SOURCE_KEY})")


def _mesh_path(repo: Path, model: OsimModel, mesh_file: str) -> Path:
    """OpenSim's search order: the model's folder, its Geometry/ folder, then the shared Geometry/."""
    mesh_file = MESH_SUBSTITUTES.get(mesh_file, mesh_file)
    for d in (model.path.parent, model.path.parent / "Geometry", repo / "Geometry"):
        if (d / mesh_file).is_file():
            return d / mesh_file
    raise MeshError(f"{mesh_file}: mesh referenced by {model.path.name} not found")


def skeleton_pieces(repo: Path, pose: dict[str, float] | None = None) -> tuple[list[Piece], OsimModel]:
    """Every bone of the model as a closed mesh in RAS millimetres, for the pose (radians / metres)."""
    model = read_osim(repo / MODEL)
    frames = model.body_frames(pose)
    pieces: list[Piece] = []
    cache: dict[str, list[tuple[str, TriMesh, list[str]]]] = {}
    for ref in model.meshes:
        path = _mesh_path(repo, model, ref.mesh_file)
        if path.name not in cache:
            labelled = label_pieces(path.name, read_vtp(path))
            cache[path.name] = [(s, *repair_mesh(m)) for s, m in labelled]
        x = frames[ref.body]
        for structure, mesh, notes in cache[path.name]:
            local = mesh.vertices * np.asarray(ref.scale)
            ground = local @ x[:3, :3].T + x[:3, 3]
            rel = path.relative_to(repo).as_posix() if path.is_relative_to(repo) else path.name
            pieces.append(Piece(structure, TriMesh(opensim_to_ras(ground), mesh.faces, rel), rel, notes))
    return pieces, model


def check_laterality(pieces: list[Piece]) -> None:
    """Every left bone must lie at -x (patient's left in RAS) of every right bone of the same kind."""
    centre: dict[str, list[float]] = {}
    for p in pieces:
        centre.setdefault(p.structure, []).append(float(p.mesh.vertices[:, 0].mean()))
    for s, xs in centre.items():
        if s.endswith("_right") or "_right_" in s:
            other = s.replace("right", "left")
            if other in centre and not max(centre[other]) < min(xs):
                raise MeshError(f"laterality check failed: {other} is not at -x of {s} in RAS")


def build_skeleton_body(body: SkeletonBody, sources_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Voxelise ``body`` from the source checkout under ``sources_dir`` and write the four body files.

    Returns body.json's content (``build.write_body`` adds the grid facts, structures and regions; the
    registry's provenance is added by ``build.build_body``).
    """
    from train.synth.bodies.build import body_seed, write_body
    from train.synth.bodies.envelope import build_envelope
    from train.synth.vocabulary import Vocabulary

    vocab = Vocabulary.load()
    repo = _resolve_source(Path(sources_dir))
    pose = {}
    for k, val in body.pose_deg:
        is_translation = k.endswith(("_tx", "_ty", "_tz"))
        pose[k] = val / 1000.0 if is_translation else np.radians(val)
    pieces, model = skeleton_pieces(repo, pose)
    check_laterality(pieces)
    pieces = [p for p in pieces if body.wants(p.structure)]
    if not pieces:
        raise MeshError(f"body {body.name}: no mesh matches {body.structures}")

    # Grid: the bones' bounding box, cropped, plus room for the soft tissue.
    allv = np.concatenate([p.mesh.vertices for p in pieces])
    lo, hi = allv.min(axis=0), allv.max(axis=0)
    if body.crop_mm is not None:
        crop = np.array(body.crop_mm, dtype=np.float64)
        lo, hi = np.maximum(lo, crop[:, 0]), np.minimum(hi, crop[:, 1])
    cropped = lo.copy(), hi.copy()
    sp = float(body.spacing_mm)
    lo = np.floor((lo - body.margin_mm) / sp) * sp
    hi = np.ceil((hi + body.margin_mm) / sp) * sp
    if body.crop_mm is not None:  # a cropped side is cut flat (as a CT's field of view is), no margin
        crop = np.array(body.crop_mm, dtype=np.float64)
        lo = np.where(crop[:, 0] > -1e8, np.floor(cropped[0] / sp) * sp, lo)
        hi = np.where(crop[:, 1] < 1e8, np.ceil(cropped[1] / sp) * sp, hi)
    shape = tuple(int(n) for n in np.round((hi - lo) / sp).astype(int) + 1)

    labels = np.zeros(shape, dtype=np.uint8)
    instances = np.zeros(shape, dtype=np.int16)
    # big bones first, small ones drawn last so a carpal is not swallowed by a neighbour's surface
    order = sorted(range(len(pieces)), key=lambda i: -_volume(pieces[i].mesh))
    full_vox: dict[str, float] = {}
    inside_vox: dict[str, int] = {}
    for n, i in enumerate(order, start=1):
        p = pieces[i]
        sl, mask = voxelise((p.mesh.vertices - lo) / sp, p.mesh.faces, shape)
        inside_vox[p.structure] = inside_vox.get(p.structure, 0) + int(mask.sum())
        shell = HOLLOW_MM.get(Path(p.source).name)
        if shell is not None and mask.any():
            depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=sp)[1:-1, 1:-1, 1:-1]
            mask &= depth <= shell
        sid = vocab.structure_id(p.structure)
        labels[sl][mask] = sid
        instances[sl][mask] = n
        full_vox[p.structure] = full_vox.get(p.structure, 0.0) + _volume(p.mesh) / sp**3

    seed = body_seed(body.name)
    rng = np.random.default_rng(seed)
    hu = build_envelope(
        instances, (sp, sp, sp), None, rng=rng, muscle_mm=body.muscle_mm, fat_mm=body.fat_mm, axis=body.axis
    )
    affine = np.diag([sp, sp, sp, 1.0])
    affine[:3, 3] = lo
    names = sorted(inside_vox)
    info = {
        "model": {"file": MODEL, "credits": model.credits, "publications": model.publications},
        "pose_deg": dict(body.pose_deg),
        "frame": "NIfTI RAS+ mm (x patient's right, y anterior, z superior); OpenSim x,y,z -> RAS y,z,x",
        # share of each structure's mesh volume inside the grid (< 1 where the box cuts a bone)
        "fraction_inside": {
            k: round(min(1.0, inside_vox[k] / full_vox[k]), 3) for k in names if inside_vox[k]
        },
        "mesh_substitutes": MESH_SUBSTITUTES,
        "mesh_repairs": {p.source: p.repairs for p in pieces if p.repairs},
        "soft_tissue": f"synthetic envelope (train/synth/bodies/envelope.py), seed {seed}, muscle "
        f"{body.muscle_mm} mm, fat {body.fat_mm} mm; bones: cortical shell and cancellous interior",
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return write_body(out_dir, hu, labels, affine, info)


def _volume(mesh: TriMesh) -> float:
    t = mesh.triangles()
    return abs(float(np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6.0))


def _builder(body: SkeletonBody):
    def build(sources_dir: Path, out_dir: Path) -> None:
        build_skeleton_body(body, sources_dir, out_dir)

    return build


for _b in BODIES:
    register(
        BodySpec(
            name=_b.name,
            description=_b.description,
            source=SOURCE,
            licence=LICENCE,
            use=USE,
            sources=(SOURCE_KEY,),
            build=_builder(_b),
        )
    )
