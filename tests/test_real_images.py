"""The real-image manifest (configs/real_images.yaml) and its fetch: cheap, no network, no model.

The images themselves are not in git; these tests check the manifest is complete (region, source,
licence with evidence, sha256 per image), that the fetch copies and verifies bytes from a wheel,
and that a missing source stops the fetch with one clear line.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("real_images", ROOT / "scripts" / "real_images.py")
assert _spec is not None
assert _spec.loader is not None
real_images = importlib.util.module_from_spec(_spec)
sys.modules["real_images"] = real_images
_spec.loader.exec_module(real_images)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return real_images.load_manifest()


def test_manifest_is_well_formed_and_covers_regions(manifest: dict) -> None:
    regions = {e["region"] for e in manifest["images"]}
    assert {"pelvis", "chest", "hand_wrist", "lower_leg"} <= regions
    for entry in manifest["images"]:
        assert entry["licence"]["evidence"].strip()
        assert len(entry["sha256"]) == 64
        assert real_images.prompts_for(manifest, entry["id"])[-2:] == ["K-wire", "screw"]


@pytest.mark.parametrize("key", ["region", "source", "licence", "sha256"])
def test_entry_without_a_required_key_is_rejected(manifest: dict, key: str) -> None:
    broken = copy.deepcopy(manifest)
    del broken["images"][0][key]
    with pytest.raises(real_images.ManifestError, match=key):
        real_images.validate(broken)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("licence", "id"), "CC BY-NC-SA 4.0", "not an open licence"),
        (("licence", "evidence"), "", "evidence"),
        (("sha256",), "abc", "64 hex"),
        (("source", "kind"), "http", "source.kind"),
        (("modality",), "CT", "modality"),
        (("file",), "elsewhere/x.png", "out/real_images"),
    ],
)
def test_bad_values_are_rejected(manifest: dict, path: tuple[str, ...], value: str, message: str) -> None:
    broken = copy.deepcopy(manifest)
    node = broken["images"][0]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(real_images.ManifestError, match=message):
        real_images.validate(broken)


def _wheel_manifest(tmp_path: Path, payload: bytes, sha: str) -> dict:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "demo-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("data/img.dcm", payload)
    return {
        "prompt_sets": {"chest": ["lungs"]},
        "images": [
            {
                "id": "demo",
                "region": "chest",
                "file": "out/real_images/chest/img.dcm",
                "modality": "CR",
                "prompt_set": "chest",
                "source": {
                    "kind": "wheel",
                    "package": "demo",
                    "version": "1.0",
                    "wheel": "demo-1.0-py3-none-any.whl",
                    "path": "data/img.dcm",
                },
                "licence": {"id": "MIT", "evidence": "test"},
                "sha256": sha,
            }
        ],
    }


def test_fetch_copies_from_a_wheel_and_checks_the_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"not really a dicom"
    good = hashlib.sha256(payload).hexdigest()
    data = _wheel_manifest(tmp_path, payload, good)
    real_images.validate(data)
    monkeypatch.setenv("REAL_IMAGES_WHEELS", str(tmp_path / "wheels"))
    (written,) = real_images.fetch(data, root=tmp_path)
    assert written.read_bytes() == payload
    data["images"][0]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="differs"):
        real_images.fetch(data, root=tmp_path)


def test_fetch_names_a_missing_github_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, manifest: dict
) -> None:
    monkeypatch.setenv("REAL_IMAGES_MIRRORS", str(tmp_path / "none"))
    github = [e for e in manifest["images"] if e["source"]["kind"] == "github"]
    data = {"prompt_sets": manifest["prompt_sets"], "images": github[:1]}
    with pytest.raises(FileNotFoundError, match=f"source absent: github:{github[0]['source']['repo']}"):
        real_images.fetch(data, root=tmp_path)


def test_fetch_script_fails_with_one_clear_line_when_a_source_is_absent(tmp_path: Path) -> None:
    env = dict(os.environ, REAL_IMAGES_WHEELS=str(tmp_path / "w"), REAL_IMAGES_MIRRORS=str(tmp_path / "m"))
    env.pop("REAL_IMAGES_DOWNLOAD", None)
    env["PYTHON"] = sys.executable
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch_real_images.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "source absent" in lines[0]
    assert "pydicom-data" in lines[0]
