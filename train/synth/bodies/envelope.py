"""A synthetic soft-tissue body around a bone label map: muscle, fat, skin, and air outside.

Bone-only CTs (FracSegNet's pelvis bones) and skeletons voxelised from meshes have no soft tissue, yet
an X-ray of them must show a body: soft tissue sets the contrast of every bone edge and the exposure.
``build_envelope`` grows a plausible one around the bones:

* the body outline is roughly elliptic per axial slice: per slice, the bones (dilated by the muscle
  thickness) are grouped into trunk / limb cross-sections, each group gets an ellipse, gaps between slices
  shorter than the grouping window are closed along the long axis (the abdomen between ribs and pelvis)
  and the outline is smoothed along the axis so it does not jump from slice to slice;
* inside the outline: muscle (~40 HU) with smooth patches of fat marbling, the bones (their own HU where
  given, else a ~1200 HU cortical shell around ~250 HU cancellous bone); outside it a subcutaneous fat
  layer (~-100 HU), then skin (~30 HU), then air (-1000 HU);
* thicknesses vary per body, smoothly along the axis and smoothly in 3D, all drawn from ``rng`` so a
  build is deterministic for a seed.

The outline is computed on a ~3 mm grid (distance transforms are the cost) and its signed distance field
is interpolated back to the full grid, so layer boundaries stay smooth: a 300^3 grid takes seconds.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 40.0
SKIN_HU = 30.0
CORTICAL_HU = 1200.0
CANCELLOUS_HU = 250.0
CORTICAL_MM = 2.0  # thickness of the synthesised cortical shell
COARSE_MM = 3.0  # voxel size the outline is computed at
GROUP_WINDOW_MM = 60.0  # bones within this distance along the axis belong to one cross-section group
SMOOTH_AXIS_MM = 5.0  # sigma of the outline's smoothing along the long axis
MARBLING_FRACTION = 0.15  # share of the inside that is intermuscular / visceral fat
TRUNK_SLOPE = 0.3  # along trunk slices the outline narrows by at most this many mm per mm of axis


def build_envelope(
    bone_labels: np.ndarray,
    spacing_mm: tuple[float, float, float],
    bone_hu: np.ndarray | None = None,
    *,
    rng: np.random.Generator,
    muscle_mm: float = 25.0,
    fat_mm: float = 15.0,
    skin_mm: float = 2.0,
    axis: int = 2,
    trunk_slices: np.ndarray | None = None,
) -> np.ndarray:
    """HU volume (float32, same grid as ``bone_labels``) of the bones inside a synthetic soft-tissue body.

    ``bone_labels`` > 0 marks bone (one value per bone, so adjacent bones each get their own cortex);
    ``bone_hu`` gives the bones' own CT values where known. ``muscle_mm`` is the muscle thickness the
    outline keeps around the bones, ``fat_mm`` / ``skin_mm`` the layers outside it (mean values: each is
    varied per body, along the axis and in 3D by ``rng``). ``axis`` is the body's long axis.

    ``trunk_slices`` (optional, one bool per index along ``axis``) marks slices of the trunk. The outline
    hugs the bones, so above a pelvis with only a lumbar spine (no ribs) it would be a tube around the
    vertebrae; across runs of trunk slices it narrows instead by at most TRUNK_SLOPE mm per mm from its
    wider neighbours, as an abdomen does. Leave it out for heads and limbs, whose outline may narrow fast.
    """
    labels = np.asarray(bone_labels)
    if labels.ndim != 3:
        raise ValueError(f"bone label map must be 3D, got shape {labels.shape}")
    if bone_hu is not None and np.shape(bone_hu) != labels.shape:
        raise ValueError(f"bone_hu has shape {np.shape(bone_hu)} but the bone labels {labels.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    sp = np.asarray(spacing_mm, dtype=np.float64)
    if sp.shape != (3,) or not np.all(sp > 0):
        raise ValueError(f"spacing_mm must be three positive numbers, got {spacing_mm}")
    if min(muscle_mm, fat_mm, skin_mm) < 0:
        raise ValueError("muscle_mm, fat_mm and skin_mm must be >= 0")
    bone = labels > 0
    if not bone.any():
        raise ValueError("the bone label map has no bone voxels (all zero)")
    if trunk_slices is not None:
        trunk_slices = np.asarray(trunk_slices, dtype=bool)
        if trunk_slices.shape != (labels.shape[axis],):
            raise ValueError(
                f"trunk_slices must hold one bool per slice along axis {axis} ({labels.shape[axis]}), "
                f"got shape {trunk_slices.shape}"
            )

    # Work with the long axis last; transpose back at the end.
    order = [a for a in range(3) if a != axis] + [axis]
    inv = np.argsort(order)
    bone_t = bone.transpose(order)
    sp_t = sp[order]

    # Per-body habitus, then smooth variation along the axis and in 3D.
    muscle = muscle_mm * rng.uniform(0.85, 1.15)
    fat = fat_mm * rng.uniform(0.6, 1.5)
    skin = skin_mm * rng.uniform(0.8, 1.2)

    f = np.maximum(1, np.round(COARSE_MM / sp_t)).astype(int)
    csp = sp_t * f
    coarse = _block_max(bone_t, f)
    nz = coarse.shape[2]
    z_profile = 1.0 + 0.15 * np.clip(_smooth_noise((nz,), 40.0 / csp[2], rng), -2.5, 2.5)
    field3 = np.clip(_smooth_noise(coarse.shape, 20.0 / csp, rng), -2.0, 2.0)

    trunk = None
    if trunk_slices is not None:
        pad = (-len(trunk_slices)) % f[2]
        trunk = np.pad(trunk_slices, (0, pad)).reshape(-1, f[2]).any(axis=1)
    hull = _outline(coarse, csp, muscle * z_profile, trunk)
    # Signed distance to the outline (mm): negative inside, positive outside (the fat and skin layers).
    sdist = ndimage.distance_transform_edt(~hull, sampling=csp) - ndimage.distance_transform_edt(
        hull, sampling=csp
    )
    fat_t = (fat * z_profile)[None, None, :] * (1.0 + 0.25 * field3)
    beyond_fat = sdist - fat_t  # > 0 outside the fat layer: skin, then air
    marble = _smooth_noise(coarse.shape, 8.0 / csp, rng)
    marbled = marble > np.quantile(marble, 1.0 - MARBLING_FRACTION)

    # Only the body's bounding box needs the full-resolution work; the rest is air.
    full = bone_t.shape
    hu = np.full(full, AIR_HU, dtype=np.float32)
    cbox = _bbox(beyond_fat <= skin + csp.max(), margin=1)
    fbox = tuple(
        slice(b.start * int(k), min(n, b.stop * int(k))) for b, k, n in zip(cbox, f, full, strict=True)
    )
    sub_shape = tuple(b.stop - b.start for b in fbox)
    sd = _upsample(sdist[cbox].astype(np.float32), f, sub_shape)
    bf = _upsample(beyond_fat[cbox].astype(np.float32), f, sub_shape)
    idx = [
        np.minimum(np.arange(n) // int(k), c.stop - c.start - 1)
        for n, k, c in zip(sub_shape, f, cbox, strict=True)
    ]
    mar = marbled[cbox][np.ix_(*idx)]

    sub = hu[fbox]
    sub[bf <= skin] = SKIN_HU
    sub[bf <= 0] = FAT_HU
    inside = sd <= 0
    sub[inside] = MUSCLE_HU
    sub[inside & mar] = FAT_HU
    hu = hu.transpose(inv)

    if bone_hu is not None:
        hu[bone] = np.asarray(bone_hu, dtype=np.float32)[bone]
    else:
        hu[bone] = synthetic_bone_hu(labels, sp)[bone]
    return np.ascontiguousarray(hu)


def synthetic_bone_hu(bone_labels: np.ndarray, spacing_mm: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """Cortical shell (~CORTICAL_MM thick, 1200 HU) around a cancellous interior (250 HU) per bone label.

    The interior is the bone eroded by CORTICAL_MM along each axis (6-neighbour steps, per label, so two
    touching bones each keep their own cortex). Zero outside bone.
    """
    labels = np.asarray(bone_labels)
    sp = np.asarray(spacing_mm, dtype=np.float64)
    out = np.zeros(labels.shape, dtype=np.float32)
    bone = labels > 0
    if not bone.any():
        return out
    box = _bbox(bone, margin=1)
    lab = labels[box]
    steps = np.maximum(1, np.round(CORTICAL_MM / sp)).astype(int)
    cur = lab > 0
    for it in range(int(steps.max())):
        nxt = cur.copy()
        for a in range(3):
            if it >= steps[a] or lab.shape[a] < 2:
                continue
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[a], hi[a] = slice(0, -1), slice(1, None)
            lo, hi = tuple(lo), tuple(hi)
            same = lab[lo] == lab[hi]
            # a voxel stays interior only if its neighbours on both sides are interior voxels of its bone
            keep_hi = np.zeros_like(cur)
            keep_hi[lo] = cur[hi] & same
            keep_lo = np.zeros_like(cur)
            keep_lo[hi] = cur[lo] & same
            nxt &= keep_hi & keep_lo
        cur = nxt
    sub = np.where(lab > 0, CORTICAL_HU, 0.0).astype(np.float32)
    sub[cur] = CANCELLOUS_HU
    out[box] = sub
    return out


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask, grown by ``margin`` voxels (clipped)."""
    box = []
    for a in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(b for b in range(mask.ndim) if b != a)))
        box.append(slice(max(0, int(idx[0]) - margin), min(mask.shape[a], int(idx[-1]) + 1 + margin)))
    return tuple(box)


