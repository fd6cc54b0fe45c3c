"""C-arm cone-beam geometry with DICOM positioner angles, in the CT's NIfTI RAS+ world frame (mm).

Angle meaning (DICOM PS3.3 C.8.7.5): the angles give the direction from the isocentre to the detector for a
supine, head-first patient. Primary angle: rotation in the axial plane, 0 = detector anterior (beam posterior
to anterior), +90 = detector on the patient's left (LAO), -90 = RAO. Secondary angle: tilt in the sagittal
plane, + = detector toward the head (cranial), - = caudal.

Image convention: the image is seen from the detector looking at the source, head up, so at 0°/0° the
patient's left is on the image's right (radiological "heart on the right"). Camera frame: origin at the
source, +x = image columns, +y = image rows (down), +z = toward the detector. Pixel (col, row) continuous
coordinates put pixel centres at integer + 0.5; K = [[sdd/p, 0, W/2], [0, sdd/p, H/2], [0, 0, 1]].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


def beam_axes(primary_deg: float, secondary_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(v, up, right): unit vectors isocentre->detector, image up and image right, in RAS+ world."""
    a, b = np.deg2rad(primary_deg), np.deg2rad(secondary_deg)
    v = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    up = np.array([np.sin(a) * np.sin(b), -np.cos(a) * np.sin(b), np.cos(b)])
    right = np.cross(up, v)
    return v, up, right


