"""Fast checks of the synthetic X-ray engine on small phantoms (no bundled CT needed)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from train.synth import rle
from train.synth.ct_source import CTInputError, CTSource, load_ct
from train.synth.geometry import Camera, beam_axes
from train.synth.projector import Projector
from train.synth.tools import Tool
from train.synth.vocabulary import UnknownStructureError, Vocabulary
from train.synth.volume import prepare_volume


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.load()


def _phantom(shape=(60, 60, 60), spacing=2.0) -> CTSource:
    """Water cube (HU 0) with a bone ball (HU 1000, label heart=51) and a liver slab (label 5)."""
    hu = np.full(shape, -1000.0, dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    hu[10:50, 10:50, 10:50] = 0.0
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    ball = (ii - 30) ** 2 + (jj - 30) ** 2 + (kk - 30) ** 2 <= 8**2
    hu[ball] = 1000.0
    lab[ball] = 51
    lab[12:20, 12:48, 12:48] = 5
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = -np.array(shape) * spacing / 2
    return CTSource("phantom", hu, lab, aff, [5, 51])


def test_vocabulary_covers_totalsegmentator_and_groups(vocab: Vocabulary) -> None:
    ids = sorted(vocab.structures_by_id)
    assert ids == list(range(1, 118)) + list(range(121, 143))  # TotalSegmentator 'total' + appendicular bones
    assert {
        "tibia_left",
        "fibula_right",
        "patella_left",
        "radius_right",
        "ulna_left",
        "carpals_right",
    } <= set(vocab.leaves("bones"))
    assert vocab.by_id[29].name == "vertebrae_L3"
    assert "third lumbar vertebra" in vocab.by_id[29].phrasings
    assert "L3" in vocab.by_id[29].phrasings
    assert "collarbone" in vocab.get("clavicula_left").phrasings[-3] or any(
        "collarbone" in p for p in vocab.get("clavicula_left").phrasings
    )
    assert set(vocab.leaves("left_lung")) == {"lung_upper_lobe_left", "lung_lower_lobe_left"}
    assert len(vocab.leaves("ribs")) == 24
    assert "vertebrae_L3" in vocab.leaves("spine")
    assert "vertebrae_C1" in vocab.leaves("spine")
    assert {"hip_left", "hip_right", "sacrum"} <= set(vocab.leaves("pelvis"))
    for t in ("K-wire", "screw", "pedicle screw", "plate", "guidewire", "catheter"):
        assert any(t == c.prompt or t in c.phrasings for c in vocab.tools), t
    with pytest.raises(UnknownStructureError, match="did you mean"):
        vocab.get("clavicula_lft")


@pytest.mark.parametrize("shape", [(5, 7), (64, 64), (1, 1)])
def test_rle_round_trip(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for p in (0.0, 0.02, 0.5, 1.0):
        m = rng.random(shape) < p
        enc = rle.encode(m)
        assert isinstance(enc["counts"], str)
        assert np.array_equal(rle.decode(enc), m)
        assert rle.area(enc) == int(m.sum())


def test_rle_matches_known_coco_string() -> None:
    # Centre pixel of 3x3: runs [4, 1, 4] column-major -> "414" (a run < 16 is chr(48 + run)).
    m = np.zeros((3, 3), bool)
    m[1, 1] = True
    assert rle.encode(m)["counts"] == "414"


def test_geometry_dicom_angles_and_round_trip() -> None:
    v, _up, right = beam_axes(0, 0)
    assert np.allclose(v, [0, 1, 0])
    assert np.allclose(right, [-1, 0, 0])
    v, _, _ = beam_axes(90, 0)
    assert np.allclose(v, [-1, 0, 0])  # LAO 90: detector on the patient's left (RAS -x)
    v, _, _ = beam_axes(0, 30)
    assert v[2] > 0  # cranial tilt: detector toward the head
    cam = Camera(64, 80, 1.3, 1000.0, 620.0, 33.0, -12.0, (5.0, -3.0, 12.0))
    pix = cam.pixel_world().numpy()
    rng = np.random.default_rng(1)
    for _ in range(20):
        r, c = int(rng.integers(64)), int(rng.integers(80))
        s = rng.uniform(0.3, 0.9)
        p3 = cam.source + s * (pix[r, c] - cam.source)  # a point on pixel (r, c)'s ray
        uv = cam.project(p3[None])[0]
        assert np.allclose(uv, [c + 0.5, r + 0.5], atol=1e-6)
    assert np.allclose(cam.project(np.array(cam.isocenter)[None])[0], [40.0, 32.0])
    back = Camera.from_json(json.loads(json.dumps(cam.to_json())))
    assert np.allclose(back.projection_matrix, cam.projection_matrix)


def test_projector_line_integral_matches_analytic_chord() -> None:
    ct = _phantom()
    vol = prepare_volume(ct, density_spacing_mm=None, label_spacing_mm=None)
    proj = Projector(vol)
    cam = Camera(32, 32, 4.0, 1000.0, 600.0, 0.0, 0.0, (0.0, 0.0, 0.0))
    out = proj.project(cam)
    li = out.line_integrals
    # Central ray crosses 80 mm of water cube (1 g/cm³), of which the ball's 32 mm diameter is bone.
    centre = li[:, 15:17, 15:17].mean((1, 2))
    soft_cm = float(centre[1]) / 1.0
    bone_g = float(centre[2])
    bone_rho = 1.017 + 0.000592 * 1000
    assert abs(soft_cm - 4.8) < 0.4  # (80 - 32) mm of water
    assert abs(bone_g / bone_rho - 3.2) < 0.4
    # Masks agree with the image: the ball's mask is where bone attenuates.
    ball = out.label_hits[out.label_ids.index(51)]
    bone = li[2] > 0.2 * li[2].max()  # bilinear sampling spreads edges by about a voxel
    inter = (ball & bone).sum().item()
    assert inter / max(ball.sum().item(), 1) > 0.85
    assert inter / max(bone.sum().item(), 1) > 0.85


def test_projector_group_path_length_matches_analytic_chord() -> None:
    """path_groups: each ray's length inside a union of labels, from the same pass as the masks."""
    vol = prepare_volume(_phantom(), density_spacing_mm=None, label_spacing_mm=None)
    proj = Projector(vol, path_groups={"ball": [51], "both": [5, 51], "absent": [99]})
    cam = Camera(32, 32, 4.0, 1000.0, 600.0, 0.0, 0.0, (0.0, 0.0, 0.0))
    out = proj.project(cam)
    assert set(out.group_paths) == {"ball", "both"}  # no id of "absent" is in the CT
    ball = out.group_paths["ball"].numpy()
    # Analytic chord of each pixel's ray through the ball (centre at the origin, radius 8 voxels of 2 mm).
    pix = cam.pixel_world().numpy().reshape(-1, 3)
    d = pix - cam.source
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    miss = np.linalg.norm(np.cross(d, -cam.source), axis=1)  # distance of the ray from the centre
    chord = (2 * np.sqrt(np.clip(16.0**2 - miss**2, 0, None))).reshape(32, 32)
    inner = chord > 8.0
    assert inner.sum() > 50
    err = (ball - chord)[inner]  # nearest-voxel sampling: up to two 2-mm voxels at an edge, unbiased
    assert np.abs(err).mean() < 2.0, err
    assert np.abs(err).max() < 5.0, err
    assert abs(err.mean()) < 1.0, err
    assert np.all(ball[chord == 0] == 0)
    # Where the ray crosses a label the path is positive, and the group of both labels adds the slab.
    hits = out.label_hits[out.label_ids.index(51)].numpy()
    assert np.array_equal(hits, ball > 0)
    both = out.group_paths["both"].numpy()
    slab = out.label_hits[out.label_ids.index(5)].numpy()
    assert np.all(both >= ball - 1e-4)
    assert np.all(both[slab & ~hits] > 0)
    assert abs(float(np.median(both[slab & ~hits])) - 72.0) < 6.0  # the slab is 72 mm deep along the beam


