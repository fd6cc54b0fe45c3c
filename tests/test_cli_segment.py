"""`fluorosam-rt segment` as a user runs it: a real subprocess, real files, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import pytest
import torch

from fluorosam_rt.bundle import ASSETS_DIR

SAMPLE = ASSETS_DIR / "samples" / "chest_pa_2c35005f.png"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fluorosam_rt.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_segment_writes_masks_and_overlay(checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        "segment",
        str(SAMPLE),
        "--prompt",
        "left lung",
        "--prompt",
        "heart",
        "--point",
        "0:200,250",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    image = cv2.imread(str(SAMPLE), cv2.IMREAD_UNCHANGED)
    for name in ("left_lung.png", "heart.png"):
        mask = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert mask.shape == image.shape[:2]
        assert set(mask.ravel().tolist()) <= {0, 255}
    overlay = cv2.imread(str(out / "overlay.png"))
    assert overlay.shape == (*image.shape[:2], 3)
    result = json.loads((out / "result.json").read_text())
    assert [m["prompt"] for m in result["masks"]] == ["left lung", "heart"]
    assert result["masks"][0]["points"] == [[200.0, 250.0]]
    assert result["masks"][1]["points"] == []


def test_segment_official_checkpoint_on_dicom(golden_dir, shared_dir, tmp_path):
    dcm = shared_dir / "data" / "dicom" / "dx_image.dcm"
    out = tmp_path / "out"
    proc = run_cli(
        "segment",
        str(dcm),
        "--prompt",
        "lungs",
        "--checkpoint",
        str(golden_dir / "golden_checkpoint.pt"),
        "--format",
        "official",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "lungs.png").is_file()
    assert "385 keys loaded" not in proc.stderr  # a clean strict load prints no report


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.png", "--prompt", "lungs"], "missing.png"),
        ([str(SAMPLE), "--prompt", "   "], "empty prompt"),
        ([str(SAMPLE)], "at least one --prompt"),
        ([str(SAMPLE), "--prompt", "lungs", "--point", "1:3,4"], "there are 1 prompts"),
    ],
)
def test_segment_input_errors_are_clear(checkpoint, tmp_path, args, message):
    proc = run_cli("segment", *args, "--checkpoint", str(checkpoint), "--out", str(tmp_path))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_segment_checkpoint_errors_are_clear(tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00" * 64)
    proc = run_cli(
        "segment", str(SAMPLE), "--prompt", "lungs", "--checkpoint", str(corrupt), "--out", str(tmp_path)
    )
    assert proc.returncode == 2
    assert "cannot read checkpoint" in proc.stderr
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"sam.something.weight": torch.zeros(2)}}, wrong)
    proc = run_cli(
        "segment", str(SAMPLE), "--prompt", "lungs", "--checkpoint", str(wrong), "--out", str(tmp_path)
    )
    assert proc.returncode == 2
    assert "does not fit the model" in proc.stderr or "CLIP text tower" in proc.stderr
    assert "Traceback" not in proc.stderr
