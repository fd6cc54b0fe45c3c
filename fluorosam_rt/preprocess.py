"""Image → encoder-input tensor, as FluoroSAM's inference path does it, but deterministic.

The official pipeline (forward_notes §1b/§1c) turns one gray X-ray into three channels, resizes
the longest side to ``img_size``, normalises with ``(x - pixel_mean) / pixel_std`` (the model
config's: 0.5 and 0.5 in every model so far) and zero-pads right/bottom:

* channel 0: min-max of the raw image;
* channels 1/2: "mixture" windows around the darker/brighter of two 1-D k-means clusters,
  each a piecewise-linear map ``[m, x_lo, x_hi, M] → [0, 0.1, 0.9, 1]`` (``np.interp``
  semantics: continuous, clamped, and a zero-length segment takes its right-hand value) with
  ``x_lo = max(μ − 3s, lo)`` and ``x_hi = min(μ + 3s, hi)`` from the cluster's centre μ and the
  std/min/max of all pixels labelled into it.

**Why our k-means differs from the official one, and why that is safe.** The official code fits
``sklearn.cluster.KMeans(n_clusters=2)`` with no ``random_state``, so the same frame can give
different windows from run to run. For 1-D data and two clusters the problem has an exact
solution: an optimal 2-means partition of points on a line is always a threshold split of the
sorted sample (any partition that interleaves can be improved by swapping points). We therefore
sort the subsample (every d-th pixel of the row-major flattened image, d = max(1, N // 1000),
exactly as the official code subsamples), and evaluate the within-cluster sum of squares of
*every* split between distinct values with prefix sums, which costs O(n log n) for the sort and
O(n) for the scan. The best split gives the centres (ties go to the first, i.e. lowest, split).
This is the global optimum that sklearn's k-means++ with restarts converges to in practice, but
it is reproducible bit for bit. Measured on the 81 shared real images (77 chest PNGs, 4 DICOM),
sklearn (``n_init=10``, ``tol=0``, seed 0) lands on exactly this partition for 70. For the other
11 (integer-valued images, where neighbouring integer thresholds can both be Lloyd fixed points)
sklearn stops at a neighbouring local optimum with a *higher* within-cluster SSE; the centres then
differ by at most 1 % of the intensity range, the same size as sklearn's own seed-to-seed spread
on those images, and the windows by < 0.03. With sklearn's default ``tol=1e-4`` Lloyd can also
stop one step early (RG3_J2KR: 0.2 % of the range).

Pixels are then labelled as sklearn's ``predict`` does, by the nearest final centre, which in 1-D
is the midpoint threshold ``t = (c_lo + c_hi) / 2``: ``I > t`` is bright, ``I <= t`` is dark (an
exact tie goes to the darker cluster; sklearn breaks it by its random cluster order). The cluster
statistics (std, min, max) are taken over all labelled pixels of the full image, not just the
sample.

Official quirks kept on purpose, so that the model sees what it was trained on:

* a constant image (``np.isclose(min, max)``) gives channels 1 and 2 equal to the *raw* image;
* channel 0 is all zeros only when min == max exactly;
* if a cluster is empty, that channel is a 1 %–99 % quantile window scaled to 0..255 and
  truncated to uint8 values (not 0..1). With the exact solver this happens only when the
  subsample holds a single distinct value but the full image does not (e.g. a flat frame with a
  small object the subsample missed): both centres are then equal, sklearn's nearest-centre rule
  puts every pixel in the first cluster, and the brighter channel (2) takes the fallback.

``window_at="resized"`` (our addition for the real-time path) resizes the raw image first and
windows the small image, so the per-pixel work scales with ``img_size²`` instead of the detector
size. The windows then come from slightly different statistics (bilinear resampling smooths the
histogram), so it is not numerically the official recipe, but it is just as deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch

from .model.config import ModelConfig

__all__ = [
    "PreprocessInfo",
    "Preprocessor",
    "minmax_window",
    "mixture_window",
    "piecewise_window",
    "resized_shape",
    "to_gray_float32",
    "two_means_1d",
]

Windowing = Literal["mixture", "minmax"]
WindowAt = Literal["original", "resized"]

_MAX_ABS_PIXEL = 1e30
_RGB_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class PreprocessInfo:
    """What a predictor needs to undo the geometry: crop ``resized_hw`` then resize to ``original_hw``."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    scale: float