def test_tool_path_length_and_mask() -> None:
    ct = _phantom()
    vol = prepare_volume(ct)
    cam = Camera(64, 64, 2.0, 1000.0, 600.0, 0.0, 0.0, (0.0, 0.0, 0.0))
    t = Tool("k_wire", 301, "stainless_steel")
    t.add_cylinder([-40.0, 0.0, 0.0], [40.0, 0.0, 0.0], 5.0)  # horizontal rod across the beam
    out = Projector(vol).project(cam, [t])
    hit = out.tool_hits[0]
    # Centre ray crosses the rod's diameter: 10 mm of steel (8 g/cm³) = 8 g/cm².
    assert abs(float(out.line_integrals[3, 32, 32]) - 8.0) < 0.3
    rows = torch.nonzero(hit.any(1)).squeeze(1)
    cols = torch.nonzero(hit.any(0)).squeeze(1)
    assert cols.numel() > 40
    assert 6 <= rows.numel() <= 12
    px = cam.project(np.array([[0.0, 0.0, 0.0]]))[0]
    assert hit[int(px[1]), int(px[0])]


def _write_nifti(path, arr, aff):
    nib.save(nib.Nifti1Image(arr, aff), str(path))


def test_ct_input_errors(tmp_path, vocab: Vocabulary) -> None:
    ct = _phantom(shape=(20, 20, 20))
    _write_nifti(tmp_path / "ct.nii.gz", ct.hu, ct.affine)
    with pytest.raises(CTInputError, match="no label map"):
        load_ct(tmp_path / "ct.nii.gz", vocabulary=vocab)
    _write_nifti(tmp_path / "bad_shape.nii.gz", ct.labels[:-1], ct.affine)
    with pytest.raises(CTInputError, match="shape"):
        load_ct(tmp_path / "ct.nii.gz", tmp_path / "bad_shape.nii.gz", vocabulary=vocab)
    shifted = ct.affine.copy()
    shifted[0, 3] += 5
    _write_nifti(tmp_path / "bad_aff.nii.gz", ct.labels, shifted)
    with pytest.raises(CTInputError, match="affine"):
        load_ct(tmp_path / "ct.nii.gz", tmp_path / "bad_aff.nii.gz", vocabulary=vocab)
    _write_nifti(tmp_path / "ok.nii.gz", ct.labels, ct.affine)
    with pytest.raises(CTInputError, match="not found"):
        load_ct(tmp_path / "ct.nii.gz", tmp_path / "missing.nii.gz", vocabulary=vocab)
    (tmp_path / "names.csv").write_text("id,structure\n5,liver\n51,hert\n")
    with pytest.raises(UnknownStructureError, match="hert"):
        load_ct(
            tmp_path / "ct.nii.gz",
            tmp_path / "ok.nii.gz",
            vocabulary=vocab,
            structures_csv=tmp_path / "names.csv",
        )
    ok = load_ct(tmp_path / "ct.nii.gz", tmp_path / "ok.nii.gz", vocabulary=vocab)
    assert ok.present_ids == [5]  # the 20³ crop holds the liver slab only
