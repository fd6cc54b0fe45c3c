"""OpenCV capture: a frame grabber on the C-arm's video out, a video file, or a network stream.

A C-arm's video out carries its monitor layout: the fluoroscopy field (round for an image
intensifier, square for a flat panel) on black, with patient banner, dose and angle text
around it. Cropping to a fixed ROI or to the automatically found field keeps the model on the
anatomy. A grabber that drops out is reopened with exponential backoff, and the source reports
"reconnecting" on status instead of ending the node.

What OpenCV can open here is what its wheel was built with (``cv2.getBuildInformation()``): the
``opencv-python-headless`` wheel has FFMPEG (files, RTSP/HTTP URLs) and V4L2 (devices) but no
GStreamer, so a GStreamer pipeline string is refused with that reason instead of failing to
open forever. Grabbers (HDMI/SDI to USB) deliver 1080p at 50/60 fps as YUYV, NV12 or MJPG; the
format, size and rate asked for are set on the device and read back, and a device that
ignores them is reported (``describe()``: asked vs delivered). A file replayed in real time
behaves like a grabber: frames the reader is too late for are skipped and counted (``late``),
and frames the model is too slow for are counted by the node (``superseded``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import cv2
import numpy as np

from .base import Source, SourceError, wait_or_stop
from .frames_from_files import bgr_to_gray

log = logging.getLogger(__name__)


PIXEL_FORMATS = ("YUYV", "NV12", "MJPG")  # what HDMI/SDI grabbers deliver


def gstreamer_available() -> bool:
    """Whether this OpenCV build can open GStreamer pipelines."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


def _fourcc_text(value: float) -> str:
    code = int(value)
    return "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4)).strip("\x00 ")


