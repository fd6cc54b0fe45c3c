"""C-arm cone-beam geometry with DICOM positioner angles, in the CT's NIfTI RAS+ world frame (mm).

Angle meaning (DICOM PS3.3 C.8.7.5): the angles give the direction from the isocentre to the detector for a
supine, head-first patient. Primary angle: rotation in the axial plane, 0 = detector anterior (beam posterior
to anterior), +90 = detector on the patient's left (LAO), -90 = RAO. Secondary angle: tilt in the sagittal
plane, + = detector toward the head (cranial), - = caudal.

Image convention: the image is seen from the detector looking at the source, head up, so at 0°/0° the
patient's left is on the image's right (radiological "heart on the right"). Camera frame: origin at the
source, +x = image columns, +y = image rows (down), +z = toward the detector. Pixel (col, row) continuous
coordinates put pixel centres at integer + 0.5; K = [[sdd/p, 0, W/2], [0, sdd/p, H/2], [0, 0, 1]].

Image-intensifier distortion (``distortion_k``, ``distortion_s``): the stored image is the ideal pinhole image
warped radially (pincushion) and twisted (S-distortion). Rays are cast through each stored pixel's ideal
position (``undistort``), so image and masks are distorted alike; ``project`` applies the warp, while ``P``
(``projection_matrix``) stays the ideal pinhole map and gives undistorted pixel coordinates.
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


def angles_from_direction(v: np.ndarray) -> tuple[float, float]:
    """DICOM (primary, secondary) degrees whose isocentre->detector direction is ``v``; inverts beam_axes."""
    v = np.asarray(v, dtype=np.float64)
    v = v / np.linalg.norm(v)
    secondary = float(np.degrees(np.arcsin(np.clip(v[2], -1.0, 1.0))))
    primary = float(np.degrees(np.arctan2(-v[0], v[1])))
    return primary, secondary


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
    # Image-intensifier distortion, at the image's half-width radius rho = 1: pincushion stretches the stored
    # image radially by about distortion_k * rho^2, S-distortion twists it by distortion_s * rho^2 radians.
    distortion_k: float = 0.0
    distortion_s: float = 0.0

    @property
    def distorted(self) -> bool:
        return self.distortion_k != 0.0 or self.distortion_s != 0.0

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
        """World points (N, 3) -> continuous pixel coordinates (N, 2) as (col, row) in the stored image."""
        pts = np.atleast_2d(points)
        h = self.projection_matrix @ np.concatenate([pts, np.ones((len(pts), 1))], axis=1).T
        return self.distort((h[:2] / h[2:]).T)

    def _half(self) -> float:
        return max(self.width, self.height) / 2.0

    def distort(self, uv: np.ndarray) -> np.ndarray:
        """Ideal pinhole pixel coordinates (N, 2) -> stored-image ones (the warp's explicit direction):
        stored = c + (1 + k rho^2) Rot(s rho^2) (ideal - c), rho = |ideal - c| / (max(H, W) / 2)."""
        if not self.distorted:
            return uv
        ctr = np.array([self.width / 2.0, self.height / 2.0])
        d = np.asarray(uv, dtype=np.float64) - ctr
        rho2 = (d * d).sum(-1) / self._half() ** 2
        scale = 1.0 + self.distortion_k * rho2
        th = self.distortion_s * rho2
        c, s = np.cos(th), np.sin(th)
        return ctr + scale[..., None] * np.stack(
            [c * d[..., 0] - s * d[..., 1], s * d[..., 0] + c * d[..., 1]], -1
        )

    def undistort(self, uv: torch.Tensor) -> torch.Tensor:
        """Stored-image pixel coordinates (..., 2) -> ideal ones: ``distort`` inverted.

        The warp is radial plus a twist that depends on the ideal radius only, so the ideal radius solves
        rho + k rho^3 = rho_stored (a few Newton steps, monotonic for k >= 0) and the twist is then undone.
        """
        if not self.distorted:
            return uv
        cx, cy = self.width / 2.0, self.height / 2.0
        half = self._half()
        dx, dy = (uv[..., 0] - cx) / half, (uv[..., 1] - cy) / half
        rs = torch.sqrt(dx * dx + dy * dy)
        k = self.distortion_k
        ri = rs.clone()
        for _ in range(12):
            ri = ri - (ri + k * ri**3 - rs) / (1.0 + 3.0 * k * ri**2)
        scale = torch.where(rs > 1e-12, ri / rs.clamp_min(1e-12), torch.ones_like(rs))
        th = -self.distortion_s * ri * ri
        c, s = torch.cos(th), torch.sin(th)
        return torch.stack([cx + half * scale * (c * dx - s * dy), cy + half * scale * (s * dx + c * dy)], -1)

    def pixel_world(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """World position on the detector that each stored pixel centre sees, (H, W, 3) float64."""
        _, up, right = self.axes
        dev = torch.device(device)
        cols = torch.arange(self.width, dtype=torch.float64, device=dev) + 0.5
        rows = torch.arange(self.height, dtype=torch.float64, device=dev) + 0.5
        ctr = torch.as_tensor(self.detector_center, device=dev)
        rt = torch.as_tensor(right, device=dev)
        dn = -torch.as_tensor(up, device=dev)
        if not self.distorted:
            c = (cols - self.width / 2) * self.pixel_size
            r = (rows - self.height / 2) * self.pixel_size
            return ctr + c[None, :, None] * rt + r[:, None, None] * dn
        grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), -1)  # (H, W, 2) as (col, row)
        ideal = self.undistort(grid)
        c = (ideal[..., 0] - self.width / 2) * self.pixel_size
        r = (ideal[..., 1] - self.height / 2) * self.pixel_size
        return ctr + c[..., None] * rt + r[..., None] * dn

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
                "distortion": "stored = c + (1 + k rho^2) Rot(s rho^2) (ideal - c), rho = |ideal - c| / "
                "(max(H, W) / 2), ideal = P-projected pixel; k = distortion_k, s = distortion_s (0: none)",
            }
        )
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Camera:
        keys = {
            "height", "width", "pixel_size", "sdd", "sod", "primary_deg", "secondary_deg", "isocenter",
            "table_shift", "view", "distortion_k", "distortion_s",
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


def carm_camera(
    rng: np.random.Generator,
    aim: np.ndarray,
    primary_deg: float,
    secondary_deg: float,
    size: int = 256,
    view: str = "custom",
    detector_mm: tuple[float, float] = (300.0, 400.0),
    magnification: tuple[float, float] = (1.33, 1.8),
    shift_sd_mm: float = 15.0,
    distortion: tuple[float, float] = (0.0, 0.0),
) -> Camera:
    """A C-arm shot at given DICOM angles aimed at ``aim`` (world mm).

    SID 900-1200 mm, the isocentre at ``aim`` plus a table shift, magnification SID/SOD drawn from
    ``magnification`` (a C-arm's ~1.3-1.8) and the detector side (II diameter or flat-panel side) from
    ``detector_mm``; ``distortion``: the image intensifier's (pincushion k, S-twist s), 0 for a flat panel.
    """
    sdd = float(rng.uniform(900.0, 1200.0))
    det = float(rng.uniform(*detector_mm))
    sod = float(sdd / rng.uniform(*magnification))
    shift = rng.normal(0.0, shift_sd_mm, size=3)
    iso = np.asarray(aim, dtype=np.float64) + shift
    return Camera(
        height=size,
        width=size,
        pixel_size=det / size,
        sdd=sdd,
        sod=sod,
        primary_deg=float(primary_deg),
        secondary_deg=float(secondary_deg),
        isocenter=tuple(float(x) for x in iso),
        table_shift=tuple(float(x) for x in shift),
        view=view,
        distortion_k=float(distortion[0]),
        distortion_s=float(distortion[1]),
    )


def sample_radiograph_camera(
    rng: np.random.Generator,
    chest_center: np.ndarray,
    size: int = 256,
    *,
    primary_deg: float = 0.0,
    secondary_deg: float = 0.0,
    sdd_mm: tuple[float, float] | None = None,
    object_detector_mm: tuple[float, float] = (110.0, 200.0),
    detector_mm: tuple[float, float] = (350.0, 430.0),
    shift_sd_mm: float = 10.0,
    view: str = "radiograph",
) -> Camera:
    """A radiograph instead of a C-arm shot: a large detector near the patient, the source far away.

    Radiographs are where the real evaluation images come from, and their geometry is unlike a C-arm's:
    the source is 1.0 m (bedside AP) to 1.8 m (erect PA) away, the chest is 11-20 cm from the detector
    (magnification 1.07-1.25 rather than the C-arm's ~1.5) and a 35-43 cm detector shows both lungs at
    once. The defaults are that chest radiograph; other body parts pass their own pose (``primary_deg``,
    ``secondary_deg``, jittered by a patient who is not perfectly placed), source distance ``sdd_mm``
    (None: the chest's mix of 60% erect 1.5-1.83 m and 40% bedside 0.95-1.15 m), object-to-detector
    distance (an extremity lies on the detector: a few cm) and detector side. There is never a round
    collimator; the image keeps the standard display (patient's left on the image's right at 0°/0°).
    """
    erect = rng.random() < 0.6
    if sdd_mm is None:
        sdd = float(rng.uniform(1500.0, 1830.0) if erect else rng.uniform(950.0, 1150.0))
    else:
        sdd = float(rng.uniform(*sdd_mm))
    odd = float(rng.uniform(*object_detector_mm))  # aimed structure's centre to detector
    det = float(rng.uniform(*detector_mm))
    shift = rng.normal(0.0, shift_sd_mm, size=3)
    iso = np.asarray(chest_center, dtype=np.float64) + shift
    return Camera(
        height=size,
        width=size,
        pixel_size=det / size,
        sdd=sdd,
        sod=sdd - odd,
        primary_deg=float(primary_deg + rng.normal(0.0, 3.0)),
        secondary_deg=float(secondary_deg + rng.normal(0.0, 5.0)),
        isocenter=tuple(float(x) for x in iso),
        table_shift=tuple(float(x) for x in shift),
        view=view,
    )
