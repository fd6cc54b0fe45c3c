"""What the web viewer sends a browser per frame, and the rolling figures it shows beside it.

A frame goes to the page as one binary WebSocket message, as small as the picture allows:

* 4 bytes: little-endian length N of the JSON header;
* N bytes: the JSON header (frame id, legend, per-stage times, geometry fields when the node
  publishes them, and where each payload lies in the body);
* the body: the display image as a JPEG (when the node publishes a preview), then one plane per
  prompt, either bit-packed (``bits``: one bit per mask pixel, row-major, most significant bit
  first, as the wire protocol's ``bits``) or run lengths (``rle``: little-endian uint32 counts
  of alternating 0 and 1 pixels, starting with 0s), whichever is smaller for that mask.

The page (bridge/web_static/viewer.js) decodes the planes and draws them. Everything here is
plain numpy and Pillow so it can be tested without a server or a browser.

Patient identifiers: the node's messages carry the DICOM patient and study attributes because a
DICOM SEG must repeat them (docs/protocol.md); the page gets only the fields in SAFE_SOURCE_KEYS
unless the viewer is started with ``--show-patient-identifiers``.
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .protocol import PATIENT_KEYS, STAGES, STUDY_KEYS, MaskMessage, PromptResult

# Time between consecutive stamps of the header's ``t`` map, named by the stage that ends it
# as the node's flow accounting names it (fluorosam_rt/service/flow.py SEGMENTS); a stage a frame skipped
# folds into the next one it passed. "transport" is published -> arrival at the viewer.
SEGMENT_NAMES = {
    "received": "ingest",
    "dequeued": "queue",
    "preprocessed": "preprocess",
    "encoded": "encode",
    "decoded": "decode",
    "postprocessed": "postprocess",
    "published": "publish_wait",
}

SAFE_SOURCE_KEYS = ("source", "frame_index", "num_frames", "Modality", "inverted", "frame_interval_ms")
# Shown only with show_patient: who the patient is and which study (bridge.protocol, one list).
IDENTIFYING_KEYS = PATIENT_KEYS + STUDY_KEYS
JPEG_QUALITY = 80


def jpeg_bytes(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """A uint8 grey image as a baseline JPEG (Pillow; the browser decodes it natively)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L").save(
        buf, format="JPEG", quality=quality
    )
    return buf.getvalue()


def run_lengths(mask: np.ndarray) -> np.ndarray:
    """Alternating run lengths of 0s and 1s over the row-major mask, starting with 0s (uint32)."""
    flat = np.asarray(mask).reshape(-1).astype(bool, copy=False)
    if flat.size == 0:
        return np.zeros(1, np.uint32)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size])))
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return runs.astype(np.uint32)


