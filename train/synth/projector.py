"""The torch projector: per-material line integrals and every label's ray-crossing mask in one pass.

Method (Joseph's slice method): the volume is cut into slices across the volume axis most parallel to the
beam; each detector ray meets slice k at a point found by one multiply-add, and a 2D ``grid_sample`` on the
stack of slices reads all rays at once (bilinear for densities, nearest for label bit-fields). The density
samples sum to a line integral (each slice contributes slice spacing / |cos| of path), and the label bit-
fields are OR-reduced along the ray, so one pass gives every label's mask (a pixel is in a mask where its ray
crosses the label). The same pass can also measure, for named groups of labels, how far each ray travels
inside the group (``path_groups``), so a mask can require more than a graze. 2D slice lookups are
cache-friendly, which is why this is many times faster on CPU than 3D ray marching. Slices are processed in
chunks to keep memory bounded. The same code runs on CPU and CUDA.

Tool masks are made at the output resolution and by coverage, not only by each pixel's centre ray: a tool's
thin cylinders (projected radius under a pixel: K-wires, guidewires at 256²) are rasterised as their
projected centre lines with their projected width, at least one pixel, so a wire's mask is one connected
line at any image size; thicker parts keep the exact centre-ray test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from train.synth.geometry import Camera
from train.synth.materials import MATERIAL_INDEX, MATERIAL_NAMES, MATERIALS
from train.synth.volume import BITS_PER_CHANNEL, PreparedVolume


class RayTool(Protocol):
    """Anything that reports, per ray, the length (mm) of the ray inside it."""

    category_id: int
    material: str

    def path_length(self, src: torch.Tensor, dirs: torch.Tensor, min_radius: float = 0.0) -> torch.Tensor: ...


@dataclass
class Projection:
    """Per-material line integrals (g/cm², channels in ``MATERIAL_NAMES`` order) and hit masks."""

    line_integrals: torch.Tensor  # (M, H, W) float32
    label_hits: torch.Tensor  # (L, H, W) bool, rows follow label_ids
    label_ids: list[int]
    tool_hits: torch.Tensor  # (T, H, W) bool, one per tool instance
    tool_ids: list[int]
    group_paths: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (H, W) mm inside the group


class _SliceStack:
    """A volume cut along one axis, as grid_sample wants it: (n_slices, C, rows, cols)."""

    def __init__(self, vol: torch.Tensor, affine: np.ndarray, axis: int):
        self.axis = axis
        rest = [a for a in range(3) if a != axis]
        self.order = (axis, *rest)
        self.data = vol.permute(1 + axis, 0, 1 + rest[0], 1 + rest[1]).contiguous()
        self.inv = torch.from_numpy(np.linalg.inv(affine)[:3][list(self.order)].copy()).to(vol.device)
        self.n = self.data.shape[0]
        self.rows, self.cols = self.data.shape[2], self.data.shape[3]

    def march(self, src: torch.Tensor, dirs: torch.Tensor, mode: str, chunk: int):
        """Yield (samples (K, C, R), per-ray path per slice (R,)) for slice chunks in front of the source."""
        p0 = self.inv[:, :3] @ src + self.inv[:, 3]
        pd = dirs @ self.inv[:, :3].T  # index units per mm, in (axis, row, col) order
        pa = pd[:, 0]
        sign = 1.0 if float(pa.mean()) > 0 else -1.0
        pa = torch.where(pa * sign > 1e-9, pa, torch.full_like(pa, sign * 1e-9))
        # Ray meets slice k at t_k = (k - p0_a) / pa; in-slice coords are affine in k.
        base_r = p0[1] - p0[0] * pd[:, 1] / pa
        base_c = p0[2] - p0[0] * pd[:, 2] / pa
        step_r, step_c = pd[:, 1] / pa, pd[:, 2] / pa
        # Normalise to grid_sample's [-1, 1] (align_corners=True): x = cols, y = rows.
        sx, sy = 2.0 / max(self.cols - 1, 1), 2.0 / max(self.rows - 1, 1)
        a = torch.stack([base_c * sx - 1.0, base_r * sy - 1.0], -1).float()
        b = torch.stack([step_c * sx, step_r * sy], -1).float()
        k_lo = int(np.floor(float(p0[0]))) + 1 if sign > 0 else 0
        k_hi = self.n if sign > 0 else min(self.n, int(np.ceil(float(p0[0]))))
        k_lo = max(k_lo, 0)
        seg = (1.0 / pa.abs()).float()  # mm of ray between consecutive slices
        for k0 in range(k_lo, k_hi, chunk):
            k1 = min(k0 + chunk, k_hi)
            ks = torch.arange(k0, k1, dtype=torch.float32, device=src.device)
            grid = torch.addcmul(a[None], ks[:, None, None], b[None])[:, None]  # (K, 1, R, 2)
            out = F.grid_sample(self.data[k0:k1], grid, mode=mode, padding_mode="zeros", align_corners=True)
            yield out[:, :, 0], seg


class Projector:
    """Projects a ``PreparedVolume`` (plus optional analytic tools) for any ``Camera``."""

    def __init__(
        self,
        volume: PreparedVolume,
        chunk_slices: int = 24,
        device: torch.device | str | None = None,
        path_groups: dict[str, Sequence[int]] | None = None,
    ):
        self.device = torch.device(device or volume.materials.device)
        self.vol = volume.to(self.device)
        self.chunk = chunk_slices
        self.label_ids = list(volume.present_ids)
        self._stacks: dict[tuple[str, int], _SliceStack] = {}
        self.set_path_groups(path_groups or {})

    def set_path_groups(self, groups: dict[str, Sequence[int]]) -> None:
        """Measure each ray's path length (mm) inside these unions of label ids in every projection.

        Ids not in the CT are ignored; a group with none of its ids present gets no entry.
        """
        n_ch = max(1, -(-len(self.label_ids) // BITS_PER_CHANNEL))
        row = {lid: n for n, lid in enumerate(self.label_ids)}
        self._path_masks: dict[str, torch.Tensor] = {}
        for name, ids in groups.items():
            m = torch.zeros(n_ch, dtype=torch.int32)
            for lid in ids:
                if lid in row:
                    c, b = divmod(row[lid], BITS_PER_CHANNEL)
                    m[c] |= 1 << b
            if bool(m.any()):
                self._path_masks[name] = m.to(self.device)

    def _stack(self, kind: str, axis: int) -> _SliceStack:
        key = (kind, axis)
        if key not in self._stacks:
            if kind == "mat":
                self._stacks[key] = _SliceStack(self.vol.materials[0], self.vol.materials_affine, axis)
            else:
                self._stacks[key] = _SliceStack(self.vol.label_bits, self.vol.labels_affine, axis)
        return self._stacks[key]

    @staticmethod
    def _main_axis(affine: np.ndarray, direction: np.ndarray) -> int:
        d = np.linalg.inv(affine)[:3, :3] @ direction
        d = d * np.linalg.norm(
            affine[:3, :3], axis=0
        )  # back to mm so anisotropic voxels don't bias the choice
        return int(np.argmax(np.abs(d)))

    @torch.no_grad()
    def project(self, cam: Camera, tools: Sequence[RayTool] = (), with_labels: bool = True) -> Projection:
        dev = self.device
        h, w = cam.height, cam.width
        src = torch.as_tensor(cam.source, dtype=torch.float64, device=dev)
        pix = cam.pixel_world(dev).reshape(-1, 3)
        dirs = pix - src
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        beam = cam.axes[0]
        n_mat = len(MATERIAL_NAMES)
        li = torch.zeros(n_mat, h * w, dtype=torch.float32, device=dev)

        stack = self._stack("mat", self._main_axis(self.vol.materials_affine, beam))
        acc = torch.zeros(3, h * w, dtype=torch.float32, device=dev)
        seg = None
        for samples, seg_k in stack.march(src, dirs, "bilinear", self.chunk):
            acc += samples.sum(0)
            seg = seg_k
        if seg is not None:
            li[:3] = acc * (seg / 10.0)  # mm -> cm: g/cm³ * cm = g/cm²

        n_lab = len(self.label_ids)
        hits = torch.zeros(n_lab, h * w, dtype=torch.bool, device=dev)
        group_paths: dict[str, torch.Tensor] = {}
        if with_labels and n_lab:
            lstack = self._stack("lab", self._main_axis(self.vol.labels_affine, beam))
            bits = torch.zeros(lstack.data.shape[1], h * w, dtype=torch.int32, device=dev)
            inside = {g: torch.zeros(h * w, dtype=torch.float32, device=dev) for g in self._path_masks}
            lseg = None
            for samples, seg_k in lstack.march(src, dirs, "nearest", self.chunk):
                lseg = seg_k
                si = samples.to(torch.int32)  # (K, C, R)
                bits |= _or_reduce(si)
                for g, gm in self._path_masks.items():
                    inside[g] += ((si & gm[None, :, None]) != 0).any(1).sum(0)
            if lseg is not None:
                group_paths = {g: (n * lseg).reshape(h, w) for g, n in inside.items()}
            shifts = torch.arange(BITS_PER_CHANNEL, dtype=torch.int32, device=dev)
            unpacked = (bits[:, None, :] >> shifts[None, :, None]) & 1  # (C, 24, R)
            hits = unpacked.reshape(-1, h * w)[:n_lab].bool()

        tool_hits = torch.zeros(len(tools), h * w, dtype=torch.bool, device=dev)
        for ti, tool in enumerate(tools):
            length = tool.path_length(src, dirs, min_radius=tool_footprint(cam, tool))  # mm
            m = MATERIAL_INDEX[tool.material]
            li[m] += (length * (MATERIALS[m].density / 10.0)).float()
            hit = length > 1e-3
            segments = getattr(tool, "segments", None)
            if segments is not None:
                hit = hit | thin_line_mask(cam, segments(), dev).reshape(-1)
            tool_hits[ti] = hit
        return Projection(
            line_integrals=li.reshape(n_mat, h, w),
            label_hits=hits.reshape(n_lab, h, w),
            label_ids=list(self.label_ids),
            tool_hits=tool_hits.reshape(len(tools), h, w),
            tool_ids=[t.category_id for t in tools],
            group_paths=group_paths,
        )


def _or_reduce(x: torch.Tensor) -> torch.Tensor:
    """Bitwise OR over the first axis by pairwise halving: log2(K) tensor ops instead of K."""
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        head = x[:half] | x[half : 2 * half]
        x = torch.cat([head, x[2 * half :]]) if x.shape[0] % 2 else head
    return x[0]


def tool_footprint(cam: Camera, tool: RayTool) -> float:
    """Half a pixel's width (mm) at the tool's far end from the source (at least at the isocentre).

    Thin cylinders are traced at least this thick (keeping their attenuation), so a wire that lies beyond
    the isocentre, where a pixel covers more of it, still darkens a continuous line of pixels.
    """
    z = cam.sod
    bounds = getattr(tool, "bounds", None)
    if bounds is not None:
        c, rad = bounds()
        z = max(z, min(float((np.asarray(c) - cam.source) @ cam.axes[0]) + rad, cam.sdd))
    return 0.5 * cam.pixel_size * z / cam.sdd


MIN_HALF_WIDTH_PX = 0.5 + 1e-4  # a thin line's mask is at least one pixel wide (the epsilon breaks ties)


def thin_line_mask(
    cam: Camera, segments: Sequence[tuple[np.ndarray, np.ndarray, float]], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(H, W) mask of cylinders thinner than a pixel, drawn as their projected centre lines.

    A pixel is in the mask when its centre lies within max(projected radius, half a pixel) of the segment's
    projection (measured in the ideal pinhole image, so an image intensifier's distortion bends the line as
    it bends the image). Half a pixel at least makes a band one pixel wide, which holds a pixel centre in
    every column (or row) it crosses, so the line is 8-connected wherever it runs. Cylinders whose projected
    radius is a pixel or more are skipped: the centre-ray test already covers them exactly.
    """
    h, w = cam.height, cam.width
    dev = torch.device(device)
    out = torch.zeros(h, w, dtype=torch.bool, device=dev)
    proj = cam.projection_matrix
    f = cam.sdd / cam.pixel_size
    ideal: torch.Tensor | None = None  # every pixel centre's ideal position, made once if needed
    for p0, p1, r in segments:
        h0 = proj @ np.append(np.asarray(p0, np.float64), 1.0)
        h1 = proj @ np.append(np.asarray(p1, np.float64), 1.0)
        if h0[2] <= 1.0 and h1[2] <= 1.0:
            continue
        if h0[2] <= 1.0 or h1[2] <= 1.0:  # clip at 1 mm in front of the source
            t = (1.0 - h0[2]) / (h1[2] - h0[2])
            hc = h0 + t * (h1 - h0)
            h0, h1 = (hc, h1) if h0[2] <= 1.0 else (h0, hc)
        r0, r1 = r * f / h0[2], r * f / h1[2]
        if min(r0, r1) >= 1.0:
            continue
        a, b = h0[:2] / h0[2], h1[:2] / h1[2]
        rad0, rad1 = max(r0, MIN_HALF_WIDTH_PX), max(r1, MIN_HALF_WIDTH_PX)
        pad = max(rad0, rad1) + 1.0
        if cam.distorted:
            ts = np.linspace(0.0, 1.0, 9)[:, None]
            stored = cam.distort(a[None] + ts * (b - a)[None])
            lo, hi = stored.min(0) - pad - 2.0, stored.max(0) + pad + 2.0
        else:
            lo, hi = np.minimum(a, b) - pad, np.maximum(a, b) + pad
        c0, c1 = max(0, int(np.floor(lo[0]))), min(w, int(np.ceil(hi[0])) + 1)
        r0i, r1i = max(0, int(np.floor(lo[1]))), min(h, int(np.ceil(hi[1])) + 1)
        if c0 >= c1 or r0i >= r1i:
            continue
        if cam.distorted:
            if ideal is None:
                cols = torch.arange(w, dtype=torch.float64, device=dev) + 0.5
                rows = torch.arange(h, dtype=torch.float64, device=dev) + 0.5
                ideal = cam.undistort(torch.stack(torch.meshgrid(cols, rows, indexing="xy"), -1))
            q = ideal[r0i:r1i, c0:c1]
        else:
            cols = torch.arange(c0, c1, dtype=torch.float64, device=dev) + 0.5
            rows = torch.arange(r0i, r1i, dtype=torch.float64, device=dev) + 0.5
            q = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), -1)
        at = torch.as_tensor(a, dtype=torch.float64, device=dev)
        ab = torch.as_tensor(b - a, dtype=torch.float64, device=dev)
        n2 = float(ab @ ab)
        t = ((q - at) @ ab / n2).clamp(0.0, 1.0) if n2 > 1e-12 else torch.zeros(q.shape[:2], device=dev)
        dist = (q - at - t[..., None] * ab).norm(dim=-1)
        out[r0i:r1i, c0:c1] |= dist <= rad0 + t * (rad1 - rad0)
    return out
