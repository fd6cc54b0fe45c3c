"""The node's geometry stage: per prompt outlines, instances, tool tips and axes, tracked ids.

One object per node, called on the inference thread once per frame, in pipeline order:

* ``begin_frame`` (start of postprocess): scene-cut check; a cut restarts smoothing and tracking;
* ``smooth`` (postprocess, before the presence gate): the optional causal EMA of logits/scores;
* ``process`` (its own stage, stamped ``t.geometry``): outlines.py for every present prompt,
  tool_axis.py for the instances of linear tools, tracking.py for the ids, then the tip of
  each tool chosen with its track's memory.

Anatomy is outlined on a ``trace_stride`` grid of the published mask (every s-th pixel per
axis, coordinates and areas scaled back): tracing every pixel of ten 1024² masks cost ~3.5 ms of
the stage's ~4 on the 2-core machine, while those masks carry no detail finer than the model's
logits (8 source pixels for the v2 model, 16 for the embedded one), so a 4-pixel grid loses
nothing they hold. Linear tools are always traced at full resolution: their tips and axes are
fitted to every boundary pixel.

It keeps the last ``window`` frames' sub-stage times (scene, outlines, tools, tracking) so that
control ``stats`` and the benchmark can show what each part costs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from bridge.geometry import source_pixel_size
from bridge.prompt_geometry import Instance, PromptGeometry, Scene, Spacing

from .linear_tools import LinearTools
from .outlines import OutlineSettings, empty_geometry, outline_mask
from .service.flow import describe_ms
from .temporal import DEFAULT_CUT_ANGLE_DEG, DEFAULT_CUT_THRESHOLD, LogitSmoother, SceneCutDetector
from .tool_axis import ToolFit, apply_tool, choose_tip, fit_tool
from .tracking import InstanceTracker

SUBSTAGES = ("scene", "outlines", "tools", "tracking")


@dataclass(frozen=True)
class GeometryOptions:
    enabled: bool = True
    tolerance_px: float = 1.0
    min_instance_px: int = 25
    trace_stride: int = 4  # anatomy outlines traced on every 4th mask pixel; linear tools on all
    max_instances: int = 32
    min_elongation: float = 3.0
    tracking: bool = True
    track_max_missed: int = 5
    smoothing: float = 0.0  # weight of the past in the EMA; 0: off (the default: no lag at all)
    cut_threshold: float = DEFAULT_CUT_THRESHOLD
    cut_angle_deg: float = DEFAULT_CUT_ANGLE_DEG


def frame_spacing(meta: Mapping[str, Any]) -> Spacing | None:
    """The source pixel size from a frame's DICOM geometry, or None when unknown or not finite."""
    size = source_pixel_size(meta)
    return Spacing(size.row_mm, size.col_mm, size.basis) if size.known else None


def support_rois(
    chosen: torch.Tensor,
    threshold: float,
    img_size: int,
    resized_hw: tuple[int, int],
    out_hw: tuple[int, int],
) -> list[tuple[int, int, int, int] | None]:
    """Per prompt, a rectangle of the output mask (x0, y0, x1, y1) outside which no pixel can be set.

    The output mask is the low-resolution logits resized twice, bilinearly (to the padded model
    input, cropped, then to the output size: Predictor.postprocess). A bilinear sample exceeds
    the threshold only if one of its two neighbours per axis does, so the positive region grows
    by less than one source sample per resize; the bounds below add one more of each as margin.
    None: no low-resolution logit exceeds the threshold (the mask is empty).
    """
    pos = chosen.detach().cpu().numpy() > threshold  # numpy: single-threaded, no pool hand-offs
    L = pos.shape[-1]
    rows, cols = pos.any(axis=2), pos.any(axis=1)
    has = rows.any(axis=1).tolist()
    r0, c0 = rows.argmax(axis=1).tolist(), cols.argmax(axis=1).tolist()
    r1 = (L - 1 - rows[:, ::-1].argmax(axis=1)).tolist()
    c1 = (L - 1 - cols[:, ::-1].argmax(axis=1)).tolist()
    s = img_size / L
    (rh, rw), (h, w) = resized_hw, out_hw
    fy, fx = h / rh, w / rw

    def lo(u: int, f: float) -> int:
        return math.floor(((u - 1) * s - 1) * f) - 2

    def hi(u: int, f: float, n: int) -> int:
        return min(n, math.ceil(((u + 2) * s + 1) * f) + 2)

    return [
        (max(0, lo(c0[k], fx)), max(0, lo(r0[k], fy)), hi(c1[k], fx, w), hi(r1[k], fy, h)) if has[k] else None
        for k in range(chosen.shape[0])
    ]


