"""diffdrr's Siddon renderer as an independent reference for our projector (images and masks).

diffdrr is only needed here, and only its renderer: a light namespace stands in for its torchio Subject, and
our camera becomes its pose. diffdrr's camera frame is ours turned 180° about the beam (its row 0 and column 0
sit at +y and +x), so its camera-to-world pose is [R_cw · diag(-1, -1, 1) | source].
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from train.synth.geometry import Camera


def diffdrr_available() -> bool:
    """True when diffdrr's renderer imports (its data files alone are not enough)."""
    try:
        import diffdrr.drr  # noqa: F401
    except Exception:
        return False
    return True


class DiffDRRReference:
    """Renders line integrals and per-label masks of a density volume with diffdrr, for a ``Camera``."""

    def __init__(self, density: np.ndarray, labels: np.ndarray | None, affine: np.ndarray, cam: Camera):
        from diffdrr.drr import DRR

        subject = SimpleNamespace(
            volume=SimpleNamespace(affine=np.asarray(affine, dtype=np.float64)),
            density=SimpleNamespace(data=torch.as_tensor(density, dtype=torch.float32)[None]),
            mask=None
            if labels is None
            else SimpleNamespace(data=torch.as_tensor(labels.astype(np.int64))[None]),
            reorient=torch.eye(4),
        )
        self.cam = cam
        self.drr = DRR(
            subject,
            sdd=cam.sdd,
            height=cam.height,
            width=cam.width,
            delx=cam.pixel_size,
            renderer="siddon",
            reverse_x_axis=True,
            patch_size=cam.height // 4 if cam.height % 4 == 0 else None,
        )

    def pose(self) -> torch.Tensor:
        ext = np.linalg.inv(self.cam.world_to_camera)  # camera -> world
        m = ext.copy()
        m[:3, :3] = ext[:3, :3] @ np.diag([-1.0, -1.0, 1.0])
        return torch.as_tensor(m, dtype=torch.float32)[None]

    @torch.no_grad()
    def line_integral(self) -> torch.Tensor:
        """(H, W) ∫ density dl in density·mm."""
        from diffdrr.pose import RigidTransform

        return self.drr(RigidTransform(self.pose()))[0, 0]

    @torch.no_grad()
    def label_masks(self) -> dict[int, torch.Tensor]:
        """label value -> (H, W) bool: the ray crosses the label (density > 0 inside it)."""
        from diffdrr.pose import RigidTransform

        ch = self.drr(RigidTransform(self.pose()), mask_to_channels=True)[0]
        return {int(c): ch[c] > 0 for c in range(1, ch.shape[0]) if bool((ch[c] > 0).any())}


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = (a & b).sum().item()
    s = a.sum().item() + b.sum().item()
    return 1.0 if s == 0 else 2.0 * inter / s