def encode_plane(mask: np.ndarray) -> tuple[str, bytes]:
    """The smaller of the bit-packed and the run-length form of one mask."""
    flat = np.asarray(mask).reshape(-1).astype(bool, copy=False)
    bits_len = -(-flat.size // 8)
    n_edges = int(np.count_nonzero(flat[1:] != flat[:-1])) if flat.size else 0
    if 4 * (n_edges + 2) < bits_len:
        return "rle", run_lengths(flat).astype("<u4").tobytes()
    return "bits", np.packbits(flat).tobytes()


def decode_plane(encoding: str, data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of encode_plane (the page does the same in JS; this is for tests and tools)."""
    h, w = shape
    if encoding == "bits":
        return np.unpackbits(np.frombuffer(data, np.uint8), count=h * w).reshape(h, w)
    if encoding == "rle":
        runs = np.frombuffer(data, "<u4").astype(np.int64)
        if int(runs.sum()) != h * w:
            raise ValueError(f"run lengths add up to {int(runs.sum())}, the mask has {h * w} pixels")
        values = np.arange(runs.size, dtype=np.uint8) % 2
        return np.repeat(values, runs).reshape(h, w)
    raise ValueError(f"unknown plane encoding {encoding!r}")


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy arrays and scalars to lists and numbers, NaN/inf to null."""
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    return str(value)


def _geometry_of(p: PromptResult) -> dict[str, Any]:
    """The prompt's protocol-v2 geometry as the header carries it (source pixels; contours as
    polygons of rings; instances with tool tips and axes: bridge/prompt_geometry.py); {} in v1."""
    g = getattr(p, "geometry", None)
    return _plain(g.to_wire()) if g is not None else {}


def stage_times_ms(t: Mapping[str, int], arrived_wall_ns: int | None = None) -> dict[str, float]:
    """Milliseconds between consecutive stamps this frame has, in the protocol's stage order."""
    out: dict[str, float] = {}
    prev = None
    for stage in STAGES:
        if stage not in t:
            continue
        if prev is not None:
            out[SEGMENT_NAMES.get(stage, stage)] = round((t[stage] - t[prev]) / 1e6, 3)
        prev = stage
    if arrived_wall_ns is not None and "published" in t:
        out["transport"] = round((arrived_wall_ns - t["published"]) / 1e6, 3)
    return out


def node_latency_ms(t: Mapping[str, int]) -> float | None:
    """Frame entered the node -> masks published (the node's own end-to-end figure)."""
    if "received" in t and "published" in t:
        return (t["published"] - t["received"]) / 1e6
    return None


def source_info(source: Mapping[str, Any], show_patient: bool) -> dict[str, Any]:
    keys = SAFE_SOURCE_KEYS + (IDENTIFYING_KEYS if show_patient else ())
    return {k: _plain(source[k]) for k in keys if k in source}


def build_frame_packet(
    msg: MaskMessage,
    arrived_wall_ns: int,
    show_patient: bool = False,
    jpeg_quality: int = JPEG_QUALITY,
) -> bytes:
    """One binary WebSocket message for this frame (layout in the module docstring)."""
    h, w = msg.mask_shape
    body: list[bytes] = []
    offset = 0

    def put(data: bytes) -> dict[str, int]:
        nonlocal offset
        body.append(data)
        loc = {"offset": offset, "length": len(data)}
        offset += len(data)
        return loc

    image = None
    if msg.image is not None:
        image = {"format": "jpeg", **put(jpeg_bytes(msg.image, jpeg_quality))}
    prompts = []
    for p in msg.prompts:
        entry: dict[str, Any] = {"id": p.id, "text": p.text, "score": _plain(float(p.score))}
        entry["present"] = bool(p.present)
        mask = getattr(p, "mask", None)
        if mask is not None and getattr(mask, "size", 0):
            enc, data = encode_plane(mask)
            entry["mask"] = {"encoding": enc, **put(data)}
        entry.update(_geometry_of(p))
        prompts.append(entry)
    lat = node_latency_ms(msg.timestamps_ns)
    header = {
        "type": "frame",
        "stream": msg.stream,
        "frame_id": int(msg.frame_id),
        "seq": int(msg.seq),
        "model": msg.model,
        "version": int(msg.version),
        "width": w,
        "height": h,
        "downsample": int(msg.downsample),
        "source_width": int(msg.source_shape[1]),
        "source_height": int(msg.source_shape[0]),
        "image": image,
        "prompts": prompts,
        "stages_ms": stage_times_ms(msg.timestamps_ns, arrived_wall_ns),
        "latency_ms": None if lat is None else round(lat, 3),
        "source": source_info(msg.source, show_patient),
    }
    spacing = getattr(msg, "spacing", None)  # protocol v2: the source pixel size and its plane
    if spacing is not None:
        header["spacing"] = _plain(spacing.to_wire())
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return struct.pack("<I", len(head)) + head + b"".join(body)


def parse_frame_packet(packet: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, body) of a frame packet; for tests and tools (the page parses it in JS)."""
    (n,) = struct.unpack_from("<I", packet, 0)
    return json.loads(packet[4 : 4 + n]), packet[4 + n :]


# --------------------------------------------------------------------------- rolling figures


@dataclass
class _Seen:
    arrived_mono: float
    seq: int
    latency_ms: float | None
    transport_ms: float | None


class RollingStats:
    """fps, latency quantiles and a sparkline over the messages the viewer received lately.

    fps counts the publisher's messages (``seq``), not the ones this viewer happened to take,
    so a viewer that skips stale messages still reports the node's rate.
    """

    def __init__(self, horizon_s: float = 5.0, keep: int = 600, spark: int = 120) -> None:
        self.horizon_s = horizon_s
        self.spark = spark
        self._seen: deque[_Seen] = deque(maxlen=keep)

    def add(self, msg: MaskMessage, arrived_wall_ns: int, arrived_mono: float | None = None) -> None:
        t = msg.timestamps_ns
        transport = (arrived_wall_ns - t["published"]) / 1e6 if "published" in t else None
        self._seen.append(
            _Seen(
                time.monotonic() if arrived_mono is None else arrived_mono,
                int(msg.seq),
                node_latency_ms(t),
                transport,
            )
        )

    def summary(self, now_mono: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now_mono is None else now_mono
        recent = [s for s in self._seen if now - s.arrived_mono <= self.horizon_s]
        fps = 0.0
        if len(recent) >= 2 and recent[-1].arrived_mono > recent[0].arrived_mono:
            fps = (recent[-1].seq - recent[0].seq) / (recent[-1].arrived_mono - recent[0].arrived_mono)
        lat = np.asarray([s.latency_ms for s in recent if s.latency_ms is not None], np.float64)
        tr = np.asarray([s.transport_ms for s in recent if s.transport_ms is not None], np.float64)
        spark = [round(s.latency_ms, 2) for s in list(self._seen)[-self.spark :] if s.latency_ms is not None]
        return {
            "fps": round(float(fps), 2),
            "frames": len(recent),
            "window_s": self.horizon_s,
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
            "transport_p50_ms": round(float(np.percentile(tr, 50)), 2) if tr.size else None,
            "sparkline_ms": spark,
        }
