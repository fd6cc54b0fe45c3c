"""Deterministic FluoroSAM preprocessing: exact 2-means windowing, resize, normalise, pad."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fluorosam_rt.imageio import read_image
from fluorosam_rt.preprocess import (
    PreprocessInfo,
    Preprocessor,
    minmax_window,
    mixture_window,
    piecewise_window,
    resized_shape,
    two_means_1d,
)


def _sse_threshold(x: np.ndarray, c_lo: float, c_hi: float) -> float:
    """Within-cluster SSE of the nearest-centre labelling of x (float64)."""
    x = x.astype(np.float64)
    bright = x > 0.5 * (c_lo + c_hi)
    total = 0.0
    for part in (x[~bright], x[bright]):
        if part.size:
            total += float(((part - part.mean()) ** 2).sum())
    return total


def _normalised(channels: list[np.ndarray]) -> np.ndarray:
    return (np.stack(channels).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)


# --------------------------------------------------------------------------- exact 2-means


def test_two_means_is_global_optimum_over_all_partitions() -> None:
    # Brute force over every 2-partition (not only threshold ones) of small samples with ties.
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(2, 11))
        x = rng.integers(0, 6, n).astype(np.float64) if trial % 2 else rng.normal(size=n)
        if np.all(x == x[0]):
            continue
        best = np.inf
        for mask in itertools.product([False, True], repeat=n):
            m = np.array(mask)
            if m.all() or not m.any():
                continue
            a, b = x[m], x[~m]
            best = min(best, ((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum())
        c_lo, c_hi = two_means_1d(x)
        assert c_lo < c_hi
        assert _sse_threshold(x, c_lo, c_hi) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_two_means_degenerate_and_order() -> None:
    assert two_means_1d(np.full(5, 3.0)) == (3.0, 3.0)
    assert two_means_1d(np.array([7.0, 1.0])) == (1.0, 7.0)
    with pytest.raises(ValueError, match="at least one"):
        two_means_1d(np.array([]))


def _sklearn_mixture(img: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The official recipe, literally, with a fixed seed: returns (sorted centres, [ch1, ch2], sample)."""
    from sklearn.cluster import KMeans  # dev dependency (test reference only)
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    img = img.astype(np.float32)
    flat = img.ravel()
    sample = flat[:: max(1, flat.size // 1000)]
    # tol=0 runs Lloyd to a true fixed point; the default tol can stop a step early.
    with threadpool_limits(1):  # OpenMP threads on a busy 2-core machine make this 50x slower
        km = KMeans(n_clusters=2, n_init=10, random_state=0, max_iter=100, tol=0.0)
        km.fit(sample.reshape(-1, 1))
        labels = km.predict(flat.reshape(-1, 1))
    order = np.argsort(km.cluster_centers_[:, 0])
    m, big_m = flat.min(), flat.max()
    channels = []
    for i in order:
        members = flat[labels == i]
        mu, s = float(km.cluster_centers_[i, 0]), members.std()
        xp = [m, max(mu - 3 * s, members.min()), min(mu + 3 * s, members.max()), big_m]
        channels.append(np.interp(img, xp, [0, 0.1, 0.9, 1]).astype(np.float32))
    return np.sort(km.cluster_centers_[:, 0]), channels, sample


@pytest.fixture(scope="module")
def kmeans_images(shared_dir: Path) -> dict[str, np.ndarray]:
    chest = shared_dir / "data" / "chest-xray-hannover" / "images"
    dicom = shared_dir / "data" / "dicom"
    names = ["00870a9c.png", "08d780ae.png", "1052b0fe.png", "19abe1f3.png", "0a7faa2a.png"]
    paths = [chest / n for n in names] + [dicom / "dx_image.dcm", dicom / "RG3_J2KR.dcm"]
    for p in paths:
        if not p.exists():
            pytest.fail(f"missing shared image {p}", pytrace=False)
    return {p.name: read_image(p).pixels for p in paths}


def test_against_sklearn_kmeans(kmeans_images: dict[str, np.ndarray]) -> None:
    exact = []
    for name, pixels in kmeans_images.items():
        img = pixels.astype(np.float32)
        sk_centres, sk_channels, sample = _sklearn_mixture(img)
        ours_centres = np.array(two_means_1d(sample))
        value_range = float(sample.max() - sample.min())
        sse_ours = _sse_threshold(sample, *ours_centres)
        sse_sk = _sse_threshold(sample, *sk_centres)
        # Never worse than sklearn: ours is the global optimum.
        assert sse_ours <= sse_sk * (1 + 1e-9), name
        ours = mixture_window(pixels)
        same_partition = np.abs(ours_centres - sk_centres).max() <= 1e-5 * value_range
        if same_partition:
            exact.append(name)
            for a, b in zip(ours[1:], sk_channels):
                np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        else:
            # sklearn stopped in a neighbouring local optimum (integer-valued data): strictly worse SSE,
            # centres within 1 % of the range, windows close.
            assert sse_ours < sse_sk, name
            np.testing.assert_allclose(ours_centres, sk_centres, atol=0.01 * value_range, err_msg=name)
            for a, b in zip(ours[1:], sk_channels):
                assert np.abs(a - b).max() < 0.03, name
                assert np.abs(a - b).mean() < 0.005, name
    # Observed: every image here except 0a7faa2a gives sklearn's global optimum.
    assert set(exact) == set(kmeans_images) - {"0a7faa2a.png"}


def test_channel0_is_minmax_and_channel_ranges(kmeans_images: dict[str, np.ndarray]) -> None:
    pixels = kmeans_images["dx_image.dcm"]
    img = pixels.astype(np.float32)
    c0, c1, c2 = mixture_window(pixels)
    np.testing.assert_allclose(c0, (img - img.min()) / (img.max() - img.min()), atol=1e-6)
    for ch in (c0, c1, c2):
        assert ch.dtype == np.float32
        assert ch.min() >= 0.0
        assert ch.max() <= 1.0
    # Both windows are monotone non-decreasing functions of the intensity.
    order = np.argsort(img.ravel(), kind="stable")
    for ch in (c1, c2):
        assert np.all(np.diff(ch.ravel()[order]) >= -1e-6)


def test_piecewise_window_matches_np_interp() -> None:
    rng = np.random.default_rng(1)
    for xp in ([0, 0, 5, 10], [0, 2, 5, 10], [0, 2, 2, 10], [0, 2, 10, 10], [3e4, 3.001e4, 3.003e4, 6e4]):
        x = np.concatenate([rng.uniform(xp[0], xp[3], 5000), xp]).astype(np.float32)
        ref = np.interp(x, xp, [0, 0.1, 0.9, 1])
        np.testing.assert_allclose(piecewise_window(x, *xp), ref, atol=5e-7, err_msg=str(xp))


# --------------------------------------------------------------------------- golden-style input


def test_golden_style_input_normalisation_and_no_padding(golden_io: dict) -> None:
    enc = golden_io["encoder_input"][0].numpy()  # 3x448x448 in [-1, 1]
    image = enc * np.float32(0.5) + np.float32(0.5)  # the fixture's [0,1] windowed image
    ch0 = image[0]
    assert ch0.min() == 0.0
    assert ch0.max() == 1.0
    # The fixture's channels 1/2 are fixed piecewise windows of channel 0 (golden_config.json).
    np.testing.assert_allclose(piecewise_window(ch0, 0, 0.15, 0.45, 1), image[1], atol=3e-7)
    np.testing.assert_allclose(piecewise_window(ch0, 0, 0.5, 0.85, 1), image[2], atol=3e-7)

    tensor, info = Preprocessor(448, windowing="minmax")(ch0)
    assert info == PreprocessInfo(original_hw=(448, 448), resized_hw=(448, 448), scale=1.0)
    assert tensor.shape == (3, 448, 448)
    assert tensor.dtype == torch.float32
    for c in range(3):  # min-max of a [0,1] image is the identity, then (x-0.5)/0.5
        np.testing.assert_allclose(tensor[c].numpy(), enc[0], atol=1e-7)

    tensor, info = Preprocessor(448)(ch0)
    # Resize skipped, nothing padded: exactly the normalised windows.
    expected = _normalised(mixture_window(ch0))
    assert torch.equal(tensor, torch.from_numpy(expected))
    np.testing.assert_allclose(tensor[0].numpy(), enc[0], atol=1e-7)
    assert float(tensor.min()) >= -1.0
    assert float(tensor.max()) <= 1.0


# --------------------------------------------------------------------------- geometry


def test_resized_shape_python_round_ties_to_even() -> None:
    assert resized_shape(5, 8, 4) == ((2, 4), 0.5)  # 2.5 → 2
    assert resized_shape(3, 8, 4) == ((2, 4), 0.5)  # 1.5 → 2
    assert resized_shape(7, 8, 4) == ((4, 4), 0.5)  # 3.5 → 4
    assert resized_shape(1, 1000, 448)[0] == (1, 448)  # never 0
    assert resized_shape(1, 1, 448) == ((448, 448), 448.0)


@pytest.mark.parametrize("window_at", ["original", "resized"])
@pytest.mark.parametrize(("h", "w"), [(300, 200), (120, 301)])
def test_non_square_padding(h: int, w: int, window_at: str) -> None:
    yy, xx = np.mgrid[0:h, 0:w]
    img = (np.sin(xx / 9.0) * np.cos(yy / 13.0) * 1000 + 2000).astype(np.uint16)
    s = 256
    tensor, info = Preprocessor(s, window_at=window_at)(img)
    rh, rw = info.resized_hw
    assert info.original_hw == (h, w)
    assert (rh, rw) == (round(h * s / max(h, w)), round(w * s / max(h, w)))
    assert max(rh, rw) == s
    assert info.scale == pytest.approx(s / max(h, w))
    assert tensor.shape == (3, s, s)
    assert torch.all(tensor[:, rh:, :] == 0)
    assert torch.all(tensor[:, :, rw:] == 0)
    valid = tensor[:, :rh, :rw]
    assert float(valid.min()) >= -1.0
    assert float(valid.max()) <= 1.0
    assert float(valid[0].min()) < -0.95  # min-max channel spans the range in the valid region
    assert float(valid[0].max()) > 0.95


def test_original_mode_windows_then_resizes_with_cv2() -> None:
    rng = np.random.default_rng(2)
    img = rng.normal(1000, 200, (90, 60)).astype(np.float32)
    tensor, info = Preprocessor(64)(img)
    hwc = cv2.resize(np.stack(mixture_window(img), -1), (info.resized_hw[1], info.resized_hw[0]))
    expected = (hwc.transpose(2, 0, 1) - np.float32(0.5)) / np.float32(0.5)
    rh, rw = info.resized_hw
    assert torch.equal(tensor[:, :rh, :rw], torch.from_numpy(np.ascontiguousarray(expected)))


def test_resized_mode_resizes_then_windows() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 4096, (200, 150)).astype(np.uint16)
    tensor, info = Preprocessor(100, window_at="resized")(img)
    small = cv2.resize(img.astype(np.float32), (info.resized_hw[1], info.resized_hw[0]))
    rh, rw = info.resized_hw
    assert torch.equal(tensor[:, :rh, :rw], torch.from_numpy(_normalised(mixture_window(small))))


def test_info_lets_a_mask_go_back_to_original_size() -> None:
    img = np.zeros((300, 500), np.uint8)
    img[100:200, 50:150] = 200
    tensor, info = Preprocessor(128, windowing="minmax")(img)
    crop = tensor[0, : info.resized_hw[0], : info.resized_hw[1]].numpy()
    back = cv2.resize(crop, (info.original_hw[1], info.original_hw[0]), interpolation=cv2.INTER_NEAREST)
    assert back.shape == img.shape
    assert np.mean((back > 0) == (img > 0)) > 0.98


# --------------------------------------------------------------------------- determinism and quirks


@pytest.mark.parametrize("window_at", ["original", "resized"])
def test_deterministic(kmeans_images: dict[str, np.ndarray], window_at: str) -> None:
    pixels = kmeans_images["00870a9c.png"]
    a, ia = Preprocessor(448, window_at=window_at)(pixels)
    b, ib = Preprocessor(448, window_at=window_at)(pixels.copy())
    assert torch.equal(a, b)
    assert ia == ib


def test_constant_image_quirk() -> None:
    tensor, info = Preprocessor(32)(np.full((10, 12), 0.3, np.float32))
    rh, rw = info.resized_hw
    assert (rh, rw) == (27, 32)
    assert torch.all(tensor[0, :rh, :rw] == -1.0)  # min-max channel is 0
    # Channels 1/2 equal the raw image (0.3), then normalised.
    assert torch.allclose(tensor[1:, :rh, :rw], torch.tensor(-0.4), atol=1e-6)
    tensor, _ = Preprocessor(8)(np.full((8, 8), 1000, np.uint16))
    assert torch.all(tensor[1:] == (1000 - 0.5) / 0.5)  # raw values, not clipped: the official quirk


def test_empty_cluster_quirk() -> None:
    # The subsample (every 10th pixel) is constant but the image is not: the bright cluster is empty.
    rng = np.random.default_rng(4)
    img = rng.uniform(0, 10, (100, 100)).astype(np.float32)
    img.ravel()[::10] = 5.0
    _, c1, c2 = mixture_window(img)
    q_lo, q_hi = np.quantile(img, [0.01, 0.99])
    expected = (np.clip((img.astype(np.float64) - q_lo) / (q_hi - q_lo), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(c2, expected.astype(np.float32))
    assert c2.max() > 250  # 0..255, not 0..1: the official fallback's scale
    # The dark cluster holds every pixel, around the (equal) centre 5.0.
    m, big_m, s = float(img.min()), float(img.max()), float(img.std(dtype=np.float64))
    np.testing.assert_array_equal(
        c1, piecewise_window(img, m, max(5 - 3 * s, m), min(5 + 3 * s, big_m), big_m)
    )


def test_uint16_full_range_is_scale_invariant() -> None:
    rng = np.random.default_rng(5)
    img = np.concatenate([rng.normal(8000, 1500, 5000), rng.normal(50000, 4000, 5000)]).clip(0, 65535)
    img = img.astype(np.uint16).reshape(100, 100)
    img[0, 0], img[-1, -1] = 0, 65535
    a, _ = Preprocessor(100)(img)
    b, _ = Preprocessor(100)(img.astype(np.float64) / 65535.0)  # the official DICOM scaling
    assert float(a[0].min()) == -1.0
    assert float(a[0].max()) == 1.0
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_one_pixel_image() -> None:
    tensor, info = Preprocessor(16)(np.array([[7]], np.uint8))
    assert info == PreprocessInfo(original_hw=(1, 1), resized_hw=(16, 16), scale=16.0)
    assert torch.all(tensor[0] == -1.0)
    assert torch.all(tensor[1:] == (7 - 0.5) / 0.5)


def test_gray_rgb_and_channel_layouts_agree() -> None:
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, (40, 30, 3)).astype(np.uint8)
    gray = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    p = Preprocessor(32)
    assert torch.equal(p(rgb)[0], p(gray)[0])
    assert torch.equal(p(gray[..., None])[0], p(gray)[0])
    signed = rng.integers(-1000, 1000, (40, 30)).astype(np.int16)
    assert torch.equal(p(signed)[0], p(signed.astype(np.float32))[0])


def test_minmax_mode_channels_equal() -> None:
    rng = np.random.default_rng(7)
    img = rng.integers(0, 255, (20, 20)).astype(np.uint8)
    tensor, _ = Preprocessor(20, windowing="minmax")(img)
    assert torch.equal(tensor[0], tensor[1])
    assert torch.equal(tensor[0], tensor[2])
    assert len(minmax_window(img)) == 3


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.array([[1.0, np.nan]]), "non-finite"),
        (np.array([[1.0, np.inf]]), "non-finite"),
        (np.zeros((0, 5)), "empty"),
        (np.zeros(10), "2-D"),
        (np.zeros((4, 4, 5)), "channels"),
        (np.zeros((2, 3, 4, 5)), "2-D"),
        (np.zeros((3, 3), np.complex64), "dtype"),
        (np.array([["a", "b"]]), "dtype"),
        (np.full((2, 2), 1e300), "overflow"),
    ],
)
def test_bad_inputs_raise_value_error(bad: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocessor(16)(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"img_size": 0}, "img_size"),
        ({"img_size": 2.5}, "img_size"),
        ({"img_size": 16, "windowing": "clahe"}, "windowing"),
        ({"img_size": 16, "window_at": "gpu"}, "window_at"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocessor(**kwargs)
