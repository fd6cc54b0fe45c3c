"""User STL tools: reading, exact ray/mesh path lengths against closed forms, masks vs silhouettes, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from train.synth.geometry import Camera
from train.synth.materials import MATERIAL_INDEX, MATERIALS
from train.synth.mesh import MeshTool, STLError, STLSpec, place_on_anatomy, read_stl, signed_volume, write_stl
from train.synth.projector import Projector
from train.synth.volume import PreparedVolume


def box_triangles(lo, hi) -> np.ndarray:
    """12 outward-wound triangles of an axis-aligned box (each face split along a diagonal)."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    c = np.array([[(hi if (i >> k) & 1 else lo)[k] for k in range(3)] for i in range(8)])
    quads = [(0, 2, 6, 4), (1, 5, 7, 3), (0, 4, 5, 1), (2, 3, 7, 6), (0, 1, 3, 2), (4, 6, 7, 5)]
    tris = []
    for a, b, cc, d in quads:
        tris += [[c[a], c[b], c[cc]], [c[a], c[cc], c[d]]]
    t = np.array(tris)
    return t if signed_volume(t) > 0 else t[:, [0, 2, 1]]


def tetra_triangles(p: np.ndarray) -> np.ndarray:
    t = np.array([[p[0], p[1], p[2]], [p[0], p[1], p[3]], [p[0], p[2], p[3]], [p[1], p[2], p[3]]])
    cen = p.mean(0)  # orient each face outward, independently of the mesh code
    for i, f in enumerate(t):
        n = np.cross(f[1] - f[0], f[2] - f[0])
        if n @ (f[0] - cen) < 0:
            t[i] = f[[0, 2, 1]]
    return t


def slab_length(src: np.ndarray, d: np.ndarray, lo, hi) -> np.ndarray:
    """Closed-form chord of rays src + t·d (t > 0) through an axis-aligned box."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ta, tb = (np.asarray(lo) - src) / d, (np.asarray(hi) - src) / d
    t0 = np.nanmax(np.minimum(ta, tb), 1).clip(0)
    t1 = np.nanmin(np.maximum(ta, tb), 1)
    return np.clip(t1 - t0, 0, None)


def convex_length(src: np.ndarray, d: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Chord through the convex hull of a tetrahedron's vertices by clipping t against its 4 half-spaces."""
    cen = pts.mean(0)
    t0 = np.zeros(len(d))
    t1 = np.full(len(d), np.inf)
    for f in [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]:
        a, b, c = pts[list(f)]
        n = np.cross(b - a, c - a)
        n = n if n @ (a - cen) > 0 else -n  # outward
        num, den = n @ (a - src), d @ n  # inside: n·(src + t d - a) <= 0
        with np.errstate(divide="ignore", invalid="ignore"):
            t = num / den
        t1 = np.where(den > 0, np.minimum(t1, t), t1)
        t0 = np.where(den < 0, np.maximum(t0, t), t0)
        t1 = np.where((den == 0) & (num < 0), -np.inf, t1)
    return np.clip(t1 - t0, 0, None)


def _rays(rng, src, target, spread, n):
    d = target + rng.uniform(-spread, spread, size=(n, 3)) - src
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _lengths(tool: MeshTool, src: np.ndarray, d: np.ndarray) -> np.ndarray:
    return tool.path_length(torch.as_tensor(src), torch.as_tensor(d)).numpy()


def test_stl_binary_and_ascii_read_the_same(tmp_path: Path) -> None:
    t = box_triangles([-3, -2, -1], [4, 5, 6])
    write_stl(tmp_path / "b.stl", t)  # binary, header begins with "solid"
    write_stl(tmp_path / "a.stl", t, ascii=True)
    assert (tmp_path / "b.stl").read_bytes()[:5] == b"solid"
    b, a = read_stl(tmp_path / "b.stl"), read_stl(tmp_path / "a.stl")
    assert b.shape == (12, 3, 3)
    assert np.allclose(a, t)
    assert np.allclose(b, t)
    assert abs(signed_volume(a) - 7 * 7 * 7) < 1e-9
    (tmp_path / "bad.stl").write_bytes(b"\x00" * 90)
    with pytest.raises(STLError, match="neither"):
        read_stl(tmp_path / "bad.stl")
    with pytest.raises(STLError, match="not found"):
        read_stl(tmp_path / "missing.stl")


