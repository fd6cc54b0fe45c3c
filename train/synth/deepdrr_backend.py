"""deepdrr as an optional render backend (``fluorosam-train synth --backend deepdrr``).

Written to deepdrr's 1.x Python API (``deepdrr.Volume``, ``deepdrr.geo.CameraProjection``,
``deepdrr.projector.Projector``) and NOT executed in this repository's CI, which has neither deepdrr nor CUDA;
its tests skip there. deepdrr is GPL-3.0 and is imported lazily, only by this module, only when this backend
is chosen.

Mapping:
* CT: the prepared volume's material channels become deepdrr's density (their sum, g/cm³) and its material
  segmentation ("air", "soft tissue", "bone", each where its channel is non-zero), with the channels' voxel ->
  RAS affine as deepdrr's ``anatomical_from_ijk`` and identity ``world_from_anatomical``, so deepdrr's world
  is our world.
* Camera: our intrinsic K and world -> camera extrinsic are already a pinhole camera in deepdrr's convention
  (camera z toward the detector, x = columns, y = rows), so they go in unchanged as a ``CameraProjection``.
  deepdrr may put the ray through a pixel's corner where we use its centre: up to half a pixel of shift.
* Physics: deepdrr casts the anatomy polychromatically with its own spectrum (the nearest of its 60/90/120
  kVp spectra to the image's kVp) and attenuation tables; its noise and scatter are off, and its energy
  per photon divided by the unattenuated spectrum's mean energy is used as the primary transmission. Tools
  are not handed to deepdrr: their transmission (our exact ray traces, our material tables, same kVp)
  multiplies deepdrr's, which ignores the beam hardening between anatomy and metal. The detector model
  (scatter kernel, Poisson and electronic noise, blur, neglog, collimator, window) is ours, shared with the
  torch backend through ``physics.detector_image``.
* Masks: from our projector, so annotations are identical in kind to the torch backend's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from train.synth.geometry import Camera
from train.synth.materials import ANATOMY_MATERIALS
from train.synth.physics import PhysicsParams, detector_image, polychromatic_transmission
from train.synth.projector import Projection, Projector, RayTool
from train.synth.volume import PreparedVolume


class BackendUnavailable(RuntimeError):
    """A backend that cannot run on this machine; the message says what is missing.

    Defined here, where it is raised, so this module needs nothing from ``backend`` (whose
    ``make_backend`` imports this one lazily).
    """


DEEPDRR_SPECTRA = {60: "60KV_AL35", 90: "90KV_AL40", 120: "120KV_AL43"}
_DEEPDRR_MATERIALS = {"air": "air", "soft_tissue": "soft tissue", "bone": "bone"}


def deepdrr_unavailable_reason() -> str | None:
    """None when deepdrr's projector can run here, else why not (used by the CLI and to skip tests)."""
    try:
        import deepdrr
        import deepdrr.projector  # noqa: F401  (initialises pycuda: fails without a CUDA driver)
    except Exception as e:  # ImportError, pycuda's driver errors, missing EGL, ...
        return f"deepdrr is not importable here ({type(e).__name__}: {e}); install it on a CUDA machine"
    if not torch.cuda.is_available():
        return "deepdrr needs a CUDA GPU and none is visible"
    return None


def nearest_spectrum(kvp: float) -> str:
    """deepdrr ships three tube spectra; the closest in kVp stands in for the requested one."""
    return DEEPDRR_SPECTRA[min(DEEPDRR_SPECTRA, key=lambda k: abs(k - kvp))]


