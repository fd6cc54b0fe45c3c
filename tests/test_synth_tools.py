"""Tools: continuous thin-tool masks at any size, and tools placed where surgeons put them."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
from synth_mannequin import mannequin_volume

from train.synth.ct_source import CTSource
from train.synth.geometry import Camera
from train.synth.landmarks import anatomy_of
from train.synth.projector import Projector
from train.synth.regions import REGIONS
from train.synth.tool_sampling import sample_tools
from train.synth.tools import Tool
from train.synth.vocabulary import Vocabulary
from train.synth.volume import prepare_volume


@pytest.fixture(scope="module")
def air() -> Projector:
    """A projector over an empty (air) volume: only the tools make masks."""
    shape = (8, 8, 8)
    aff = np.diag([40.0, 40.0, 40.0, 1.0])
    aff[:3, 3] = -140.0
    ct = CTSource("air", np.full(shape, -1000.0, np.float32), np.zeros(shape, np.uint8), aff, [])
    return Projector(prepare_volume(ct, None, None))


@pytest.fixture(scope="module")
def body():
    return mannequin_volume()


def _random_pose(rng: np.random.Generator, size: int, distorted: bool) -> Camera:
    sdd = rng.uniform(900.0, 1200.0)
    return Camera(
        size, size, rng.uniform(300.0, 400.0) / size, sdd, sdd / rng.uniform(1.3, 1.8),
        rng.uniform(-180.0, 180.0), rng.uniform(-40.0, 40.0), (0.0, 0.0, 0.0),
        distortion_k=rng.uniform(0.02, 0.08) if distorted else 0.0,
        distortion_s=rng.uniform(-0.05, 0.05) if distorted else 0.0,
    )  # fmt: skip


def _wire_in_view(
    rng: np.random.Generator, cam: Camera, aligned: bool = False, margin: float = 4.0
) -> tuple[np.ndarray, np.ndarray]:
    """A straight wire between -200 mm (toward the source) and +250 mm (toward the detector) of the
    isocentre, both ends inside the image. ``aligned``: within 3° of the image rows or columns and beyond
    the isocentre, where a pixel's ray sees more of the patient and a wire between two pixel rows is
    missed by every pixel-centre ray (the hard case for centre-ray masks)."""
    v, up, right = cam.axes
    for _ in range(1000):
        if aligned:
            c = rng.normal(0.0, 30.0, 3) + v * rng.uniform(120.0, 250.0)
            d = (right if rng.random() < 0.5 else up) + rng.normal(0.0, np.deg2rad(2.0), 3)
        else:
            c = rng.normal(0.0, 40.0, 3) + v * rng.uniform(-200.0, 250.0)
            d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        half = rng.uniform(30.0, 100.0)
        p0, p1 = c - d * half, c + d * half
        uv = cam.project(np.stack([p0, p1]))
        if np.all((uv > margin) & (uv < cam.width - margin)) and np.linalg.norm(uv[1] - uv[0]) > 20.0:
            return p0, p1
    raise AssertionError("no wire pose found")


def _components(mask: np.ndarray) -> int:
    n, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return n - 1


def _check_kwires(air: Projector, n: int, seed: int) -> None:
    """1.0-2.5 mm K-wires at 256², anywhere between source and detector, with and without image-intensifier
    distortion: each mask is one 8-connected component as long as the projected wire (within 3 px). Every
    third pose is a hard case: a 1.0 mm wire square to the image axes beyond the isocentre. (Centre-ray
    masks alone broke 8 of 10 such wires into 2-8 pieces.)"""
    rng = np.random.default_rng(seed)
    for k in range(n):
        cam = _random_pose(rng, 256, distorted=k % 2 == 1)
        p0, p1 = _wire_in_view(rng, cam, aligned=k % 3 == 0)
        t = Tool("k_wire", 301, "stainless_steel")
        t.add_cylinder(p0, p1, 0.5 if k % 3 == 0 else rng.uniform(0.5, 1.25))
        mask = air.project(cam, [t], with_labels=False).tool_hits[0].numpy()
        assert _components(mask) == 1, k
        uv = cam.project(np.stack([p0, p1]))
        chord = uv[1] - uv[0]
        u = chord / np.linalg.norm(chord)
        rows, cols = np.nonzero(mask)
        along = (np.stack([cols + 0.5, rows + 0.5], 1) - uv[0]) @ u
        extent = float(along.max() - along.min())
        assert abs(extent - np.linalg.norm(chord)) <= 3.0, (k, extent, np.linalg.norm(chord))


def test_kwire_mask_is_one_line_of_the_right_length_at_256(air: Projector) -> None:
    _check_kwires(air, 9, seed=0)


@pytest.mark.slow
def test_kwire_mask_is_one_line_for_many_poses(air: Projector) -> None:
    _check_kwires(air, 90, seed=10)


def test_kwire_width_follows_the_projection_at_1024(air: Projector) -> None:
    """A 1.6 mm K-wire on a 30 cm detector: at 1024² its mask is as wide as its projection (~5 px at unit
    magnification, more at the C-arm's), not a 1-px line."""
    cam = Camera(1024, 1024, 300.0 / 1024, 1000.0, 650.0, 0.0, 0.0, (0.0, 0.0, 0.0))
    t = Tool("k_wire", 301, "stainless_steel")
    t.add_cylinder([-60.0, 0.0, -20.0], [60.0, 0.0, 25.0], 0.8)
    mask = air.project(cam, [t], with_labels=False).tool_hits[0].numpy()
    uv = cam.project(np.array([[-60.0, 0.0, -20.0], [60.0, 0.0, 25.0]]))
    length = float(np.linalg.norm(uv[1] - uv[0]))
    width = mask.sum() / length
    expected = 2 * 0.8 * cam.sdd / cam.sod / cam.pixel_size  # wire at the isocentre depth
    assert 4.5 < expected - 0.8 < width < expected + 0.8
    assert _components(mask) == 1


def _check_guidewires(air: Projector, n: int, seed: int) -> None:
    """0.36-0.9 mm guidewires (polylines of sub-pixel cylinders) are one component at 256²."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n:
        cam = _random_pose(rng, 256, distorted=bool(rng.random() < 0.5))
        steps = rng.normal(0.0, 1.0, (40, 3)).cumsum(0) * 0.3 + np.array([1.0, 0.0, 0.0])
        line = np.cumsum(steps / np.linalg.norm(steps, axis=1, keepdims=True) * 4.0, axis=0)
        line -= line.mean(0)
        uv = cam.project(line)
        if not np.all((uv > 2) & (uv < 254)):
            continue
        t = Tool("guidewire", 305, "nitinol")
        r = rng.uniform(0.18, 0.45)
        for a, b in itertools.pairwise(line):
            t.add_cylinder(a, b, r)
        mask = air.project(cam, [t], with_labels=False).tool_hits[0].numpy()
        assert _components(mask) == 1
        done += 1


def test_guidewire_stays_continuous(air: Projector) -> None:
    _check_guidewires(air, 2, seed=1)


@pytest.mark.slow
def test_guidewires_stay_continuous_for_many_poses(air: Projector) -> None:
    _check_guidewires(air, 20, seed=11)


def test_region_tools_start_in_their_bones(body) -> None:
    vocab = Vocabulary.load()
    anat = anatomy_of(body, vocab)
    kinds: set[str] = set()
    for region in REGIONS:
        for seed in range(10):
            tools = sample_tools(np.random.default_rng([seed, 7]), body, 0.0, region=region)
            assert tools, (region, seed)
            for t in tools:
                kinds.add(t.name)
                if t.name == "k_wire":
                    radii = [p["r"] for k, p, _ in t.parts if k == "cyl"]
                    assert 0.5 <= min(radii) <= max(radii) <= 1.25  # 1.0-2.5 mm
                if not t.target:
                    assert t.name in ("guidewire", "catheter"), t.site
                    continue
                pts = anat.points(t.target)
                dist = float(np.linalg.norm(pts - t.tip, axis=1).min())
                limit = 12.0 if t.target == "skull" else 6.0  # the skull is a shell: entry on its surface
                assert dist < limit, (region, t.name, t.site, t.target, dist)
    every = {"k_wire", "bone_screw", "cannulated_screw", "pedicle_screw", "plate", "guidewire", "catheter"}
    assert kinds >= every | {"drill_bit"}


def test_pedicle_screws_come_in_converging_pairs(body) -> None:
    from train.synth.tool_sites import _LUMBAR, site_pedicles

    anat = anatomy_of(body, Vocabulary.load())
    pairs = 0
    for seed in range(6):
        screws = site_pedicles(np.random.default_rng(seed), anat, _LUMBAR, "screws")
        by_level: dict[str, list[Tool]] = {}
        for s in screws:
            by_level.setdefault(s.target, []).append(s)
            entry = s.parts[0][1]["p1"]  # core cylinder: tip -> entry
            assert abs(entry[0]) > abs(s.tip[0]) + 5.0  # converging: the entry is more lateral than the tip
            assert entry[1] < s.tip[1] - 20.0  # posterior entry, anterior tip
        for level in by_level.values():
            if len(level) == 2:
                pairs += 1
                assert level[0].tip[0] * level[1].tip[0] < 0  # one each side of the midline
    assert pairs >= 4


def test_femoral_neck_screws_run_inside_the_neck(body) -> None:
    from train.synth.tool_sites import site_femoral_neck

    anat = anatomy_of(body, Vocabulary.load())
    for seed in range(5):
        screws = site_femoral_neck(np.random.default_rng(seed), anat, "left", "screws")
        assert 2 <= len(screws) <= 3
        pts = anat.points("femur_left")
        axes = []
        for s in screws:
            p0, p1 = s.parts[0][1]["p0"], s.parts[0][1]["p1"]
            axes.append((p1 - p0) / np.linalg.norm(p1 - p0))
            for f in (0.0, 0.5, 0.9):  # tip, middle, near the lateral cortex: all in bone
                q = p0 + f * (p1 - p0)
                assert np.linalg.norm(pts - q, axis=1).min() < 6.0
        assert min(float(a @ axes[0]) for a in axes) > np.cos(np.deg2rad(1.0))  # parallel


def test_region_free_call_and_missing_region(body) -> None:
    tools = sample_tools(np.random.default_rng(3), body, p_none=0.0)  # the original call
    assert tools
    assert all(t.site == "" for t in tools)
    legless = mannequin_volume(without=("patella", "tibia", "fibula", "femur"), name="legless")
    with pytest.raises(ValueError, match="body 'legless' has no region 'knee_right'"):
        sample_tools(np.random.default_rng(0), legless, 0.3, region="knee_right")