@dataclass
class Camera:
    """One C-arm pose plus detector; everything needed to re-project a 3D point into the stored image."""

    height: int
    width: int
    pixel_size: float  # mm, square pixels (detector side / pixels)
    sdd: float  # source-to-detector distance, mm
    sod: float  # source-to-isocentre distance, mm
    primary_deg: float
    secondary_deg: float
    isocenter: tuple[float, float, float]  # world mm = anchor + table_shift
    table_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    view: str = "custom"

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return beam_axes(self.primary_deg, self.secondary_deg)

    @property
    def source(self) -> np.ndarray:
        v, _, _ = self.axes
        return np.asarray(self.isocenter, dtype=np.float64) - self.sod * v

    @property
    def detector_center(self) -> np.ndarray:
        v, _, _ = self.axes
        return self.source + self.sdd * v

    @property
    def intrinsic(self) -> np.ndarray:
        f = self.sdd / self.pixel_size
        return np.array([[f, 0.0, self.width / 2.0], [0.0, f, self.height / 2.0], [0.0, 0.0, 1.0]])

    @property
    def world_to_camera(self) -> np.ndarray:
        """4x4 extrinsic: world mm -> camera frame (origin at source, z toward detector)."""
        v, up, right = self.axes
        rot = np.stack([right, -up, v])
        ext = np.eye(4)
        ext[:3, :3] = rot
        ext[:3, 3] = -rot @ self.source
        return ext

    @property
    def projection_matrix(self) -> np.ndarray:
        """3x4 P = K [R | t]; pixel = (P X)[:2] / (P X)[2]."""
        return self.intrinsic @ self.world_to_camera[:3]

    def project(self, points: np.ndarray) -> np.ndarray:
        """World points (N, 3) -> continuous pixel coordinates (N, 2) as (col, row)."""
        pts = np.atleast_2d(points)
        h = self.projection_matrix @ np.concatenate([pts, np.ones((len(pts), 1))], axis=1).T
        return (h[:2] / h[2:]).T

    def pixel_world(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """World position of every pixel centre on the detector, (H, W, 3) float64."""
        _, up, right = self.axes
        dev = torch.device(device)
        c = (
            torch.arange(self.width, dtype=torch.float64, device=dev) + 0.5 - self.width / 2
        ) * self.pixel_size
        r = (
            torch.arange(self.height, dtype=torch.float64, device=dev) + 0.5 - self.height / 2
        ) * self.pixel_size
        ctr = torch.as_tensor(self.detector_center, device=dev)
        rt = torch.as_tensor(right, device=dev)
        dn = -torch.as_tensor(up, device=dev)
        return ctr + c[None, :, None] * rt + r[:, None, None] * dn

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        v, up, right = self.axes
        d.update(
            {
                "isocenter": [float(x) for x in self.isocenter],
                "table_shift": [float(x) for x in self.table_shift],
                "source": self.source.tolist(),
                "detector_center": self.detector_center.tolist(),
                "detector_size_mm": [self.height * self.pixel_size, self.width * self.pixel_size],
                "beam_direction": v.tolist(),
                "image_up": up.tolist(),
                "image_right": right.tolist(),
                "intrinsic": self.intrinsic.tolist(),
                "extrinsic": self.world_to_camera.tolist(),
                "world_frame": "NIfTI RAS+ world of the case's CT, mm",
                "pixels": "pixel (col,row) centres at integer+0.5; P=K[R|t] maps world -> (col,row)",
            }
        )
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Camera:
        keys = {
            "height", "width", "pixel_size", "sdd", "sod", "primary_deg", "secondary_deg", "isocenter",
            "table_shift", "view",
        }  # fmt: skip
        kw = {k: d[k] for k in keys if k in d}
        kw["isocenter"] = tuple(kw["isocenter"])
        kw["table_shift"] = tuple(kw.get("table_shift", (0.0, 0.0, 0.0)))
        return cls(**kw)


# Probability of each view kind; "random" draws from the C-arm's mechanical range.
VIEW_KINDS: dict[str, float] = {
    "AP": 0.25,
    "lateral": 0.15,
    "oblique": 0.25,
    "cranio_caudal": 0.1,
    "random": 0.25,
}


def sample_angles(rng: np.random.Generator, kind: str | None = None) -> tuple[str, float, float]:
    """Draw a view kind and its DICOM primary/secondary angles (degrees)."""
    if kind is None:
        names = list(VIEW_KINDS)
        p = np.array([VIEW_KINDS[n] for n in names])
        kind = str(rng.choice(names, p=p / p.sum()))
    j = lambda s: float(rng.normal(0.0, s))  # noqa: E731
    if kind == "AP":
        return kind, j(4.0), j(4.0)
    if kind == "lateral":
        return kind, float(rng.choice([-90.0, 90.0])) + j(4.0), j(4.0)
    if kind == "oblique":
        return kind, float(rng.choice([-1.0, 1.0]) * rng.uniform(25.0, 60.0)), j(8.0)
    if kind == "cranio_caudal":
        return kind, j(8.0), float(rng.choice([-1.0, 1.0]) * rng.uniform(15.0, 35.0))
    if kind == "random":
        return kind, float(rng.uniform(-120.0, 120.0)), float(rng.uniform(-40.0, 40.0))
    raise ValueError(f"unknown view kind {kind!r}; choose from {list(VIEW_KINDS)}")


def sample_camera(
    rng: np.random.Generator,
    anchors: np.ndarray,
    size: int = 256,
    kind: str | None = None,
) -> Camera:
    """A plausible C-arm shot: aim at an organ's centre (one of ``anchors``, world mm) plus a table shift."""
    kind, prim, sec = sample_angles(rng, kind)
    sdd = float(rng.uniform(900.0, 1200.0))
    det = float(rng.uniform(300.0, 400.0))
    sod = float(sdd * rng.uniform(0.55, 0.75))
    anchor = anchors[int(rng.integers(len(anchors)))]
    shift = rng.normal(0.0, 15.0, size=3)
    iso = anchor + shift
    return Camera(
        height=size,
        width=size,
        pixel_size=det / size,
        sdd=sdd,
        sod=sod,
        primary_deg=prim,
        secondary_deg=sec,
        isocenter=tuple(float(x) for x in iso),
        table_shift=tuple(float(x) for x in shift),
        view=kind,
    )


def sample_radiograph_camera(rng: np.random.Generator, chest_center: np.ndarray, size: int = 256) -> Camera:
    """A chest radiograph instead of a C-arm shot: the whole thorax on a large detector near the patient.

    Radiographs are where the real evaluation images come from, and their geometry is unlike a C-arm's:
    the source is 1.0 m (bedside AP) to 1.8 m (erect PA) away, the chest is 11-20 cm from the detector
    (magnification 1.07-1.25 rather than the C-arm's ~1.5) and a 35-43 cm detector shows both lungs at
    once. The image keeps the standard display (patient's left on the image's right), so the pose stays
    near 0°/0° with the small tilts of a patient who is not perfectly upright.
    """
    sdd = float(rng.uniform(1500.0, 1830.0) if rng.random() < 0.6 else rng.uniform(950.0, 1150.0))
    odd = float(rng.uniform(110.0, 200.0))  # chest centre to detector
    det = float(rng.uniform(350.0, 430.0))
    shift = rng.normal(0.0, 10.0, size=3)
    iso = np.asarray(chest_center, dtype=np.float64) + shift
    return Camera(
        height=size,
        width=size,
        pixel_size=det / size,
        sdd=sdd,
        sod=sdd - odd,
        primary_deg=float(rng.normal(0.0, 3.0)),
        secondary_deg=float(rng.normal(0.0, 5.0)),
        isocenter=tuple(float(x) for x in iso),
        table_shift=tuple(float(x) for x in shift),
        view="radiograph",
    )
