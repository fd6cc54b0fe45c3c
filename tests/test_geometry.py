"""Outlines, instances, areas and tool tips/axes computed from masks (issue 18).

Truth comes from the masks themselves (a connected-component labelling, pixel counts) and from
wires of known tip and direction (tests/synth_wires.py): analytic wires at 1024², and the demo
sweep's cameras projecting a K-wire. Bad input never raises: fields go absent with a reason.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bridge.prompt_geometry import PromptGeometry, Spacing
from fluorosam_rt.geometry_stage import GeometryOptions, GeometryStage, frame_spacing
from fluorosam_rt.linear_tools import LinearTools, default_linear_tools
from fluorosam_rt.outlines import OutlineSettings, outline_mask
from fluorosam_rt.tool_axis import choose_tip, fit_tool

sys.path.insert(0, str(Path(__file__).parent))
from synth_wires import angle_deg, draw_segment, sweep_wire, wire_mask

EXACT = OutlineSettings(tolerance_px=0.0, min_instance_px=1, max_instances=10_000)


def stage(**kw) -> GeometryStage:
    return GeometryStage(GeometryOptions(**kw), default_linear_tools())


def one(stage_: GeometryStage, mask: np.ndarray, text: str = "K-wire", meta: dict | None = None, d: int = 1):
    src = (mask.shape[0] * d, mask.shape[1] * d)
    return stage_.process([NS(id=text, text=text)], [mask], [True], d, src, meta or {})[0]


def clip_to_frame(a: np.ndarray, b: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The part of segment a-b inside [-0.5, size - 0.5]² (Liang-Barsky)."""
    t0, t1, d = 0.0, 1.0, b - a
    for p, q in (
        (-d[0], a[0] + 0.5),
        (d[0], size - 0.5 - a[0]),
        (-d[1], a[1] + 0.5),
        (d[1], size - 0.5 - a[1]),
    ):
        if p == 0:
            continue
        r = q / p
        if p < 0:
            t0 = max(t0, r)
        else:
            t1 = min(t1, r)
    return a + t0 * d, a + t1 * d


def wire_fit(mask: np.ndarray, flexible: bool = False):
    o = outline_mask(mask, dense=True)
    assert len(o.parts) == 1
    return fit_tool(o.parts[0], 1, flexible)


# --------------------------------------------------------------------------- outlines and areas


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.integers(0, 1)))
def test_instances_are_the_connected_components_with_exact_pixel_areas(mask):
    n, labels = cv2.connectedComponents(mask, connectivity=8)
    truth = sorted((int((labels == i).sum()) for i in range(1, n)), reverse=True)
    for dense in (False, True):
        g = outline_mask(mask, settings=EXACT, dense=dense).geometry
        assert sorted((i.area_px for i in g.instances), reverse=True) == truth
        if truth:
            assert g.area_px == int(mask.sum())
            assert len(g.contours) == len(g.instances) == n - 1
            assert g.absent == {"area_mm2": "no pixel spacing"}
        else:
            assert g.area_px is None
            assert g.absent == {"geometry": "empty mask"}


@settings(max_examples=80, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(2, 40), st.integers(2, 40)), elements=st.integers(0, 1)))
def test_bbox_covers_every_pixel_and_centroid_is_within_a_pixel_of_the_centre_of_mass(mask):
    g = outline_mask(mask, settings=EXACT).geometry
    if not mask.any():
        return
    ys, xs = np.nonzero(mask)
    x, y, w, h = g.bbox
    assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
    assert math.hypot(g.centroid[0] - xs.mean(), g.centroid[1] - ys.mean()) <= 1.0
    for inst, poly in zip(g.instances, g.contours):
        ix, iy, iw, ih = inst.bbox
        assert ix >= x
        assert iy >= y
        assert ix + iw <= x + w
        assert iy + ih <= y + h
        assert poly[0].dtype == np.int32
        assert poly[0].shape[1] == 2


