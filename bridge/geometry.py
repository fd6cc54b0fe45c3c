"""Where a mask pixel lies in millimetres: the IJK -> RAS matrix navigation software needs.

A fluoroscopy frame is a projection, so there is no true 3-D placement; what a consumer can
rely on is scale. The matrix therefore places the image in the coronal plane of an AP view
(columns run to the patient's left, rows run inferior, the usual DICOM display of a chest
film), centred on the world origin, with the pixel size taken in this order of preference:

1. ``PixelSpacing``: calibrated in the patient (or at the isocentre) by the modality;
2. ``ImagerPixelSpacing`` divided by the magnification ``DistanceSourceToDetector /
   DistanceSourceToPatient`` when both distances are known: the size at the isocentre plane;
3. ``ImagerPixelSpacing`` as is: the size at the detector;
4. nothing known: 1 mm, flagged so the caller can warn that distances are not to scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Unit directions in RAS for increasing column (i) and increasing row (j) index.
COLUMN_DIRECTION_RAS = np.array([-1.0, 0.0, 0.0])  # towards the patient's left
ROW_DIRECTION_RAS = np.array([0.0, 0.0, -1.0])  # towards the feet
NORMAL_RAS = np.array([0.0, 1.0, 0.0])  # anterior: i x j, so the frame is right-handed


@dataclass(frozen=True)
class PixelSize:
    row_mm: float  # distance between rows (DICOM spacing order: row, column)
    col_mm: float
    basis: str  # "PixelSpacing", "ImagerPixelSpacing@isocenter", "ImagerPixelSpacing", "unknown"

    @property
    def known(self) -> bool:
        return self.basis != "unknown"


def _pair(value: Any) -> tuple[float, float] | None:
    try:
        r, c = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    ok = all(math.isfinite(v) and v > 0 for v in (r, c))  # NaN, inf, 0 or negative: unknown
    return (r, c) if ok else None


def source_pixel_size(geometry: Mapping[str, Any]) -> PixelSize:
    """The size of one source pixel from the message's geometry map."""
    ps = _pair(geometry.get("PixelSpacing"))
    if ps:
        return PixelSize(ps[0], ps[1], "PixelSpacing")
    ips = _pair(geometry.get("ImagerPixelSpacing"))
    if ips:
        try:
            dsd = float(geometry.get("DistanceSourceToDetector") or 0)
            dsp = float(geometry.get("DistanceSourceToPatient") or 0)
        except (TypeError, ValueError):
            dsd = dsp = 0.0
        if math.isfinite(dsd) and math.isfinite(dsp) and dsd > 0 and dsp > 0:
            m = dsd / dsp
            return PixelSize(ips[0] / m, ips[1] / m, "ImagerPixelSpacing@isocenter")
        return PixelSize(ips[0], ips[1], "ImagerPixelSpacing")
    return PixelSize(1.0, 1.0, "unknown")


def ijk_to_ras(
    geometry: Mapping[str, Any], source_shape: tuple[int, int], downsample: int = 1
) -> tuple[np.ndarray, PixelSize]:
    """4x4 matrix from mask index (i = column, j = row, k = 0) to RAS millimetres.

    Mask pixel (j, i) covers source pixels j*d .. j*d+d-1 (and likewise for i), so its centre
    is at source index j*d + (d-1)/2; the source image's centre sits at the origin.
    """
    size = source_pixel_size(geometry)
    h, w = source_shape
    d = float(downsample)
    col_axis = COLUMN_DIRECTION_RAS * size.col_mm
    row_axis = ROW_DIRECTION_RAS * size.row_mm
    m = np.eye(4)
    m[:3, 0] = col_axis * d
    m[:3, 1] = row_axis * d
    m[:3, 2] = NORMAL_RAS * min(size.row_mm, size.col_mm)  # slice thickness: one pixel, for display
    # centre of mask pixel (0, 0) relative to the centre of the source image, in source pixels
    offset = (d - 1) / 2.0
    m[:3, 3] = col_axis * (offset - (w - 1) / 2.0) + row_axis * (offset - (h - 1) / 2.0)
    return m, size
