"""ZeroMQ PUB sink for the mask stream.

Why PUB with a small send high-water mark and not CONFLATE: CONFLATE keeps one message per
subscriber but breaks multipart messages, and the protocol needs multipart for zero-copy mask
payloads. A PUB socket never blocks the sender: when a subscriber's queue holds ``sndhwm``
whole messages, newer messages to that subscriber are dropped (atomically, never half a
message) while other subscribers are unaffected. With ``sndhwm`` small, a slow subscriber is
at most a couple of frames (plus kernel socket buffers, bounded by ``sndbuf``) behind, and
its bridge.Subscriber drains to the newest frame on every read.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import zmq

from bridge.protocol import MaskMessage, encode_message

from .security import CurveKeys, make_server


class MaskPublisher:
    def __init__(
        self,
        endpoints: Sequence[str],
        sndhwm: int = 2,
        sndbuf: int = 0,
        context: zmq.Context | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        if curve is not None:  # encrypted, and only allow-listed subscribers (security.py)
            make_server(self._sock, curve)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        if sndbuf:
            self._sock.setsockopt(zmq.SNDBUF, sndbuf)
        self.endpoints: list[str] = []
        try:
            for ep in endpoints:
                self._sock.bind(ep)
                # "tcp://host:*" binds an ephemeral port; report the real one.
                self.endpoints.append(self._sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise OSError(f"cannot bind the mask stream to {ep}: {exc}") from exc
        self.seq = 0
        self.bytes_sent = 0
        self._lock = threading.Lock()

    def publish(self, msg: MaskMessage) -> None:
        """Stamp the message's sequence number and send it; never blocks on subscribers."""
        with self._lock:
            msg.seq = self.seq
            self.seq += 1
            frames = encode_message(msg)
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            self.bytes_sent += sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)

    def close(self) -> None:
        self._sock.close(linger=0)
