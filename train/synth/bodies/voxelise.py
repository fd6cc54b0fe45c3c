"""Closed triangle meshes to voxel masks, and the explicit repairs that make a bone mesh closed.

Voxelising is a parity fill along the grid's third axis: every triangle is rasterised onto the (i, j)
columns whose centres its projection covers, each covered column gets one crossing at the triangle's height
there, and a voxel is inside when an odd number of crossings lie below its centre. Shared edges and vertices
follow the rasteriser's top-left rule with a canonical edge direction, so a column through a shared edge is
counted exactly once and a closed surface gives exact parity; no ray is ever "unlucky". The work is a few
array operations per batch of triangles, about a second for a whole skeleton at 1 mm.

Parity is only meaningful for a closed surface, so an open mesh is an error (naming the file) unless it is
repaired on purpose by ``repair_mesh``, which says what it did: welds coincident vertices, drops degenerate
triangles, cancels back-to-back duplicate triangles (zero-thickness fins) and collapses same-facing copies,
and closes each remaining hole with a fan from the hole's centroid. The result is checked with the project's
one watertightness test (``train.synth.mesh.watertight_problem``).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from train.synth.bodies.vtp import TriMesh

PAIR_BUDGET = 1 << 22  # triangle x column candidates evaluated at once (bounds temporaries to ~100 MB)


class MeshError(ValueError):
    """A mesh that cannot be voxelised (not closed), naming the file."""


def watertight_problem(mesh: TriMesh) -> str | None:
    """Why the mesh is not closed and consistently wound, or None (the project's one test, on triangles)."""
    from train.synth.mesh import watertight_problem as _problem

    return _problem(mesh.triangles())


def check_closed(mesh: TriMesh) -> None:
    """Raise a one-line MeshError naming the file when the mesh is not a closed surface."""
    problem = watertight_problem(mesh)
    if problem:
        raise MeshError(
            f"{mesh.source or 'mesh'}: mesh is not watertight ({problem}); repair it or fix the file"
        )


def weld(mesh: TriMesh, rel_tol: float = 1e-6) -> TriMesh:
    """Merge vertices closer than ``rel_tol`` x the mesh size and drop unused ones."""
    v = mesh.vertices
    tol = rel_tol * max(float(np.ptp(v, axis=0).max()), 1e-9)
    keys = np.round(v / tol).astype(np.int64)
    _, first, inv = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    faces = inv.reshape(-1)[mesh.faces]
    used, remap = np.unique(faces, return_inverse=True)
    return TriMesh(v[first][used], remap.reshape(faces.shape), mesh.source)


def split_components(mesh: TriMesh) -> list[TriMesh]:
    """Edge/vertex-connected pieces of a (welded) mesh: one per bone when a file holds several bones."""
    m = weld(mesh)
    f = m.faces
    n = len(m.vertices)
    rows = np.concatenate([f[:, 0], f[:, 1]])
    cols = np.concatenate([f[:, 1], f[:, 2]])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    ncomp, lab = connected_components(graph, directed=False)
    face_lab = lab[f[:, 0]]
    out = []
    for c in range(ncomp):
        sel = f[face_lab == c]
        if len(sel) == 0:
            continue
        used, remap = np.unique(sel, return_inverse=True)
        out.append(TriMesh(m.vertices[used], remap.reshape(sel.shape), m.source))
    return out


def repair_mesh(mesh: TriMesh, max_hole_frac: float = 0.4) -> tuple[TriMesh, list[str]]:
    """A closed version of ``mesh`` and a list of what was changed (empty when nothing was needed).

    Holes are closed with a fan from each hole's centroid; a hole whose own bounding box spans more than
    ``max_hole_frac`` of the mesh's bounding-box diagonal is not a defect but a missing part, so it is an
    error (naming the file) rather than a silent lid. Raises MeshError when the result is still not closed.
    """
    notes: list[str] = []
    m = weld(mesh)
    if len(m.vertices) < len(mesh.vertices):
        notes.append(f"welded {len(mesh.vertices) - len(m.vertices)} coincident vertices")
    f = m.faces
    degenerate = (f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2])
    if degenerate.any():
        notes.append(f"dropped {int(degenerate.sum())} degenerate triangles")
        f = f[~degenerate]
    f, n_cancel, n_collapse = _dedupe(f)
    if n_cancel:
        notes.append(f"cancelled {n_cancel} back-to-back duplicate triangles")
    if n_collapse:
        notes.append(f"collapsed {n_collapse} same-facing duplicate triangles")
    v = m.vertices
    loops = _boundary_components(f)
    if loops:
        diag = float(np.linalg.norm(np.ptp(v, axis=0)))
        new_v, new_f = [v], [f]
        for edges in loops:
            span = float(np.linalg.norm(np.ptp(v[np.unique(edges)], axis=0)))
            if span > max_hole_frac * diag:
                raise MeshError(
                    f"{mesh.source or 'mesh'}: mesh is not watertight and a hole is too large to close "
                    f"(hole spans {span / diag:.0%} of the mesh's bounding-box diagonal)"
                )
            c = len(np.concatenate(new_v))
            new_v.append(v[np.unique(edges)].mean(axis=0, keepdims=True))
            # boundary edge a->b is used once too often: the fan adds b->a
            new_f.append(np.stack([edges[:, 1], edges[:, 0], np.full(len(edges), c)], axis=1))
        v, f = np.concatenate(new_v), np.concatenate(new_f)
        notes.append(
            f"closed {len(loops)} holes ({sum(len(e) for e in loops)} boundary edges) with centroid fans"
        )
    out = TriMesh(v, f, mesh.source)
    problem = watertight_problem(out)
    if problem:
        raise MeshError(f"{mesh.source or 'mesh'}: mesh is not watertight ({problem}) and repair failed")
    return out, notes