def _outline(
    bone: np.ndarray, sp: np.ndarray, muscle_z: np.ndarray, trunk: np.ndarray | None = None
) -> np.ndarray:
    """The body's muscle outline (bool, long axis last) on the coarse grid."""
    nx, ny = bone.shape[:2]
    # In-plane distance to bone: a huge sampling along the axis keeps the nearest bone in the same slice.
    d = ndimage.distance_transform_edt(~bone, sampling=(sp[0], sp[1], 1e6))
    d[:, :, ~bone.any(axis=(0, 1))] = np.inf
    dil = d <= muscle_z[None, None, :]
    w = max(1, int(np.round(GROUP_WINDOW_MM / sp[2])))
    grouped = ndimage.maximum_filter1d(dil, size=2 * w + 1, axis=2)
    fit_w = max(1, int(np.round(max(float(muscle_z.mean()), sp[2]) / sp[2])))
    fitpts = ndimage.maximum_filter1d(dil, size=2 * fit_w + 1, axis=2)

    zs = np.flatnonzero(bone.any(axis=(0, 1)))
    z0, z1 = int(zs[0]), int(zs[-1])
    hull = np.zeros_like(dil)
    ii, jj = np.meshgrid(np.arange(nx) * sp[0], np.arange(ny) * sp[1], indexing="ij")
    for k in range(z0, z1 + 1):
        groups, n = ndimage.label(grouped[:, :, k])
        pts_mask = fitpts[:, :, k]
        sl = dil[:, :, k].copy()
        for g in range(1, n + 1):
            sel = pts_mask & (groups == g)
            if sel.sum() < 3:
                continue
            sl |= _ellipse(ii, jj, ii[sel], jj[sel])
        hull[:, :, k] = ndimage.binary_fill_holes(sl)
    # Close gaps along the axis (e.g. the abdomen between the rib cage and the pelvis), inside the bones'
    # axial extent only, then smooth the outline along the axis.
    hull[:, :, z0 : z1 + 1] = (
        ndimage.binary_closing(
            hull[:, :, z0 : z1 + 1], structure=np.ones((1, 1, 2 * w + 1), bool), border_value=0
        )
        | hull[:, :, z0 : z1 + 1]
    )
    if trunk is not None and trunk.any():
        hull |= _trunk_taper(hull, sp, trunk)
    sigma = SMOOTH_AXIS_MM / sp[2]
    if sigma > 0.3:
        hull = ndimage.gaussian_filter1d(hull.astype(np.float32), sigma, axis=2) > 0.5
    return hull | dil


