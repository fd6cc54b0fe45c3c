"""Video capture as a C-arm's monitor reaches the node through a frame grabber (issue 20):
a 1080p60 recording of a synthetic monitor layout (fluoroscopy field plus UI text), made at
test time and replayed through the video source in real time."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from fluorosam_rt.sources.base import SourceError
from fluorosam_rt.sources.video import VideoSource, detect_circular_fov, gstreamer_available

sys.path.insert(0, str(Path(__file__).parent))
from test_node import running_node, wait_for

REPO = Path(__file__).resolve().parents[1]
W, H, FPS, N = 1920, 1080, 60, 30  # half a second of a 1080p60 grabber
FIELD = (860, 540, 470)  # centre x, centre y, radius of the round fluoroscopy field


def _anatomy(size: int) -> np.ndarray:
    """The demo's chest DRR (a real CT's projection) as the field's content."""
    cap = cv2.VideoCapture(str(REPO / "fluorosam_rt" / "assets" / "demo" / "chest_sweep.mp4"))
    ok, img = cap.read()
    cap.release()
    assert ok
    return cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), (size, size))


def _ui(i: int) -> np.ndarray:
    """The monitor's UI on black: patient banner, acquisition text on both sides, a ruler."""
    img = np.zeros((H, W, 3), np.uint8)
    cv2.rectangle(img, (0, 0), (W - 1, 44), (70, 70, 70), -1)  # patient banner
    cv2.putText(
        img, "DOE^JOHN  1954-03-02  ID 0042", (20, 32), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2
    )
    lines = ["kV 72", "mA 3.1", "LAO 30", "CRAN 5", "DAP 12.3", f"T {i / FPS:05.2f}s"]
    for k, text in enumerate(lines):
        cv2.putText(img, text, (40, 160 + 70 * k), cv2.FONT_HERSHEY_SIMPLEX, 1.4, (235, 235, 235), 3)
        cv2.putText(img, text, (1500, 160 + 70 * k), cv2.FONT_HERSHEY_SIMPLEX, 1.4, (200, 255, 200), 3)
    cv2.line(img, (1450, 900), (1850, 900), (255, 255, 255), 2)  # a ruler
    return img


def monitor_frame(i: int, anatomy: np.ndarray, square: bool = False) -> np.ndarray:
    """One 1080p frame of a C-arm monitor: the field (moving anatomy) on black, UI around it."""
    cx, cy, r = FIELD
    img = _ui(i)
    win = img[cy - r : cy + r + 1, cx - r : cx + r + 1]
    inside = np.ones((2 * r + 1, 2 * r + 1), bool)
    if not square:
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        inside = xx * xx + yy * yy <= r * r
    field = np.maximum(np.roll(anatomy, 2 * i, axis=1), 45)  # an exposed field is never black
    win[inside] = field[inside][:, None]
    return img


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("grabber") / "monitor_1080p60.avi"
    anatomy = _anatomy(2 * FIELD[2] + 1)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    assert vw.isOpened()
    for i in range(N):
        vw.write(monitor_frame(i, anatomy))
    vw.release()
    cap = cv2.VideoCapture(str(path))
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (W, H)
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(FPS)
    cap.release()
    return path


@pytest.mark.parametrize("square", [False, True], ids=["intensifier_circle", "flat_panel_square"])
def test_field_is_found_in_the_monitor_layout(square):
    img = monitor_frame(3, _anatomy(2 * FIELD[2] + 1), square=square)
    box = detect_circular_fov(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    cx, cy, r = FIELD
    want = (cx - r, cy - r, 2 * r + 1, 2 * r + 1)
    assert box is not None
    assert np.abs(np.subtract(box, want)).max() <= 4, (box, want)


def test_1080p60_monitor_recording_through_the_node(tmp_path, bundle, recording):
    """Replayed at 60 fps: every recorded frame is emitted or skipped as late by the source,
    every emitted frame is published or dropped (superseded) by the node, and the masks cover
    the cropped field, not the whole monitor."""
    source = {"kind": "video", "device": str(recording), "roi": "auto", "realtime": True}
    t0 = time.monotonic()
    with running_node(tmp_path, bundle, source, prompts=("lungs", "heart", "spine")) as (app, sub):
        node = app.node
        wait_for(lambda: node.source.finished.is_set() and node.idle(), 60, "the recording to end")
        msg = sub.receive(timeout=10)
        elapsed = time.monotonic() - t0
    src = node.source.describe()
    final = app.final
    assert src["emitted"] + src["rejected"].get("late", 0) == N
    assert final["received"] == src["emitted"]
    assert final["published"] >= 1
    assert set(final["dropped"]) <= {"superseded", "superseded_at_publish"}, final
    assert final["received"] == final["published"] + sum(final["dropped"].values())
    cx, cy, r = FIELD
    assert np.abs(np.subtract(src["roi"], (cx - r, cy - r, 2 * r + 1, 2 * r + 1))).max() <= 8  # MJPG edges
    assert msg.source_shape == (src["roi"][3], src["roi"][2])
    assert [p.text for p in msg.prompts] == ["lungs", "heart", "spine"]
    assert elapsed >= (N - 1) / FPS * 0.9  # played at the grabber's rate, not as fast as possible


def test_gstreamer_pipelines_are_refused_when_opencv_has_no_gstreamer():
    info = cv2.getBuildInformation()
    assert gstreamer_available() == bool(re.search(r"GStreamer:\s+YES", info))
    readme = (REPO / "README.md").read_text()
    if not gstreamer_available():
        with pytest.raises(SourceError, match="no GStreamer"):
            VideoSource("videotestsrc num-buffers=10 ! videoconvert ! appsink")
        assert "GStreamer/RTSP" not in readme


class _Grabber:
    """Stands in for a V4L2 capture (none exists on CI): keeps what is set, or a fixed format."""

    def __init__(self, keeps_format: str | None = None) -> None:
        self.props: dict[int, float] = {cv2.CAP_PROP_FOURCC: cv2.VideoWriter_fourcc(*"MJPG")}
        self.keeps_format = keeps_format

    def set(self, prop: int, value: float) -> bool:
        if prop == cv2.CAP_PROP_FOURCC and self.keeps_format:
            return False
        self.props[prop] = value
        return True

    def get(self, prop: int) -> float:
        return self.props.get(prop, 0.0)


@pytest.mark.parametrize("fmt", ["YUYV", "NV12", "MJPG"])
def test_requested_pixel_format_is_set_and_read_back(fmt):
    src = VideoSource(0, pixel_format=fmt, width=1920, height=1080, fps=60)
    got = src.configure(_Grabber())
    assert got == {"pixel_format": fmt, "width": 1920, "height": 1080, "fps": 60.0}
    assert src.last_error == ""
    assert src.describe()["delivered"]["pixel_format"] == fmt


def test_a_grabber_that_keeps_another_format_is_reported():
    src = VideoSource(0, pixel_format="YUYV", width=1920, height=1080, fps=60)
    src.configure(_Grabber(keeps_format="MJPG"))
    assert "pixel_format=MJPG (asked YUYV)" in src.last_error
    with pytest.raises(SourceError, match="pixel_format"):
        VideoSource(0, pixel_format="RGB3")