def detect_circular_fov(gray: np.ndarray, min_fraction: float = 0.05) -> tuple[int, int, int, int] | None:
    """Bounding box (x, y, w, h) of the fluoroscopy field in a monitor layout (or a bare image).

    The field's surround is near-black; the field itself (round or square) is one large region
    of exposed pixels, while the UI around it is thin strokes (text, rulers, icons). So: pixels
    clearly above the black level (Otsu's threshold, at most 40 of 255, so dark anatomy inside
    the field stays in), an opening that removes strokes thinner than about 1% of the frame,
    holes filled, and the largest region's bounding box. None when no region covers
    min_fraction of the frame (then nothing is cropped).
    """
    img = (
        gray
        if gray.dtype == np.uint8
        else cv2.normalize(gray, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    )
    blur = cv2.GaussianBlur(img, (5, 5), 0)
    otsu, _ = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    _, mask = cv2.threshold(blur, min(float(otsu), 40.0), 255, cv2.THRESH_BINARY)
    k = max(3, (min(img.shape[:2]) // 100) | 1)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea)
    if cv2.contourArea(c) < min_fraction * img.size:
        return None
    x, y, w, h = cv2.boundingRect(c)
    return int(x), int(y), int(w), int(h)


class VideoSource(Source):
    kind = "video"

    def __init__(
        self,
        device: str | int,
        roi: tuple[int, int, int, int] | str | None = None,
        realtime: bool = True,
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        end_of_file: str = "finish",  # "finish" (a file ends the stream) or "reconnect" (a device)
        pixel_format: str | None = None,  # a device: YUYV, NV12 or MJPG (None: the device's default)
        width: int | None = None,  # a device: capture size and rate to ask for (None: its default)
        height: int | None = None,
        fps: float | None = None,
    ) -> None:
        super().__init__()
        self.device = int(device) if isinstance(device, str) and device.isdigit() else device
        if isinstance(self.device, str) and "!" in self.device and not gstreamer_available():
            raise SourceError(
                f"video source {self.device!r} looks like a GStreamer pipeline, but this OpenCV build "
                "has no GStreamer (cv2.getBuildInformation()); give a device index, a file or an "
                "RTSP/HTTP URL (FFMPEG)"
            )
        if pixel_format is not None and pixel_format.upper() not in PIXEL_FORMATS:
            raise SourceError(f"pixel_format must be one of {', '.join(PIXEL_FORMATS)}, not {pixel_format!r}")
        self.pixel_format = pixel_format.upper() if pixel_format else None
        self.width, self.height, self.fps = width, height, fps
        self.delivered: dict[str, Any] = {}  # what the device delivers after our request
        self.roi = roi
        self.realtime = realtime
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.end_of_file = "reconnect" if isinstance(self.device, int) else end_of_file
        self.reconnects = 0
        self._crop: tuple[int, int, int, int] | None = roi if isinstance(roi, tuple) else None
        self._thread: threading.Thread | None = None

    def _open(self) -> cv2.VideoCapture:
        dev = self.device
        if isinstance(dev, str) and "!" in dev:
            return cv2.VideoCapture(dev, cv2.CAP_GSTREAMER)
        cap = cv2.VideoCapture(dev)
        if isinstance(dev, int) and cap.isOpened():
            self.configure(cap)
        return cap

    def configure(self, cap: Any) -> dict[str, Any]:
        """Ask a device for the configured pixel format, size and rate; read back what it delivers.

        V4L2 grabbers take the format through CAP_PROP_FOURCC and may silently keep another one;
        the reply is compared with the request so status shows it (and the log warns once).
        """
        if self.pixel_format:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.pixel_format))
        if self.width and self.height:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.fps:
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        got = {
            "pixel_format": _fourcc_text(cap.get(cv2.CAP_PROP_FOURCC)),
            "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            "fps": float(cap.get(cv2.CAP_PROP_FPS)),
        }
        self.delivered = got
        asked = {
            "pixel_format": self.pixel_format,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
        }
        differs = [k for k, v in asked.items() if v and got[k] != v]
        if differs:
            self.last_error = "device delivers " + ", ".join(
                f"{k}={got[k]} (asked {asked[k]})" for k in differs
            )
            log.warning("video %r: %s", self.device, self.last_error)
        return got

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="source-video", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = self.reconnect_initial_s
        while not self._stop.is_set():
            cap = self._open()
            if not cap.isOpened():
                cap.release()
                self.state, self.last_error = "reconnecting", f"cannot open {self.device!r}"
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self.reconnect_max_s)
                self.reconnects += 1
                continue
            self.state = "running"
            backoff = self.reconnect_initial_s
            ended = self._pump(cap)
            cap.release()
            if ended and self.end_of_file == "finish":
                self._finish()
                return
            if not self._stop.is_set():
                self.state, self.last_error = "reconnecting", f"{self.device!r} stopped delivering frames"
                self.reconnects += 1
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self.reconnect_max_s)

    def _pump(self, cap: cv2.VideoCapture) -> bool:
        """Read until the capture ends (True) or we are stopped (False)."""
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        pace = self.realtime and not isinstance(self.device, int) and fps > 0
        t_next = time.monotonic()
        index = 0
        while not self._stop.is_set():
            if pace:  # a grabber does not wait: skip the frames whose time has passed
                while time.monotonic() > t_next + 1.0 / fps:
                    if not cap.grab():
                        return True
                    self.reject("late")
                    index += 1
                    t_next += 1.0 / fps
            ok, img = cap.read()
            if not ok:
                return True
            ts = time.time_ns()
            gray = bgr_to_gray(img)
            if self.roi == "auto" and self._crop is None:
                self._crop = detect_circular_fov(gray)
            if self._crop is not None:
                x, y, w, h = self._crop
                gray = gray[y : y + h, x : x + w]
            if gray.size == 0:
                self.reject("empty_after_crop", f"ROI {self._crop} leaves nothing of a {img.shape} frame")
                continue
            self.emit(
                np.ascontiguousarray(gray), self.frame_meta({"frame_index": index, "roi": self._crop}), ts
            )
            index += 1
            if pace:
                t_next += 1.0 / fps
                if wait_or_stop(self._stop, t_next):
                    return False
        return False

    def _stop_impl(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=5)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "device": str(self.device),
            "roi": self._crop,
            "reconnects": self.reconnects,
            "asked": {
                "pixel_format": self.pixel_format,
                "width": self.width,
                "height": self.height,
                "fps": self.fps,
            },
            "delivered": self.delivered,
        }