def test_holes_are_rings_after_the_outline_and_are_not_counted():
    m = np.zeros((200, 300), np.uint8)
    cv2.circle(m, (150, 100), 80, 1, -1)
    cv2.circle(m, (150, 100), 30, 0, -1)  # a hole
    cv2.circle(m, (150, 100), 10, 1, -1)  # an island in the hole: its own instance
    g = outline_mask(m).geometry
    assert [len(p) for p in g.contours] == [2, 1]
    assert g.instances[0].area_px + g.instances[1].area_px == int(m.sum()) == g.area_px
    hole = g.contours[0][1]
    assert np.abs(np.hypot(hole[:, 0] - 150, hole[:, 1] - 100) - 30).max() < 2.5
    assert g.instances[0].centroid == pytest.approx((150, 100), abs=0.5)


def test_contours_are_simplified_within_the_stated_tolerance():
    m = np.zeros((400, 400), np.uint8)
    cv2.ellipse(m, (200, 200), (150, 90), 30, 0, 360, 1, -1)
    dense = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)[0][0].reshape(-1, 2)
    for tol in (0.5, 1.0, 3.0):
        ring = outline_mask(m, settings=OutlineSettings(tolerance_px=tol)).geometry.contours[0][0]
        poly = ring.reshape(-1, 1, 2).astype(np.float32)
        worst = max(abs(cv2.pointPolygonTest(poly, (float(x), float(y)), True)) for x, y in dense)
        assert worst <= tol + 1e-6
        assert len(ring) < len(dense) / (2 if tol < 1 else 5)


@pytest.mark.parametrize("d", [2, 3])
def test_downsampled_masks_report_source_pixels(d):
    src = np.zeros((301, 299), np.uint8)
    cv2.rectangle(src, (40, 60), (200, 130), 1, -1)
    small = cv2.resize(src, (math.ceil(299 / d), math.ceil(301 / d)), interpolation=cv2.INTER_NEAREST)
    g = outline_mask(small, downsample=d, source_hw=(301, 299)).geometry
    x, y, w, h = g.bbox
    assert abs(x - 40) <= d
    assert abs(y - 60) <= d
    assert abs(x + w - 201) <= d
    assert abs(y + h - 131) <= d
    assert g.area_px == pytest.approx(161 * 71, rel=0.06)
    assert g.centroid == pytest.approx((120, 95), abs=d)


def test_area_mm2_uses_the_spacing_and_says_when_it_cannot():
    m = np.zeros((100, 100), np.uint8)
    m[10:20, 10:30] = 1
    sp = frame_spacing(
        {
            "ImagerPixelSpacing": [0.3, 0.3],
            "DistanceSourceToDetector": 1200.0,
            "DistanceSourceToPatient": 800.0,
        }
    )
    assert sp == Spacing(pytest.approx(0.2), pytest.approx(0.2), "ImagerPixelSpacing@isocenter")
    g = outline_mask(m, spacing=sp).geometry
    assert g.area_mm2 == pytest.approx(200 * 0.04)
    assert g.instances[0].area_mm2 == pytest.approx(8.0)
    for meta in ({}, {"ImagerPixelSpacing": [float("nan"), 0.3]}, {"PixelSpacing": [float("inf"), 1]}):
        assert frame_spacing(meta) is None
    assert (
        frame_spacing(
            {
                "ImagerPixelSpacing": [0.3, 0.3],
                "DistanceSourceToPatient": float("nan"),
                "DistanceSourceToDetector": 1000,
            }
        ).basis
        == "ImagerPixelSpacing"
    )
    g = outline_mask(m, spacing=None).geometry
    assert g.area_mm2 is None
    assert g.absent["area_mm2"] == "no pixel spacing"


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda m: None, {"geometry": "empty mask"}),
        (lambda m: m.__setitem__((50, 60), 1), {"instances": "every part is smaller than 25 px"}),
        (lambda m: m.fill(1), {}),
    ],
    ids=["empty", "one-pixel", "full-frame"],
)
def test_degenerate_masks_give_fields_absent_with_a_reason(make, expect):
    m = np.zeros((120, 160), np.uint8)
    make(m)
    g = outline_mask(m, spacing=Spacing(0.2, 0.2, "PixelSpacing")).geometry
    assert g.absent == expect
    if "geometry" not in expect:
        assert g.area_px == int(m.sum())
    if expect == {}:
        assert g.bbox == (0, 0, 160, 120)
        assert g.instances[0].border
        assert g.centroid == pytest.approx((79.5, 59.5))


