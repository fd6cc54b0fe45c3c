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


def test_intensifier_distortion_moves_mask_with_image_and_magnifies_the_rim() -> None:
    from train.augment import intensifier_maps, remap

    size = 128
    img = np.zeros((size, size), np.float32)
    img[100:118, 10:40] = 1.0  # a square near the rim, where pincushion moves things most
    m = (img > 0.5)[None]
    maps = intensifier_maps(img.shape, np.random.default_rng(5))
    wi, wm, valid = remap(img, m, maps, fill=0.0)
    assert ((wi > 0.5) == wm[0]).mean() > 0.99  # the mask went where the square went
    assert wm[0].sum() > m[0].sum()  # pincushion: the rim is magnified
    assert not np.array_equal(wm[0], m[0])
    assert valid[size // 2, size // 2]


def test_over_exposure_clips_the_brightest_part_and_blooms_into_its_neighbours() -> None:
    from train.augment import over_exposure

    img = np.tile(np.linspace(0, 1, 128, dtype=np.float32), (128, 1))
    out = over_exposure(img, np.random.default_rng(2))
    assert out.max() <= 1.0
    assert out.min() >= 0.0
    sat = out >= 1.0 - 1e-6
    assert 0.04 < sat.mean() < 0.35  # the top few to a third of the range burns out
    first = int(np.argmax(sat[64]))
    # just below the saturated edge the glow lifts pixels above a plain clip of the same image
    plain = np.minimum(img / img[64, first], 1.0)
    assert np.all(out >= plain - 1e-3)  # light only adds
    assert (out[64, first - 4 : first] - plain[64, first - 4 : first]).max() > 1e-4
    assert np.allclose(out[64, :8], plain[64, :8], atol=1e-4)  # far from the glare nothing changes