def test_cube_path_lengths_match_slab_formula(tmp_path: Path) -> None:
    lo, hi = np.array([10.0, -20.0, 5.0]), np.array([30.0, 0.0, 25.0])
    write_stl(tmp_path / "cube.stl", box_triangles(lo, hi))
    tool = MeshTool("cube", 399, "titanium", read_stl(tmp_path / "cube.stl"))
    rng = np.random.default_rng(0)
    src = np.array([20.0, -600.0, 15.0])
    d = _rays(rng, src, (lo + hi) / 2, 16.0, 4000)
    want = slab_length(src, d, lo, hi)
    got = _lengths(tool, src, d)
    assert (want > 0).sum() > 1000
    assert (want == 0).sum() > 500
    assert np.abs(got - want).max() < 1e-6
    # Rays through the entry face's triangulation diagonal (an edge shared by two triangles), with a second
    # box behind: the doubled entry hit must be merged, or the gap between the boxes counts as inside.
    lo2, hi2 = np.array([0.0, 40.0, -10.0]), np.array([40.0, 60.0, 40.0])
    two = MeshTool("two", 399, "titanium", np.concatenate([box_triangles(lo, hi), box_triangles(lo2, hi2)]))
    src2 = np.array([0.0, -500.0, 0.0])
    t = np.linspace(0.05, 0.95, 9)
    targets = np.stack([lo[0] + t * (hi[0] - lo[0]), np.full(9, lo[1]), lo[2] + t * (hi[2] - lo[2])], 1)
    d2 = targets - src2
    d2 /= np.linalg.norm(d2, axis=1, keepdims=True)
    want2 = slab_length(src2, d2, lo, hi) + slab_length(src2, d2, lo2, hi2)
    assert (slab_length(src2, d2, lo2, hi2) > 0).all()
    assert np.allclose(_lengths(two, src2, d2), want2, atol=1e-6)