def test_specks_are_counted_not_listed_and_instances_are_capped():
    m = np.zeros((200, 200), np.uint8)
    m[10:30, 10:30] = 1
    for k in range(6):
        m[100, 20 + 20 * k] = 1  # one-pixel specks
    g = outline_mask(m).geometry
    assert len(g.instances) == 1
    assert g.specks == 6
    assert g.area_px == 406
    g = outline_mask(m, settings=OutlineSettings(min_instance_px=1, max_instances=3)).geometry
    assert len(g.instances) == 3
    assert g.specks == 4


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_a_promised_roi_gives_the_same_geometry_as_a_full_scan(seed):
    rng = np.random.default_rng(seed)
    m = np.zeros((128, 160), np.uint8)
    for _ in range(rng.integers(1, 4)):
        cv2.circle(m, tuple(int(v) for v in rng.integers(10, 120, 2)), int(rng.integers(1, 20)), 1, -1)
    ys, xs = np.nonzero(m)
    roi = (
        max(0, xs.min() - rng.integers(0, 5)),
        max(0, ys.min() - rng.integers(0, 5)),
        xs.max() + 1 + rng.integers(0, 5),
        ys.max() + 1 + rng.integers(0, 5),
    )
    a, b = outline_mask(m).geometry, outline_mask(m, roi=roi).geometry
    assert a.to_wire() == b.to_wire()


# --------------------------------------------------------------------------- tools: tip and axis


def test_analytic_wires_at_1024_tip_within_3px_and_axis_within_2_degrees():
    rng = np.random.default_rng(18)
    tip_err, axis_err = [], []
    for k in range(60):
        theta = rng.uniform(-math.pi, math.pi)
        width = rng.uniform(2.5, 16.0)
        length = rng.uniform(max(40.0, 4 * width), 700.0)
        tip = rng.uniform(180, 844, 2)
        while not np.all(
            (tip - length * np.array([math.cos(theta), math.sin(theta)]) > 20)
            & (tip - length * np.array([math.cos(theta), math.sin(theta)]) < 1003)
        ):
            length *= 0.8  # the whole wire inside the frame: both ends are ends, not the border
        taper = [0.0, 1.5 * width][
            k % 2
        ]  # flat end (a cut wire, the synthesis engine's cylinders) or a trocar point
        m = wire_mask(tuple(tip), theta, length, width, taper=taper)
        fit = wire_fit(m)
        assert not isinstance(fit, str), fit
        truth_dir = (math.cos(theta), math.sin(theta))
        end, rule, _ = choose_tip(fit, None, (511.5, 511.5))
        if taper and width >= 6:  # a thinner point tapers within the slice at the very end
            assert rule == "taper"
        else:  # ends that look alike: take the end nearer the truth, as a track would
            end, rule, _ = choose_tip(fit, tuple(tip), (511.5, 511.5))
        tip_err.append(float(np.linalg.norm(fit.ends[end].point - tip)))
        axis_err.append(angle_deg(fit.ends[end].direction, truth_dir))
        assert abs(fit.length_px - length) < 4.0
        assert abs(fit.width_px - width) < 2.0
    assert max(tip_err) <= 3.0, max(tip_err)
    assert max(axis_err) <= 2.0, max(axis_err)


