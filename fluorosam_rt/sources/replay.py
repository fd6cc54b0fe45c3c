"""Replay a recording at a set frame rate, once or looped: the demo's and benchmark's source.

Frames are decoded up front so the replay clock is not disturbed by decoding, and a loop costs
nothing after the first pass.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .base import Source, SourceError, wait_or_stop
from .frames_from_files import read_recording


class ReplaySource(Source):
    kind = "replay"

    def __init__(self, path: str | Path, fps: float | None = None, loop: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.frames: list[tuple[np.ndarray, dict[str, Any]]]
        self.frames, native_fps = read_recording(self.path)
        self.fps = float(fps or native_fps or 15.0)
        if self.fps <= 0:
            raise SourceError(f"replay fps must be positive, got {self.fps}")
        self.loop = loop
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="source-replay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = 1.0 / self.fps
        t_next = time.monotonic()
        n = 0
        while not self._stop.is_set():
            pixels, meta = self.frames[n % len(self.frames)]
            index, loop = n % len(self.frames), n // len(self.frames)
            self.emit(pixels, self.frame_meta(meta, replay_index=index, replay_pass=loop))
            n += 1
            if not self.loop and n >= len(self.frames):
                self._finish()
                return
            t_next += period
            if t_next < time.monotonic() - period:  # we fell far behind (paused process): resync
                t_next = time.monotonic()
            if wait_or_stop(self._stop, t_next):
                return

    def _stop_impl(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=5)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path), "fps": self.fps, "frames": len(self.frames)}
