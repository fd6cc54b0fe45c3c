"""What a navigation system reads instead of a bitmap: outlines, instances, tool tips and axes.

Protocol version 2 adds these to each prompt result in the header (docs/protocol.md, "Geometry").
The node computes them (fluorosam_rt/geometry_stage.py); this module holds only the typed form a
subscriber gets and its conversion to and from the header's plain msgpack values, so that it
needs nothing beyond numpy.

Conventions, all in **source pixels** whatever the mask downsampling: x is the column, y the row,
pixel centres at integer coordinates, (0, 0) the top-left pixel. ``bbox`` is ``[x, y, width,
height]`` covering every set pixel. A field the node could not compute is absent (``None``
here) and named in ``absent`` with the reason, e.g. ``{"area_mm2": "no pixel spacing"}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Spacing bases, best first (bridge.geometry.source_pixel_size picks them in this order).
SPACING_BASES = ("PixelSpacing", "ImagerPixelSpacing@isocenter", "ImagerPixelSpacing")
TIP_RULES = ("border", "taper", "track", "centre")
CUT_REASONS = ("", "start", "image", "series", "angles")


class GeometryFormatError(ValueError):
    """A geometry entry in a header that does not follow the protocol (bridge.protocol re-raises it
    as a ProtocolError)."""


@dataclass(frozen=True)
class Spacing:
    """The size of one source pixel, and where that size holds (the header's ``spacing``)."""

    row_mm: float
    col_mm: float
    basis: str  # one of SPACING_BASES: in the patient, at the isocentre plane, or at the detector

    def to_wire(self) -> dict[str, Any]:
        return {"row_mm": self.row_mm, "col_mm": self.col_mm, "basis": self.basis}

    @classmethod
    def from_wire(cls, d: Any) -> Spacing:
        _need(isinstance(d, dict), "spacing is not a map")
        row, col = _finite(d.get("row_mm"), "spacing.row_mm"), _finite(d.get("col_mm"), "spacing.col_mm")
        _need(row > 0 and col > 0, "spacing must be positive")
        _need(d.get("basis") in SPACING_BASES, f"unknown spacing basis {d.get('basis')!r}")
        return cls(row, col, d["basis"])


@dataclass(frozen=True)
class Scene:
    """Temporal context of a frame: instance ids and smoothing restart when ``id`` changes."""

    id: int
    cut: str = ""  # why this frame starts a new scene ("" when it does not): one of CUT_REASONS
    smoothing: float = 0.0  # weight of the past in the node's temporal smoothing (0: off)

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "cut": self.cut, "smoothing": self.smoothing}

    @classmethod
    def from_wire(cls, d: Any) -> Scene:
        _need(isinstance(d, dict), "scene is not a map")
        _need(d.get("cut", "") in CUT_REASONS, f"unknown scene cut {d.get('cut')!r}")
        return cls(
            _int(d.get("id"), "scene.id"), d.get("cut", ""), _finite(d.get("smoothing", 0.0), "smoothing")
        )