def resized_shape(h: int, w: int, img_size: int) -> tuple[tuple[int, int], float]:
    """Longest side → img_size as albumentations' LongestMaxSize does (Python round, ties to even)."""
    scale = img_size / max(h, w)
    return (max(1, round(h * scale)), max(1, round(w * scale))), scale


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == hw:
        return img
    return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def to_gray_float32(pixels: np.ndarray) -> np.ndarray:
    """Validate and convert any 2-D / HxWx1 / HxWx3(4) numeric array to a finite float32 2-D image.

    Raises ValueError with the reason, because a NaN or an empty frame that slipped through would
    silently turn the whole window into NaN or crash deep inside OpenCV.
    """
    arr = np.asarray(pixels)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"image must have a real numeric dtype, got {arr.dtype}")
    if arr.ndim == 3:
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
        elif arr.shape[2] in (3, 4):
            rgb = arr[:, :, :3].astype(np.float64)
            arr = (
                rgb[:, :, 0] * _RGB_WEIGHTS[0]
                + rgb[:, :, 1] * _RGB_WEIGHTS[1]
                + rgb[:, :, 2] * _RGB_WEIGHTS[2]
            )
        else:
            raise ValueError(
                f"image must be HxW, HxWx1 or HxWx3 (RGB), got shape {arr.shape} with {arr.shape[2]} channels"
            )
    if arr.ndim != 2:
        raise ValueError(f"image must be 2-D (HxW), HxWx1 or HxWx3, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"image is empty (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"image contains {bad} non-finite value(s) (NaN or Inf); refusing to window it")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if out.dtype != arr.dtype and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(out).all():
        raise ValueError("image values overflow float32 (|x| > 3.4e38)")
    # Windowing subtracts and scales in float32: a span near float32's limit overflows to Inf and
    # would reach the engine as an "engine failure". No detector produces such values.
    if np.issubdtype(arr.dtype, np.floating) and out.size and float(np.abs(out).max()) > _MAX_ABS_PIXEL:
        raise ValueError(f"image values exceed {_MAX_ABS_PIXEL:g} in magnitude; refusing to window them")
    return out


def two_means_1d(sample: np.ndarray) -> tuple[float, float]:
    """Exact (globally optimal) 2-means of 1-D data; returns (darker, brighter) centres.

    Deterministic replacement for the official unseeded sklearn KMeans: scan every split of the
    sorted sample with prefix sums and keep the one with the least within-cluster sum of squares.
    With fewer than two distinct values both centres equal that value (sklearn's degenerate case).
    """
    x = np.sort(np.asarray(sample, dtype=np.float64).ravel())
    n = x.size
    if n == 0:
        raise ValueError("two_means_1d needs at least one value")
    if x[0] == x[-1]:
        return float(x[0]), float(x[0])
    xc = x - x.mean()  # centring keeps the prefix sums well conditioned
    s = np.cumsum(xc)
    total = s[-1]
    k = np.arange(1, n, dtype=np.float64)  # size of the left cluster for split after index k-1
    left = s[:-1]
    # SSE = sum(xc²) - left²/k - (total-left)²/(n-k); maximise the subtracted part.
    gain = left * left / k + (total - left) ** 2 / (n - k)
    valid = x[1:] > x[:-1]  # only thresholds between distinct values are partitions by value
    gain = np.where(valid, gain, -np.inf)
    split = int(np.argmax(gain)) + 1
    return float(x[:split].mean()), float(x[split:].mean())


def piecewise_window(image: np.ndarray, m: float, x_lo: float, x_hi: float, big_m: float) -> np.ndarray:
    """[m, x_lo, x_hi, M] → [0, 0.1, 0.9, 1], continuous and clamped, as float32.

    Semantics are those of ``np.interp(image, [m, x_lo, x_hi, M], [0, .1, .9, 1])`` (a zero-length
    segment jumps at its breakpoint and the breakpoint takes the upper value), but evaluated as a
    sum of three clipped float32 ramps: np.interp's per-pixel binary search in float64 cost ~20 ms
    per megapixel, the ramps ~3 ms. The results agree to float32 rounding of the breakpoints.
    """
    img = np.asarray(image, dtype=np.float32)
    out = np.zeros(img.shape, np.float32)
    tmp = np.empty(img.shape, np.float32)
    for a, b, dy in ((m, x_lo, 0.1), (x_lo, x_hi, 0.8), (x_hi, big_m, 0.1)):
        a32, b32 = np.float32(a), np.float32(b)
        if b32 > a32:
            np.clip(img, a32, b32, out=tmp)
            np.subtract(tmp, a32, out=tmp)
            np.multiply(tmp, np.float32(dy / (float(b32) - float(a32))), out=tmp)
        else:
            np.greater_equal(img, a32, out=tmp, casting="unsafe")
            np.multiply(tmp, np.float32(dy), out=tmp)
        np.add(out, tmp, out=out)
    np.clip(out, np.float32(0.0), np.float32(1.0), out=out)
    return out


def _quantile_fallback(image: np.ndarray) -> np.ndarray:
    """The official empty-cluster fallback: 1–99 % quantile window, uint8 0..255 (returned as float32)."""
    q_lo, q_hi = np.quantile(image, [0.01, 0.99])
    if q_hi <= q_lo:
        return np.zeros(image.shape, np.float32)
    scaled = np.clip((image.astype(np.float64) - q_lo) / (q_hi - q_lo), 0.0, 1.0) * 255.0
    return scaled.astype(np.uint8).astype(np.float32)


def _cluster_window(image: np.ndarray, members: np.ndarray, mu: float, m: float, big_m: float) -> np.ndarray:
    if members.size == 0:
        return _quantile_fallback(image)
    s = float(members.std(dtype=np.float64))
    x_lo = max(mu - 3.0 * s, float(members.min()))
    x_hi = min(mu + 3.0 * s, float(members.max()))
    return piecewise_window(image, m, x_lo, x_hi, big_m)


def _minmax(image: np.ndarray, m: np.float32, big_m: np.float32) -> np.ndarray:
    if big_m == m:
        return np.zeros(image.shape, np.float32)
    out = (image - m) / (big_m - m)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def minmax_window(image: np.ndarray) -> list[np.ndarray]:
    """Three copies of the min-max channel: a cheap, statistics-free alternative to "mixture"."""
    return _minmax_channels(to_gray_float32(image))


def _minmax_channels(img: np.ndarray) -> list[np.ndarray]:
    c0 = _minmax(img, img.min(), img.max())
    return [c0, c0.copy(), c0.copy()]


def mixture_window(image: np.ndarray) -> list[np.ndarray]:
    """The official three-channel "mixture" windowing (forward_notes §1b) with exact 2-means.

    Returns three float32 HxW channels: min-max, darker-cluster window, brighter-cluster window.
    """
    return _mixture_channels(to_gray_float32(image))


def _mixture_channels(img: np.ndarray) -> list[np.ndarray]:
    m, big_m = img.min(), img.max()
    c0 = _minmax(img, m, big_m)
    if np.isclose(m, big_m):
        return [c0, img.copy(), img.copy()]
    flat = img.ravel()
    d = max(1, flat.size // 1000)
    c_lo, c_hi = two_means_1d(flat[::d])
    fm, fbig = float(m), float(big_m)
    if c_lo == c_hi:
        # Degenerate subsample: all pixels go to the first cluster, the second is empty.
        return [c0, _cluster_window(img, flat, c_lo, fm, fbig), _quantile_fallback(img)]
    bright = flat > 0.5 * (c_lo + c_hi)
    dark_members = flat[~bright]
    bright_members = flat[bright]
    return [
        c0,
        _cluster_window(img, dark_members, c_lo, fm, fbig),
        _cluster_window(img, bright_members, c_hi, fm, fbig),
    ]


class Preprocessor:
    """Gray X-ray frame → ([3, S, S] float32 tensor in [-1, 1], PreprocessInfo), deterministic.

    ``window_at="original"`` reproduces the official order (window at full resolution, then
    resize); ``"resized"`` resizes first, which is what the real-time path should use.
    """

    def __init__(
        self,
        img_size: int,
        windowing: Windowing = "mixture",
        window_at: WindowAt = "original",
        pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ) -> None:
        if len(pixel_mean) != 3 or len(pixel_std) != 3 or min(pixel_std) <= 0:
            raise ValueError(f"pixel_mean/pixel_std: three values each, std > 0: {pixel_mean}, {pixel_std}")
        if not isinstance(img_size, (int, np.integer)) or isinstance(img_size, bool) or img_size < 1:
            raise ValueError(f"img_size must be a positive int, got {img_size!r}")
        if windowing not in ("mixture", "minmax"):
            raise ValueError(f"windowing must be 'mixture' or 'minmax', got {windowing!r}")
        if window_at not in ("original", "resized"):
            raise ValueError(f"window_at must be 'original' or 'resized', got {window_at!r}")
        self.img_size = int(img_size)
        self.windowing: Windowing = windowing
        self.window_at: WindowAt = window_at
        self._window = _mixture_channels if windowing == "mixture" else _minmax_channels
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        self._mean = np.asarray(pixel_mean, np.float32).reshape(3, 1, 1)
        self._std = np.asarray(pixel_std, np.float32).reshape(3, 1, 1)

    def __repr__(self) -> str:
        return (
            f"Preprocessor(img_size={self.img_size}, windowing={self.windowing!r}, "
            f"window_at={self.window_at!r}, pixel_mean={self.pixel_mean}, pixel_std={self.pixel_std})"
        )

    def __call__(self, pixels: np.ndarray) -> tuple[torch.Tensor, PreprocessInfo]:
        img = to_gray_float32(pixels)
        h, w = img.shape
        hw, scale = resized_shape(h, w, self.img_size)
        s = self.img_size
        out = np.zeros((3, s, s), np.float32)
        if self.window_at == "resized":
            channels = self._window(_resize(img, hw))
            for c, ch in enumerate(channels):
                out[c, : hw[0], : hw[1]] = ch
        else:
            hwc = np.stack(self._window(img), axis=-1)
            hwc = _resize(hwc, hw)
            out[:, : hw[0], : hw[1]] = hwc.transpose(2, 0, 1)
        valid = out[:, : hw[0], : hw[1]]
        np.subtract(valid, self._mean, out=valid)  # the model config's pixel_mean/pixel_std
        np.divide(valid, self._std, out=valid)
        info = PreprocessInfo(original_hw=(int(h), int(w)), resized_hw=hw, scale=float(scale))
        return torch.from_numpy(out), info


def preprocessor_for(cfg: ModelConfig) -> Preprocessor:
    """The preprocessing a model was trained with, from its config: the one way to build it
    (the predictor, training, the naive baseline), so training sees exactly what the node sees."""
    pp = cfg.preprocess
    return Preprocessor(
        cfg.image_encoder.img_size,
        windowing=pp.windowing,
        window_at=pp.window_at,
        pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std,
    )
