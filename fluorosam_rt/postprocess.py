"""Low-resolution mask logits -> logits or masks at the input's own size, padding removed.

The model's [K, L, L] logits cover the padded square input. Every output is made the same way:
bilinear (half-pixel, as torch's ``align_corners=False``) to the padded input size S, crop the
valid ``resized_hw`` region, bilinear to the output size. Both steps run in OpenCV: for
upsampling it is the same arithmetic as torch's interpolate (agreement ~1e-6), without waking
torch's thread pool for a few small images.

Two outputs, one path: :func:`logits_at_size` keeps the float logits (``segment`` overlays,
evaluation); :func:`masks_at_size` gives exactly ``logits_at_size(...) > threshold`` as uint8
planes at a fraction of the cost, which is what the node publishes. At K = 10 on a 1024 x 1024
frame, materialising ten float planes (40 MB) and thresholding them cost ~20 CPU-ms, mostly page
faults and memory passes rather than arithmetic; the mask path resizes each plane into one
reused buffer and compares it into the mask in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

__all__ = ["cropped_logits", "logits_at_size", "masks_at_size"]


def cropped_logits(
    low_res: torch.Tensor | np.ndarray, img_size: int, resized_hw: tuple[int, int]
) -> np.ndarray:
    """[K, L, L] -> [K, rh, rw] float32: bilinear to the padded input (S x S), padding cropped."""
    low = low_res.detach().to("cpu", torch.float32).numpy() if isinstance(low_res, torch.Tensor) else low_res
    low = np.asarray(low, dtype=np.float32)
    if low.ndim != 3 or low.shape[1] != low.shape[2]:
        raise ValueError(f"low-res logits must be [K, L, L], got shape {low.shape}")
    rh, rw = resized_hw
    if not (0 < rh <= img_size and 0 < rw <= img_size):
        raise ValueError(f"resized size {resized_hw} does not fit the {img_size}-px model input")
    out = np.empty((low.shape[0], rh, rw), dtype=np.float32)
    for i in range(low.shape[0]):
        out[i] = cv2.resize(low[i], (img_size, img_size), interpolation=cv2.INTER_LINEAR)[:rh, :rw]
    return out


def logits_at_size(
    low_res: torch.Tensor | np.ndarray, img_size: int, resized_hw: tuple[int, int], out_hw: tuple[int, int]
) -> np.ndarray:
    """[K, L, L] logits -> [K, H, W] float32 logits at out_hw, padding removed."""
    x = cropped_logits(low_res, img_size, resized_hw)
    h, w = out_hw
    if x.shape[1:] == (h, w):
        return x
    out = np.empty((x.shape[0], h, w), dtype=np.float32)
    for i in range(x.shape[0]):
        cv2.resize(x[i], (w, h), dst=out[i], interpolation=cv2.INTER_LINEAR)
    return out


def masks_at_size(
    low_res: torch.Tensor | np.ndarray,
    img_size: int,
    resized_hw: tuple[int, int],
    out_hw: tuple[int, int],
    threshold: float,
    present: Sequence[bool] | None = None,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """[K, L, L] logits -> [K, H, W] uint8 masks (1 inside): ``logits_at_size(...) > threshold``.

    Masks whose ``present`` entry is False stay all zero and are not computed, and so are those
    with no cropped logit above the threshold (a bilinear sample is a convex combination of its
    neighbours, so it cannot exceed the threshold either). ``scratch``: a float32 [H, W] plane to
    reuse across calls (allocated here when missing or of another size).
    """
    x = cropped_logits(low_res, img_size, resized_hw)
    k = x.shape[0]
    h, w = out_hw
    if present is not None and len(present) != k:
        raise ValueError(f"present has {len(present)} entries for {k} masks")
    if scratch is None or scratch.shape != (h, w) or scratch.dtype != np.float32:
        scratch = np.empty((h, w), dtype=np.float32)
    out = np.zeros((k, h, w), dtype=np.uint8)
    same = x.shape[1:] == (h, w)
    for i in range(k):
        if (present is not None and not present[i]) or not (x[i] > threshold).any():
            continue
        plane = x[i] if same else cv2.resize(x[i], (w, h), dst=scratch, interpolation=cv2.INTER_LINEAR)
        np.greater(plane, threshold, out=out[i].view(np.bool_))  # 0/1 bytes, written in place
    return out
