"""ZeroMQ PUB sink for the mask stream.

Why PUB with a small send high-water mark and not CONFLATE: CONFLATE keeps one message per
subscriber but breaks multipart messages, and the protocol needs multipart for zero-copy mask
payloads. A PUB socket never blocks the sender: when a subscriber's queue holds ``sndhwm``
whole messages, newer messages to that subscriber are dropped (atomically, never half a
message) while other subscribers are unaffected. With ``sndhwm`` small, a slow subscriber is
at most a couple of frames (plus kernel socket buffers, bounded by ``sndbuf``) behind, and
its bridge.Subscriber drains to the newest frame on every read.

Three kinds of socket, each a plain PUB with the stream name as topic, so a subscriber chooses
what it gets by the endpoint it connects to (a topic suffix cannot do that: ZeroMQ subscriptions
match by prefix, so a subscriber of "carm0" would also get "carm0.geometry"):

* ``endpoints``: protocol version 2, masks and geometry;
* ``geometry_endpoints``: version 2 without mask planes: outlines, instances, tips and axes only,
  a few kilobytes per frame instead of a megabyte per prompt;
* ``v1_endpoints``: version 1 exactly, for subscribers not yet upgraded.

Each socket numbers its own messages (``seq``), so gap counting works on each.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import zmq

from bridge.protocol import PROTOCOL_VERSION, MaskMessage, encode_message

from .security import CurveKeys, make_server


@dataclass
class Outlet:
    """One PUB socket and the form of message it carries."""

    kind: str  # "full", "geometry" or "v1"
    sock: zmq.Socket
    endpoints: list[str]
    version: int
    planes: bool
    seq: int = 0
    bytes_sent: int = 0
    messages: int = 0


_KINDS = {"full": (PROTOCOL_VERSION, True), "geometry": (PROTOCOL_VERSION, False), "v1": (1, True)}


class MaskPublisher:
    """The node's ZeroMQ PUB sockets: one message per frame to every subscriber.

    ``endpoints``: protocol v2 with masks and geometry. ``geometry_endpoints``: v2 without mask
    planes. ``v1_endpoints``: version 1 exactly, for subscribers not yet upgraded. ``sndhwm``: how
    many whole messages a slow subscriber may have queued before newer ones to it are dropped
    (others unaffected); ``sndbuf``: the kernel send buffer (0: the OS default). ``context``: the
    ZeroMQ context (default: the process's); ``curve``: the node's CURVE keys, to encrypt and
    allow-list.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        sndhwm: int = 2,
        sndbuf: int = 0,
        context: zmq.Context | None = None,
        curve: CurveKeys | None = None,
        geometry_endpoints: Sequence[str] = (),
        v1_endpoints: Sequence[str] = (),
    ) -> None:
        self._ctx = context or zmq.Context.instance()
        self.outlets: list[Outlet] = []
        try:
            for kind, eps in (("full", endpoints), ("geometry", geometry_endpoints), ("v1", v1_endpoints)):
                if eps:
                    self.outlets.append(self._bind(kind, eps, sndhwm, sndbuf, curve))
        except OSError:
            self.close()
            raise
        self._lock = threading.Lock()

    def _bind(
        self, kind: str, endpoints: Sequence[str], sndhwm: int, sndbuf: int, curve: CurveKeys | None
    ) -> Outlet:
        sock = self._ctx.socket(zmq.PUB)
        if curve is not None:  # encrypted, and only allow-listed subscribers (security.py)
            make_server(sock, curve)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.LINGER, 0)
        if sndbuf:
            sock.setsockopt(zmq.SNDBUF, sndbuf)
        bound: list[str] = []
        try:
            for ep in endpoints:
                sock.bind(ep)
                # "tcp://host:*" binds an ephemeral port; report the real one.
                bound.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise OSError(f"cannot bind the mask stream ({kind}) to {ep}: {exc}") from exc
        version, planes = _KINDS[kind]
        return Outlet(kind, sock, bound, version, planes)

    def _endpoints(self, kind: str) -> list[str]:
        return [ep for o in self.outlets if o.kind == kind for ep in o.endpoints]

    @property
    def endpoints(self) -> list[str]:
        """The full stream's endpoints (version 2, masks and geometry)."""
        return self._endpoints("full")

    @property
    def geometry_endpoints(self) -> list[str]:
        return self._endpoints("geometry")

    @property
    def v1_endpoints(self) -> list[str]:
        return self._endpoints("v1")

    @property
    def seq(self) -> int:
        return self.outlets[0].seq if self.outlets else 0

    @property
    def bytes_sent(self) -> int:
        return sum(o.bytes_sent for o in self.outlets)

    def describe(self) -> dict[str, dict[str, int | list[str]]]:
        """Per socket kind: endpoints, messages and bytes sent (what geometry-only saves)."""
        return {
            o.kind: {"endpoints": list(o.endpoints), "messages": o.messages, "bytes_sent": o.bytes_sent}
            for o in self.outlets
        }

    def publish(self, msg: MaskMessage) -> None:
        """Stamp each socket's sequence number and send; never blocks on subscribers."""
        with self._lock:
            for o in self.outlets:
                msg.seq = o.seq
                o.seq += 1
                frames = encode_message(msg, planes=o.planes, version=o.version)
                o.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                o.bytes_sent += sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
                o.messages += 1

    def close(self) -> None:
        for o in self.outlets:
            o.sock.close(linger=0)