@pytest.mark.parametrize("frame", [0, 13, 26, 39])
def test_demo_sweep_camera_wire_tip_and_axis_from_the_synthesis_geometry(frame):
    """The demo sweep's own K-wire projects outside its field of view, so the same 3-D wire is
    moved 120 mm towards the isocentre and projected with each frame's recorded camera."""
    tip, tail, width = sweep_wire(frame, 1024, shift_to_isocenter_mm=120.0)
    m = draw_segment(tip, tail, width, (1024, 1024))
    st_ = stage()
    g = one(st_, m, "Kirschner wire", {"ImagerPixelSpacing": [0.34, 0.34]})
    inst = g.instances[0]
    assert inst.tip_by in ("border", "taper", "centre", "track")
    got = np.array(inst.tip)
    end_err = min(np.linalg.norm(got - tip), np.linalg.norm(got - tail))
    assert end_err <= 3.0
    truth = (tip - tail) if np.linalg.norm(got - tip) < np.linalg.norm(got - tail) else (tail - tip)
    assert angle_deg(inst.axis, truth) <= 2.0
    a, b = clip_to_frame(tip, tail, 1024)
    assert inst.length_mm == pytest.approx(np.hypot(*(a - b)) * 0.34, rel=0.02)
    assert inst.ends_at_border == int(not np.allclose(b, tail)) + int(not np.allclose(a, tip))


def test_a_wire_cut_by_the_border_has_its_tip_inside():
    m = wire_mask((600.0, 500.0), math.radians(200), 900, 8)  # runs off the right edge
    g = one(stage(), m)
    inst = g.instances[0]
    assert inst.tip_by == "border"
    assert inst.ends_at_border == 1
    assert inst.border
    assert np.linalg.norm(np.array(inst.tip) - (600, 500)) <= 3
    assert angle_deg(inst.axis, (math.cos(math.radians(200)), math.sin(math.radians(200)))) <= 2
    assert np.linalg.norm(inst.polyline[0] - inst.tip) < 1e-9  # the centre line starts at the tip


def test_a_wire_crossing_the_image_has_an_axis_but_no_tip():
    m = np.zeros((512, 512), np.uint8)
    cv2.line(m, (0, 100), (511, 400), 1, 7)
    inst = one(stage(), m).instances[0]
    assert inst.tip is None
    assert inst.absent["tip"] == "both ends leave the image"
    assert inst.axis is not None
    assert inst.ends_at_border == 2
    assert angle_deg(inst.axis, (511, 300)) <= 2 or angle_deg(inst.axis, (-511, -300)) <= 2


def test_two_wires_are_two_instances_each_with_its_tip():
    m = wire_mask((300.0, 300.0), 0.3, 250, 8) | wire_mask((700.0, 650.0), 2.0, 300, 8)
    g = one(stage(), m, "K-wires")
    assert len(g.instances) == 2
    tips = sorted(tuple(np.round(i.tip)) for i in g.instances)
    assert np.allclose(tips, [(300, 300), (700, 650)], atol=3)
    assert len({i.id for i in g.instances}) == 2