@dataclass
class Instance:
    """One connected part of a prompt's mask (two K-wires are two instances), with a tracked id.

    Linear tools (K-wire, guidewire, catheter, drill bit, screws: ``linear`` in the vocabulary)
    also carry their centre line, tip and axis; everything else leaves those ``None``.
    """

    id: int  # stable across frames while the C-arm is still or moves slowly; new after a scene cut
    contour: int  # index of this instance's polygon in PromptGeometry.contours
    area_px: int
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    border: bool  # touches the image border: the structure may continue outside the frame
    area_mm2: float | None = None
    # linear tools
    polyline: np.ndarray | None = None  # [n, 2] float centre line, tip first
    tip: tuple[float, float] | None = None
    axis: tuple[float, float] | None = None  # unit vector pointing towards the tip
    length_px: float | None = None  # projected centre-line length in source pixels
    length_mm: float | None = None  # the same in mm at the spacing's plane: a *projected* length
    width_px: float | None = None  # median width across the axis
    tip_by: str | None = None  # how the tip end was told from the other: one of TIP_RULES
    ends_at_border: int | None = None  # 0, 1 or 2 ends cut by the image border (length is then a minimum)
    absent: dict[str, str] = field(default_factory=dict)

    _OPTIONAL = ("area_mm2", "length_px", "length_mm", "width_px")

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "contour": self.contour,
            "area_px": self.area_px,
            "bbox": list(self.bbox),
            "centroid": [round(self.centroid[0], 2), round(self.centroid[1], 2)],
            "border": self.border,
        }
        for k in self._OPTIONAL:
            v = getattr(self, k)
            if v is not None:
                d[k] = round(float(v), 3)
        if self.polyline is not None:
            d["polyline"] = np.round(self.polyline, 2).tolist()
        if self.tip is not None:
            d["tip"] = [round(self.tip[0], 2), round(self.tip[1], 2)]
        if self.axis is not None:
            d["axis"] = [round(self.axis[0], 6), round(self.axis[1], 6)]
        if self.tip_by is not None:
            d["tip_by"] = self.tip_by
        if self.ends_at_border is not None:
            d["ends_at_border"] = self.ends_at_border
        if self.absent:
            d["absent"] = dict(self.absent)
        return d

    @classmethod
    def from_wire(cls, d: Any) -> Instance:
        _need(isinstance(d, dict), "instance is not a map")
        inst = cls(
            id=_int(d.get("id"), "instance.id"),
            contour=_int(d.get("contour"), "instance.contour"),
            area_px=_int(d.get("area_px"), "instance.area_px"),
            bbox=_bbox(d.get("bbox")),
            centroid=_point(d.get("centroid"), "instance.centroid"),
            border=_bool(d.get("border"), "instance.border"),
            absent=_absent(d.get("absent", {})),
        )
        for k in cls._OPTIONAL:
            if k in d:
                setattr(inst, k, _finite(d[k], f"instance.{k}"))
        if "polyline" in d:
            inst.polyline = _points(d["polyline"], "instance.polyline", np.float64)
        if "tip" in d:
            inst.tip = _point(d["tip"], "instance.tip")
        if "axis" in d:
            inst.axis = _point(d["axis"], "instance.axis")
            _need(abs(math.hypot(*inst.axis) - 1.0) < 1e-3, "instance.axis is not a unit vector")
        if "tip_by" in d:
            _need(d["tip_by"] in TIP_RULES, f"unknown tip_by {d['tip_by']!r}")
            inst.tip_by = d["tip_by"]
        if "ends_at_border" in d:
            inst.ends_at_border = _int(d["ends_at_border"], "instance.ends_at_border")
            _need(inst.ends_at_border in (0, 1, 2), "instance.ends_at_border must be 0, 1 or 2")
        return inst


