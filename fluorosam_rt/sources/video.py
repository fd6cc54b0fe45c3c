"""OpenCV capture: a frame grabber on the C-arm's video out, a video file, or a GStreamer/RTSP URL.

A C-arm's video out carries UI around the image (patient banner, dose, a black surround of the
circular field of view); cropping to a fixed ROI or to the detected circle keeps the model on
the anatomy. A grabber that drops out is reopened with exponential backoff, and the source
reports "reconnecting" on status instead of ending the node.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import cv2
import numpy as np

from .base import Source, wait_or_stop
from .frames_from_files import bgr_to_gray


def detect_circular_fov(gray: np.ndarray, min_fraction: float = 0.05) -> tuple[int, int, int, int] | None:
    """Bounding box (x, y, w, h) of the largest bright blob: an image intensifier's round field.

    The surround of the field of view is near-black; Otsu separates it from the exposed area.
    Returns None when no blob covers min_fraction of the frame (then nothing is cropped).
    """
    img = (
        gray
        if gray.dtype == np.uint8
        else cv2.normalize(gray, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    )
    blur = cv2.GaussianBlur(img, (5, 5), 0)
    _, mask = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
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
    ) -> None:
        super().__init__()
        self.device = int(device) if isinstance(device, str) and device.isdigit() else device
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
        return cv2.VideoCapture(dev)

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
            self.emit(np.ascontiguousarray(gray), {"frame_index": index, "roi": self._crop}, ts)
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
        }
