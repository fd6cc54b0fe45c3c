"""Per-frame values of enhanced multi-frame objects (Enhanced XA/XRF), and per-frame timing of
legacy cine objects.

Why: an Enhanced XA run keeps what changes during the run in per-frame functional groups: the
C-arm rotates (X-Ray Positioner: primary and secondary angle), the display window follows the
dose (Frame VOI LUT), the rescale can change (Pixel Value Transformation), and each frame has
its own acquisition time (Frame Content). The top level of such an object holds none of them,
so reading the top level gives every frame the same (or no) angle and window. Here each frame
gets its values: the Shared Functional Groups first, then the frame's own Per-Frame item on
top (PS3.3 C.7.6.16: a macro is in one or the other).

Legacy XA/XRF cine gives its timing at the top level: Frame Time (constant) or Frame Time
Vector (each frame's increment from the previous one, PS3.3 C.7.6.5.1.2).
"""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

# Macro sequence -> attributes that change how the pixels are displayed.
_PIXEL_MACROS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence"),
}
# Macro sequence -> attributes carried into the frame's metadata (geometry and timing).
_META_MACROS = {
    "PixelMeasuresSequence": ("PixelSpacing",),
    "PositionerPositionSequence": ("PositionerPrimaryAngle", "PositionerSecondaryAngle"),
    "XRayGeometrySequence": ("DistanceSourceToIsocenter", "DistanceSourceToDetector"),
    "FrameContentSequence": (
        "FrameAcquisitionDateTime",
        "FrameReferenceDateTime",
        "FrameAcquisitionDuration",
        "FrameAcquisitionNumber",
    ),
}
FRAME_META_KEYS = tuple(k for keys in _META_MACROS.values() for k in keys)
_FLOAT_KEYS = {
    "PositionerPrimaryAngle",
    "PositionerSecondaryAngle",
    "DistanceSourceToIsocenter",
    "DistanceSourceToDetector",
    "FrameAcquisitionDuration",
}


def has_functional_groups(ds: Any) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _group_items(ds: Any, index: int) -> list[Any]:
    """The shared item, then the frame's own item (later wins)."""
    items = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        items.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        items.append(per_frame[index])
    return items


def _macro_values(items: list[Any], macros: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        for seq_kw, keys in macros.items():
            seq = item.get(seq_kw)
            if not seq:
                continue
            for kw in keys:
                if kw in seq[0]:
                    out[kw] = seq[0][kw].value
    return out


def frame_pixel_attributes(ds: Any, index: int) -> dict[str, Any]:
    """Rescale and VOI attributes for frame ``index`` (raw element values), or {} if none."""
    return _macro_values(_group_items(ds, index), _PIXEL_MACROS)


def _plain(kw: str, value: Any) -> Any:
    """DICOM values -> msgpack-friendly Python values."""
    if kw in _FLOAT_KEYS:
        try:
            return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
        except (TypeError, ValueError, IndexError):
            return None
    if kw == "PixelSpacing":
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            return None
        return tuple(values) if len(values) == 2 and min(values) > 0 else None
    if kw == "FrameAcquisitionNumber":
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    return str(value)


def frame_meta(ds: Any, index: int) -> dict[str, Any]:
    """Geometry and timing of frame ``index`` from the functional groups ({} when none)."""
    raw = _macro_values(_group_items(ds, index), _META_MACROS)
    return {kw: v for kw, v in ((kw, _plain(kw, val)) for kw, val in raw.items()) if v is not None}


def _dicom_datetime(value: str) -> datetime | None:
    """A DT value (YYYYMMDDHHMMSS.FFFFFF, offset ignored) -> datetime, or None."""
    text = str(value).strip().split("+")[0].split("-")[0]
    for fmt in ("%Y%m%d%H%M%S.%f", "%Y%m%d%H%M%S"):
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


def frame_intervals_ms(ds: Any, metas: list[dict[str, Any]]) -> list[float | None]:
    """Milliseconds from each frame to the next, as the object records it (None: unknown).

    Frame Time Vector, else Frame Time, else the frames' own acquisition (or reference) times.
    The last frame has the same interval as the one before it.
    """
    n = len(metas)
    if n < 2:
        return [None] * n
    ftv = ds.get("FrameTimeVector")
    if ftv is not None:
        try:
            inc = [float(v) for v in ftv]
        except (TypeError, ValueError):
            inc = []
        if len(inc) == n:  # inc[i] is the time from frame i-1 to frame i
            out = [inc[i + 1] if inc[i + 1] > 0 else None for i in range(n - 1)]
            return [*out, out[-1]]
    ft = ds.get("FrameTime")
    try:
        ft_ms = float(ft) if ft not in (None, "") else None
    except (TypeError, ValueError):
        ft_ms = None
    if ft_ms and ft_ms > 0:
        return [ft_ms] * n
    for key in ("FrameAcquisitionDateTime", "FrameReferenceDateTime"):
        times = [_dicom_datetime(m[key]) if key in m else None for m in metas]
        if all(t is not None for t in times):
            out2: list[float | None] = []
            for a, b in itertools.pairwise(times):
                dt = (b - a).total_seconds() * 1000.0  # type: ignore[operator]
                out2.append(dt if dt > 0 else None)
            return [*out2, out2[-1]]
    return [None] * n