def test_a_flexible_tool_gets_the_direction_at_its_tip_and_a_curved_centre_line():
    m = np.zeros((1024, 1024), np.uint8)
    t = np.linspace(0, math.pi / 2, 200)
    arc = np.stack([200 + 500 * np.sin(t), 800 - 500 * (1 - np.cos(t))], 1)  # quarter circle
    cv2.polylines(m, [np.int32(arc).reshape(-1, 1, 2)], False, 1, 6)
    st_ = stage()
    guide = one(st_, m, "guidewire").instances[0]
    rigid = one(stage(), m, "K-wire").instances[0]
    end = np.array(guide.tip)
    at_start = np.linalg.norm(end - arc[0]) < np.linalg.norm(end - arc[-1])
    local = arc[0] - arc[8] if at_start else arc[-1] - arc[-9]
    # the flexible fit follows the last third; the rigid one averages the whole arc
    assert angle_deg(guide.axis, local) < angle_deg(rigid.axis, local)
    assert angle_deg(guide.axis, local) < 12
    mid = guide.polyline[len(guide.polyline) // 2]
    assert np.min(np.hypot(*(arc - mid).T)) < 3  # the centre line follows the arc
    assert guide.length_px == pytest.approx(500 * math.pi / 2, rel=0.03)


@pytest.mark.parametrize(
    ("draw", "reason"),
    [
        (lambda m: cv2.circle(m, (500, 500), 60, 1, -1), "a blob, not a line"),
        (lambda m: cv2.rectangle(m, (400, 400), (460, 440), 1, -1), "a blob, not a line"),
        (lambda m: m.__setitem__((500, slice(500, 502)), 1), "too small to have an axis"),
    ],
)
def test_a_tool_mask_that_is_not_a_line_has_no_tool_fields(draw, reason):
    m = np.zeros((1024, 1024), np.uint8)
    draw(m)
    g = one(stage(min_instance_px=1), m)
    inst = g.instances[0]
    assert inst.tip is None
    assert inst.axis is None
    assert inst.polyline is None
    assert inst.absent["tool"].startswith(reason)


def test_a_u_shaped_tool_is_reported_as_not_one_line():
    m = np.zeros((512, 512), np.uint8)
    cv2.line(m, (100, 100), (400, 100), 1, 8)
    cv2.line(m, (100, 160), (400, 160), 1, 8)
    cv2.line(m, (100, 100), (100, 160), 1, 8)
    inst = one(stage(), m, "catheter").instances[0]
    assert inst.tip is None
    assert "does not follow one line" in inst.absent["tool"]


def test_anatomy_prompts_get_no_tool_fields_and_the_vocabulary_decides():
    tools = default_linear_tools()
    assert tools.kind("K-wire") == tools.kind("K-wires") == tools.kind("kirshner wire") == "rigid"
    assert tools.kind("guide wire") == "flexible"
    assert tools.kind("left lung") is None
    assert tools.kind("plate") is None
    m = wire_mask((500.0, 500.0), 0.5, 300, 8)
    assert one(stage(), m, "left lung").instances[0].tip is None
    custom = LinearTools.from_vocabulary({"tools": [{"name": "pin", "prompt": "pin", "linear": "rigid"}]})
    assert custom.kind("pin") == "rigid"
    assert custom.kind("K-wire") is None
    with pytest.raises(ValueError, match="linear"):
        LinearTools.from_vocabulary({"tools": [{"name": "x", "prompt": "x", "linear": "bendy"}]})


# --------------------------------------------------------------------------- bad input: never a crash


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mask=arrays(np.uint8, st.tuples(st.integers(1, 48), st.integers(1, 48)), elements=st.integers(0, 1)),
    text=st.sampled_from(["K-wire", "guidewire", "left lung"]),
    d=st.integers(1, 3),
    spacing=st.sampled_from(
        [
            {},
            {"PixelSpacing": [0.2, 0.3]},
            {"ImagerPixelSpacing": [float("nan")] * 2},
            {"PixelSpacing": "garbage"},
        ]
    ),
)
def test_any_mask_gives_finite_fields_or_absent_ones_with_a_reason(mask, text, d, spacing):
    g = one(stage(min_instance_px=1), mask, text, spacing, d)
    wire = g.to_wire()
    back = PromptGeometry.from_wire(wire)  # the decoder's own validation: finite numbers, sane shapes
    assert back.to_wire() == wire
    if not mask.any():
        assert g.absent == {"geometry": "empty mask"}
        return
    if "area_mm2" not in wire:
        assert g.absent["area_mm2"] == "no pixel spacing"
    for inst in g.instances:
        if text != "left lung":
            has_tool = inst.axis is not None
            assert has_tool or "tool" in inst.absent
            if has_tool:
                assert abs(math.hypot(*inst.axis) - 1) < 1e-6
                assert (inst.tip is not None) or "tip" in inst.absent
                assert (inst.length_mm is not None) == (
                    "PixelSpacing" in spacing and spacing["PixelSpacing"] != "garbage"
                )


def test_not_present_prompts_and_geometry_off():
    st_ = stage()
    m = np.ones((10, 10), np.uint8)
    g = st_.process([NS(id="a", text="a")], [m], [False], 1, (10, 10), {})[0]
    assert g.absent == {"geometry": "prompt not present"}
    assert g.to_wire() == {"absent": g.absent}
    g = stage(enabled=False).process([NS(id="a", text="a")], [m], [True], 1, (10, 10), {})[0]
    assert g.absent == {"geometry": "off on this node"}


# --------------------------------------------------------------------------- the anatomy trace grid


