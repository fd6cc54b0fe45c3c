"""A blocking subscriber to the node's mask stream that always hands out the newest frame.

A navigation display wants the current anatomy, not a queue of old frames: each ``receive``
drains whatever has arrived and returns only the newest message, counting the ones it skipped.
Lost messages (a jump in the publisher's ``seq``) are counted separately from the frames the
node itself dropped (a jump in ``frame_id`` with no jump in ``seq``), so a consumer can tell a
slow network from a slow model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import zmq

from .curve import CurveClient
from .protocol import MaskMessage, decode_message


class SubscriberTimeout(TimeoutError):
    """No message arrived within the timeout."""


class FrameGapError(RuntimeError):
    """Messages were lost between node and subscriber (raised only when asked: ``on_gap="raise"``).

    A navigation display may prefer to blank its overlay rather than keep showing anatomy whose
    age it cannot vouch for; the message says how many were lost and between which frames.
    """

    def __init__(self, message: str, lost: int, message_obj: MaskMessage) -> None:
        super().__init__(message)
        self.lost = lost
        self.message = message_obj  # the newest message, still usable


class GapTracker:
    """Tells lost messages (seq jumps) from frames the node dropped itself (frame_id jumps).

    Shared by the blocking and the asyncio subscriber so that both count the same way.
    """

    def __init__(self) -> None:
        self.received = 0  # messages handed to the caller
        self.skipped = 0  # older messages discarded because a newer one was waiting
        self.lost = 0  # messages the publisher sent that never arrived (seq gaps)
        self.node_dropped = 0  # frame ids the node never published (its own latest-frame-wins)
        self.last: MaskMessage | None = None

    def update(self, msg: MaskMessage, skipped_now: int) -> int:
        """Account for one handed-out message; returns how many messages were lost just before it."""
        self.skipped += skipped_now
        prev, lost_now = self.last, 0
        if prev is not None and msg.seq > prev.seq:
            seq_gap = msg.seq - prev.seq - 1
            lost_now = max(0, seq_gap - skipped_now)
            self.lost += lost_now
            self.node_dropped += max(0, (msg.frame_id - prev.frame_id - 1) - seq_gap)
        self.last = msg
        self.received += 1
        return lost_now

    def gap_error(self, msg: MaskMessage, lost_now: int, prev_frame: int | None) -> FrameGapError:
        return FrameGapError(
            f"{lost_now} message(s) lost between frame {prev_frame} and frame {msg.frame_id} "
            f"of stream {msg.stream!r} (publisher seq {msg.seq}); the network or this reader is too slow",
            lost_now,
            msg,
        )


def check_on_gap(on_gap: str) -> str:
    if on_gap not in ("count", "raise"):
        raise ValueError(f"on_gap must be 'count' or 'raise', got {on_gap!r}")
    return on_gap


def open_sub_socket(
    ctx: zmq.Context,
    connect: str | list[str],
    topic: str,
    rcvhwm: int,
    rcvbuf: int = 0,
    curve: CurveClient | None = None,
) -> zmq.Socket:
    """A SUB socket that keeps at most rcvhwm messages queued and never lingers on close.

    Shared by the blocking and asyncio subscribers (an asyncio context makes an asyncio socket).
    ``curve``: this client's keys, for a node whose stream is a CURVE server (bridge/curve.py).
    """
    sock = ctx.socket(zmq.SUB)
    if curve is not None:
        curve.apply(sock)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    if rcvbuf:  # bytes the kernel may buffer: bounds how stale a slow reader's frames can be
        sock.setsockopt(zmq.RCVBUF, rcvbuf)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    for ep in [connect] if isinstance(connect, str) else connect:
        sock.connect(ep)
    return sock


class Subscriber:
    def __init__(
        self,
        connect: str | list[str],
        topic: str = "",
        rcvhwm: int = 2,
        rcvbuf: int = 0,
        context: zmq.Context | None = None,
        on_gap: str = "count",
        curve: CurveClient | None = None,
    ) -> None:
        self.on_gap = check_on_gap(on_gap)
        self.gaps = GapTracker()
        self._ctx = context or zmq.Context.instance()
        self._sock = open_sub_socket(self._ctx, connect, topic, rcvhwm, rcvbuf, curve)

    # Counters live in the shared GapTracker; these keep the original attribute names.
    received = property(lambda self: self.gaps.received)
    skipped = property(lambda self: self.gaps.skipped)
    lost = property(lambda self: self.gaps.lost)
    node_dropped = property(lambda self: self.gaps.node_dropped)

    def receive(self, timeout: float | None = None, newest: bool = True) -> MaskMessage:
        """The newest message (or the next one, newest=False).

        Raises SubscriberTimeout, ProtocolError/ProtocolVersionError for a message this side
        cannot read, and FrameGapError after lost messages when ``on_gap="raise"``.
        """
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        if not self._sock.poll(ms):
            raise SubscriberTimeout(f"no message within {timeout} s")
        frames = self._sock.recv_multipart(copy=False)
        skipped_now = 0
        if newest:
            while self._sock.poll(0):
                frames = self._sock.recv_multipart(copy=False)
                skipped_now += 1
        msg = decode_message([f.buffer for f in frames])
        prev_frame = self.gaps.last.frame_id if self.gaps.last is not None else None
        lost_now = self.gaps.update(msg, skipped_now)
        if lost_now and self.on_gap == "raise":
            raise self.gaps.gap_error(msg, lost_now, prev_frame)
        return msg

    def __iter__(self) -> Iterator[MaskMessage]:
        while True:
            yield self.receive()

    def messages(
        self, max_messages: int, timeout: float = 10.0, newest: bool = True
    ) -> Iterator[MaskMessage]:
        """Up to max_messages messages; stops early when none arrives for ``timeout`` seconds."""
        deadline_each = timeout
        for _ in range(max_messages):
            try:
                yield self.receive(timeout=deadline_each, newest=newest)
            except SubscriberTimeout:
                return

    def wait_connected(self, timeout: float = 5.0) -> None:
        """PUB/SUB joins asynchronously; give the subscription a moment to reach the publisher."""
        time.sleep(min(timeout, 0.2))

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