def deepdrr_volume(vol: PreparedVolume) -> Any:
    """Our prepared CT as a ``deepdrr.Volume`` in the same world frame."""
    import deepdrr
    from deepdrr import geo

    mats = vol.materials[0].detach().cpu().numpy()  # (3, X, Y, Z): air, soft tissue, bone
    density = mats.sum(0).astype(np.float32)
    seg = {_DEEPDRR_MATERIALS[n]: (mats[i] > 0) for i, n in enumerate(ANATOMY_MATERIALS)}
    seg["air"] = seg["air"] | ~(seg["soft tissue"] | seg["bone"])  # zero-density voxels count as air
    seg = {k: v.astype(np.float32) for k, v in seg.items()}
    # Positional: the keyword is spelled anatomical_from_ijk in some 1.x releases and _IJK in others.
    return deepdrr.Volume(density, seg, geo.FrameTransform(np.asarray(vol.materials_affine, np.float64)))


def camera_projection(cam: Camera) -> Any:
    """Our camera as a ``deepdrr.geo.CameraProjection`` (same K, same world -> camera)."""
    from deepdrr import geo

    return geo.CameraProjection(
        geo.CameraIntrinsicTransform(cam.intrinsic), geo.FrameTransform(cam.world_to_camera)
    )


def spectrum_mean_energy(name: str) -> float:
    """Energy per photon of the unattenuated beam, in the unit deepdrr's intensity uses (keV)."""
    from deepdrr.projector import spectral_data

    spec = np.asarray(spectral_data.spectrums[name], dtype=np.float64)
    e, p = spec[:, 0], spec[:, 1]
    if e.max() > 1000.0:  # tabulated in eV
        e = e / 1000.0
    return float((e * p).sum() / p.sum())


class DeepDRRBackend:
    """deepdrr's ray caster for the anatomy, our projector for masks and tools, our detector model."""

    name = "deepdrr"

    def __init__(self, vol: PreparedVolume, device: torch.device | str | None = "cuda", step: float = 0.1):
        why = deepdrr_unavailable_reason()
        if why is not None:
            raise BackendUnavailable(why)
        self.projector = Projector(vol, device=device or "cuda")
        self.step = step
        self._volume = deepdrr_volume(vol)
        self._casters: dict[tuple[int, int, str], Any] = {}

    def _caster(self, cam: Camera, spectrum: str) -> Any:
        """One initialised deepdrr Projector per (image size, spectrum): both are fixed at its creation."""
        key = (cam.height, cam.width, spectrum)
        if key not in self._casters:
            from deepdrr import geo
            from deepdrr.projector import Projector as DeepDRRProjector

            caster = DeepDRRProjector(
                self._volume,
                camera_intrinsics=geo.CameraIntrinsicTransform(cam.intrinsic),
                step=self.step,
                mode="linear",
                spectrum=spectrum,
                scatter_num=0,
                add_noise=False,
                neglog=False,
            )
            caster.initialize()
            self._casters[key] = caster
        return self._casters[key]

    def anatomy_transmission(self, cam: Camera, kvp: float) -> torch.Tensor:
        """(H, W) primary transmission of the anatomy according to deepdrr."""
        spectrum = nearest_spectrum(kvp)
        intensity = np.asarray(self._caster(cam, spectrum).project(camera_projection(cam)), np.float32)
        if intensity.shape != (cam.height, cam.width):
            raise RuntimeError(f"deepdrr returned {intensity.shape}, expected {(cam.height, cam.width)}")
        t = intensity / spectrum_mean_energy(spectrum)
        return torch.from_numpy(t).to(self.projector.device).clamp(0.0, 1.0)

    def render(
        self,
        cam: Camera,
        tools: Sequence[RayTool],
        phys: PhysicsParams,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, Projection]:
        proj = self.projector.project(cam, tools)
        prim = self.anatomy_transmission(cam, phys.kvp)
        if len(tools):
            only_tools = proj.line_integrals.clone()
            only_tools[: len(ANATOMY_MATERIALS)] = 0.0
            prim = prim * polychromatic_transmission(only_tools, phys.kvp, phys.cu_mm)
        return detector_image(prim, phys, generator), proj

    def close(self) -> None:
        """Free deepdrr's GPU buffers."""
        for c in self._casters.values():
            c.free()
        self._casters.clear()
