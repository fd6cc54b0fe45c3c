"""Readers: labelled X-ray folder and FluoroSeg; training items in the model frame."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fluorosam_rt.preprocess import Preprocessor
from train.augment import AugmentConfig
from train.data import TextFeatureBank, mask_to_model_frame, open_dataset
from train.fluoroseg import FluoroSegDataset, is_fluoroseg
from train.labelled_folder import LabelledFolder
from train.prompt_sampling import PromptedImages, PromptSamplingConfig, collate
from train.toyset import write_toy_fluoroseg, write_toy_folder


def test_labelled_folder_reads_masks_prompts_and_empty_masks_as_absent(tmp_path: Path) -> None:
    root = write_toy_folder(tmp_path / "f", n=2, size=50)
    cv2.imwrite(str(root / "masks" / "lungs" / "img001.png"), np.zeros((50, 50), np.uint8))
    ds = open_dataset(root)
    assert isinstance(ds, LabelledFolder)
    assert len(ds) == 2
    assert ds.structures["left_lung"].prompt == "left lung"
    phr = ds.structures["left_lung"].phrasings  # from the vocabulary, since the folder name matches
    assert phr
    assert "left lung" not in phr
    assert set(ds.present(0)) == {"lungs", "left_lung", "right_lung"}
    assert ds.absent(1) == ["lungs"]
    case = ds.load(0)
    assert case.image.shape == (50, 50)
    assert case.masks["lungs"].dtype == bool
    over = tmp_path / "p.json"
    over.write_text(json.dumps({"lungs": "both lungs"}))
    assert open_dataset(root, over).structures["lungs"].prompt == "both lungs"


def test_fluoroseg_reader_and_parent_of_chunks(tmp_path: Path) -> None:
    write_toy_fluoroseg(tmp_path / "chunks" / "a", 3, 1, 40, seed=0)
    write_toy_fluoroseg(tmp_path / "chunks" / "b", 2, 1, 40, seed=1)
    assert is_fluoroseg(tmp_path / "chunks")
    tr = FluoroSegDataset(tmp_path / "chunks", "train")
    va = FluoroSegDataset(tmp_path / "chunks", "val")
    assert len(tr) == 5
    assert len(va) == 2
    case = tr.load(0, ["lungs"])
    assert set(case.masks) == {"lungs"}
    assert case.image.dtype == np.float32
    assert case.masks["lungs"].sum() / case.masks["lungs"].size == pytest.approx(tr.area_fraction(0, "lungs"))


def test_mask_to_model_frame_matches_preprocessor_geometry() -> None:
    m = np.zeros((60, 120), bool)
    m[:, 60:] = True
    out = mask_to_model_frame(m, 64)
    assert out.shape == (64, 64)
    assert out[:30].sum() > 0
    assert out[32:].sum() == 0
    assert out[:30, 34:].min() == 1.0
    assert out[:30, :30].max() == 0.0


def test_prompted_images_are_deterministic_and_in_model_frame(tmp_path: Path) -> None:
    ds = FluoroSegDataset(write_toy_fluoroseg(tmp_path / "fs", 3, 0, 48), "train")
    texts = sorted({t for s in ds.structures.values() for t in s.texts})
    bank = TextFeatureBank(texts, torch.randn(len(texts), 8), "test")
    pi = PromptedImages(
        ds,
        bank,
        Preprocessor(32, window_at="resized"),
        PromptSamplingConfig(prompts_per_image=4),
        AugmentConfig(),
        seed=3,
    )
    a, b = pi[1], pi[1]
    for k in a:
        assert torch.equal(a[k], b[k])
    assert a["image"].shape == (3, 32, 32)
    assert a["targets"].shape == (4, 32, 32)
    # an absent prompt has an empty target
    assert all(a["targets"][i].sum() == 0 for i in range(4) if not a["present"][i])
    pi.set_epoch(1)
    assert not torch.equal(pi[1]["image"], a["image"])
    batch = collate([pi[0], pi[2]])
    assert batch["image_index"].tolist() == [0] * 4 + [1] * 4


def test_shared_chest_folder_reads(shared_dir: Path) -> None:
    # shared_dir (tests/conftest.py) fails loudly when ../shared is missing: this never skips.
    ds = open_dataset(shared_dir / "data" / "chest-xray-hannover")
    assert len(ds) == 77
    assert ds.structures["left_lung"].prompt == "left lung"
    case = ds.load(0)
    assert case.masks["lungs"].shape == case.image.shape[:2]
    flagged = sum(bool(ds.case_meta(i).get("mask_extends_outside_field_of_view")) for i in range(len(ds)))
    assert flagged == 5
