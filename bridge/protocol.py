"""The mask stream's wire protocol, shared by the node (publisher) and every subscriber.

It lives here, in a package that needs only numpy and msgpack, so that a navigation system can
consume masks without installing PyTorch, and so that the publisher and the subscribers cannot
drift apart. docs/protocol.md describes the same format for implementers in other languages.

One ZeroMQ multipart message per frame:

* part 0: topic, the UTF-8 stream name (PUB/SUB prefix-filters on it, so one subscriber can
  follow one C-arm);
* part 1: header, a msgpack map (see :class:`MaskMessage` and docs/protocol.md);
* parts 2..K+1: one mask payload per prompt, in the header's prompt order;
* part K+2 (only when the header has ``image``): a uint8 preview of the source frame.

Payloads are raw bytes so that the publisher can hand numpy buffers to ZeroMQ without a copy
and a C subscriber can use them in place.

Version 2 adds each prompt's geometry (outlines, instances with tracked ids, tool tips and axes:
bridge/prompt_geometry.py), the frame's pixel spacing and scene, and geometry-only messages
(``mask.planes`` false: no mask or image parts, a few kilobytes instead of megabytes). This
decoder reads versions 1 and 2; a node can still publish version 1 for subscribers that have not
been upgraded (docs/protocol.md, "Compatibility").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .prompt_geometry import GeometryFormatError, PromptGeometry, Scene, Spacing

PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # what this decoder reads; the publisher writes 2, or 1 on request
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
    "geometry",  # outlines, instances, tools and tracking done (version 2)
    "published",  # just before the message was handed to ZeroMQ
)
# DICOM attributes that identify a patient, and the study attributes a derived object (the DICOM
# SEG) repeats: the node carries both in a frame's ``source`` metadata, never logs the first, and
# the browser view shows both only when asked. Defined here, once, because the bridge cannot
# import the node; the node takes them from here (sources.base, sources.dicom_frames).
PATIENT_KEYS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")
STUDY_KEYS = ("StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")
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
    # uint8 [h, w], 1 inside the structure, at the header's mask size; None in a geometry-only message
    mask: np.ndarray | None
    geometry: PromptGeometry | None = None  # version 2; None in a version-1 message


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
    spacing: Spacing | None = None  # version 2: source pixel size, None when the frame does not say
    scene: Scene | None = None  # version 2: scene id (tracking and smoothing restart on a cut)
    planes: bool = True  # False: a geometry-only message, no mask or image parts on the wire

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


def encode_message(
    msg: MaskMessage, planes: bool | None = None, version: int | None = None
) -> list[bytes | np.ndarray]:
    """Message -> multipart frames; mask buffers are returned as arrays for zero-copy sends.

    ``planes=False`` makes a geometry-only message (version 2); ``version=1`` writes exactly what
    a version-1 subscriber reads (no geometry). Both default to the message's own.
    """
    version = msg.version if version is None else version
    planes = msg.planes if planes is None else planes
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            f"cannot write protocol version {version!r}; this side writes {SUPPORTED_VERSIONS}"
        )
    if version == 1 and not planes:
        raise ProtocolError("protocol version 1 has no geometry-only messages")
    if msg.encoding not in ENCODINGS:
        raise ProtocolError(f"unknown mask encoding {msg.encoding!r}; expected one of {ENCODINGS}")
    shape = msg.mask_shape
    payloads: list[bytes | np.ndarray] = []
    for p in msg.prompts if planes else ():
        if p.mask is None or tuple(p.mask.shape) != shape:
            got = None if p.mask is None else p.mask.shape
            raise ProtocolError(f"mask of prompt {p.id!r} is {got}, the header says {shape}")
        payloads.append(encode_mask(p.mask, msg.encoding))
    header: dict[str, Any] = {
        "v": version,
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
        "prompts": [_prompt_entry(p, version) for p in msg.prompts],
    }
    if version >= 2:
        header["mask"]["planes"] = bool(planes)
        if msg.spacing is not None:
            header["spacing"] = msg.spacing.to_wire()
        if msg.scene is not None:
            header["scene"] = msg.scene.to_wire()
    if msg.model:
        header["model"] = str(msg.model)
    if msg.image is not None and planes:
        img = np.ascontiguousarray(msg.image, dtype=np.uint8)
        if img.shape != shape:
            raise ProtocolError(f"preview image is {img.shape}, masks are {shape}")
        header["image"] = {"encoding": "u8", "height": shape[0], "width": shape[1]}
        payloads.append(img)
    return [msg.stream.encode(), msgpack.packb(header, use_bin_type=True), *payloads]


def _prompt_entry(p: PromptResult, version: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": p.id, "text": p.text, "score": float(p.score), "present": bool(p.present)}
    if version >= 2 and p.geometry is not None:
        entry.update(p.geometry.to_wire())
    return entry


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
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolVersionError(
            f"publisher speaks protocol version {version!r}, this subscriber speaks "
            f"{' and '.join(map(str, SUPPORTED_VERSIONS))}; upgrade the side that is older"
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
    _need(isinstance(m.get("planes", True), bool), "mask field 'planes' is not a boolean")
    _need(version >= 2 or m.get("planes", True), "a version-1 message always carries mask planes")
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
    planes = m.get("planes", True)
    has_image = "image" in header
    _need(planes or not has_image, "a geometry-only message announces an image part")
    want = 2 + (n + (1 if has_image else 0) if planes else 0)
    _need(len(frames) == want, f"message has {len(frames)} parts, the header announces {want}")
    v2 = header["v"] >= 2
    try:
        prompts = [
            PromptResult(
                id=p["id"],
                text=p["text"],
                score=float(p["score"]),
                present=p["present"],
                mask=decode_mask(frames[2 + i], shape, m["encoding"]) if planes else None,
                geometry=PromptGeometry.from_wire(p) if v2 else None,
            )
            for i, p in enumerate(header["prompts"])
        ]
        spacing = Spacing.from_wire(header["spacing"]) if v2 and "spacing" in header else None
        scene = Scene.from_wire(header["scene"]) if v2 and "scene" in header else None
    except GeometryFormatError as exc:
        raise ProtocolError(f"invalid geometry: {exc}") from exc
    image = decode_mask(frames[-1], shape, "u8") if has_image and planes else None
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
        spacing=spacing,
        scene=scene,
        planes=planes,
    )
