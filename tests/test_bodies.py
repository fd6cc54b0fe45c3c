"""Labelled bodies: the synthetic soft-tissue envelope, the builders, the atomic build and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from train.synth.bodies.envelope import (
    AIR_HU,
    CANCELLOUS_HU,
    CORTICAL_HU,
    FAT_HU,
    MUSCLE_HU,
    SKIN_HU,
    build_envelope,
    synthetic_bone_hu,
)


def _two_bones(n: int = 64, sp: float = 2.0) -> np.ndarray:
    """Two parallel cylinders (labels 75, 76, radius 12 mm, 48 mm apart) along axis 2, grid at 2 mm."""
    i, j, _ = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    lab = np.zeros((n, n, n), np.uint8)
    rr = (12.0 / sp) ** 2
    lab[(i - n / 2 + 12) ** 2 + (j - n / 2) ** 2 <= rr] = 75
    lab[(i - n / 2 - 12) ** 2 + (j - n / 2) ** 2 <= rr] = 76
    lab[:, :, :8] = 0
    lab[:, :, -8:] = 0
    return lab


def test_envelope_layers_in_order_from_bone_to_air():
    lab = _two_bones(96)
    hu = build_envelope(
        lab, (2.0, 2.0, 2.0), rng=np.random.default_rng(0), muscle_mm=10.0, fat_mm=6.0, skin_mm=2.0
    )
    assert hu.dtype == np.float32
    assert hu.shape == lab.shape
    assert set(np.unique(hu)) <= {AIR_HU, FAT_HU, SKIN_HU, MUSCLE_HU, CORTICAL_HU, CANCELLOUS_HU}
    # Grid corners are air; bones keep bone HU; cortex on the outside of each bone, cancellous inside.
    assert hu[0, 0, 48] == AIR_HU
    assert hu[-1, -1, 48] == AIR_HU
    assert np.all(hu[lab > 0] >= CANCELLOUS_HU)
    assert hu[36, 48, 48] == CANCELLOUS_HU  # centre of bone 75
    # Walking out from the bone along -i in the mid slice: bone, then soft tissue, then fat, skin, air.
    line = hu[:36, 48, 48][::-1]
    kinds = [v for k, v in enumerate(line) if k == 0 or v != line[k - 1]]
    soft = [v for v in kinds if v not in (CORTICAL_HU, CANCELLOUS_HU)]
    assert soft[0] in (MUSCLE_HU, FAT_HU)
    assert soft[-1] == AIR_HU
    assert soft[-2] == SKIN_HU
    assert soft[-3] == FAT_HU
    # The muscle band around the bone is about muscle_mm thick: no air within 8 mm of bone (away from
    # the bone ends, which get only the fat and skin layers: a scalp, a sole).
    from scipy import ndimage

    d = ndimage.distance_transform_edt(lab == 0, sampling=2.0)
    near = (d > 0) & (d <= 8)
    near[:, :, :20] = False
    near[:, :, -20:] = False
    assert np.all(hu[near] != AIR_HU)
    assert np.all(hu[near] != SKIN_HU)
    # Everything farther from bone than the largest muscle + fat + skin (+ one coarse voxel) is air.
    far = 10 * 1.15 * 1.375 + 6 * 1.5 * 1.375 * 1.5 + 2 * 1.2 + 6
    assert np.all(hu[d > far] == AIR_HU)
    assert (hu[d > 0] == SKIN_HU).any()


def test_envelope_is_one_body_between_the_bones_and_deterministic_per_seed():
    lab = _two_bones()
    a = build_envelope(lab, (2.0, 2.0, 2.0), rng=np.random.default_rng(3))
    b = build_envelope(lab, (2.0, 2.0, 2.0), rng=np.random.default_rng(3))
    c = build_envelope(lab, (2.0, 2.0, 2.0), rng=np.random.default_rng(4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # The gap between the two bones (24 mm apart) is inside the body, not air.
    assert np.all(a[28:37, 32, 16:48] != AIR_HU)


def test_envelope_keeps_given_bone_hu_and_honours_axis():
    lab = _two_bones()
    bone_hu = np.where(lab > 0, 777.0, 0.0).astype(np.float32)
    hu = build_envelope(lab, (2.0, 2.0, 2.0), bone_hu, rng=np.random.default_rng(0))
    assert np.all(hu[lab > 0] == 777.0)
    # The same bones with the long axis first give the transposed body.
    lab0 = np.ascontiguousarray(lab.transpose(2, 0, 1))
    hu0 = build_envelope(
        lab0, (2.0, 2.0, 2.0), bone_hu.transpose(2, 0, 1), rng=np.random.default_rng(0), axis=0
    )
    assert np.array_equal(hu0, hu.transpose(2, 0, 1))


def test_envelope_bad_input():
    lab = _two_bones()
    with pytest.raises(ValueError, match="no bone voxels"):
        build_envelope(np.zeros_like(lab), (2.0, 2.0, 2.0), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="bone_hu has shape"):
        build_envelope(lab, (2.0, 2.0, 2.0), np.zeros((3, 3, 3)), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="spacing"):
        build_envelope(lab, (2.0, 0.0, 2.0), rng=np.random.default_rng(0))


def test_synthetic_bone_has_its_own_cortex_per_bone():
    lab = np.zeros((20, 10, 10), np.uint8)
    lab[1:10, 1:9, 1:9] = 27
    lab[10:19, 1:9, 1:9] = 28  # touches bone 27 face to face
    hu = synthetic_bone_hu(lab, (1.0, 1.0, 1.0))
    assert hu[0, 5, 5] == 0
    assert hu[5, 5, 5] == CANCELLOUS_HU
    assert hu[14, 5, 5] == CANCELLOUS_HU
    # Both faces where the bones touch are cortex: each bone keeps its own end plate.
    assert hu[9, 5, 5] == CORTICAL_HU
    assert hu[10, 5, 5] == CORTICAL_HU
    assert hu[1, 5, 5] == CORTICAL_HU
    assert hu[5, 1, 5] == CORTICAL_HU
