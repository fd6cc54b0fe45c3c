"""Per-case anatomical variation (train/synth/variation.py) on analytic phantoms.

The phantoms are built straight as ``PreparedVolume``s (materials on a 2 mm grid, label bits on a 1.5 mm
grid that does not share its voxel centres, like a prepared CT) so every test runs in about a second.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.synth.variation import (
    JointPose,
    VariationParams,
    _grad,
    apply_variation,
    build_map,
    find_joints,
    sample_variation,
    volume_centre,
)
from train.synth.volume import PreparedVolume

BALL, SLAB = 91, 116  # skull, sternum: any two vocabulary structures
DENSITY = {BALL: 1.2, SLAB: 1.9, 70: 1.5, 72: 1.5}  # g/cm³ of each phantom bone
HUMERUS, SCAPULA = 70, 72  # humerus_right, scapula_right: the shoulder joint's lever and socket


def _centres(n: int, mm: float, lo: float) -> np.ndarray:
    return lo + mm / 2 + mm * np.arange(n)


def _grid(mm: float, extent: float, lo: float) -> tuple[np.ndarray, np.ndarray]:
    n = round(extent / mm)
    c = _centres(n, mm, lo)
    aff = np.diag([mm, mm, mm, 1.0])
    aff[:3, 3] = c[0]
    w = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
    return w, aff


def make_phantom(shapes: dict[int, tuple], extent: float = 160.0, name: str = "phantom") -> PreparedVolume:
    """A soft-tissue cylinder (axis z, radius 0.4 extent; its outer 0.05 extent fat at 0.93 g/cm³, lean
    tissue at 1.0 inside) in air with bones: ``shapes`` maps a label id to
    (inside(world (..., 3)) -> bool, bone density g/cm³). Materials are partial-volume averages of 8
    sub-voxel samples, as a CT pooled to 2 mm; a label voxel is set where its centre is inside (channel 0,
    bit n for the n-th id)."""
    lo = -extent / 2
    wm, am = _grid(2.0, extent, lo)
    soft = np.zeros(wm.shape[:3], np.float32)
    bone = np.zeros_like(soft)
    air = np.zeros_like(soft)
    for off in np.stack(np.meshgrid(*[[-0.5, 0.5]] * 3, indexing="ij"), -1).reshape(-1, 3):
        w = wm + off
        body = np.hypot(w[..., 0], w[..., 1]) < 0.4 * extent
        b = np.zeros_like(soft)
        for inside, dens in shapes.values():
            b = np.where(inside(w), dens, b)
        bone += b / 8
        r = np.hypot(w[..., 0], w[..., 1])
        soft += np.where(body & (b == 0), np.where(r > 0.35 * extent, 0.93, 1.0), 0.0) / 8
        air += np.where(body, 0.0, 0.001) / 8
    wl, al = _grid(1.5, extent, lo)
    bits = np.zeros(wl.shape[:3], np.int64)
    ids = list(shapes)
    rng = np.random.default_rng(0)
    anchors, points = {}, {}
    for n, lid in enumerate(ids):
        m = shapes[lid][0](wl)
        bits[m] |= 1 << n
        pts = wl[m]
        anchors[lid] = pts.mean(0)
        points[lid] = pts[rng.choice(len(pts), min(4000, len(pts)), replace=False)].astype(np.float32)
    return PreparedVolume(
        name=name,
        materials=torch.from_numpy(np.stack([air, soft, bone]).astype(np.float32))[None].contiguous(),
        materials_affine=am,
        label_bits=torch.from_numpy(bits.astype(np.float32))[None].contiguous(),
        labels_affine=al,
        present_ids=ids,
        anchors=anchors,
        points=points,
    )


@lru_cache(maxsize=1)  # built once: apply_variation never changes its input (test_input_is_untouched)
def ball_and_slab() -> PreparedVolume:
    ball = (lambda w: np.linalg.norm(w - np.array([15.0, -10.0, 8.0]), axis=-1) < 28.0, 1.2)
    slab = (
        lambda w: (np.abs(w[..., 1] - 38.0) < 7.0) & (np.abs(w[..., 0]) < 40) & (np.abs(w[..., 2]) < 45),
        1.9,
    )
    return make_phantom({BALL: ball, SLAB: slab})


@lru_cache(maxsize=1)
def shoulder() -> PreparedVolume:
    """A humerus (head radius 14 mm at the origin, shaft radius 7 mm down -z for 110 mm) against a
    scapula block touching the head medially: the shoulder_right joint of ``JOINTS``."""
    centre = np.array([0.0, 0.0, 40.0])

    def humerus(w):
        r = w - centre
        shaft = (np.hypot(r[..., 0], r[..., 1]) < 7.0) & (r[..., 2] < 0) & (r[..., 2] > -110)
        return (np.linalg.norm(r, axis=-1) < 14.0) | shaft

    def scapula(w):
        r = w - centre
        return (r[..., 0] < -17.0) & (r[..., 0] > -30.0) & (np.abs(r[..., 1]) < 25) & (np.abs(r[..., 2]) < 25)

    return make_phantom({HUMERUS: (humerus, 1.5), SCAPULA: (scapula, 1.5)}, extent=200.0)


def _bit_mask(vol: PreparedVolume, lid: int) -> np.ndarray:
    b = vol.present_ids.index(lid)
    return (vol.label_bits[0].numpy().astype(np.int64) >> b) & 1 == 1


def _world(aff: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).astype(np.float64)
    return ijk @ aff[:3, :3].T + aff[:3, 3]


def _bone_at(vol: PreparedVolume, world: np.ndarray) -> np.ndarray:
    """Bone density of ``vol`` (trilinear) at world points."""
    inv = np.linalg.inv(vol.materials_affine)
    idx = world @ inv[:3, :3].T + inv[:3, 3]
    n = np.array(vol.materials.shape[2:]) - 1
    g = torch.from_numpy((2 * idx / n - 1)[:, ::-1].copy()).float().view(1, -1, 1, 1, 3)
    out = F.grid_sample(vol.materials[:, 2:3], g, mode="bilinear", align_corners=True)
    return out.flatten().numpy()


def _label_at(vol: PreparedVolume, lid: int, world: np.ndarray, grow: int = 0) -> np.ndarray:
    """Whether label ``lid`` (grown by ``grow`` voxels) is set at the nearest label voxel of each point."""
    inv = np.linalg.inv(vol.labels_affine)
    idx = np.rint(world @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    shape = np.array(vol.label_bits.shape[1:])
    ok = np.all((idx >= 0) & (idx < shape), axis=1)
    m = _bit_mask(vol, lid)
    if grow:
        t = torch.from_numpy(m)[None, None].float()
        m = F.max_pool3d(t, 2 * grow + 1, stride=1, padding=grow)[0, 0].numpy() > 0.5
    out = np.zeros(len(world), bool)
    out[ok] = m[tuple(idx[ok].T)]
    return out


def _interior(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` whose six face neighbours are in it too (edges jitter by a voxel under any
    resampling, so alignment is judged one voxel in from them)."""
    m = torch.from_numpy(mask)[None, None].float()
    return (-F.max_pool3d(-m, 3, stride=1, padding=1))[0, 0].numpy() > 0.5


