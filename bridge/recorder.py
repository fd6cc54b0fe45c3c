"""Record the mask stream to disk for audit and replay, with numpy and the standard library only.

Layout of a recording folder:

* ``headers.jsonl``: one line per message, the decoded header plus the files written for it;
* ``masks/<frame_id>.npz``: ``masks`` (uint8 [K, h, w]), ``ids`` and ``texts`` of the prompts;
* ``frames/<frame_id>.png``: the preview image, when the node publishes one (``include_image``).

``frames/`` is a folder of PNGs, which is exactly what the node's replay source reads, so
``fluorosam-rt serve --source replay:<dir>/frames`` replays what was seen. PNGs are written by
a small encoder here because the bridge must not depend on OpenCV or Pillow.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .protocol import MaskMessage
from .subscriber import SubscriberTimeout


def write_png_gray8(path: Path, image: np.ndarray) -> None:
    """Lossless 8-bit grayscale PNG (filter 0 on every row; fine for masks and previews)."""
    img = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = img.shape
    raw = np.hstack([np.zeros((h, 1), np.uint8), img]).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6))
    path.write_bytes(png + chunk(b"IEND", b""))


class Recorder:
    """Appends messages to a recording folder; safe to stop at any point (every line is whole)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        (self.out_dir / "masks").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "frames").mkdir(parents=True, exist_ok=True)
        self._log = (self.out_dir / "headers.jsonl").open("a", encoding="utf-8")
        self.recorded = 0

    def write(self, msg: MaskMessage) -> dict[str, Any]:
        name = f"{msg.frame_id:08d}"
        entry: dict[str, Any] = {
            "stream": msg.stream,
            "frame_id": msg.frame_id,
            "seq": msg.seq,
            "t": msg.timestamps_ns,
            "source": msg.source,
            "geometry": msg.geometry,
            "source_shape": list(msg.source_shape),
            "downsample": msg.downsample,
            "model": msg.model,
            "prompts": [
                {"id": p.id, "text": p.text, "score": p.score, "present": p.present} for p in msg.prompts
            ],
        }
        masks = (
            np.stack([p.mask for p in msg.prompts])
            if msg.prompts
            else np.zeros((0, *msg.mask_shape), np.uint8)
        )
        np.savez_compressed(
            self.out_dir / "masks" / f"{name}.npz",
            masks=masks.astype(np.uint8),
            ids=np.array([p.id for p in msg.prompts], dtype=str),
            texts=np.array([p.text for p in msg.prompts], dtype=str),
        )
        entry["masks_file"] = f"masks/{name}.npz"
        if msg.image is not None:
            write_png_gray8(self.out_dir / "frames" / f"{name}.png", msg.image)
            entry["frame_file"] = f"frames/{name}.png"
        self._log.write(json.dumps(entry, default=str) + "\n")
        self._log.flush()
        self.recorded += 1
        return entry

    def run(self, subscriber: Any, max_messages: int | None = None, idle_timeout: float | None = None) -> int:
        """Record every message (not just the newest: an audit wants them all) until idle."""
        while max_messages is None or self.recorded < max_messages:
            try:
                self.write(subscriber.receive(timeout=idle_timeout, newest=False))
            except SubscriberTimeout:
                break
        return self.recorded

    def close(self) -> None:
        self._log.close()


def read_recording_masks(out_dir: str | Path) -> list[dict[str, Any]]:
    """The recorded headers with their masks loaded (for audits and tests)."""
    root = Path(out_dir)
    rows = []
    for line in (root / "headers.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        with np.load(root / entry["masks_file"]) as z:
            entry["masks"] = z["masks"]
        rows.append(entry)
    return rows