def strided(
    mask: np.ndarray, roi: tuple[int, int, int, int] | None, stride: int
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """Every ``stride``-th pixel of a mask (the middle of each block), and its ROI on that grid.

    The ROI stays a superset: a sample at block k is pixel k*stride + stride//2, inside [x0, x1)
    only if x0 // stride <= k < ceil(x1 / stride). Only the ROI's blocks are read, by OpenCV's
    nearest-neighbour resize (centre sampling), several times faster than a strided numpy copy.
    """
    h, w = mask.shape
    c = stride // 2
    gh, gw = (h - c + stride - 1) // stride, (w - c + stride - 1) // stride  # samples per axis
    x0, y0, x1, y1 = roi if roi is not None else (0, 0, w, h)
    r = (max(0, x0) // stride, max(0, y0) // stride, min(gw, -(-x1 // stride)), min(gh, -(-y1 // stride)))
    out = np.zeros((gh, gw), mask.dtype)
    bw, bh = r[2] - r[0], r[3] - r[1]
    if bw > 0 and bh > 0:
        if r[3] * stride <= h and r[2] * stride <= w:  # whole blocks: OpenCV samples their centres
            block = mask[r[1] * stride : r[3] * stride, r[0] * stride : r[2] * stride]
            out[r[1] : r[3], r[0] : r[2]] = cv2.resize(block, (bw, bh), interpolation=cv2.INTER_NEAREST_EXACT)
        else:  # the last block is cut by the mask's edge
            out[r[1] : r[3], r[0] : r[2]] = mask[c::stride, c::stride][r[1] : r[3], r[0] : r[2]]
    return out, (r if roi is not None else None)


class StageTimes:
    """The newest ``window`` frames' sub-stage durations (ns), preallocated."""

    def __init__(self, window: int = 1000) -> None:
        self._ns = np.zeros((window, len(SUBSTAGES)), dtype=np.int64)
        self.count = 0

    def record(self, ns: Sequence[int]) -> None:
        self._ns[self.count % len(self._ns)] = ns
        self.count += 1

    def rows(self) -> np.ndarray:
        return self._ns[: min(self.count, len(self._ns))].copy()

    def summary(self) -> dict[str, dict[str, float]]:
        rows = self.rows()
        if not len(rows):
            return {}
        out = {name: describe_ms(rows[:, j] / 1e6) for j, name in enumerate(SUBSTAGES)}
        out["total"] = describe_ms(rows.sum(axis=1) / 1e6)
        return out


def _finite(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, np.ndarray):
        return bool(np.isfinite(v).all())
    return all(math.isfinite(x) for x in v) if isinstance(v, tuple) else math.isfinite(v)


_PROMPT_FLOATS = ("area_mm2", "centroid")
_INSTANCE_FLOATS = ("area_mm2", "centroid", "polyline", "tip", "axis", "length_px", "length_mm", "width_px")


def _sanitize(g: PromptGeometry) -> None:
    """Drop any non-finite number (never expected; never published): the field goes absent."""
    for obj, names in ((g, _PROMPT_FLOATS), *((i, _INSTANCE_FLOATS) for i in g.instances)):
        for name in names:
            if not _finite(getattr(obj, name)):
                setattr(obj, name, None)
                obj.absent[name] = "not finite (numerical failure)"


class GeometryStage:
    def __init__(
        self, options: GeometryOptions | None = None, linear_tools: LinearTools | None = None
    ) -> None:
        self.options = o = options or GeometryOptions()
        self.linear_tools = linear_tools if linear_tools is not None else LinearTools({})
        self.outline_settings = OutlineSettings(o.tolerance_px, o.min_instance_px, o.max_instances)
        self.cuts = SceneCutDetector(o.cut_threshold, o.cut_angle_deg)
        self.smoother = LogitSmoother(o.smoothing)
        self.tracker = InstanceTracker(max_missed=o.track_max_missed)
        self.times = StageTimes()
        self.scene = Scene(0)
        self._scene_ns = 0

    # -- start of postprocess ------------------------------------------------------------------

    def begin_frame(self, pixels: np.ndarray, meta: Mapping[str, Any]) -> Scene:
        t0 = time.perf_counter_ns()
        cut = self.cuts.check(pixels, meta)
        if cut:
            self.tracker.reset()
            self.smoother.reset()
        self.scene = Scene(self.cuts.scene, cut, self.options.smoothing)
        self._scene_ns = time.perf_counter_ns() - t0
        return self.scene

    def smooth(
        self, prompt_ids: Sequence[str], logits: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.smoother(prompt_ids, logits, scores)

    # -- the geometry stage ---------------------------------------------------------------------

    def process(
        self,
        prompts: Sequence[Any],
        masks: Sequence[np.ndarray],
        present: Sequence[bool],
        downsample: int,
        source_hw: tuple[int, int],
        meta: Mapping[str, Any],
        rois: Sequence[tuple[int, int, int, int] | None] | None = None,
    ) -> list[PromptGeometry]:
        """Geometry for each prompt (``prompts`` need ``id`` and ``text``), in prompt order."""
        if not self.options.enabled:
            return [empty_geometry("off on this node") for _ in prompts]
        t0 = time.perf_counter_ns()
        spacing = frame_spacing(meta)
        out: list[PromptGeometry] = []
        parts = []
        kinds = [self.linear_tools.kind(p.text) for p in prompts]
        for i in range(len(prompts)):
            if not present[i]:
                out.append(empty_geometry("prompt not present"))
                parts.append([])
                continue
            roi = rois[i] if rois is not None else None
            if rois is not None and roi is None:
                out.append(empty_geometry("empty mask"))
                parts.append([])
                continue
            stride = self.options.trace_stride if kinds[i] is None else 1
            o = None
            if stride > 1:
                grid, grid_roi = strided(masks[i], roi, stride)
                o = outline_mask(
                    grid, downsample * stride, spacing, self.outline_settings, grid_roi, source_hw
                )
                if not o.geometry.instances and not o.geometry.specks:
                    o = None  # the mask is smaller than the grid: trace it whole
            if o is None:
                dense = kinds[i] is not None
                o = outline_mask(
                    masks[i], downsample, spacing, self.outline_settings, roi, source_hw, dense=dense
                )
            out.append(o.geometry)
            parts.append(o.parts)
        t1 = time.perf_counter_ns()

        fits: list[list[ToolFit | str | None]] = []
        for kind, ps in zip(kinds, parts):
            fits.append(
                [fit_tool(part, downsample, kind == "flexible", self.options.min_elongation) for part in ps]
                if kind
                else [None] * len(ps)
            )
        t2 = time.perf_counter_ns()

        if self.options.tracking:
            self.tracker.keep_only(p.id for p in prompts)
        centre = ((source_hw[1] - 1) / 2.0, (source_hw[0] - 1) / 2.0)
        for p, g, fs in zip(prompts, out, fits):
            tracks = (
                self.tracker.update(p.id, [i.bbox for i in g.instances], [i.centroid for i in g.instances])
                if self.options.tracking
                else [None] * len(g.instances)
            )
            for inst, tr, fit in zip(g.instances, tracks, fs):
                if tr is not None:
                    inst.id = tr.id
                self._apply_fit(inst, fit, tr, centre, spacing)
            _sanitize(g)
        t3 = time.perf_counter_ns()
        self.times.record((self._scene_ns, t1 - t0, t2 - t1, t3 - t2))
        return out

    def _apply_fit(
        self,
        inst: Instance,
        fit: ToolFit | str | None,
        track: Any,
        centre: tuple[float, float],
        spacing: Spacing | None,
    ) -> None:
        if fit is None:
            return
        if isinstance(fit, str):
            inst.absent["tool"] = fit
            return
        end, rule, why = choose_tip(fit, track.tip if track is not None else None, centre)
        apply_tool(inst, fit, end, rule, why, spacing, self.options.tolerance_px)
        if track is not None and inst.tip is not None:
            track.tip = inst.tip