def _agreement(
    vol: PreparedVolume, lid: int, labels_from: PreparedVolume | None = None
) -> tuple[float, float]:
    """(share of the label's interior voxels that lie on bone, share of fully dense bone voxels that lie
    under the label). On bone: over half the structure's density, read trilinearly at the label voxel's
    centre; fully dense: over 90 % of it. Bone within 3 mm of another label is left out.

    ``labels_from`` takes the labels from another volume (to show that a misaligned pair fails)."""
    lab = labels_from or vol
    d = DENSITY[lid]
    on_bone = float(np.mean(_bone_at(vol, _world(lab.labels_affine, _interior(_bit_mask(lab, lid)))) > d / 2))
    w = _world(vol.materials_affine, vol.materials[0, 2].numpy() > 0.9 * d)
    others = [i for i in lab.present_ids if i != lid]
    theirs = (
        np.any([_label_at(lab, o, w, grow=2) for o in others], axis=0) if others else np.zeros(len(w), bool)
    )
    under = float(np.mean(_label_at(lab, lid, w[~theirs])))
    return on_bone, under


STRONG = VariationParams(
    scale=(1.12, 0.88, 1.1),
    elastic_seed=3,
    elastic_spacing_mm=40.0,
    elastic_rms_mm=5.0,
    subcutaneous_mm=8.0,
)


