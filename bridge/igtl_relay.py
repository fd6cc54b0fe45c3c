"""OpenIGTLink relay: the mask stream as IMAGE messages for 3D Slicer and PLUS-style consumers.

Slicer's OpenIGTLink IF shows each incoming device as a volume node named after the device, so
one prompt must always arrive under one name: ``FluoroSAM_<prompt>``, at most 20 bytes (the
protocol's device-name field); longer prompt ids are cut and suffixed with a short hash so two
prompts can never collide. Each prompt also keeps one label value for the relay's lifetime,
so Slicer's label colour table tells the structures apart when they are shown together.

The image is the mask as a uint8 label map at mask resolution, stamped with the source
frame's time (not the relay's), and placed by :func:`bridge.geometry.ijk_to_ras`. When the
frame carries no pixel size the matrix uses 1 mm and a warning is logged once per stream.

Tools (protocol version 2) go out as navigation software expects them:

* ``FSAMtip_<prompt>``: a POINT message with every tip of that prompt's instances, in RAS mm,
  each named ``<prompt>#<instance id>`` (the id is tracked across frames), group ``tip``;
* ``FSAMaxis_<prompt>``: a TRANSFORM for the largest instance with a tip: origin at the tip,
  z along the tool axis towards the tip, y the image normal (anterior), x = y × z, so a needle
  model in Slicer follows the wire.

The tip and the axis are placed with the same matrix as the IMAGE, so they land on the mask.
A frame without tips sends no POINT (OpenIGTLink has no empty point list); the STRING status
says how many tips each prompt has. A geometry-only stream (no mask planes) sends no IMAGE.

pyigtl keeps up to 100 outgoing messages while no client is connected; the relay clears that
queue while nobody listens, so a client that connects late gets the current anatomy, not a
burst of old frames.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from typing import Any

import numpy as np
import pyigtl

from .geometry import ijk_to_ras
from .protocol import MaskMessage
from .subscriber import SubscriberTimeout

log = logging.getLogger(__name__)

DEVICE_NAME_BYTES = 20  # OpenIGTLink header field
PREFIX = "FluoroSAM_"
TIP_PREFIX = "FSAMtip_"
AXIS_PREFIX = "FSAMaxis_"
STATUS_DEVICE = "FluoroSAM_status"


def device_name(prompt_id: str, prefix: str = PREFIX) -> str:
    """Stable OpenIGTLink device name for a prompt (same id -> same name, always <= 20 bytes)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt_id).strip("_") or "prompt"
    name = prefix + slug
    if len(name.encode()) <= DEVICE_NAME_BYTES:
        return name
    digest = hashlib.sha1(prompt_id.encode()).hexdigest()[:4]
    room = DEVICE_NAME_BYTES - len(prefix) - 5
    return f"{prefix}{slug[:room]}_{digest}"


def source_to_ras(source_matrix: np.ndarray, xy: tuple[float, float]) -> np.ndarray:
    """A point in source pixels (x = column, y = row) -> RAS mm, by ijk_to_ras at downsample 1."""
    return (source_matrix @ np.array([xy[0], xy[1], 0.0, 1.0]))[:3]


def axis_frame(source_matrix: np.ndarray, tip: tuple[float, float], axis: tuple[float, float]) -> np.ndarray:
    """4x4 pose of a tool: origin at the tip, z along the axis towards the tip, y the image normal."""
    z = source_matrix[:3, :2] @ np.asarray(axis, dtype=np.float64)  # pixel direction -> RAS, with spacing
    z /= np.linalg.norm(z)
    y = source_matrix[:3, 2] / np.linalg.norm(source_matrix[:3, 2])
    x = np.cross(y, z)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, z, source_to_ras(source_matrix, tip)
    return m