def _logit_like_mask(seed: int, size: int = 1024, grid: int = 8) -> np.ndarray:
    """A mask as the node makes one: a coarse logit map resized bilinearly, thresholded."""
    rng = np.random.default_rng(seed)
    field = cv2.resize(rng.normal(size=(grid, grid)).astype(np.float32), (size, size), cv2.INTER_LINEAR)
    return (field > 0.5).astype(np.uint8)


@pytest.mark.parametrize("seed", range(4))
def test_anatomy_traced_on_the_stride_grid_matches_the_full_trace(seed):
    """Stride 4 (the default) against every pixel, on masks shaped like the node's: total area
    within 2 %, every instance over 2,000 px found again with its area within 6 %, bounding box
    within 6 px and centroid within 3 px, and every published vertex within 4 px of the outline."""
    mask = _logit_like_mask(seed)
    full = one(stage(trace_stride=1), mask, "left lung")
    grid = one(stage(trace_stride=4), mask, "left lung")
    assert abs(grid.area_px - full.area_px) <= 0.02 * full.area_px
    big = [i for i in full.instances if i.area_px > 2000]
    assert big
    for a in big:
        b = min(grid.instances, key=lambda i: math.dist(i.centroid, a.centroid))
        assert math.dist(a.centroid, b.centroid) <= 3
        assert abs(a.area_px - b.area_px) <= 0.06 * a.area_px
        assert np.abs(np.subtract(a.bbox, b.bbox)).max() <= 6
    inner = cv2.erode(mask, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    edge = cv2.distanceTransform(1 - (mask - inner), cv2.DIST_L2, 3)  # distance to a boundary pixel
    for rings in grid.contours:
        for ring in rings:
            pts = np.asarray(ring).reshape(-1, 2)
            xs, ys = np.clip(np.round(pts).astype(int), 0, 1023).T
            assert edge[ys, xs].max() <= 4


def test_tools_and_masks_smaller_than_the_grid_are_traced_at_full_resolution():
    wire = wire_mask((300.0, 420.0), 0.7, 500.0, 5.0)
    a, b = one(stage(trace_stride=1), wire), one(stage(trace_stride=4), wire)
    assert a.instances[0].tip is not None
    assert a.to_wire() == b.to_wire()
    dot = np.zeros((64, 64), np.uint8)
    dot[5, 5] = 1  # no sample of the 4-pixel grid falls on it
    g = one(stage(trace_stride=4, min_instance_px=1), dot, "left lung")
    assert g.area_px == 1
    assert len(g.instances) == 1


@pytest.mark.parametrize("seed", range(3))
def test_the_grid_trace_honours_a_promised_roi(seed):
    mask = _logit_like_mask(seed, 512)
    ys, xs = np.nonzero(mask)
    roi = (int(xs.min()) - 3, int(ys.min()) - 1, int(xs.max()) + 2, int(ys.max()) + 5)
    st_ = stage(trace_stride=4)
    p = [NS(id="l", text="left lung")]
    with_roi = st_.process(p, [mask], [True], 1, mask.shape, {}, [roi])[0]
    st_ = stage(trace_stride=4)
    without = st_.process(p, [mask], [True], 1, mask.shape, {})[0]
    assert with_roi.to_wire() == without.to_wire()


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    stride=st.integers(2, 5),
    roi=st.tuples(st.integers(-3, 40), st.integers(-3, 40), st.integers(0, 44), st.integers(0, 44)),
    seed=st.integers(0, 2**16),
)
def test_strided_is_the_block_centres_inside_the_roi(h, w, stride, roi, seed):
    from fluorosam_rt.geometry_stage import strided

    mask = (np.random.default_rng(seed).random((h, w)) > 0.5).astype(np.uint8)
    c = stride // 2
    want = mask[c::stride, c::stride]
    got, r = strided(mask, None, stride)
    np.testing.assert_array_equal(got, want)
    assert r is None
    x0, y0, x1, y1 = roi
    inside = np.zeros_like(mask)
    inside[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = 1
    got, r = strided(mask * inside, roi, stride)
    np.testing.assert_array_equal(got, (mask * inside)[c::stride, c::stride])