def test_labels_stay_on_the_anatomy():
    vol = ball_and_slab()
    params = replace(STRONG, scale_centre=tuple(volume_centre(vol)))
    out = apply_variation(vol, params)
    moved = np.abs(out.anchors[BALL] - vol.anchors[BALL]).max()
    assert moved > 2.0  # the strong variation does move the ball
    for lid in (BALL, SLAB):
        on_bone, under = _agreement(out, lid)
        assert on_bone >= 0.95, (lid, on_bone)
        assert under >= 0.95, (lid, under)
    # The check has teeth: the varied densities with the unvaried labels do not agree.
    on_bone, under = _agreement(out, BALL, labels_from=vol)
    assert min(on_bone, under) < 0.9


def test_points_and_anchors_stay_inside_their_labels():
    vol = ball_and_slab()
    out = apply_variation(vol, replace(STRONG, scale_centre=tuple(volume_centre(vol))))
    for lid in (BALL, SLAB):
        assert _label_at(out, lid, out.points[lid].astype(np.float64)).mean() >= 0.98
    assert _label_at(out, BALL, out.anchors[BALL][None])[0]


def test_identity_reproduces_the_input_exactly():
    vol = ball_and_slab()
    params = sample_variation(np.random.default_rng(4), vol, strength=0.0)
    out = apply_variation(vol, params)
    assert torch.equal(out.materials, vol.materials)
    assert torch.equal(out.label_bits, vol.label_bits)
    assert np.array_equal(out.materials_affine, vol.materials_affine)
    assert np.array_equal(out.labels_affine, vol.labels_affine)
    for k in vol.points:
        assert np.array_equal(out.points[k], vol.points[k])
        assert np.array_equal(out.anchors[k], vol.anchors[k])
    assert out.materials is not vol.materials  # a new volume, not the input


def test_a_near_identity_map_resamples_to_the_input():
    vol = ball_and_slab()
    out = apply_variation(vol, VariationParams(elastic_rms_mm=1e-4, scale_centre=tuple(volume_centre(vol))))
    assert torch.equal(out.label_bits, vol.label_bits)
    assert float((out.materials[:, 1:] - vol.materials[:, 1:]).abs().max()) < 1e-3


def test_input_is_untouched():
    vol = ball_and_slab()
    before = (vol.materials.clone(), vol.label_bits.clone(), {k: v.copy() for k, v in vol.points.items()})
    apply_variation(vol, sample_variation(np.random.default_rng(1), vol, strength=1.5))
    assert torch.equal(vol.materials, before[0])
    assert torch.equal(vol.label_bits, before[1])
    assert all(np.array_equal(vol.points[k], v) for k, v in before[2].items())


def test_scaling_changes_the_measured_extent_by_the_drawn_factor():
    vol = ball_and_slab()
    params = sample_variation(np.random.default_rng(7), vol)
    params = VariationParams(scale=params.scale, scale_centre=params.scale_centre)  # scaling alone
    assert max(abs(s - 1) for s in params.scale) > 0.03
    out = apply_variation(vol, params)
    for lid in (BALL, SLAB):
        a = _world(vol.labels_affine, _bit_mask(vol, lid))
        b = _world(out.labels_affine, _bit_mask(out, lid))
        ratio = np.ptp(b, axis=0) / np.ptp(a, axis=0)
        assert np.allclose(ratio, params.scale, atol=1e-6)
        # the anchors move with the same map
        c = np.asarray(params.scale_centre)
        assert np.allclose(out.anchors[lid], c + np.asarray(params.scale) * (vol.anchors[lid] - c))


