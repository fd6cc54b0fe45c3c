"""Scene cuts and optional temporal smoothing: steadier masks without a frame of delay.

**Scene cuts.** Tracking and smoothing assume the frames show one scene. A new scene starts when
the DICOM series changes, when the positioner angles jump, or when the image itself changes
abruptly (a video source carries no metadata). The image test compares 32x32 thumbnails,
each normalised to zero mean and unit variance (so a dose or window change is not a cut), by
their mean absolute difference. Measured on this project's data (tests/test_geometry_stage.py):
consecutive frames of the demo sweep (1.8 degrees apart) differ by at most 0.05, 0.07 with
heavy added noise, frames 9 degrees apart by 0.2, the sweep's two ends (70 degrees) by 0.5, and
two different patients' radiographs by at least 0.59; the default threshold is 0.35. A thumbnail
costs ~35 us for a 1024² frame (a strided read, then an area resize).

**Smoothing** (off by default) is an exponential moving average of each prompt's low-resolution
logits and predicted IoU, before the presence gate and the threshold:
``s_t = (1 - w) * x_t + w * s_(t-1)``. It is causal: frame t's masks use frames <= t only, so it
never holds a frame back; the price is that a moving edge trails its true position (measured as
tip lag in the benchmark). It restarts on a scene cut, and for a prompt whose id is new.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch

THUMB = 32
DEFAULT_CUT_THRESHOLD = 0.35
DEFAULT_CUT_ANGLE_DEG = 10.0
ANGLE_KEYS = ("PositionerPrimaryAngle", "PositionerSecondaryAngle")


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """32x32 float32 thumbnail, zero mean and unit variance (all zeros for a flat frame)."""
    img = np.asarray(pixels)
    if img.ndim == 3:
        img = img[..., 0]
    step = max(1, min(img.shape[:2]) // (4 * THUMB))
    small = img[::step, ::step]
    if small.dtype not in (np.uint8, np.uint16, np.float32):
        small = small.astype(np.float32)
    t = cv2.resize(np.ascontiguousarray(small), (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    t = t.astype(np.float32)
    t -= t.mean()
    sd = float(t.std())
    return t / sd if sd > 1e-6 and math.isfinite(sd) else np.zeros_like(t)


def _angle(meta: Mapping[str, Any], key: str) -> float | None:
    try:
        v = float(meta[key])
    except (KeyError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class SceneCutDetector:
    """Numbers scenes; ``check`` says whether a frame starts a new one, and why."""

    def __init__(
        self, threshold: float = DEFAULT_CUT_THRESHOLD, angle_deg: float = DEFAULT_CUT_ANGLE_DEG
    ) -> None:
        self.threshold = threshold
        self.angle_deg = angle_deg
        self.scene = 0
        self.last_distance = 0.0
        self._thumb: np.ndarray | None = None
        self._series: Any = None
        self._angles: dict[str, float] = {}

    def check(self, pixels: np.ndarray, meta: Mapping[str, Any]) -> str:
        """'' when the frame continues the scene, else the reason it starts a new one."""
        thumb = thumbnail(pixels)
        series = meta.get("SeriesInstanceUID")
        angles = {k: a for k in ANGLE_KEYS if (a := _angle(meta, k)) is not None}
        reason = ""
        if self._thumb is None:
            reason = "start"
        elif series is not None and self._series is not None and series != self._series:
            reason = "series"
        elif any(abs(a - self._angles[k]) > self.angle_deg for k, a in angles.items() if k in self._angles):
            reason = "angles"
        else:
            self.last_distance = float(np.mean(np.abs(thumb - self._thumb)))
            if self.last_distance > self.threshold:
                reason = "image"
        self._thumb, self._series, self._angles = thumb, series, angles
        if reason:
            self.scene += 1
        return reason


class LogitSmoother:
    """Per-prompt exponential moving average of low-resolution logits and scores.

    The arithmetic runs in numpy on the tensors' memory: a few hundred thousand floats per frame
    are not worth torch's thread pool, whose hand-offs cost milliseconds on a loaded machine.
    """

    def __init__(self, weight: float) -> None:
        if not 0.0 <= weight < 1.0:
            raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
        self.weight = weight
        self._state: dict[str, tuple[np.ndarray, float]] = {}

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def reset(self) -> None:
        self._state.clear()

    def __call__(
        self, prompt_ids: Sequence[str], logits: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Smoothed [K, h, w] logits and [K] scores; state is kept for exactly these prompts."""
        if not self.enabled:
            return logits, scores
        w = self.weight
        x = logits.detach().cpu().float().numpy()
        out = np.array(x, copy=True)
        out_s = scores.detach().cpu().double().numpy().copy()
        state: dict[str, tuple[np.ndarray, float]] = {}
        for i, pid in enumerate(prompt_ids):
            prev = self._state.get(pid)
            if prev is not None and prev[0].shape == x[i].shape:
                np.multiply(x[i], 1 - w, out=out[i])
                out[i] += w * prev[0]
                out_s[i] = (1 - w) * out_s[i] + w * prev[1]
            state[pid] = (out[i], float(out_s[i]))
        self._state = state
        return torch.from_numpy(out), torch.from_numpy(out_s).to(scores.dtype)
