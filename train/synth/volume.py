"""A CT prepared for projection: downsampled per-material density channels plus label bit-fields."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train.synth.ct_source import CTSource
from train.synth.materials import hu_to_material_densities


@dataclass
class PreparedVolume:
    """Tensors and world->grid maps used by the projector; cheap to save and to load in worker processes."""

    name: str
    materials: torch.Tensor  # (1, 3, X, Y, Z) g/cm³: air, soft tissue, bone
    materials_affine: np.ndarray  # 4x4 voxel -> world of the material grid
    label_bits: torch.Tensor  # (C, X', Y', Z') float32; bit b of channel c <=> label present_ids[24c + b]
    labels_affine: np.ndarray  # 4x4 voxel -> world of the (OR-pooled) label-bit grid
    present_ids: list[int]
    anchors: dict[int, np.ndarray]  # label id -> centroid (world mm)
    points: dict[int, np.ndarray]  # label id -> up to 4000 voxel centres (world mm), for tool placement

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            name=self.name,
            materials=self.materials.numpy(),
            materials_affine=self.materials_affine,
            label_bits=self.label_bits.numpy(),
            labels_affine=self.labels_affine,
            present_ids=np.array(self.present_ids),
            anchor_ids=np.array(list(self.anchors)),
            anchors=np.stack(list(self.anchors.values())),
            **{f"points_{k}": v for k, v in self.points.items()},
        )

    @classmethod
    def load(cls, path: str | Path) -> PreparedVolume:
        z = np.load(path)
        ids = [int(i) for i in z["anchor_ids"]]
        return cls(
            name=str(z["name"]),
            materials=torch.from_numpy(z["materials"]),
            materials_affine=z["materials_affine"],
            label_bits=torch.from_numpy(z["label_bits"]),
            labels_affine=z["labels_affine"],
            present_ids=[int(i) for i in z["present_ids"]],
            anchors={i: z["anchors"][n] for n, i in enumerate(ids)},
            points={int(k.split("_")[1]): z[k] for k in z.files if k.startswith("points_")},
        )

    def to(self, device: torch.device | str) -> PreparedVolume:
        self.materials = self.materials.to(device)
        self.label_bits = self.label_bits.to(device)
        return self


def _downsample_factors(spacing: np.ndarray, target_mm: float) -> tuple[int, int, int]:
    return tuple(max(1, round(target_mm / float(s))) for s in spacing)  # type: ignore[return-value]


BITS_PER_CHANNEL = 24  # float32 holds integers < 2**24 exactly, and nearest grid_sample copies them


def label_bit_volume(labels: np.ndarray, ids: list[int], factors: tuple[int, int, int]) -> torch.Tensor:
    """Pack a label map into float32 bit-field channels, OR-pooled over ``factors`` blocks.

    Labels become bits so one nearest-neighbour ``grid_sample`` reads all labels at once and a bitwise OR
    along the ray gives every label's "ray crosses it" at once. OR-pooling keeps thin structures that a plain
    subsample would drop; it dilates masks by under one pooled voxel (measured against diffdrr in the tests).
    """
    n_ch = max(1, -(-len(ids) // BITS_PER_CHANNEL))
    lut_ch = np.full(256, -1, dtype=np.int64)
    lut_bit = np.zeros(256, dtype=np.int64)
    for n, lid in enumerate(ids):
        lut_ch[lid], lut_bit[lid] = divmod(n, BITS_PER_CHANNEL)
    pad = [(0, (-s) % f) for s, f in zip(labels.shape, factors)]
    lab = np.pad(labels, pad)
    out_shape = tuple(s // f for s, f in zip(lab.shape, factors))
    out = np.zeros((n_ch, *out_shape), dtype=np.float32)
    ch = lut_ch[lab]
    bits = np.left_shift(1, lut_bit[lab]).astype(np.int32)
    for c in range(n_ch):
        v = np.where(ch == c, bits, 0).astype(np.int32)
        acc = np.zeros(out_shape, dtype=np.int32)
        for a in range(factors[0]):
            for b in range(factors[1]):
                for d in range(factors[2]):
                    acc |= v[a :: factors[0], b :: factors[1], d :: factors[2]]
        out[c] = acc.astype(np.float32)
    return torch.from_numpy(out)


def prepare_volume(
    ct: CTSource,
    density_spacing_mm: float | None = 2.0,
    label_spacing_mm: float | None = 1.5,
    seed: int = 0,
) -> PreparedVolume:
    """Convert HU to material densities, average-pool them to ~``density_spacing_mm``, pack the labels.

    ``None`` for a spacing keeps the CT's own grid (used by the reference comparison).
    """
    dens = torch.from_numpy(hu_to_material_densities(ct.hu))[None]  # (1,3,X,Y,Z)
    aff = ct.affine.copy()
    if density_spacing_mm:
        f = _downsample_factors(ct.spacing, density_spacing_mm)
        if f != (1, 1, 1):
            dens = F.avg_pool3d(dens, kernel_size=f, stride=f, ceil_mode=True, count_include_pad=False)
            scale = np.diag([*f, 1.0]).astype(np.float64)
            scale[:3, 3] = (np.array(f) - 1) / 2.0
            aff = ct.affine @ scale
    lf = _downsample_factors(ct.spacing, label_spacing_mm) if label_spacing_mm else (1, 1, 1)
    bits = label_bit_volume(ct.labels, list(ct.present_ids), lf)
    lscale = np.diag([*lf, 1.0]).astype(np.float64)
    lscale[:3, 3] = (np.array(lf) - 1) / 2.0
    rng = np.random.default_rng(seed)
    anchors: dict[int, np.ndarray] = {}
    points: dict[int, np.ndarray] = {}
    flat = ct.labels.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=256)
    starts = np.concatenate([[0], np.cumsum(counts)])
    shape = np.array(ct.labels.shape)
    for lid in ct.present_ids:
        idx = order[starts[lid] : starts[lid + 1]]
        ijk = np.stack(np.unravel_index(idx, shape), axis=1).astype(np.float64)
        world = (ct.affine[:3, :3] @ ijk.T).T + ct.affine[:3, 3]
        anchors[lid] = world.mean(0)
        if len(world) > 4000:
            world = world[rng.choice(len(world), 4000, replace=False)]
        points[lid] = world.astype(np.float32)
    return PreparedVolume(
        name=ct.name,
        materials=dens.contiguous(),
        materials_affine=aff,
        label_bits=bits,
        labels_affine=ct.affine @ lscale,
        present_ids=list(ct.present_ids),
        anchors=anchors,
        points=points,
    )
