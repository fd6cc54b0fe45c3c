"""User STL meshes as tools: read with numpy, place on the anatomy, ray-trace exactly in the projector pass.

Path length per ray is computed from the ray/triangle intersections, not by voxelising: every ray of a view
leaves the same source point, so Möller–Trumbore's per-triangle terms that depend only on the source are
computed once and each of u, v, t and the determinant becomes one (rays x triangles) matrix product, chunked
to bound memory. Rays are first binned by direction and each bin meets only the triangles whose projection
from the source can contain its rays, which cuts the pairs by orders of magnitude for real meshes. The hits
are sorted along each ray and a winding count turns them into inside intervals (entry/exit pairs), which makes
non-convex meshes and overlapping shells (CAD exports often have several) come out as the union of their
solids. Duplicate hits where a ray crosses an edge shared by two triangles are merged, so rays through a
triangulation's diagonals are not counted twice.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.synth.materials import MATERIAL_INDEX
from train.synth.volume import PreparedVolume

# Bones a user tool is centred on (TotalSegmentator ids; vertebrae, ribs, pelvis, long bones, sternum...).
_BONE_IDS = [*range(25, 51), *range(69, 79), 91, *range(92, 117)]
# Rays x triangles evaluated at once: each (R, T) float64 temporary is 8 MB at this size.
PAIR_BUDGET = 1 << 20
_UV_EPS = 1e-9  # barycentric slack, so rays through shared edges hit both triangles (merged later)


class STLError(ValueError):
    """An STL file that cannot be used as a tool, with the reason."""


def read_stl(path: str | Path) -> np.ndarray:
    """Triangles (T, 3, 3) in the file's units (taken as mm) from a binary or ASCII STL.

    Binary is recognised by its size (84 + 50·T bytes), not by the header, because many binary exporters
    start the 80-byte header with "solid" like an ASCII file does.
    """
    p = Path(path)
    if not p.is_file():
        raise STLError(f"{p}: STL file not found")
    raw = p.read_bytes()
    if len(raw) >= 84:
        (n,) = struct.unpack_from("<I", raw, 80)
        if 84 + 50 * n == len(raw):
            rec = np.dtype([("normal", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
            tris = np.frombuffer(raw, dtype=rec, count=n, offset=84)["v"].astype(np.float64)
            return _validated(tris, p)
    if not raw.lstrip()[:5].lower() == b"solid":
        raise STLError(f"{p}: neither a binary STL (size does not match its triangle count) nor ASCII STL")
    verts = []
    for line in raw.decode("ascii", errors="replace").splitlines():
        parts = line.split()
        if parts and parts[0].lower() == "vertex":
            if len(parts) != 4:
                raise STLError(f"{p}: malformed vertex line {line.strip()!r}")
            try:
                verts.append([float(x) for x in parts[1:]])
            except ValueError as e:
                raise STLError(f"{p}: malformed vertex line {line.strip()!r}") from e
    if len(verts) % 3:
        raise STLError(f"{p}: {len(verts)} vertices is not a whole number of triangles")
    return _validated(np.asarray(verts, dtype=np.float64).reshape(-1, 3, 3), p)


def _validated(tris: np.ndarray, p: Path) -> np.ndarray:
    if len(tris) == 0:
        raise STLError(f"{p}: no triangles")
    if not np.isfinite(tris).all():
        raise STLError(f"{p}: non-finite vertex coordinates")
    problem = watertight_problem(tris)
    if problem:
        raise STLError(
            f"{p}: mesh is not watertight ({problem}); close it (e.g. fill holes) and export again"
        )
    return tris


def watertight_problem(tris: np.ndarray) -> str | None:
    """Why the mesh is not a closed, consistently wound surface, or None when it is.

    The path-length tracer counts entries and exits along each ray, so a hole lets a ray enter without
    leaving (a streak across the image) and a flipped triangle turns an exit into an entry. Closed and
    consistent means: after welding coincident vertices, every directed edge a->b is matched by as many b->a
    (several closed shells, even touching ones, pass).
    """
    pts = tris.reshape(-1, 3)
    tol = 1e-6 * max(float(np.ptp(pts, axis=0).max()), 1e-3)
    _, vid = np.unique(np.round(pts / tol).astype(np.int64), axis=0, return_inverse=True)
    f = vid.reshape(-1, 3)
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]  # drop collapsed triangles
    if len(f) == 0:
        return "every triangle is degenerate"
    a = np.concatenate([f[:, 0], f[:, 1], f[:, 2]])
    b = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = lo * (int(vid.max()) + 1) + hi
    sign = np.where(a < b, 1, -1)
    uniq, inv = np.unique(key, return_inverse=True)
    uses = np.bincount(inv, minlength=len(uniq))
    if np.any(uses % 2):
        return f"{int(np.sum(uses % 2))} open edges"
    if np.any(np.bincount(inv, weights=sign, minlength=len(uniq)) != 0):
        return "triangles wound inconsistently"
    return None


def write_stl(path: str | Path, tris: np.ndarray, ascii: bool = False) -> None:
    """Write triangles (T, 3, 3) as STL; used by tests and to export placed tools for inspection."""
    tris = np.asarray(tris, dtype=np.float64)
    n = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
    n = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-30)
    if ascii:
        lines = ["solid tool"]
        for f, t in zip(n, tris):
            lines += [f"  facet normal {f[0]:.9g} {f[1]:.9g} {f[2]:.9g}", "    outer loop"]
            lines += [f"      vertex {v[0]:.9g} {v[1]:.9g} {v[2]:.9g}" for v in t]
            lines += ["    endloop", "  endfacet"]
        lines.append("endsolid tool")
        Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")
        return
    rec = np.zeros(len(tris), dtype=[("normal", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    rec["normal"], rec["v"] = n, tris
    header = b"solid-looking binary header written by fluorosam-rt".ljust(80, b" ")
    Path(path).write_bytes(header + struct.pack("<I", len(tris)) + rec.tobytes())


def signed_volume(tris: np.ndarray) -> float:
    """Enclosed volume (mm³), negative when the triangles wind inward (normals pointing in)."""
    return float(np.einsum("ij,ij->i", tris[:, 0], np.cross(tris[:, 1], tris[:, 2])).sum() / 6.0)


@dataclass
class MeshTool:
    """A placed triangle mesh of one material; fills the projector's ``RayTool`` protocol."""

    name: str
    category_id: int
    material: str
    triangles: np.ndarray  # (T, 3, 3) world mm, after placement
    source: str = ""
    pose: np.ndarray = field(default_factory=lambda: np.eye(4))  # world <- file frame
    _cache: dict[Any, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.material not in MATERIAL_INDEX:
            raise STLError(f"unknown material {self.material!r}; choose from {sorted(MATERIAL_INDEX)}")
        tris = np.asarray(self.triangles, dtype=np.float64)
        if signed_volume(tris) < 0:  # inward winding: flip so hit signs mean entry/exit
            tris = tris[:, [0, 2, 1]]
        self.triangles = tris

    def bounds(self) -> tuple[np.ndarray, float]:
        """Bounding sphere (centre, radius) used to skip rays that cannot touch the mesh."""
        pts = self.triangles.reshape(-1, 3)
        c = 0.5 * (pts.min(0) + pts.max(0))
        return c, float(np.linalg.norm(pts - c, axis=1).max()) + 1e-6

    def _terms(self, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-triangle terms of Möller–Trumbore that depend only on the (shared) source point."""
        key = (tuple(float(x) for x in src.tolist()), src.device, src.dtype)
        if key not in self._cache:
            self._cache.clear()
            t = torch.as_tensor(self.triangles, dtype=src.dtype, device=src.device)
            v0, e1, e2 = t[:, 0], t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
            s = src[None] - v0
            n = torch.linalg.cross(e1, e2)
            a = torch.linalg.cross(e2, s)  # u·det = d·(e2 x s)
            q = torch.linalg.cross(s, e1)  # v·det = d·(s x e1)
            tq = (e2 * q).sum(-1)  # t·det = e2·(s x e1)
            self._cache[key] = (n, a, q, tq)
        return self._cache[key]

    def path_length(self, src: torch.Tensor, dirs: torch.Tensor, min_radius: float = 0.0) -> torch.Tensor:
        """Length (mm) of each ray src + t·dirs (t > 0, unit dirs) inside the mesh.

        ``min_radius`` (the projector's anti-dashing width for sub-pixel wires) is not applied: a mesh is
        traced as it is, so a mesh thinner than a pixel can show gaps between pixel-centre rays.
        """
        del min_radius
        c, rad = self.bounds()
        ct = torch.as_tensor(c, dtype=dirs.dtype, device=dirs.device)
        w = ct - src
        along = dirs @ w
        close = ((w @ w) - along * along) <= rad * rad
        outside = float(w @ w) > rad * rad
        if outside:  # the whole mesh is in front of the source: rays pointing away cannot meet it
            close &= along > 0
        near = torch.nonzero(close).squeeze(1)
        out = torch.zeros(dirs.shape[0], dtype=dirs.dtype, device=dirs.device)
        if near.numel() == 0:
            return out
        terms = self._terms(src.to(dirs.dtype))
        d = dirs[near]
        groups = self._ray_groups(src, d) if outside else None
        if groups is None:  # source inside the bounding sphere: every ray against every triangle
            groups = [(torch.arange(d.shape[0], device=d.device), None)]
        for ridx, tidx in groups:
            sub = terms if tidx is None else tuple(x[tidx] for x in terms)
            chunk = max(1, PAIR_BUDGET // sub[0].shape[0])
            for r0 in range(0, ridx.numel(), chunk):
                r = ridx[r0 : r0 + chunk]
                out[near[r]] = _inside_length(d[r], *sub)
        return out

    def _ray_groups(
        self, src: torch.Tensor, d: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Rays binned on a grid of directions, each bin with the triangles that can meet its rays.

        Seen from the source, a ray can only hit a triangle whose central projection contains the ray's
        direction, so comparing each bin's direction range with the triangles' projected bounding boxes drops
        most (ray, triangle) pairs before Möller–Trumbore. None when a vertex is not in front of the source.
        """
        c, _ = self.bounds()
        axis = c - src.detach().cpu().numpy()
        axis = axis / np.linalg.norm(axis)
        e1 = np.cross(axis, [1.0, 0.0, 0.0] if abs(axis[0]) < 0.9 else [0.0, 1.0, 0.0])
        e1 /= np.linalg.norm(e1)
        frame = torch.as_tensor(np.stack([axis, e1, np.cross(axis, e1)]), dtype=d.dtype, device=d.device)
        tri = torch.as_tensor(self.triangles, dtype=d.dtype, device=d.device)
        tw = (tri - src) @ frame.T  # (T, 3, 3) in (along the axis, across 1, across 2)
        if bool((tw[..., 0] <= 1e-9).any()):
            return None
        txy = tw[..., 1:] / tw[..., :1]
        pad = 1e-7 * (1.0 + txy.abs().amax())
        lo, hi = txy.amin(1) - pad, txy.amax(1) + pad  # (T, 2) projected bounding boxes
        rw = d @ frame.T
        rxy = rw[:, 1:] / rw[:, :1]
        g = int(np.clip(np.sqrt(d.shape[0] / 96.0), 1, 48))
        x0, x1 = rxy.amin(0), rxy.amax(0)
        cw = ((x1 - x0) / g).clamp_min(1e-12)
        ij = ((rxy - x0) / cw).floor().long().clamp(0, g - 1)
        cell = ij[:, 0] * g + ij[:, 1]
        order = torch.argsort(cell)
        _, counts = torch.unique_consecutive(cell[order], return_counts=True)
        groups = []
        for ridx in torch.split(order, counts.tolist()):
            clo, chi = rxy[ridx].amin(0), rxy[ridx].amax(0)
            m = (hi[:, 0] >= clo[0]) & (lo[:, 0] <= chi[0]) & (hi[:, 1] >= clo[1]) & (lo[:, 1] <= chi[1])
            tidx = torch.nonzero(m).squeeze(1)
            if tidx.numel():
                groups.append((ridx, tidx))
        return groups

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "category_id": self.category_id,
            "material": self.material,
            "kind": "stl_mesh",
            "source": self.source,
            "n_triangles": len(self.triangles),
            "pose": self.pose.tolist(),
        }


def _inside_length(
    d: torch.Tensor, n: torch.Tensor, a: torch.Tensor, q: torch.Tensor, tq: torch.Tensor
) -> torch.Tensor:
    """Inside length for rays ``d`` (R, 3) against all triangles: hits -> sorted entry/exit -> intervals."""
    det = -(d @ n.T)  # (R, T); > 0 where the ray enters through the triangle's outward face
    ok = det.abs() > 1e-12
    inv = torch.where(ok, 1.0 / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    u = (d @ a.T) * inv
    v = (d @ q.T) * inv
    t = tq[None] * inv
    hit = ok & (u >= -_UV_EPS) & (v >= -_UV_EPS) & (u + v <= 1.0 + _UV_EPS) & (t > 0)
    ray, tri = torch.nonzero(hit, as_tuple=True)
    out = torch.zeros(d.shape[0], dtype=d.dtype, device=d.device)
    if ray.numel() < 2:
        return out
    th = t[ray, tri]
    sg = torch.where(det[ray, tri] > 0, 1, -1).to(torch.int64)
    order = torch.argsort(th, stable=True)
    order = order[torch.argsort(ray[order], stable=True)]  # by ray, then by t along it
    ray, th, sg = ray[order], th[order], sg[order]
    # Merge a hit with its predecessor when both are on the same ray, of the same kind and at the same point:
    # one crossing of an edge (or vertex) shared by several triangles.
    tol = 1e-9 * (1.0 + th.abs())
    dup = torch.zeros_like(sg, dtype=torch.bool)
    dup[1:] = (ray[1:] == ray[:-1]) & (sg[1:] == sg[:-1]) & ((th[1:] - th[:-1]).abs() <= tol[1:])
    keep = ~dup
    ray, th, sg = ray[keep], th[keep], sg[keep]
    # Winding number after each hit, per ray: inside while it is positive (the union of all shells).
    cs = torch.cumsum(sg, 0)
    _, counts = torch.unique_consecutive(ray, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    before = torch.where(starts > 0, cs[(starts - 1).clamp_min(0)], torch.zeros_like(starts))
    wind = cs - torch.repeat_interleave(before, counts)
    same = ray[1:] == ray[:-1]
    seg = torch.where(same & (wind[:-1] > 0), th[1:] - th[:-1], torch.zeros_like(th[1:]))
    out.index_add_(0, ray[:-1], seg)
    return out


# ----------------------------------------------------------------------------------------------- placement


def random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    """Rotation about a uniformly random axis by an angle drawn uniformly in [0, max_angle_deg]."""
    axis = rng.normal(size=3)
    axis /= max(float(np.linalg.norm(axis)), 1e-12)
    ang = np.deg2rad(rng.uniform(0.0, max_angle_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * (k @ k)


def place_on_anatomy(
    rng: np.random.Generator, vol: PreparedVolume, tris: np.ndarray, max_angle_deg: float = 180.0
) -> np.ndarray:
    """A 4x4 pose (world <- file) centring the mesh's bounding box on a point inside a bone.

    Bones are where implants and instruments sit, so a random bone voxel is the plausible default; with no
    bone in the CT any labelled structure is used, then the volume's centre. The orientation is the file's
    own, turned by at most ``max_angle_deg`` about a random axis (180 = any orientation).
    """
    ids = [i for i in _BONE_IDS if i in vol.points and len(vol.points[i])]
    if not ids:
        ids = [i for i in vol.points if len(vol.points[i])]
    if ids:
        pts = vol.points[int(rng.choice(ids))]
        target = np.asarray(pts[int(rng.integers(len(pts)))], dtype=np.float64)
    else:
        shape = np.array(vol.materials.shape[2:], dtype=np.float64)
        target = vol.materials_affine[:3, :3] @ ((shape - 1) / 2) + vol.materials_affine[:3, 3]
    flat = tris.reshape(-1, 3)
    centre = 0.5 * (flat.min(0) + flat.max(0))
    rot = random_rotation(rng, max_angle_deg)
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = target - rot @ centre
    return pose


def apply_pose(tris: np.ndarray, pose: np.ndarray) -> np.ndarray:
    return tris @ pose[:3, :3].T + pose[:3, 3]


@dataclass(frozen=True)
class STLSpec:
    """One ``--tool-stl PATH[:material[:name]]`` argument, resolved to a vocabulary category."""

    path: str
    material: str = "stainless_steel"
    name: str | None = None
    category_id: int = 399

    @classmethod
    def parse(cls, spec: str, default_material: str = "stainless_steel") -> STLSpec:
        """Split ``PATH[:material[:name]]``; a path that exists as given wins over splitting at colons."""
        if Path(spec).is_file():
            path, material, name = spec, "", ""
        else:
            path, _, rest = spec.partition(":")
            material, _, name = rest.partition(":")
        material = material.strip() or default_material
        if material not in MATERIAL_INDEX:
            raise STLError(
                f"--tool-stl {spec!r}: unknown material {material!r}; choose from {sorted(MATERIAL_INDEX)}"
            )
        if not Path(path).is_file():
            raise STLError(f"--tool-stl {spec!r}: STL file {path!r} not found")
        return cls(path=path, material=material, name=name.strip() or None)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "material": self.material,
            "name": self.name,
            "category_id": self.category_id,
        }


def make_mesh_tool(
    rng: np.random.Generator,
    vol: PreparedVolume,
    spec: STLSpec,
    tris: np.ndarray,
    category_name: str,
    max_angle_deg: float = 180.0,
) -> MeshTool:
    """Place one user mesh for one scenario."""
    pose = place_on_anatomy(rng, vol, tris, max_angle_deg)
    return MeshTool(
        name=category_name,
        category_id=spec.category_id,
        material=spec.material,
        triangles=apply_pose(tris, pose),
        source=str(spec.path),
        pose=pose,
    )