def test_bone_density_changes_only_the_bone_channel():
    vol = ball_and_slab()
    out = apply_variation(vol, VariationParams(bone_factor=0.7))
    assert torch.equal(out.materials[0, :2], vol.materials[0, :2])
    assert torch.equal(out.label_bits, vol.label_bits)
    bone_in, bone_out = vol.materials[0, 2], out.materials[0, 2]
    cancellous = bone_in == 1.2  # the ball: cancellous density gets the full factor
    cortical = bone_in == 1.9  # the slab: cortical density gets half of the change
    assert torch.allclose(bone_out[cancellous], torch.tensor(1.2 * 0.7))
    assert torch.allclose(bone_out[cortical], torch.tensor(1.9 * 0.85))


def test_habitus_adds_fat_outside_the_body_only():
    vol = ball_and_slab()
    out = apply_variation(vol, VariationParams(subcutaneous_mm=10.0))
    assert torch.equal(out.materials[0, 2], vol.materials[0, 2])
    assert torch.equal(out.label_bits, vol.label_bits)
    gained = out.materials[0, 1] - vol.materials[0, 1]
    assert float(gained.min()) >= 0
    inside = vol.materials[0, 1] >= 0.92  # fully tissue (surface voxels are partly filled up)
    assert float(gained[inside].abs().max()) < 1e-6
    # the phantom is 64 mm thick (half-thickness 60 in steps of HABITUS_RADII_MM, of HABITUS_FULL_MM 120):
    # ~5 mm of fat on a cylinder of radius 64 mm adds ~ (69² - 64²) / 64² = 16 % of its cross-section
    share = float(gained.sum() / 0.93 / vol.materials[0, 1:].sum(0).gt(0.5).sum())
    assert 0.1 < share < 0.22, share


def test_thinner_habitus_removes_only_fat():
    vol = ball_and_slab()
    out = apply_variation(vol, VariationParams(subcutaneous_mm=-10.0))
    assert torch.equal(out.materials[0, 2], vol.materials[0, 2])
    assert torch.equal(out.label_bits, vol.label_bits)
    soft_in, soft_out = vol.materials[0, 1], out.materials[0, 1]
    assert torch.equal(soft_out[soft_in > 0.98], soft_in[soft_in > 0.98])  # lean tissue stays
    fat = (soft_in > 0.9) & (soft_in <= 0.98)
    # ~5 mm of the 8 mm fat shell (radius 56-64 mm) goes: (64² - 59²) / (64² - 56²) = 64 %
    lost = float(1 - soft_out[fat].sum() / soft_in[fat].sum())
    assert 0.4 < lost < 0.85, lost


def test_determinism():
    vol = ball_and_slab()
    p1 = sample_variation(np.random.default_rng(11), vol)
    p2 = sample_variation(np.random.default_rng(11), vol)
    assert p1 == p2
    assert p1.to_json() == p2.to_json()
    assert VariationParams.from_json(p1.to_json()).to_json() == p1.to_json()
    a, b = apply_variation(vol, p1), apply_variation(vol, p2)
    assert torch.equal(a.materials, b.materials)
    assert torch.equal(a.label_bits, b.label_bits)
    assert p1 != sample_variation(np.random.default_rng(12), vol)


def test_elastic_map_does_not_fold():
    vol = ball_and_slab()
    params = VariationParams(
        elastic_seed=5, elastic_spacing_mm=40.0, elastic_rms_mm=15.0
    )  # far past the range
    smap = build_map(vol, params)
    jac = _grad(smap.disp, smap.grid.spacing).permute(2, 3, 4, 0, 1) + torch.eye(3)
    assert float(torch.linalg.det(jac).min()) > 0.3
    assert float(smap.disp.norm(dim=0).max()) > 3.0  # and it does deform


