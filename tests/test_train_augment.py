"""Augmentations keep image and masks aligned and stay in range."""

from __future__ import annotations

import numpy as np
import pytest

from train.augment import AugmentConfig, augment, collimator, random_affine, text_burn_in, tone_curve, warp


def _square(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    img = np.zeros((size, size), np.float32)
    img[30:60, 20:50] = 1.0
    return img, (img > 0.5)[None]


def test_strength_zero_is_identity_up_to_normalisation() -> None:
    img, m = _square()
    out, mo = augment(img * 0.5 + 0.2, m, np.random.default_rng(0), AugmentConfig(strength=0.0))
    np.testing.assert_allclose(out, img, atol=1e-6)
    assert np.array_equal(mo, m)


@pytest.mark.parametrize("seed", range(12))
def test_random_augment_in_range_and_masks_follow_geometry(seed: int) -> None:
    img, m = _square()
    rng = np.random.default_rng(seed)
    out, mo = augment(img, m, rng, AugmentConfig())
    assert out.dtype == np.float32
    assert out.shape == img.shape
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    assert mo.shape == m.shape
    assert mo.dtype == bool
    # a mask can only shrink (crop, collimator) or move; it never grows past the warped square
    assert mo.sum() <= m.sum() * 1.7 + 10


def test_warp_moves_mask_with_image() -> None:
    img, m = _square()
    mat = random_affine(img.shape, np.random.default_rng(3), AugmentConfig())
    wi, wm, valid = warp(img, m, mat, fill=0.0)
    bright = wi > 0.5
    inter = (bright & wm[0]).sum()
    assert inter / max(1, wm[0].sum()) > 0.85  # the mask is where the square went
    assert valid.dtype == bool


def test_collimator_leaves_a_central_field() -> None:
    fov = collimator((128, 128), np.random.default_rng(1))
    assert fov[64, 64]
    assert 0.2 < fov.mean() < 1.0


def test_sim_to_real_steps_change_pixels_but_not_range() -> None:
    rng = np.random.default_rng(0)
    img = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    for fn in (tone_curve, text_burn_in):
        out = fn(img, rng)
        assert out.shape == img.shape
        assert out.min() >= 0
        assert out.max() <= 1.0 + 1e-6
        assert not np.allclose(out, img)