def _trunk_taper(hull: np.ndarray, sp: np.ndarray, trunk: np.ndarray) -> np.ndarray:
    """Outline grown so that, across runs of trunk slices, it narrows by at most TRUNK_SLOPE mm per mm.

    The in-plane signed depth of the outline (mm, > 0 inside) is carried slice to slice along the axis,
    losing TRUNK_SLOPE * slice spacing per slice, forward and backward (a cone-shaped max filter).
    """
    flat = (sp[0], sp[1], 1e6)
    depth = ndimage.distance_transform_edt(hull, sampling=flat) - ndimage.distance_transform_edt(
        ~hull, sampling=flat
    )
    step = TRUNK_SLOPE * sp[2]
    out = depth.copy()
    for ks in (range(1, hull.shape[2]), range(hull.shape[2] - 2, -1, -1)):
        carried = depth.copy()
        for k in ks:
            prev = k - 1 if ks.step == 1 else k + 1
            if trunk[k] and trunk[prev]:
                np.maximum(carried[:, :, k], carried[:, :, prev] - step, out=carried[:, :, k])
        np.maximum(out, carried, out=out)
    return out > 0


def _ellipse(ii: np.ndarray, jj: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Ellipse inscribed in the points' bounding box, in the frame of their principal axes."""
    c = np.array([px.mean(), py.mean()])
    cov = np.cov(np.stack([px - c[0], py - c[1]])) + np.eye(2) * 1e-6
    _, vecs = np.linalg.eigh(cov)
    u = (px - c[0]) * vecs[0, 0] + (py - c[1]) * vecs[1, 0]
    v = (px - c[0]) * vecs[0, 1] + (py - c[1]) * vecs[1, 1]
    cu, cv = (u.max() + u.min()) / 2, (v.max() + v.min()) / 2
    a, b = max((u.max() - u.min()) / 2, 1.0), max((v.max() - v.min()) / 2, 1.0)
    gu = (ii - c[0]) * vecs[0, 0] + (jj - c[1]) * vecs[1, 0] - cu
    gv = (ii - c[0]) * vecs[0, 1] + (jj - c[1]) * vecs[1, 1] - cv
    return (gu / a) ** 2 + (gv / b) ** 2 <= 1.0


def _block_max(a: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Max-pool a bool volume by integer factors (padding the edge blocks)."""
    pad = [(0, (-s) % k) for s, k in zip(a.shape, f, strict=True)]
    a = np.pad(a, pad)
    s = a.shape
    return a.reshape(s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2]).any(axis=(1, 3, 5))


def _upsample(a: np.ndarray, f: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of a coarse block grid back onto the full grid (cropped to ``shape``).

    Coarse voxel c covers full voxels [c*f, (c+1)*f); its value sits at the block centre. Separable,
    two taps per axis: much faster than ndimage.zoom on large grids.
    """
    out = a
    for ax in range(3):
        k = int(f[ax])
        if k == 1:
            out = out[(slice(None),) * ax + (slice(0, shape[ax]),)]
            continue
        pos = (np.arange(shape[ax]) + 0.5) / k - 0.5  # full-voxel centre in coarse-index units
        i0 = np.clip(np.floor(pos).astype(int), 0, out.shape[ax] - 1)
        i1 = np.clip(i0 + 1, 0, out.shape[ax] - 1)
        w = np.clip(pos - np.floor(pos), 0.0, 1.0).astype(np.float32)
        w = np.where(pos < 0, 0.0, w).astype(np.float32)
        bshape = [1, 1, 1]
        bshape[ax] = -1
        w = w.reshape(bshape)
        a0 = np.take(out, i0, axis=ax)
        a1 = np.take(out, i1, axis=ax)
        out = a0 + (a1 - a0) * w
    return out


def _smooth_noise(
    shape: tuple[int, ...], sigma_vox: np.ndarray | float, rng: np.random.Generator
) -> np.ndarray:
    """Zero-mean, unit-std smooth Gaussian noise."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="wrap")
    sd = n.std()
    return n / sd if sd > 0 else n
