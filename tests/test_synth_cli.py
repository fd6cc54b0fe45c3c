"""End-to-end CLI run on a tiny phantom CT: layout, determinism, loader round trip, clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from train.cli import main
from train.synth.fluoroseg_io import decode_masks, iter_images, read_split
from train.synth.geometry import Camera


def _phantom_files(tmp: Path) -> Path:
    shape = (48, 48, 40)
    hu = np.full(shape, -1000.0, np.float32)
    lab = np.zeros(shape, np.uint8)
    hu[6:42, 6:42, 4:36] = 20.0
    lab[8:22, 8:40, 6:34] = 12  # right upper lobe
    lab[26:40, 8:40, 6:34] = 10  # left upper lobe
    hu[20:28, 30:38, 4:36] = 700.0
    lab[20:28, 30:38, 4:36] = 38  # T6, posterior midline
    aff = np.diag([-3.0, 3.0, 3.0, 1.0])
    aff[:3, 3] = [72.0, -72.0, -60.0]
    nib.save(nib.Nifti1Image(hu, aff), str(tmp / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), str(tmp / "mask.nii.gz"))
    return tmp / "ct.nii.gz"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.glob("case_*/*")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_cli_synth_layout_determinism_and_loader(tmp_path: Path) -> None:
    ct = _phantom_files(tmp_path)
    args = ["synth", "--ct", str(ct), "--n", "4", "--size", "64", "--images-per-case", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a"), "--seed", "7", "--contact-sheet", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--seed", "7", "--contact-sheet", "0"]) == 0
    a = tmp_path / "a"
    assert _digest(a) == _digest(tmp_path / "b")
    sheets = sorted(a.glob("contact_sheet_*.png"))  # one per region the images were aimed at
    regions = {
        img["region"] for c in a.glob("case_*/case.json") for img in json.loads(c.read_text())["images"]
    }
    assert [p.name for p in sheets] == sorted(f"contact_sheet_{r}.png" for r in regions)
    assert regions <= {"chest", "thoracic_spine"}
    assert all(p.stat().st_size > 1000 for p in sheets)
    assert read_split(a, "train") == ["case_00000"]
    assert read_split(a, "val") == ["case_00001"]
    cats = {c["id"]: c for c in json.loads((a / "categories.json").read_text())}
    assert cats[10]["name"] == "lung_upper_lobe_left"
    case = json.loads((a / "case_00000" / "case.json").read_text())
    assert len(case["images"]) == 2
    assert "intrinsic" in case["images"][0]["camera"]
    n_ann = 0
    for img, rec in iter_images(a, "train"):
        assert img.shape == (64, 64)
        assert img.dtype == np.float32
        masks = decode_masks(rec)
        for ann in rec["annotations"]:
            m = masks[ann["category_id"]]
            assert 0.001 <= m.mean() <= 0.9
            x, y, w, h = ann["bbox"]
            assert m[int(y) : int(y + h), int(x) : int(x + w)].sum() == m.sum()
        present = set(masks)
        assert not present & set(rec["absent_category_ids"])
        assert 1 in rec["absent_category_ids"]  # spleen is not in the phantom
        if 10 in masks and 12 in masks and 201 in masks:  # lungs = union of both lungs
            assert np.array_equal(masks[201], masks[10] | masks[12] | masks.get(202, masks[10]))
        n_ann += len(rec["annotations"])
    assert n_ann > 0
    assert main([*args, "--out", str(tmp_path / "c"), "--seed", "8", "--contact-sheet", "0"]) == 0
    assert _digest(tmp_path / "c") != _digest(a)


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ct = _phantom_files(tmp_path)
    base = ["synth", "--n", "1", "--size", "32", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--ct", str(tmp_path / "nope.nii.gz")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([*base, "--ct", str(ct), "--structures", "left_lung,hart"]) == 2
    assert "unknown structure name 'hart'" in capsys.readouterr().err


def test_cli_synth_radiograph_views(tmp_path: Path) -> None:
    """--p-radiograph 1: every view is a whole-chest radiograph with a rectangular field."""
    ct = _phantom_files(tmp_path)
    out = tmp_path / "r"
    args = ["synth", "--ct", str(ct), "--n", "3", "--size", "48", "--images-per-case", "3", "--no-progress"]
    assert main([*args, "--out", str(out), "--p-radiograph", "1", "--contact-sheet", "0"]) == 0
    case = json.loads((out / "case_00000" / "case.json").read_text())
    lungs = np.array([[27.0, 0.0, 0.0], [-27.0, 0.0, 0.0]])  # the two lobes' centres, world mm
    for info in case["images"]:
        cam, phys = info["camera"], info["physics"]
        assert cam["view"] == "radiograph"
        assert phys["collimator_radius"] is None
        assert 950.0 <= cam["sdd"] <= 1830.0
        assert 1.05 <= cam["sdd"] / cam["sod"] <= 1.3  # chest near the detector, unlike a C-arm
        assert 350.0 <= cam["pixel_size"] * 48 <= 430.0
        # Aimed at the lungs: both lobes' centres project inside the middle of the image.
        uv = Camera.from_json(cam).project(lungs)
        assert np.all((uv > 8) & (uv < 40)), uv
    assert main([*args, "--out", str(tmp_path / "bad"), "--p-radiograph", "1.5"]) == 2


def test_cli_synth_min_path_trims_only_that_structure(tmp_path: Path) -> None:
    """--min-path lungs=MM: lung masks keep the rays that run deep in lung; images and other masks stay."""
    ct = _phantom_files(tmp_path)
    args = ["synth", "--ct", str(ct), "--n", "2", "--size", "48", "--images-per-case", "2", "--no-progress"]
    args += ["--seed", "3", "--contact-sheet", "0"]
    assert main([*args, "--out", str(tmp_path / "any")]) == 0
    assert main([*args, "--out", str(tmp_path / "deep"), "--min-path", "lungs=30"]) == 0
    trimmed = 0
    pairs = zip(iter_images(tmp_path / "any", "train"), iter_images(tmp_path / "deep", "train"))
    for (img_a, rec_a), (img_b, rec_b) in pairs:
        assert np.array_equal(img_a, img_b)  # the same projection; only the lung labels differ
        a, b = decode_masks(rec_a), decode_masks(rec_b)
        for cid in (10, 12, 201):  # left upper lobe, right upper lobe, lungs
            if cid in b:
                assert cid in a
                assert not np.any(b[cid] & ~a[cid])  # a subset: never adds pixels
                trimmed += int(a[cid].sum() - b[cid].sum())
        if 38 in a:  # the vertebra has no threshold
            assert np.array_equal(a[38], b[38])
    assert trimmed > 0
    for bad in ("lungs", "lungs=-1", "=30", "lungs=x"):
        assert main([*args, "--out", str(tmp_path / "bad"), "--min-path", bad]) == 2
    assert main([*args, "--out", str(tmp_path / "bad"), "--min-path", "lugns=30"]) == 2
