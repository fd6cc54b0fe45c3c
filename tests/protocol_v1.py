"""FROZEN COPY of bridge/protocol.py as released with protocol version 1 (commit 3d01d2e), kept only
so the tests can prove a version-1 subscriber still reads what a node publishes for it. Never edit:
it stands for code already deployed next to navigation systems.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
MESSAGE_KIND = "masks"
ENCODINGS = ("u8", "bits")
STAGES = (
    "source",  # when the source says the frame was made (device clock, or arrival for DICOM)
    "received",  # when the frame entered the node
    "dequeued",  # when inference took it from the input hand-off
    "preprocessed",
    "encoded",
    "decoded",
    "postprocessed",
    "published",  # just before the message was handed to ZeroMQ
)
# Guards against a hostile or corrupt header: real headers are a few kilobytes.
MAX_HEADER_BYTES = 1 << 20
MAX_PROMPTS = 256
MAX_SIDE = 1 << 15


class ProtocolError(ValueError):
    """A message that does not follow the wire protocol; the message says what is wrong."""


class ProtocolVersionError(ProtocolError):
    """The publisher speaks another protocol version than this subscriber."""


@dataclass
class PromptResult:
    id: str
    text: str
    score: float
    present: bool
    mask: np.ndarray  # uint8 [h, w], 1 inside the structure, at the header's mask size


@dataclass
class MaskMessage:
    """One published frame: its masks and everything needed to place them in time and space."""

    stream: str
    frame_id: int
    seq: int  # publisher's message counter: a jump means messages were lost between node and here
    timestamps_ns: dict[str, int]  # stage -> wall-clock time (ns since the Unix epoch)
    source: dict[str, Any]  # source kind, metadata, DICOM UIDs
    geometry: dict[str, Any]  # pixel spacing, distances, angles (absent keys: unknown)
    source_shape: tuple[int, int]  # (height, width) of the source frame
    downsample: int  # mask pixel (i, j) covers source pixels (i*d .. i*d+d-1, j*d .. j*d+d-1)
    encoding: str  # on the wire: "u8" (one byte per pixel) or "bits" (np.packbits, MSB first)
    prompts: list[PromptResult] = field(default_factory=list)
    image: np.ndarray | None = None  # optional uint8 preview of the source, at the mask size
    version: int = PROTOCOL_VERSION
    model: str = ""  # optional: the model that made the masks (a DICOM SEG names its algorithm)

    @property
    def mask_shape(self) -> tuple[int, int]:
        return mask_shape(self.source_shape, self.downsample)

    def latency_ms(self, start: str = "received", end: str = "published") -> float:
        t = self.timestamps_ns
        return (t[end] - t[start]) / 1e6


def mask_shape(source_shape: Sequence[int], downsample: int) -> tuple[int, int]:
    """Masks are ceil(H / d) x ceil(W / d): every source pixel belongs to exactly one mask pixel."""
    h, w = int(source_shape[0]), int(source_shape[1])
    return -(-h // downsample), -(-w // downsample)


def encode_mask(mask: np.ndarray, encoding: str) -> np.ndarray:
    """Bool/uint8 mask -> contiguous uint8 buffer for the wire (no copy when already uint8 0/1)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ProtocolError(f"a mask must be 2-D, got shape {m.shape}")
    if encoding == "u8":
        return np.ascontiguousarray(m if m.dtype == np.uint8 else m.astype(np.uint8))
    if encoding == "bits":
        return np.packbits(m.astype(bool, copy=False), axis=None)
    raise ProtocolError(f"unknown mask encoding {encoding!r}; expected one of {ENCODINGS}")