def _dedupe(f: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Cancel opposite-facing copies of a triangle pairwise; collapse same-facing copies to one."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for idx, key in enumerate(map(tuple, np.sort(f, axis=1).tolist())):
        groups[key].append(idx)
    keep, cancelled, collapsed = [], 0, 0
    for idxs in groups.values():
        if len(idxs) == 1:
            keep.append(f[idxs[0]])
            continue
        ref = f[idxs[0]].tolist()
        signs = []
        for i in idxs:
            t = f[i].tolist()
            r = ref.index(t[0])
            signs.append(1 if ref[(r + 1) % 3] == t[1] else -1)
        net = sum(signs)
        cancelled += len(idxs) - abs(net)
        collapsed += max(abs(net) - 1, 0)
        if net:
            keep.append(np.array(ref if net > 0 else [ref[0], ref[2], ref[1]]))
    return np.array(keep, dtype=np.int64).reshape(-1, 3), cancelled, collapsed


def _boundary_components(f: np.ndarray) -> list[np.ndarray]:
    """Directed edges used once too often (net a->b minus b->a), grouped into connected holes."""
    a = np.concatenate([f[:, 0], f[:, 1], f[:, 2]])
    b = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    n = int(f.max()) + 1
    key = lo * n + hi
    uniq, inv = np.unique(key, return_inverse=True)
    net = np.bincount(inv, weights=np.where(a < b, 1, -1), minlength=len(uniq)).astype(np.int64)
    edges = []
    for k, m in zip(uniq[net != 0], net[net != 0], strict=True):
        u, w = divmod(int(k), n)
        e = (u, w) if m > 0 else (w, u)
        edges += [e] * abs(int(m))
    if not edges:
        return []
    e = np.array(edges, dtype=np.int64)
    graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    _, lab = connected_components(graph, directed=False)
    comp = lab[e[:, 0]]
    return [e[comp == c] for c in np.unique(comp)]


def voxelise(
    vertices_vox: np.ndarray, faces: np.ndarray, shape: tuple[int, int, int]
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Inside mask of a closed mesh given in voxel index coordinates (voxel centres at integers).

    Returns ``(slices, mask)``: the mask covers only the mesh's bounding box clipped to ``shape``, and
    ``full[slices] |= mask`` places it. Parts of the mesh outside the grid are cropped correctly (a bone cut
    by the volume's edge stays filled up to the edge).
    """
    v = np.asarray(vertices_vox, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    lo = np.maximum(np.ceil(v.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.floor(v.max(axis=0)).astype(int) + 1, np.array(shape))
    if np.any(hi <= lo):
        return (slice(0, 0),) * 3, np.zeros((0, 0, 0), bool)
    ni, nj, nk = (hi - lo).tolist()
    tri = v[f] - np.array([lo[0], lo[1], lo[2]], dtype=np.float64)  # (M, 3, 3) local voxel coordinates
    x, y = tri[..., 0], tri[..., 1]
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    ok = area != 0  # triangles seen edge-on by the columns add no crossing
    tri, area = tri[ok], area[ok]
    flip = area < 0  # make every projected triangle counter-clockwise
    tri[flip] = tri[flip][:, [0, 2, 1]]
    area = np.abs(area)
    i0 = np.maximum(np.ceil(tri[..., 0].min(axis=1)), 0).astype(int)
    i1 = np.minimum(np.floor(tri[..., 0].max(axis=1)), ni - 1).astype(int)
    j0 = np.maximum(np.ceil(tri[..., 1].min(axis=1)), 0).astype(int)
    j1 = np.minimum(np.floor(tri[..., 1].max(axis=1)), nj - 1).astype(int)
    has = (i1 >= i0) & (j1 >= j0)
    tri, area, i0, i1, j0, j1 = tri[has], area[has], i0[has], i1[has], j0[has], j1[has]
    counts = np.zeros((ni, nj, nk + 1), dtype=np.uint8)
    wi, wj = i1 - i0 + 1, j1 - j0 + 1
    order = np.argsort(wi * wj, kind="stable")
    start = 0
    while start < len(order):
        # a batch of similar-sized triangles, padded to the largest column box among them
        end, mi, mj = start + 1, wi[order[start]], wj[order[start]]
        while end < len(order):
            ni_, nj_ = max(mi, wi[order[end]]), max(mj, wj[order[end]])
            if (end - start + 1) * ni_ * nj_ > PAIR_BUDGET:
                break
            mi, mj, end = ni_, nj_, end + 1
        idx = order[start:end]
        start = end
        _crossings(tri[idx], area[idx], i0[idx], j0[idx], i1[idx], j1[idx], counts)
    inside = (np.cumsum(counts, axis=2, dtype=np.uint8)[:, :, :nk] & 1).astype(bool)
    return (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])), inside


def _crossings(tri, area, i0, j0, i1, j1, counts) -> None:
    """Add one crossing per (triangle, covered column) to ``counts`` at the first voxel above the hit."""
    di = int((i1 - i0).max()) + 1
    dj = int((j1 - j0).max()) + 1
    gi = i0[:, None, None] + np.arange(di)[None, :, None]  # (T, di, 1)
    gj = j0[:, None, None] + np.arange(dj)[None, None, :]  # (T, 1, dj)
    valid = (gi <= i1[:, None, None]) & (gj <= j1[:, None, None])
    px, py = gi.astype(np.float64), gj.astype(np.float64)
    w = []
    for a, b in ((1, 2), (2, 0), (0, 1)):  # weight of the vertex opposite each edge
        w.append(_edge(tri[:, a, :2], tri[:, b, :2], px, py))
    inside = valid
    for (a, b), wk in zip(((1, 2), (2, 0), (0, 1)), w, strict=True):
        dx = (tri[:, b, 0] - tri[:, a, 0])[:, None, None]
        dy = (tri[:, b, 1] - tri[:, a, 1])[:, None, None]
        top_left = (dy < 0) | ((dy == 0) & (dx < 0))
        inside = inside & ((wk > 0) | ((wk == 0) & top_left))
    t, ii, jj = np.nonzero(inside)
    if len(t) == 0:
        return
    zs = tri[:, :, 2]
    hz = (w[0][t, ii, jj] * zs[t, 0] + w[1][t, ii, jj] * zs[t, 1] + w[2][t, ii, jj] * zs[t, 2]) / area[t]
    k = np.clip(np.floor(hz).astype(np.int64) + 1, 0, counts.shape[2] - 1)
    np.add.at(counts, (gi[t, ii, 0], gj[t, 0, jj], k), 1)


def _edge(a: np.ndarray, b: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Edge function of a->b at (px, py), evaluated in a canonical direction so shared edges agree bitwise."""
    swap = (a[:, 0] > b[:, 0]) | ((a[:, 0] == b[:, 0]) & (a[:, 1] > b[:, 1]))
    p = np.where(swap[:, None], b, a)
    q = np.where(swap[:, None], a, b)
    e = (q[:, 0, None, None] - p[:, 0, None, None]) * (py - p[:, 1, None, None]) - (
        q[:, 1, None, None] - p[:, 1, None, None]
    ) * (px - p[:, 0, None, None])
    return np.where(swap[:, None, None], -e, e)
