"""OpenIGTLink relay: the mask stream as IMAGE messages for 3D Slicer and PLUS-style consumers.

Slicer's OpenIGTLink IF shows each incoming device as a volume node named after the device, so
one prompt must always arrive under one name: ``FluoroSAM_<prompt>``, at most 20 bytes (the
protocol's device-name field); longer prompt ids are cut and suffixed with a short hash so two
prompts can never collide. Each prompt also keeps one label value for the relay's lifetime,
so Slicer's label colour table tells the structures apart when they are shown together.

The image is the mask as a uint8 label map at mask resolution, stamped with the source
frame's time (not the relay's), and placed by :func:`bridge.geometry.ijk_to_ras`. When the
frame carries no pixel size the matrix uses 1 mm and a warning is logged once per stream.

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
                    }
                    for p in msg.prompts
                ],
                "spacing": size.basis,
            }
            out.append(
                pyigtl.StringMessage(json.dumps(status), timestamp=timestamp, device_name=STATUS_DEVICE)
            )
        return out

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