def decode_mask(buf: bytes | memoryview, shape: tuple[int, int], encoding: str) -> np.ndarray:
    h, w = shape
    data = np.frombuffer(buf, dtype=np.uint8)
    if encoding == "u8":
        if data.size != h * w:
            raise ProtocolError(f"u8 mask payload has {data.size} bytes, expected {h * w} ({h}x{w})")
        return data.reshape(h, w)
    if encoding == "bits":
        want = -(-h * w // 8)
        if data.size != want:
            raise ProtocolError(f"bit-packed mask payload has {data.size} bytes, expected {want}")
        return np.unpackbits(data, count=h * w).reshape(h, w)
    raise ProtocolError(f"unknown mask encoding {encoding!r}; expected one of {ENCODINGS}")


def _plain(value: Any) -> Any:
    """Metadata as msgpack-safe plain types (tuples -> lists, numpy scalars -> Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    return str(value)


def encode_message(msg: MaskMessage) -> list[bytes | np.ndarray]:
    """Message -> multipart frames; mask buffers are returned as arrays for zero-copy sends."""
    if msg.encoding not in ENCODINGS:
        raise ProtocolError(f"unknown mask encoding {msg.encoding!r}; expected one of {ENCODINGS}")
    shape = msg.mask_shape
    payloads: list[bytes | np.ndarray] = []
    for p in msg.prompts:
        if tuple(p.mask.shape) != shape:
            raise ProtocolError(f"mask of prompt {p.id!r} is {p.mask.shape}, the header says {shape}")
        payloads.append(encode_mask(p.mask, msg.encoding))
    header: dict[str, Any] = {
        "v": msg.version,
        "kind": MESSAGE_KIND,
        "stream": msg.stream,
        "frame_id": int(msg.frame_id),
        "seq": int(msg.seq),
        "t": {k: int(v) for k, v in msg.timestamps_ns.items()},
        "source": _plain(msg.source),
        "geometry": _plain(msg.geometry),
        "mask": {
            "encoding": msg.encoding,
            "height": shape[0],
            "width": shape[1],
            "downsample": int(msg.downsample),
            "source_height": int(msg.source_shape[0]),
            "source_width": int(msg.source_shape[1]),
        },
        "prompts": [
            {"id": p.id, "text": p.text, "score": float(p.score), "present": bool(p.present)}
            for p in msg.prompts
        ],
    }
    if msg.model:
        header["model"] = str(msg.model)
    if msg.image is not None:
        img = np.ascontiguousarray(msg.image, dtype=np.uint8)
        if img.shape != shape:
            raise ProtocolError(f"preview image is {img.shape}, masks are {shape}")
        header["image"] = {"encoding": "u8", "height": shape[0], "width": shape[1]}
        payloads.append(img)
    return [msg.stream.encode(), msgpack.packb(header, use_bin_type=True), *payloads]


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def decode_header(buf: bytes | memoryview) -> dict[str, Any]:
    """Parse and validate a header (a subscriber can check the version before touching payloads)."""
    _need(len(buf) <= MAX_HEADER_BYTES, f"header is {len(buf)} bytes, more than {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(bytes(buf), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for truncated or corrupt input
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    _need(isinstance(header, dict), "header is not a map")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"publisher speaks protocol version {version!r}, this subscriber speaks {PROTOCOL_VERSION}; "
            "upgrade the side that is older"
        )
    _need(header.get("kind") == MESSAGE_KIND, f"unknown message kind {header.get('kind')!r}")
    for key, typ in (("stream", str), ("frame_id", int), ("seq", int), ("t", dict), ("mask", dict)):
        _need(isinstance(header.get(key), typ), f"header field {key!r} is missing or not a {typ.__name__}")
    for key in ("source", "geometry"):
        _need(isinstance(header.get(key, {}), dict), f"header field {key!r} is not a map")
    _need(isinstance(header.get("model", ""), str), "header field 'model' is not a string")
    m = header["mask"]
    for key in ("height", "width", "downsample", "source_height", "source_width"):
        v = m.get(key)
        _need(
            isinstance(v, int) and 0 < v <= MAX_SIDE, f"mask field {key!r} is missing or out of range: {v!r}"
        )
    _need(m.get("encoding") in ENCODINGS, f"unknown mask encoding {m.get('encoding')!r}")
    _need(
        (m["height"], m["width"]) == mask_shape((m["source_height"], m["source_width"]), m["downsample"]),
        "mask size does not match source size and downsample factor",
    )
    prompts = header.get("prompts")
    _need(isinstance(prompts, list) and len(prompts) <= MAX_PROMPTS, "header field 'prompts' is invalid")
    for p in prompts:
        _need(
            isinstance(p, dict)
            and isinstance(p.get("id"), str)
            and isinstance(p.get("text"), str)
            and isinstance(p.get("score"), (int, float))
            and isinstance(p.get("present"), bool),
            f"invalid prompt entry {p!r}",
        )
    return header


def decode_message(frames: Sequence[bytes | memoryview]) -> MaskMessage:
    """Multipart frames -> MaskMessage. Raises ProtocolError (or ProtocolVersionError) if invalid."""
    _need(len(frames) >= 2, f"a message has at least 2 parts (topic, header), got {len(frames)}")
    header = decode_header(frames[1])
    try:
        topic = bytes(frames[0]).decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("topic is not UTF-8") from exc
    _need(topic == header["stream"], f"topic {topic!r} does not match the header's stream")
    m = header["mask"]
    shape = (m["height"], m["width"])
    n = len(header["prompts"])
    has_image = "image" in header
    want = 2 + n + (1 if has_image else 0)
    _need(len(frames) == want, f"message has {len(frames)} parts, the header announces {want}")
    prompts = [
        PromptResult(
            id=p["id"],
            text=p["text"],
            score=float(p["score"]),
            present=p["present"],
            mask=decode_mask(frames[2 + i], shape, m["encoding"]),
        )
        for i, p in enumerate(header["prompts"])
    ]
    image = decode_mask(frames[-1], shape, "u8") if has_image else None
    return MaskMessage(
        stream=header["stream"],
        frame_id=header["frame_id"],
        seq=header["seq"],
        timestamps_ns=dict(header["t"]),
        source=header.get("source", {}),
        geometry=header.get("geometry", {}),
        source_shape=(m["source_height"], m["source_width"]),
        downsample=m["downsample"],
        encoding=m["encoding"],
        prompts=prompts,
        image=image,
        version=header["v"],
        model=header.get("model", ""),
    )
