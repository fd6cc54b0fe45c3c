"""Labelled bodies: the synthetic soft-tissue envelope, the builders, the atomic build and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from train.synth.bodies.envelope import (
    AIR_HU,
    CANCELLOUS_HU,
    CORTICAL_HU,
    FAT_HU,
    MUSCLE_HU,
    SKIN_HU,
    build_envelope,
    synthetic_bone_hu,
)


def _two_bones(n: int = 64, sp: float = 2.0) -> np.ndarray:
    """Two parallel cylinders (labels 75, 76, radius 12 mm, 48 mm apart) along axis 2, grid at 2 mm."""
    i, j, _ = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    lab = np.zeros((n, n, n), np.uint8)
    rr = (12.0 / sp) ** 2
    lab[(i - n / 2 + 12) ** 2 + (j - n / 2) ** 2 <= rr] = 75
    lab[(i - n / 2 - 12) ** 2 + (j - n / 2) ** 2 <= rr] = 76
    lab[:, :, :8] = 0
    lab[:, :, -8:] = 0
    return lab


def test_envelope_layers_in_order_from_bone_to_air():
    lab = _two_bones(96)
    hu = build_envelope(
        lab, (2.0, 2.0, 2.0), rng=np.random.default_rng(0), muscle_mm=10.0, fat_mm=6.0, skin_mm=2.0
    )
    assert hu.dtype == np.float32
    assert hu.shape == lab.shape
    assert set(np.unique(hu)) <= {AIR_HU, FAT_HU, SKIN_HU, MUSCLE_HU, CORTICAL_HU, CANCELLOUS_HU}
    # Grid corners are air; bones keep bone HU; cortex on the outside of each bone, cancellous inside.
    assert hu[0, 0, 48] == AIR_HU
    assert hu[-1, -1, 48] == AIR_HU
    assert np.all(hu[lab > 0] >= CANCELLOUS_HU)
    assert hu[36, 48, 48] == CANCELLOUS_HU  # centre of bone 75
    # Walking out from the bone along -i in the mid slice: bone, then soft tissue, then fat, skin, air.
    line = hu[:36, 48, 48][::-1]
    kinds = [v for k, v in enumerate(line) if k == 0 or v != line[k - 1]]
    soft = [v for v in kinds if v not in (CORTICAL_HU, CANCELLOUS_HU)]
    assert soft[0] in (MUSCLE_HU, FAT_HU)
    assert soft[-1] == AIR_HU
    assert soft[-2] == SKIN_HU
    assert soft[-3] == FAT_HU
    # The muscle band around the bone is about muscle_mm thick: no air within 8 mm of bone (away from
    # the bone ends, which get only the fat and skin layers: a scalp, a sole).
    from scipy import ndimage

    d = ndimage.distance_transform_edt(lab == 0, sampling=2.0)
    near = (d > 0) & (d <= 8)
    near[:, :, :20] = False
    near[:, :, -20:] = False
    assert np.all(hu[near] != AIR_HU)
    assert np.all(hu[near] != SKIN_HU)
    # Everything farther from bone than the largest muscle + fat + skin (+ one coarse voxel) is air.
    far = 10 * 1.15 * 1.375 + 6 * 1.5 * 1.375 * 1.5 + 2 * 1.2 + 6
    assert np.all(hu[d > far] == AIR_HU)
    assert (hu[d > 0] == SKIN_HU).any()


def test_envelope_is_one_body_between_the_bones_and_deterministic_per_seed():
    lab = _two_bones()
    a = build_envelope(lab, (2.0, 2.0, 2.0), rng=np.random.default_rng(3))
    b = build_envelope(lab, (2.0, 2.0, 2.0), rng=np.random.default_rng(3))
    c = build_envelope(lab, (2.0, 2.0, 2.0), rng=np.random.default_rng(4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # The gap between the two bones (24 mm apart) is inside the body, not air.
    assert np.all(a[28:37, 32, 16:48] != AIR_HU)


def test_envelope_keeps_given_bone_hu_and_honours_axis():
    lab = _two_bones()
    bone_hu = np.where(lab > 0, 777.0, 0.0).astype(np.float32)
    hu = build_envelope(lab, (2.0, 2.0, 2.0), bone_hu, rng=np.random.default_rng(0))
    assert np.all(hu[lab > 0] == 777.0)
    # The same bones with the long axis first give the transposed body.
    lab0 = np.ascontiguousarray(lab.transpose(2, 0, 1))
    hu0 = build_envelope(
        lab0, (2.0, 2.0, 2.0), bone_hu.transpose(2, 0, 1), rng=np.random.default_rng(0), axis=0
    )
    assert np.array_equal(hu0, hu.transpose(2, 0, 1))


def test_envelope_bad_input():
    lab = _two_bones()
    with pytest.raises(ValueError, match="no bone voxels"):
        build_envelope(np.zeros_like(lab), (2.0, 2.0, 2.0), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="bone_hu has shape"):
        build_envelope(lab, (2.0, 2.0, 2.0), np.zeros((3, 3, 3)), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="spacing"):
        build_envelope(lab, (2.0, 0.0, 2.0), rng=np.random.default_rng(0))


def test_synthetic_bone_has_its_own_cortex_per_bone():
    lab = np.zeros((20, 10, 10), np.uint8)
    lab[1:10, 1:9, 1:9] = 27
    lab[10:19, 1:9, 1:9] = 28  # touches bone 27 face to face
    hu = synthetic_bone_hu(lab, (1.0, 1.0, 1.0))
    assert hu[0, 5, 5] == 0
    assert hu[5, 5, 5] == CANCELLOUS_HU
    assert hu[14, 5, 5] == CANCELLOUS_HU
    # Both faces where the bones touch are cortex: each bone keeps its own end plate.
    assert hu[9, 5, 5] == CORTICAL_HU
    assert hu[10, 5, 5] == CORTICAL_HU
    assert hu[1, 5, 5] == CORTICAL_HU
    assert hu[5, 1, 5] == CORTICAL_HU


# ----------------------------------------------------------------------------------------------------
# builders on tiny synthetic inputs


def _nifti(path, data, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64)), str(path))
    return path


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg
    return msg


LPS_3MM = np.diag([-3.0, -3.0, 3.0, 1.0])  # voxel i grows toward the patient's left (RAS x decreases)


@pytest.fixture
def ts_inputs(tmp_path):
    """A 3 mm CT + 'total' label map in LPS voxel order and a map_to_binary.py with its class map."""
    n = (12, 10, 8)
    ct = np.full(n, -1000, np.int16)
    ct[2:10, 2:8, :] = 40
    seg = np.zeros(n, np.uint8)
    seg[8:10, 4:6, 2:6] = 75  # femur_left at large i: -x in RAS, the patient's left
    seg[2:4, 4:6, 2:6] = 76
    seg[5:7, 3:5, 1:7] = 27  # vertebrae_L5
    ct[seg > 0] = 700
    cm = tmp_path / "map_to_binary.py"
    cm.write_text(
        'class_map = {\n "total_v1": {1: "spleen"},\n'
        ' "total": {27: "vertebrae_L5", 75: "femur_left", 76: "femur_right"},\n}\n'
    )
    return (
        _nifti(tmp_path / "ct.nii.gz", ct, LPS_3MM),
        _nifti(tmp_path / "seg.nii.gz", seg, LPS_3MM),
        cm,
        seg,
    )


def test_totalseg_convert_resamples_to_canonical_grid_and_keeps_anatomy(tmp_path, ts_inputs):
    import json

    import nibabel as nib

    from train.synth.bodies.totalseg import convert

    ct_p, seg_p, cm, seg = ts_inputs
    out = tmp_path / "body"
    out.mkdir()
    convert(ct_p, seg_p, cm, out, spacing_mm=1.5)
    ct = nib.load(str(out / "ct.nii.gz"))
    lab = nib.load(str(out / "labels.nii.gz"))
    assert ct.get_data_dtype() == np.int16
    assert lab.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    assert np.allclose(np.abs(np.diag(ct.affine)[:3]), 1.5)
    assert ct.shape == tuple((s - 1) * 2 + 1 for s in seg.shape)
    labels = np.asarray(lab.dataobj)
    hu = np.asarray(ct.dataobj)
    assert set(np.unique(labels)) == {0, 27, 75, 76}
    assert np.median(hu[labels > 0]) == 700

    # The same world point carries the same structure: femur_left's centroid did not move.
    def centroid(img, data, v):
        return nib.affines.apply_affine(img.affine, np.argwhere(data == v).mean(0))

    src = nib.load(str(seg_p))
    for v in (75, 76):
        assert np.allclose(centroid(lab, labels, v), centroid(src, seg, v), atol=1.6)
    # Patient left is -x in RAS: femur_left sits at smaller x than femur_right.
    assert centroid(lab, labels, 75)[0] < centroid(lab, labels, 76)[0]
    info = json.loads((out / "body.json").read_text())
    assert info["structures"] == ["vertebrae_L5", "femur_left", "femur_right"]
    from train.synth.regions import regions_of

    assert "lumbar_spine" in info["regions"]
    assert info["regions"] == regions_of(set(info["structures"]))
    assert info["voxel_size_mm"] == [1.5, 1.5, 1.5]
    assert (out / "structures.csv").read_text().splitlines()[0] == "id,structure"


def test_totalseg_bad_input_one_line_errors(tmp_path, ts_inputs):
    from train.synth.bodies.totalseg import convert
    from train.synth.ct_source import CTInputError

    ct_p, seg_p, cm, seg = ts_inputs
    out = tmp_path / "o"
    out.mkdir()
    # a CT without labels
    with pytest.raises(CTInputError) as e:
        convert(ct_p, tmp_path / "missing_seg.nii.gz", cm, out)
    assert "no label map" in _one_line(e.value)
    assert "missing_seg.nii.gz" in str(e.value)
    # labels not on the CT grid (shape, then affine)
    off = _nifti(tmp_path / "off.nii.gz", seg[:-1], LPS_3MM)
    with pytest.raises(CTInputError) as e:
        convert(ct_p, off, cm, out)
    assert "not on the grid" in _one_line(e.value)
    assert "off.nii.gz" in str(e.value)
    shifted = _nifti(
        tmp_path / "shifted.nii.gz", seg, LPS_3MM + np.array([[0, 0, 0, 5.0]] * 3 + [[0, 0, 0, 0]])
    )
    with pytest.raises(CTInputError, match="not on the grid"):
        convert(ct_p, shifted, cm, out)
    # an unknown structure name in the class map
    bad = tmp_path / "bad_map.py"
    bad.write_text('class_map = {"total": {27: "vertebrae_L5", 75: "thigh_bone_left", 76: "femur_right"}}\n')
    with pytest.raises(CTInputError) as e:
        convert(ct_p, seg_p, bad, out)
    assert "thigh_bone_left" in _one_line(e.value)
    assert "seg.nii.gz" in str(e.value)
    # a label value the class map does not name
    partial = tmp_path / "partial_map.py"
    partial.write_text('class_map = {"total": {27: "vertebrae_L5", 75: "femur_left"}}\n')
    with pytest.raises(CTInputError, match="label value 76"):
        convert(ct_p, seg_p, partial, out)
    assert not list(out.iterdir())  # nothing written by any failed conversion


def test_bundled_convert_renumbers_by_name(tmp_path):
    import json

    import nibabel as nib

    from train.synth.bodies.bundled import convert

    ct = np.full((6, 6, 6), -1000, np.int16)
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[1:3, 1:3, 1:3] = 7
    mask[3:5, 3:5, 3:5] = 118
    aff = np.diag([0.7, 0.7, 2.5, 1.0])
    csv = tmp_path / "structures.csv"
    csv.write_text("id,structure\n7,femur_left\n118,costal_cartilages\n")
    out = tmp_path / "b"
    out.mkdir()
    convert(_nifti(tmp_path / "ct.nii.gz", ct, aff), _nifti(tmp_path / "m.nii.gz", mask, aff), csv, out)
    lab = np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj)
    assert set(np.unique(lab)) == {0, 75, 117}
    assert json.loads((out / "body.json").read_text())["voxel_size_mm"] == [0.7, 0.7, 2.5]


def _fracseg_case(root, case="007", swap=False, sp=2.0):
    """Three bone-only CTs (+ masks) on one RAS grid: left hip at -x, right hip at +x, sacrum between,
    with room around them (50 mm) for the synthetic soft tissue."""
    d = root / case
    d.mkdir(parents=True)
    n = (90, 64, 20)
    aff = np.diag([sp, sp, sp, 1.0])
    aff[:3, 3] = [-90.0, -64.0, -20.0]
    x, y = 25, 20
    boxes = {
        "LI": (slice(x + 4, x + 12), slice(y + 8, y + 16), slice(4, 16)),
        "RI": (slice(x + 28, x + 36), slice(y + 8, y + 16), slice(4, 16)),
        "SA": (slice(x + 17, x + 23), slice(y + 4, y + 10), slice(6, 18)),
    }
    if swap:
        boxes["LI"], boxes["RI"] = boxes["RI"], boxes["LI"]
    for key, box in boxes.items():
        ct = np.zeros(n, np.int32)
        ct[box] = {"LI": 650, "RI": 660, "SA": 670}[key]
        mask = np.zeros(n, np.uint8)
        mask[box] = 1
        mask[box[0], box[1], box[2].start : box[2].start + 2] = 2  # a second fragment
        _nifti(d / f"{case}_{key}.nii.gz", ct, aff)
        _nifti(d / f"{case}_{key}_mask.nii.gz", mask, aff)
    return d


def test_fracsegnet_convert_bones_inside_a_soft_tissue_body(tmp_path):
    import json

    import nibabel as nib

    from train.synth.bodies.fracsegnet import convert

    d = _fracseg_case(tmp_path)
    out = tmp_path / "b"
    out.mkdir()
    convert(d, "007", out, seed=1, spacing_mm=2.5)
    ct = nib.load(str(out / "ct.nii.gz"))
    hu = np.asarray(ct.dataobj)
    lab = np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj)
    assert set(np.unique(lab)) == {0, 25, 77, 78}  # sacrum, hip_left, hip_right
    # bone HU kept (mask-weighted resampling: no dilution by the zeros around the bone)
    for v, h in ((77, 650), (78, 660), (25, 670)):
        assert np.all(np.abs(hu[lab == v] - h) <= 1)
    assert (hu == MUSCLE_HU).sum() > (lab > 0).sum()  # soft tissue grown around the bones
    assert (hu == FAT_HU).any()
    assert (hu == SKIN_HU).any()
    x = lambda v: nib.affines.apply_affine(ct.affine, np.argwhere(lab == v).mean(0))[0]  # noqa: E731
    assert x(77) < x(25) < x(78)  # hip_left at -x (patient left), sacrum between
    info = json.loads((out / "body.json").read_text())
    assert info["synthetic_soft_tissue"] is True
    assert info["envelope_seed"] == 1
    assert "pelvis" in info["regions"]


def test_fracsegnet_bad_input(tmp_path):
    from train.synth.bodies.fracsegnet import convert
    from train.synth.ct_source import CTInputError

    out = tmp_path / "b"
    out.mkdir()
    # laterality contradicting the affine
    d = _fracseg_case(tmp_path / "swap", swap=True)
    with pytest.raises(CTInputError) as e:
        convert(d, "007", out, seed=1, spacing_mm=2.5)
    assert "patient right" in _one_line(e.value)
    # a bone CT without its label map
    d = _fracseg_case(tmp_path / "nomask")
    (d / "007_RI_mask.nii.gz").unlink()
    with pytest.raises(CTInputError) as e:
        convert(d, "007", out, seed=1)
    assert "007_RI_mask.nii.gz" in _one_line(e.value)
    # a mask not on the CT's grid
    d = _fracseg_case(tmp_path / "grid")
    _nifti(d / "007_SA_mask.nii.gz", np.ones((90, 64, 19), np.uint8), np.eye(4))
    with pytest.raises(CTInputError) as e:
        convert(d, "007", out, seed=1)
    assert "not on the grid" in _one_line(e.value)
    assert "007_SA_mask.nii.gz" in str(e.value)
    assert not list(out.iterdir())


def test_write_body_rejects_a_non_vocabulary_label(tmp_path):
    from train.synth.bodies.build import write_body
    from train.synth.ct_source import CTInputError

    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = 200  # a group id, not a structure
    with pytest.raises(CTInputError) as e:
        write_body(tmp_path, np.zeros((4, 4, 4)), lab, np.eye(4))
    assert "200" in _one_line(e.value)


# ----------------------------------------------------------------------------------------------------
# atomic build, fetch and the CLI


def _fake_spec(name, build, heldout=False):
    from train.synth.bodies import BodySpec

    return BodySpec(
        name=name,
        description="test body",
        source="tests",
        licence="CC0",
        use="tests",
        sources=(),
        build=build,
        heldout=heldout,
    )


def _write_cube(out_dir, value=75):
    from train.synth.bodies.build import write_body

    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:6, 2:6, 2:6] = value
    write_body(out_dir, np.where(lab > 0, 500.0, -1000.0), lab, np.diag([2.0, 2.0, 2.0, 1.0]))


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """An empty bodies folder and a registry with two fake bodies (one of them failing)."""
    from train.synth import bodies

    monkeypatch.setenv("FLUOROSAM_BODIES", str(tmp_path / "bodies"))
    monkeypatch.setenv("FLUOROSAM_SOURCES", str(tmp_path / "sources"))
    bodies.all_bodies()  # import the real builders first, then swap the registry for the fakes
    calls = {"fail": False}

    def good(_src, out):
        _write_cube(out, 78 if calls["fail"] else 75)
        if calls["fail"]:
            raise RuntimeError("builder died half-way")

    reg = {"t_good": _fake_spec("t_good", good), "t_held": _fake_spec("t_held", good, heldout=True)}
    monkeypatch.setattr(bodies, "_REGISTRY", reg)
    return calls


def test_build_is_atomic_and_a_failed_rebuild_keeps_the_old_body(tmp_path, registry):
    import json

    from train.synth.bodies import bodies_root, body_info, load_body
    from train.synth.bodies.build import build_body

    build_body("t_good", log=lambda *_: None)
    info = body_info("t_good")
    assert info["name"] == "t_good"
    assert info["licence"] == "CC0"
    assert info["structures"] == ["femur_left"]
    assert info["rebuild"] == "fluorosam-train bodies build t_good"
    assert load_body("t_good").present_ids == [75]
    registry["fail"] = True
    with pytest.raises(RuntimeError, match="half-way"):
        build_body("t_good", log=lambda *_: None)
    # the earlier build is untouched and no temporary folder is left
    assert json.loads((bodies_root() / "t_good" / "body.json").read_text())["structures"] == ["femur_left"]
    assert sorted(p.name for p in bodies_root().iterdir()) == ["t_good"]
    with pytest.raises(RuntimeError):
        build_body("t_held", log=lambda *_: None)
    assert sorted(p.name for p in bodies_root().iterdir()) == ["t_good"]


def test_build_without_its_source_says_how_to_fetch(tmp_path, monkeypatch):
    from train.synth.bodies import bodies_root
    from train.synth.bodies.build import build_body
    from train.synth.ct_source import CTInputError

    monkeypatch.setenv("FLUOROSAM_BODIES", str(tmp_path / "bodies"))
    with pytest.raises(CTInputError) as e:
        build_body("totalseg_example", sources=tmp_path / "nothing")
    assert "bodies fetch" in _one_line(e.value)
    assert not bodies_root().exists() or not list(bodies_root().iterdir())


def test_cli_lists_builds_and_tabulates(tmp_path, registry, capsys):
    import json

    from train.cli import main

    assert main(["bodies", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"t_good", "t_held"}
    assert rows["t_good"]["built"] is False
    assert rows["t_held"]["heldout"] is True
    assert main(["bodies", "coverage"]) == 2  # nothing built yet
    capsys.readouterr()
    assert main(["bodies", "build", "all"]) == 0
    capsys.readouterr()
    assert main(["bodies", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["t_good"]["built"] is True
    assert rows["t_good"]["voxel_size_mm"] == [2.0, 2.0, 2.0]
    assert rows["t_good"]["extent_mm"] == [16.0, 16.0, 16.0]
    assert rows["t_good"]["structures"] == ["femur_left"]
    from train.synth.regions import regions_of

    assert rows["t_good"]["regions"] == regions_of({"femur_left"})
    assert main(["bodies", "coverage", "--markdown"]) == 0
    md = capsys.readouterr().out
    assert "| femur_left | 2 | t_good, t_held |" in md
    assert "| femur | 2 |" in md
    assert "| skull | 0 | **none** |" in md
    from train.bodies_cli import BEGIN, END

    doc = tmp_path / "bodies.md"
    doc.write_text(f"# Bodies\n\n{BEGIN}\nold table\n{END}\n\nmore text\n")
    assert main(["bodies", "coverage", "--update", str(doc)]) == 0
    text = doc.read_text()
    assert "old table" not in text
    assert f"{BEGIN}\nBuilt bodies counted: 2" in text
    assert text.endswith(f"| femur_left | 2 | t_good, t_held |\n{END}\n\nmore text\n")
    (tmp_path / "plain.md").write_text("no markers\n")
    assert main(["bodies", "coverage", "--update", str(tmp_path / "plain.md")]) == 2
    assert main(["bodies", "build", "no_such_body"]) == 2
    assert "unknown body 'no_such_body'" in capsys.readouterr().err


def test_fetch_clones_only_the_paths_builders_read(tmp_path, monkeypatch):
    import subprocess

    from train.synth import bodies
    from train.synth.bodies import build

    up = tmp_path / "mirror" / "someone+thing"
    (up / "data").mkdir(parents=True)
    (up / "data" / "a.txt").write_text("a")
    (up / "big.bin").write_text("b")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(up)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    monkeypatch.setattr(bodies, "SOURCES", {"thing": "https://github.com/someone/thing"})
    monkeypatch.setattr(build, "SOURCES", bodies.SOURCES)
    monkeypatch.setitem(build.SOURCE_PATHS, "thing", ("/data/",))
    dest = tmp_path / "src"
    got = build.fetch_sources(dest, mirror=str(tmp_path / "mirror" / "{owner}+{name}"), log=lambda *_: None)
    assert (got["thing"] / "data" / "a.txt").read_text() == "a"
    assert not (got["thing"] / "big.bin").exists()
    assert len(build.source_commit(got["thing"])) == 40
    # present: kept as it is
    (got["thing"] / "data" / "a.txt").write_text("local")
    build.fetch_sources(dest, mirror=str(tmp_path / "mirror" / "{owner}+{name}"), log=lambda *_: None)
    assert (got["thing"] / "data" / "a.txt").read_text() == "local"
    # a failed clone leaves nothing behind
    with pytest.raises(build.BuildError, match="git clone"):
        build.fetch_sources(tmp_path / "src2", mirror=str(tmp_path / "nowhere/{name}"), log=lambda *_: None)
    assert not list((tmp_path / "src2").iterdir())


def test_trunk_slices_keep_the_abdomen_wide_above_a_pelvis():
    # A wide "pelvis" plate on the lower slices and a thin "spine" column continuing 100 mm above it.
    n, sp = (100, 60, 80), 3.0
    lab = np.zeros(n, np.uint8)
    lab[20:80, 25:35, 5:30] = 77
    lab[47:53, 25:35, 5:75] = 27

    def width_mm(hu, k):
        inside = np.flatnonzero(hu[:, 30, k] > -1000)
        return (inside[-1] - inside[0] + 1) * sp

    kw = dict(rng=np.random.default_rng(0), muscle_mm=15.0, fat_mm=5.0)
    plain = build_envelope(lab, (sp, sp, sp), **kw)
    kw["rng"] = np.random.default_rng(0)
    trunk = build_envelope(lab, (sp, sp, sp), trunk_slices=np.ones(n[2], bool), **kw)
    pelvis_w = width_mm(trunk, 20)
    k = 30 + 10  # 30 mm above the top of the pelvis plate
    assert width_mm(plain, k) < 0.5 * pelvis_w  # a tube around the spine
    assert width_mm(trunk, k) >= pelvis_w - 2 * 0.3 * 30 - 2 * 2 * sp  # tapering at <= 0.3 mm/mm
    assert width_mm(trunk, k) <= pelvis_w + sp
    # the bones themselves are the same either way
    assert np.array_equal(plain[lab > 0], trunk[lab > 0])
    with pytest.raises(ValueError, match="one bool per slice"):
        build_envelope(lab, (sp, sp, sp), trunk_slices=np.ones(3, bool), rng=np.random.default_rng(0))