def test_joint_rotation_turns_the_distal_bone_by_the_drawn_angle():
    vol = shoulder()
    joints = find_joints(vol)
    assert [j.spec.name for j in joints] == ["shoulder_right"]
    jf = joints[0]
    assert np.linalg.norm(jf.centre - [0, 0, 40]) < 4.0  # the head's fitted centre
    assert jf.limb_axis[2] < -0.99  # down the shaft
    pose = JointPose("shoulder_right", tuple(jf.centre), (1.0, 0.0, 0.0), 25.0)
    out = apply_variation(vol, VariationParams(joints=(pose,), scale_centre=tuple(volume_centre(vol))))

    def axis(v: PreparedVolume) -> np.ndarray:
        w = _world(v.labels_affine, _bit_mask(v, HUMERUS))
        w = w[w[:, 2] < jf.centre[2] - 20]  # the shaft, not the head
        return np.linalg.svd(w - w.mean(0), full_matrices=False)[2][0]

    angle = np.degrees(np.arccos(abs(axis(vol) @ axis(out))))
    assert abs(angle - 25.0) < 1.5, angle
    # the socket stays, the bone keeps its density under its label, and its points follow it
    assert np.array_equal(_bit_mask(out, SCAPULA), _bit_mask(vol, SCAPULA))
    on_bone, under = _agreement(out, HUMERUS)
    assert on_bone >= 0.95, on_bone
    assert under >= 0.95, under
    assert _label_at(out, HUMERUS, out.points[HUMERUS].astype(np.float64)).mean() >= 0.98
    r = np.asarray(pose.rotation()[0])
    tip = vol.points[HUMERUS][np.argmin(vol.points[HUMERUS][:, 2])].astype(np.float64)
    k = int(np.argmin(vol.points[HUMERUS][:, 2]))
    assert np.allclose(out.points[HUMERUS][k], r @ (tip - jf.centre) + jf.centre, atol=0.05)


def test_sampled_joints_stay_in_range_and_abduct():
    vol = shoulder()
    jf = find_joints(vol)[0]
    tip = jf.centre + jf.limb_axis * jf.lever_mm
    mid_x = np.mean([a[0] for a in vol.anchors.values()])  # the scapula lies medial to the humerus
    angles = []
    for seed in range(12):
        p = sample_variation(np.random.default_rng(seed), vol)
        for j in p.joints:
            angles.append(j.angle_deg)
            r, t = j.rotation()
            assert abs((r @ tip + t)[0] - mid_x) >= abs(tip[0] - mid_x) - 1e-6  # away from the trunk
    assert angles
    assert all(-20 <= a <= 20 for a in angles)


def test_bad_input_gets_a_clear_error():
    vol = ball_and_slab()
    with pytest.raises(ValueError, match="strength"):
        sample_variation(np.random.default_rng(0), vol, strength=-1)
    with pytest.raises(ValueError, match="unknown joint"):
        apply_variation(vol, VariationParams(joints=(JointPose("tail", (0, 0, 0), (1, 0, 0), 10.0),)))
    with pytest.raises(ValueError, match="scale"):
        apply_variation(vol, VariationParams(scale=(1.0, 0.0, 1.0)))


def test_varied_cases_are_not_retained_by_the_region_caches():
    """Every case is a new varied volume; once a worker moves on, the old ones must be freed.
    An unbounded anatomy cache once kept every case alive (+100-150 MB per case in a worker)."""
    import gc
    import weakref

    from train.synth.views import body_regions
    from train.synth.vocabulary import Vocabulary

    vocab = Vocabulary.load()
    base = ball_and_slab()
    refs = []
    for seed in range(6):
        vol = apply_variation(base, sample_variation(np.random.default_rng(seed), base))
        body_regions(vol, vocab)
        refs.append(weakref.ref(vol))
        del vol
    gc.collect()
    alive = [r() is not None for r in refs]
    assert not any(alive[:-2]), alive  # at most the two most recent cases are cached
