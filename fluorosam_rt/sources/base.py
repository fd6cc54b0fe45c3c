"""The frame type and the contract every source keeps.

Sources push: each runs its own thread (or the DICOM server's association threads) and hands
frames to a sink, the node's latest-frame-wins slot. The base class, not each source, assigns
frame ids, so ids are monotonic across reconnects, associations and replay loops.
"""

from __future__ import annotations

import itertools
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bridge.protocol import PATIENT_KEYS

__all__ = [
    "GEOMETRY_KEYS",
    "PATIENT_KEYS",
    "Frame",
    "FrameMeta",
    "FrameSink",
    "Source",
    "SourceError",
    "frame_meta",
    "wait_or_stop",
]


class SourceError(RuntimeError):
    """A source that cannot start (bad path, port in use, no device); the message says why."""


# DICOM attributes that place a mask in space; published as the message's "geometry".
GEOMETRY_KEYS = (
    "PixelSpacing",
    "ImagerPixelSpacing",
    "DistanceSourceToDetector",
    "DistanceSourceToPatient",
    "DistanceSourceToIsocenter",
    "PositionerPrimaryAngle",
    "PositionerSecondaryAngle",
    "FrameTime",
)


class FrameMeta(Mapping[str, Any]):
    """A frame's metadata, split once into the two maps its mask message publishes.

    ``source``: the source kind, UIDs, patient and study keys, frame index, ... (the message's
    ``source``). ``geometry``: the ``GEOMETRY_KEYS`` that have a value (the message's
    ``geometry``). Built by :func:`frame_meta` (a source calls ``Source.frame_meta``) and taken
    by the node as is. Read as one mapping (``meta["FrameTime"]``) by whoever needs both.
    """

    __slots__ = ("geometry", "source")

    def __init__(self, source: Mapping[str, Any], geometry: Mapping[str, Any]) -> None:
        self.source = dict(source)
        self.geometry = dict(geometry)

    def __getitem__(self, key: str) -> Any:
        return self.source[key] if key in self.source else self.geometry[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.source
        yield from self.geometry

    def __len__(self) -> int:
        return len(self.source) + len(self.geometry)

    def __repr__(self) -> str:
        return f"FrameMeta(source={self.source!r}, geometry={self.geometry!r})"


def frame_meta(kind: str | None, fields: Mapping[str, Any], **extra: Any) -> FrameMeta:
    """The one way a frame's metadata is built: ``kind`` (the source), what was read, what the source adds.

    ``fields``: what the reader found (imageio's and the DICOM dataset's keys); ``extra``: what
    the source itself knows (calling AE, replay index, capture ROI). Geometry keys without a value
    (an invalid Pixel Spacing is read as None) are left out, so consumers never divide by them.
    """
    merged = {"source": kind, **fields, **extra} if kind is not None else {**fields, **extra}
    geometry = {k: merged[k] for k in GEOMETRY_KEYS if merged.get(k) is not None}
    return FrameMeta({k: v for k, v in merged.items() if k not in GEOMETRY_KEYS}, geometry)


@dataclass
class Frame:
    """One X-ray frame on its way through the node.

    ``pixels``: 2-D gray, bright = dense, in the source's own dtype. ``frame_id``: increasing within
    one node run (the source's ``emit`` assigns it). ``source_ts_ns``: wall-clock ns when the frame
    was made (a device clock) or arrived (a DICOM C-STORE), the start of every latency the node
    reports. ``meta``: a :class:`FrameMeta` (a plain mapping is split by :func:`frame_meta` with
    no source kind). ``received_ns``: set by the node when the frame enters it.
    """

    pixels: np.ndarray  # 2-D gray (bright = dense), native dtype
    frame_id: int  # monotonically increasing within one node run
    source_ts_ns: int  # wall-clock ns when the source made (or received) the frame
    meta: FrameMeta = field(default_factory=lambda: FrameMeta({}, {}))  # source and geometry maps
    received_ns: int = 0  # wall-clock ns when the frame entered the node

    def __post_init__(self) -> None:
        if not isinstance(self.meta, FrameMeta):
            self.meta = frame_meta(None, self.meta)


FrameSink = Callable[[Frame], None]

# PATIENT_KEYS: DICOM attributes that identify a patient: carried in each frame's metadata (the
# bridge's DICOM SEG needs them), never logged (the node's status and logs leave them out). The one
# list is bridge.protocol's, which the browser view hides too (the bridge cannot import the node).


class Source(ABC):
    """Where frames come from (a grabber, a DICOM SCP, a replay), pushed into the node's sink.

    The base constructor takes no parameters: subclasses take their own (device, port, path,
    rate) and call it. ``start(sink)`` begins producing frames into ``sink`` (the node's
    ``receive``) on the source's own thread; ``emit`` numbers each frame; ``reject`` counts inputs
    that never became frames; ``finished`` is set when a finite source has emitted everything.
    """

    kind: str = "source"

    def __init__(self) -> None:
        self._sink: FrameSink | None = None
        self._ids = itertools.count()
        self._id_lock = threading.Lock()
        self._stop = threading.Event()
        self.finished = threading.Event()  # set when a finite source has emitted everything
        self.emitted = 0
        self.rejected: Counter[str] = Counter()  # inputs that never became frames, by reason
        self.state = "idle"  # idle, running, reconnecting, finished, stopped, failed
        self.last_error = ""

    def start(self, sink: FrameSink) -> None:
        """Begin producing frames into sink; returns at once (raises SourceError if it cannot)."""
        self._sink = sink
        self._stop.clear()
        self.state = "running"
        self._start()

    def stop(self) -> None:
        self._stop.set()
        self._stop_impl()
        if self.state != "finished":
            self.state = "stopped"

    @abstractmethod
    def _start(self) -> None: ...

    @abstractmethod
    def _stop_impl(self) -> None: ...

    def frame_meta(self, fields: Mapping[str, Any], **extra: Any) -> FrameMeta:
        """This source's frame metadata: :func:`frame_meta` with the source's kind."""
        return frame_meta(self.kind, fields, **extra)

    def emit(self, pixels: np.ndarray, meta: FrameMeta, source_ts_ns: int | None = None) -> Frame:
        """Stamp a frame with the next id and hand it to the node (``meta`` from ``frame_meta``)."""
        if not isinstance(meta, FrameMeta):
            raise TypeError(f"emit takes a FrameMeta (Source.frame_meta), not {type(meta).__name__}")
        with self._id_lock:
            fid = next(self._ids)
            self.emitted += 1
        now = time.time_ns()
        frame = Frame(
            pixels=pixels,
            frame_id=fid,
            source_ts_ns=source_ts_ns if source_ts_ns is not None else now,
            meta=meta,
        )
        if self._sink is not None:
            self._sink(frame)
        return frame

    def reject(self, reason: str, detail: str = "") -> None:
        self.rejected[reason] += 1
        if detail:
            self.last_error = detail

    def describe(self) -> dict[str, Any]:
        """What status reports about the source."""
        return {
            "kind": self.kind,
            "state": self.state,
            "emitted": self.emitted,
            "rejected": dict(self.rejected),
            "last_error": self.last_error,
        }

    def _finish(self) -> None:
        self.state = "finished"
        self.finished.set()


def wait_or_stop(stop: threading.Event, until_monotonic: float) -> bool:
    """Sleep until a deadline; True if asked to stop meanwhile (so loops exit promptly)."""
    delay = until_monotonic - time.monotonic()
    return stop.wait(delay) if delay > 0 else stop.is_set()
