"""Decode a recording (folder of images or DICOM files, one multi-frame DICOM, or a video) to frames.

Shared by the replay source, the demo and the tests, so a recording means the same thing
everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..imageio import ImageReadError, read_image
from .base import SourceError

VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".gif", ".mpg", ".mpeg"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".dic"}


def bgr_to_gray(img: np.ndarray) -> np.ndarray:
    """Frame grabbers deliver BGR even for a gray X-ray; the model wants one channel."""
    if img.ndim == 3 and img.shape[2] >= 3:
        return cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2GRAY)
    if img.ndim == 3:
        return np.ascontiguousarray(img[:, :, 0])
    return img


def read_video(path: Path, max_frames: int = 100_000) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise SourceError(f"cannot open video {path}")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    frames = []
    try:
        while len(frames) < max_frames:
            ok, img = cap.read()
            if not ok:
                break
            frames.append(bgr_to_gray(img))
    finally:
        cap.release()
    if not frames:
        raise SourceError(f"video {path} has no readable frames")
    return frames, fps


def read_recording(path: str | Path) -> tuple[list[tuple[np.ndarray, dict[str, Any]]], float]:
    """(pixels, meta) per frame, and the recording's own frame rate (0.0 if it has none)."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"recording {p} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise SourceError(f"folder {p} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
        out: list[tuple[np.ndarray, dict[str, Any]]] = []
        for f in files:
            out.extend(_read_still(f))
        return out, 0.0
    if p.suffix.lower() in VIDEO_EXTS:
        frames, fps = read_video(p)
        return [(f, {"source_path": str(p), "frame_index": i}) for i, f in enumerate(frames)], fps
    frames = _read_still(p)
    frame_time = frames[0][1].get("FrameTime")
    return frames, (1000.0 / frame_time if frame_time else 0.0)


def _read_still(f: Path) -> list[tuple[np.ndarray, dict[str, Any]]]:
    try:
        with f.open("rb") as fh:
            head = fh.read(132)
        if f.suffix.lower() in {".dcm", ".dicom", ".dic"} or head[128:132] == b"DICM":
            from .dicom_frames import dicom_file_frames

            return dicom_file_frames(f)
        img = read_image(f)
    except (ImageReadError, OSError) as exc:
        raise SourceError(str(exc)) from exc
    return [(img.pixels, img.meta)]