class IgtlRelay:
    """Builds OpenIGTLink messages from mask messages and serves them on one TCP port."""

    def __init__(
        self,
        port: int = 18944,
        local_only: bool = True,
        iface: str | None = None,
        send_status: bool = True,
        server: Any = None,
    ) -> None:
        # pyigtl installs SIGINT/SIGTERM handlers, so the server must be made on the main thread.
        self.server = server or pyigtl.OpenIGTLinkServer(port=port, local_server=local_only, iface=iface)
        self.send_status = send_status
        self.labels: dict[str, int] = {}  # prompt id -> label value
        self.sent = 0
        self.relayed_frames = 0
        self._warned_streams: set[str] = set()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def label_for(self, prompt_id: str) -> int:
        if prompt_id not in self.labels:
            self.labels[prompt_id] = min(len(self.labels) + 1, 255)
        return self.labels[prompt_id]

    def messages_for(self, msg: MaskMessage) -> list[Any]:
        """The IMAGE messages (and the STRING status) one mask message becomes."""
        matrix, size = ijk_to_ras(msg.geometry, msg.source_shape, msg.downsample)
        source_matrix, _ = ijk_to_ras(msg.geometry, msg.source_shape, 1)
        if not size.known and msg.stream not in self._warned_streams:
            self._warned_streams.add(msg.stream)
            log.warning(
                "stream %r carries no pixel spacing: OpenIGTLink images use 1 mm pixels, "
                "so distances in the navigation system are not to scale",
                msg.stream,
            )
        ts_ns = msg.timestamps_ns.get("source") or msg.timestamps_ns.get("received") or 0
        timestamp = ts_ns / 1e9 if ts_ns else None
        out: list[Any] = []
        for p in msg.prompts:
            out += self._tool_messages(p, source_matrix, timestamp)
            if p.mask is None:
                continue
            label = np.where(p.mask > 0, np.uint8(self.label_for(p.id)), np.uint8(0)).astype(np.uint8)
            out.append(
                pyigtl.ImageMessage(
                    label[None],  # (k, j, i): pyigtl treats a 2-D array as a single column
                    ijk_to_world_matrix=matrix,
                    world_coordinate_system="ras",
                    timestamp=timestamp,
                    device_name=device_name(p.id),
                )
            )
        if self.send_status:
            status = {
                "stream": msg.stream,
                "frame_id": msg.frame_id,
                "prompts": [
                    {
                        "id": p.id,
                        "device": device_name(p.id),
                        "present": p.present,
                        "score": round(p.score, 4),
                        "instances": len(p.geometry.instances) if p.geometry is not None else None,
                        "tips": len(p.geometry.tips) if p.geometry is not None else None,
                    }
                    for p in msg.prompts
                ],
                "spacing": size.basis,
            }
            out.append(
                pyigtl.StringMessage(json.dumps(status), timestamp=timestamp, device_name=STATUS_DEVICE)
            )
        return out

    def _tool_messages(self, p: Any, matrix: np.ndarray, timestamp: float | None) -> list[Any]:
        """POINT (all tips) and TRANSFORM (largest tool's axis) of one prompt, in RAS mm."""
        g = p.geometry
        tools = [i for i in g.instances if i.tip is not None] if g is not None else []
        if not tools:
            return []
        tips = np.array([source_to_ras(matrix, i.tip) for i in tools])
        points = pyigtl.PointMessage(
            positions=tips,
            names=[f"{p.id}#{i.id}"[:63] for i in tools],
            groups="tip",
            timestamp=timestamp,
            device_name=device_name(p.id, TIP_PREFIX),
        )
        main = max(tools, key=lambda i: i.area_px)
        frame = axis_frame(matrix, main.tip, main.axis)
        axis = pyigtl.TransformMessage(frame, timestamp=timestamp, device_name=device_name(p.id, AXIS_PREFIX))
        return [points, axis]

    def relay(self, msg: MaskMessage) -> int:
        """Queue one frame's messages for the connected client; returns how many were queued."""
        with self._lock:
            if not self.server.is_connected():
                with self.server.lock_outgoing_messages:  # nobody listens: keep nothing stale
                    self.server.outgoing_messages.clear()
            items = self.messages_for(msg)
            for item in items:
                self.server.send_message(item, wait=False)
            self.sent += len(items)
            self.relayed_frames += 1
            return len(items)

    def run(
        self,
        subscriber: Any,
        stop: threading.Event | None = None,
        max_messages: int | None = None,
        poll_s: float = 0.2,
    ) -> int:
        """Relay the newest frame each time until stopped or max_messages frames were relayed."""
        stop = stop or threading.Event()
        n = 0
        while not stop.is_set() and (max_messages is None or n < max_messages):
            try:
                msg = subscriber.receive(timeout=poll_s)
            except SubscriberTimeout:
                continue
            self.relay(msg)
            n += 1
        return n

    def close(self) -> None:
        self.server.stop()