def test_tetrahedron_and_overlapping_shells() -> None:
    rng = np.random.default_rng(1)
    pts = np.array([[0.0, 0.0, 0.0], [30.0, 2.0, 1.0], [5.0, 25.0, -3.0], [8.0, 6.0, 28.0]])
    tool = MeshTool("tet", 399, "stainless_steel", tetra_triangles(pts)[:, [0, 2, 1]])  # inward: auto-flipped
    src = np.array([-300.0, -250.0, 400.0])
    d = _rays(rng, src, pts.mean(0), 14.0, 3000)
    want = convex_length(src, d, pts)
    assert (want > 0).sum() > 500
    assert np.abs(_lengths(tool, src, d) - want).max() < 1e-6
    # Two overlapping boxes and a disjoint third in one mesh: the union's length, not the sum.
    boxes = [([0, 0, 0], [20, 20, 20]), ([10, 5, 5], [35, 15, 15]), ([50, 0, 0], [60, 20, 20])]
    tool2 = MeshTool("multi", 399, "titanium", np.concatenate([box_triangles(a, b) for a, b in boxes]))
    src = np.array([-200.0, 10.0, 10.0])
    d = _rays(rng, src, np.array([30.0, 10.0, 10.0]), 8.0, 2000)
    want = _union_length(src, d, boxes)
    assert np.abs(_lengths(tool2, src, d) - want).max() < 1e-6
    assert (want > 30).sum() > 100  # rays through both overlapping boxes are in the sample
    # A source between the shells, inside the mesh's bounding sphere (every ray against every triangle).
    src = np.array([42.0, 10.0, 10.0])
    d = rng.normal(size=(1500, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    want = _union_length(src, d, boxes)
    assert (want > 0).sum() > 150
    assert np.abs(_lengths(tool2, src, d) - want).max() < 1e-6


def _union_length(src: np.ndarray, d: np.ndarray, boxes) -> np.ndarray:
    """Length of each ray (t > 0) inside the union of axis-aligned boxes, from sorted slab intervals."""
    want = np.zeros(len(d))
    with np.errstate(divide="ignore", invalid="ignore"):
        for i, di in enumerate(d):
            spans = []
            for a, b in boxes:
                ta, tb = (np.array(a) - src) / di, (np.array(b) - src) / di
                t0, t1 = max(np.nanmax(np.minimum(ta, tb)), 0.0), np.nanmin(np.maximum(ta, tb))
                if t1 > t0:
                    spans.append((t0, t1))
            spans.sort()
            end = -np.inf
            for t0, t1 in spans:
                want[i] += max(0.0, t1 - max(t0, end))
                end = max(end, t1)
    return want


def _empty_volume() -> PreparedVolume:
    mats = torch.zeros(1, 3, 8, 8, 8)
    aff = np.diag([20.0, 20.0, 20.0, 1.0])
    aff[:3, 3] = -70.0
    bone = np.random.default_rng(0).uniform(-20, 20, size=(50, 3)).astype(np.float32)
    return PreparedVolume(
        "empty", mats, aff, torch.zeros(1, 8, 8, 8), aff, [], {}, {32: bone + np.float32([0, 5, 0])}
    )


def _silhouette(cam: Camera, tris: np.ndarray) -> np.ndarray:
    """Pixels whose centre lies inside some projected triangle (2D edge functions on Camera.project)."""
    uv = cam.project(tris.reshape(-1, 3)).reshape(-1, 3, 2)
    cc, rr = np.meshgrid(np.arange(cam.width) + 0.5, np.arange(cam.height) + 0.5)
    p = np.stack([cc.ravel(), rr.ravel()], 1)
    out = np.zeros(len(p), bool)
    for a, b, c in uv:
        e = [
            (q[0] - o[0]) * (p[:, 1] - o[1]) - (q[1] - o[1]) * (p[:, 0] - o[0])
            for o, q in ((a, b), (b, c), (c, a))
        ]
        out |= ((e[0] >= 0) & (e[1] >= 0) & (e[2] >= 0)) | ((e[0] <= 0) & (e[1] <= 0) & (e[2] <= 0))
    return out.reshape(cam.height, cam.width)


def test_mesh_tool_mask_is_its_silhouette_and_adds_attenuation() -> None:
    vol = _empty_volume()
    pts = np.array([[-25.0, -10.0, -20.0], [30.0, 5.0, -15.0], [-5.0, 20.0, 30.0], [10.0, -15.0, 25.0]])
    tool = MeshTool("tet", 399, "titanium", tetra_triangles(pts))
    cam = Camera(96, 96, 1.5, 1000.0, 650.0, 25.0, -10.0, (0.0, 0.0, 0.0))
    out = Projector(vol).project(cam, [tool])
    mask = out.tool_hits[0].numpy()
    sil = _silhouette(cam, tool.triangles)
    assert sil.sum() > 400
    assert (
        mask != sil
    ).sum() <= 3  # only a pixel centre exactly on an outline may differ (a 1-px shift: ~100)
    # The line integral is path length x density, and zero outside the mask.
    src = torch.as_tensor(cam.source)
    pix = cam.pixel_world().reshape(-1, 3)
    d = (pix - src) / (pix - src).norm(dim=-1, keepdim=True)
    length = tool.path_length(src, d).reshape(96, 96).numpy()
    rho = MATERIALS[MATERIAL_INDEX["titanium"]].density
    li = out.line_integrals[MATERIAL_INDEX["titanium"]].numpy()
    assert np.allclose(li, length * rho / 10.0, atol=1e-4)
    assert li[~mask].max() == 0.0
    assert length.max() > 20.0


def test_placement_centres_mesh_on_bone_within_angle_limit() -> None:
    vol = _empty_volume()
    tris = box_triangles([100, 100, 100], [110, 104, 140])
    bone = vol.points[32]
    for seed in range(5):
        pose = place_on_anatomy(np.random.default_rng(seed), vol, tris, max_angle_deg=20.0)
        rot = pose[:3, :3]
        assert np.allclose(rot @ rot.T, np.eye(3))
        assert np.degrees(np.arccos((np.trace(rot) - 1) / 2)) <= 20.0 + 1e-6
        centre = rot @ np.array([105.0, 102.0, 120.0]) + pose[:3, 3]
        assert np.min(np.linalg.norm(bone - centre, axis=1)) < 1e-4  # a bone voxel
    again = place_on_anatomy(np.random.default_rng(3), vol, tris, 20.0)
    assert np.allclose(again, place_on_anatomy(np.random.default_rng(3), vol, tris, 20.0))


def test_stl_spec_and_user_tool_vocabulary(tmp_path: Path) -> None:
    from train.synth.generate import resolve_user_tools
    from train.synth.vocabulary import Vocabulary

    write_stl(tmp_path / "cage.stl", box_triangles([0, 0, 0], [10, 10, 10]))
    p = str(tmp_path / "cage.stl")
    assert STLSpec.parse(p) == STLSpec(p, "stainless_steel", None)
    assert STLSpec.parse(f"{p}:titanium:interbody cage") == STLSpec(p, "titanium", "interbody cage")
    assert STLSpec.parse(f"{p}::drill guide").material == "stainless_steel"
    with pytest.raises(STLError, match="unknown material"):
        STLSpec.parse(f"{p}:unobtainium")
    with pytest.raises(STLError, match="not found"):
        STLSpec.parse(str(tmp_path / "nope.stl"))
    vocab, specs = resolve_user_tools(Vocabulary.load(), [f"{p}:titanium:interbody cage", f"{p}:polymer"])
    assert [s.category_id for s in specs] == [399, 398]
    assert vocab.by_id[399].prompt == "interbody cage"
    assert vocab.by_id[399].name == "custom_tool"
    assert vocab.by_id[398].prompt == "tool"
    assert vocab.by_id[398].material == "polymer"
    assert {"custom_tool", "custom_tool_398"} <= set(vocab.leaves("tools"))


def test_cli_synth_with_user_stl(tmp_path: Path) -> None:
    from tests.test_synth_cli import _phantom_files
    from train.cli import main

    ct = _phantom_files(tmp_path)
    write_stl(tmp_path / "cage.stl", box_triangles([0, 0, 0], [14, 10, 24]))
    out = tmp_path / "out"
    args = ["synth", "--ct", str(ct), "--n", "2", "--size", "48", "--images-per-case", "2", "--no-progress"]
    args += [
        "--out",
        str(out),
        "--contact-sheet",
        "0",
        "--tool-stl",
        f"{tmp_path / 'cage.stl'}:titanium:cage",
    ]
    assert main(args) == 0
    cats = {c["id"]: c for c in json.loads((out / "categories.json").read_text())}
    assert cats[399]["prompt"] == "cage"
    case = json.loads((out / "case_00000" / "case.json").read_text())
    mesh = [t for t in case["tools"] if t.get("kind") == "stl_mesh"]
    assert len(mesh) == 1
    assert mesh[0]["category_id"] == 399
    assert mesh[0]["n_triangles"] == 12
    recs = [json.loads((out / "case_00000" / f"{j:06d}.json").read_text()) for j in range(2)]
    seen = [{a["category_id"] for a in r["annotations"]} | set(r["dropped_category_ids"]) for r in recs]
    assert any(399 in s and 300 in s for s in seen)  # its own mask, and inside the all-tools group
    bad = [*args[:-1], f"{tmp_path / 'cage.stl'}:kryptonite"]
    assert main(bad) == 2
