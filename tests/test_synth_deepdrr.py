"""The optional deepdrr backend: never imported by default, clear errors without it, adapter logic on a stub,
and (only where deepdrr and CUDA exist) a real render against the torch backend."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from train.synth.deepdrr_backend import deepdrr_unavailable_reason
from train.synth.geometry import Camera
from train.synth.physics import PhysicsParams, detector_image, polychromatic_transmission
from train.synth.tools import Tool
from train.synth.volume import PreparedVolume

REPO = Path(__file__).resolve().parents[1]
_WHY = deepdrr_unavailable_reason()


def _volume() -> PreparedVolume:
    """A water block with a bone core and one label, 4 mm voxels."""
    mats = torch.zeros(1, 3, 20, 20, 20)
    mats[0, 1, 3:17, 3:17, 3:17] = 1.0
    mats[0, 1, 8:12, 8:12, 8:12] = 0.0
    mats[0, 2, 8:12, 8:12, 8:12] = 1.6
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = -38.0
    bits = torch.zeros(1, 20, 20, 20)
    bits[0, 8:12, 8:12, 8:12] = 1.0  # bit 0 = label 51
    pts = {51: np.zeros((4, 3), np.float32)}
    return PreparedVolume("block", mats, aff, bits, aff, [51], {51: np.zeros(3)}, pts)


def _quiet_physics() -> PhysicsParams:
    return PhysicsParams(
        photons_per_pixel=1e9,
        electronic_noise=0.0,
        blur_px=0.0,
        scatter_fraction=0.0,
        collimator_radius=None,
        window_lo=0.0,
        window_hi=1.0,
    )


def test_deepdrr_is_never_imported_by_default() -> None:
    code = (
        "import sys, numpy as np, torch\n"
        "import train.cli, train.synth.generate, train.synth.backend as b\n"
        "from train.synth.volume import PreparedVolume\n"
        "a = np.eye(4)\n"
        "v = PreparedVolume('x', torch.zeros(1, 3, 4, 4, 4), a, torch.zeros(1, 4, 4, 4), a, [], {}, {})\n"
        "b.make_backend('torch', v)\n"
        "train.cli.build_parser()\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'deepdrr'], 'deepdrr imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.skipif(_WHY is None, reason="deepdrr is usable here; the unavailable path is not reachable")
def test_cli_backend_deepdrr_without_it_is_a_clear_error(tmp_path: Path, capsys) -> None:
    from train.cli import main

    rc = main(["synth", "--ct", "bundled", "--n", "1", "--out", str(tmp_path), "--backend", "deepdrr"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--backend deepdrr" in err
    assert "CUDA" in err or "not importable" in err
    assert not list(tmp_path.iterdir())  # refused before any work


class _Recorder:
    def __init__(self) -> None:
        self.calls: list = []


def _stub_deepdrr(monkeypatch: pytest.MonkeyPatch, transmission: np.ndarray, mean_kev: float) -> _Recorder:
    """A stand-in deepdrr package that records what the adapter hands it and returns a known intensity."""
    rec = _Recorder()
    dd = types.ModuleType("deepdrr")
    geo = types.ModuleType("deepdrr.geo")
    proj_mod = types.ModuleType("deepdrr.projector")
    spectral = types.ModuleType("deepdrr.projector.spectral_data")

    class FrameTransform:
        def __init__(self, data):
            self.data = np.asarray(data)

    class CameraIntrinsicTransform(FrameTransform):
        pass

    class CameraProjection:
        def __init__(self, intrinsic, extrinsic):
            self.intrinsic, self.extrinsic = intrinsic, extrinsic

    class Volume:
        def __init__(self, data, materials, anatomical_from_ijk):
            rec.calls.append(("volume", data, materials, anatomical_from_ijk))

    class Projector:
        def __init__(self, volume, camera_intrinsics=None, **kw):
            rec.calls.append(("projector", camera_intrinsics, kw))

        def initialize(self):
            rec.calls.append(("initialize",))

        def project(self, cp):
            rec.calls.append(("project", cp))
            return (transmission * mean_kev).astype(np.float32)

        def free(self):
            rec.calls.append(("free",))

    geo.FrameTransform, geo.CameraIntrinsicTransform, geo.CameraProjection = (
        FrameTransform,
        CameraIntrinsicTransform,
        CameraProjection,
    )
    dd.Volume, dd.geo, dd.projector = Volume, geo, proj_mod
    proj_mod.Projector, proj_mod.spectral_data = Projector, spectral
    e = np.linspace(20e3, 90e3, 8)  # eV, as deepdrr tabulates them
    p = np.ones(8)
    spectral.spectrums = {n: np.stack([e, p], 1) for n in ("60KV_AL35", "90KV_AL40", "120KV_AL43")}
    for name, mod in [
        ("deepdrr", dd),
        ("deepdrr.geo", geo),
        ("deepdrr.projector", proj_mod),
        ("deepdrr.projector.spectral_data", spectral),
    ]:
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return rec


def test_adapter_maps_volume_camera_and_physics_on_a_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    from train.synth.deepdrr_backend import DeepDRRBackend, nearest_spectrum

    cam = Camera(24, 32, 3.0, 1000.0, 650.0, 20.0, 5.0, (0.0, 0.0, 0.0))
    anat = np.random.default_rng(0).uniform(0.2, 0.9, size=(24, 32))
    rec = _stub_deepdrr(monkeypatch, anat, mean_kev=55.0)
    vol = _volume()
    be = DeepDRRBackend(vol, device="cpu")
    kind, density, mats, aff = rec.calls[0]
    assert kind == "volume"
    assert np.allclose(density, vol.materials[0].sum(0).numpy())
    assert set(mats) == {"air", "soft tissue", "bone"}
    assert (mats["air"] + mats["soft tissue"] + mats["bone"] == 1).all()  # every voxel has one material
    assert np.allclose(aff.data, vol.materials_affine)
    tool = Tool("k_wire", 301, "stainless_steel")
    tool.add_cylinder([-30.0, 0.0, 0.0], [30.0, 0.0, 0.0], 2.0)
    phys = _quiet_physics()
    img, proj = be.render(cam, [tool], phys, torch.Generator().manual_seed(0))
    _, intr, kw = rec.calls[1]
    assert np.allclose(intr.data, cam.intrinsic)
    assert kw["spectrum"] == nearest_spectrum(phys.kvp) == "90KV_AL40"
    assert not kw["add_noise"]
    assert not kw["neglog"]
    cp = rec.calls[-1][1]
    assert np.allclose(cp.intrinsic.data, cam.intrinsic)
    assert np.allclose(cp.extrinsic.data, cam.world_to_camera)
    # Transmission = deepdrr's energy per photon / the beam's mean energy (55 keV in the stub's eV table),
    # times the tools' transmission, then our detector model.
    tools_only = proj.line_integrals.clone()
    tools_only[:3] = 0.0
    prim = torch.as_tensor(anat, dtype=torch.float32) * polychromatic_transmission(tools_only, phys.kvp)
    want = detector_image(prim, phys, torch.Generator().manual_seed(0))
    assert torch.allclose(img, want, atol=1e-5)
    assert proj.tool_hits[0].any()  # masks come from our projector
    assert proj.label_hits[0].any()
    assert nearest_spectrum(70) == "60KV_AL35"
    assert nearest_spectrum(110) == "120KV_AL43"
    be.close()
    assert rec.calls[-1] == ("free",)


@pytest.mark.gpu
@pytest.mark.skipif(_WHY is not None, reason=f"deepdrr backend unavailable: {_WHY}")
def test_deepdrr_render_agrees_with_torch_backend() -> None:  # pragma: no cover - needs deepdrr + CUDA
    from train.synth.backend import make_backend

    vol = _volume()
    cam = Camera(64, 64, 2.0, 1000.0, 650.0, 0.0, 0.0, (0.0, 0.0, 0.0))
    phys = _quiet_physics()
    ref_img, ref = make_backend("torch", vol, "cuda").render(cam, [], phys, None)
    img, proj = make_backend("deepdrr", vol, "cuda").render(cam, [], phys, None)
    assert img.shape == (64, 64)
    assert torch.equal(proj.label_hits.cpu(), ref.label_hits.cpu())
    c = np.corrcoef(img.cpu().numpy().ravel(), ref_img.cpu().numpy().ravel())[0, 1]
    assert c > 0.9
