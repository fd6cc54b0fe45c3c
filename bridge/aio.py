"""The asyncio form of the subscriber, for consumers whose display or network loop is asyncio.

It follows the same rules as the blocking :class:`bridge.Subscriber` (newest message wins, the
same gap accounting, the same typed errors) so that switching between the two changes no
behaviour, only the calling convention.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from .curve import CurveClient
from .protocol import MaskMessage, decode_message
from .subscriber import GapTracker, SubscriberTimeout, check_on_gap, open_sub_socket


class AsyncSubscriber:
    """``async for msg in AsyncSubscriber(...)`` yields the newest mask message each time."""

    def __init__(
        self,
        connect: str | list[str],
        topic: str = "",
        rcvhwm: int = 2,
        context: zmq.asyncio.Context | None = None,
        on_gap: str = "count",
        curve: CurveClient | None = None,
    ) -> None:
        self.on_gap = check_on_gap(on_gap)
        self.gaps = GapTracker()
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock = open_sub_socket(self._ctx, connect, topic, rcvhwm, curve=curve)

    async def receive(self, timeout: float | None = None, newest: bool = True) -> MaskMessage:
        """The newest message (or the next, newest=False); raises SubscriberTimeout on timeout."""
        try:
            frames = await asyncio.wait_for(self._sock.recv_multipart(copy=False), timeout)
        except asyncio.TimeoutError as exc:
            raise SubscriberTimeout(f"no message within {timeout} s") from exc
        skipped_now = 0
        if newest:
            while True:
                try:  # a non-blocking read: what is already queued, never a wait
                    frames = await self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                skipped_now += 1
        msg = decode_message([f.buffer for f in frames])
        prev_frame = self.gaps.last.frame_id if self.gaps.last is not None else None
        lost_now = self.gaps.update(msg, skipped_now)
        if lost_now and self.on_gap == "raise":
            raise self.gaps.gap_error(msg, lost_now, prev_frame)
        return msg

    async def messages(
        self, max_messages: int, timeout: float = 10.0, newest: bool = True
    ) -> AsyncIterator[MaskMessage]:
        """Up to max_messages messages; stops early when none arrives for ``timeout`` seconds."""
        for _ in range(max_messages):
            try:
                yield await self.receive(timeout=timeout, newest=newest)
            except SubscriberTimeout:
                return

    def __aiter__(self) -> AsyncIterator[MaskMessage]:
        return self._forever()

    async def _forever(self) -> AsyncIterator[MaskMessage]:
        while True:
            yield await self.receive()

    def close(self) -> None:
        self._sock.close(linger=0)

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