@dataclass
class PromptGeometry:
    """A prompt result's geometry: every field may be absent, with the reason in ``absent``."""

    area_px: int | None = None  # set pixels in source pixels (mask pixels x downsample^2)
    area_mm2: float | None = None  # area_px x row_mm x col_mm of the header's spacing
    bbox: tuple[int, int, int, int] | None = None
    centroid: tuple[float, float] | None = None
    # One polygon per instance, in instance order: ring 0 is the outline, rings 1.. its holes,
    # each an [n, 2] int32 array of vertices simplified to the node's stated tolerance.
    contours: list[list[np.ndarray]] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    specks: int = 0  # parts smaller than the node's minimum instance size: in the mask, not listed
    absent: dict[str, str] = field(default_factory=dict)

    def outline(self, instance: Instance) -> list[np.ndarray]:
        """The rings (outline, then holes) of one instance."""
        return self.contours[instance.contour]

    @property
    def tips(self) -> list[tuple[float, float]]:
        return [i.tip for i in self.instances if i.tip is not None]

    def to_wire(self) -> dict[str, Any]:
        """The keys this geometry adds to a prompt entry of a version-2 header."""
        d: dict[str, Any] = {}
        if self.area_px is not None:
            d["area_px"] = self.area_px
        if self.area_mm2 is not None:
            d["area_mm2"] = round(self.area_mm2, 3)
        if self.bbox is not None:
            d["bbox"] = list(self.bbox)
        if self.centroid is not None:
            d["centroid"] = [round(self.centroid[0], 2), round(self.centroid[1], 2)]
        if self.area_px is not None:
            d["contours"] = [[r.tolist() for r in poly] for poly in self.contours]
            d["instances"] = [i.to_wire() for i in self.instances]
            d["specks"] = self.specks
        if self.absent:
            d["absent"] = dict(self.absent)
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> PromptGeometry:
        """From a prompt entry of a version-2 header (keys it does not know are ignored)."""
        g = cls(absent=_absent(d.get("absent", {})))
        if "area_px" in d:
            g.area_px = _int(d["area_px"], "area_px")
        if "area_mm2" in d:
            g.area_mm2 = _finite(d["area_mm2"], "area_mm2")
        if "bbox" in d:
            g.bbox = _bbox(d["bbox"])
        if "centroid" in d:
            g.centroid = _point(d["centroid"], "centroid")
        contours = d.get("contours", [])
        _need(isinstance(contours, list), "contours is not a list")
        for poly in contours:
            _need(
                isinstance(poly, list) and len(poly) >= 1,
                "a contour polygon must be a non-empty list of rings",
            )
            g.contours.append([_points(r, "contour ring", np.int32) for r in poly])
        instances = d.get("instances", [])
        _need(isinstance(instances, list), "instances is not a list")
        g.instances = [Instance.from_wire(i) for i in instances]
        for i in g.instances:
            _need(
                0 <= i.contour < len(g.contours),
                f"instance {i.id} names contour {i.contour}, not in contours",
            )
        g.specks = _int(d.get("specks", 0), "specks")
        return g


# --------------------------------------------------------------------------- validation helpers


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise GeometryFormatError(what)


def _int(v: Any, what: str) -> int:
    _need(isinstance(v, int) and not isinstance(v, bool), f"{what} is not an integer: {v!r}")
    return int(v)


def _bool(v: Any, what: str) -> bool:
    _need(isinstance(v, bool), f"{what} is not a boolean: {v!r}")
    return bool(v)


def _finite(v: Any, what: str) -> float:
    _need(isinstance(v, (int, float)) and not isinstance(v, bool), f"{what} is not a number: {v!r}")
    _need(math.isfinite(v), f"{what} is not finite: {v!r}")
    return float(v)


def _point(v: Any, what: str) -> tuple[float, float]:
    _need(isinstance(v, list) and len(v) == 2, f"{what} is not an [x, y] pair: {v!r}")
    return (_finite(v[0], what), _finite(v[1], what))


def _bbox(v: Any) -> tuple[int, int, int, int]:
    _need(isinstance(v, list) and len(v) == 4, f"bbox is not [x, y, width, height]: {v!r}")
    x, y, w, h = (_int(a, "bbox") for a in v)
    _need(w >= 1 and h >= 1, f"bbox has no extent: {v!r}")
    return (x, y, w, h)


def _points(v: Any, what: str, dtype: Any) -> np.ndarray:
    _need(isinstance(v, list) and len(v) >= 1, f"{what} is not a non-empty list of [x, y] points")
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GeometryFormatError(f"{what} is not a list of [x, y] points") from exc
    _need(a.ndim == 2 and a.shape[1] == 2, f"{what} is not a list of [x, y] points")
    _need(bool(np.isfinite(a).all()), f"{what} has non-finite coordinates")
    return a.astype(dtype)


def _absent(v: Any) -> dict[str, str]:
    _need(
        isinstance(v, dict) and all(isinstance(k, str) and isinstance(r, str) for k, r in v.items()),
        "absent is not a map of field name -> reason",
    )
    return dict(v)
