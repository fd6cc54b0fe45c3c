"""An asyncio client of the node's control socket (one JSON request, one JSON reply).

The node side and the full request list are in ``fluorosam_rt/control.py`` and docs/protocol.md;
the bridge may not import that package, so this is the client half for asyncio bridge
processes (the web viewer). A node that does not answer must never wedge the caller, so every
request has a deadline, and the REQ socket is made "relaxed" and "correlated": after a timeout
the next request may be sent at once and a late reply to the old one is discarded, not taken
for the answer to the new one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import zmq
import zmq.asyncio

from .curve import CurveClient

MAX_REPLY_BYTES = 4 * 1024 * 1024  # a status or flow reply is kilobytes; bounds a hostile peer


class ControlTimeout(TimeoutError):
    """The node did not reply within the deadline."""


class AsyncControlClient:
    """``await client.request({"cmd": "status"})``; requests are serialised (REQ is one-at-a-time)."""

    def __init__(
        self,
        endpoint: str,
        timeout: float = 5.0,
        context: zmq.asyncio.Context | None = None,
        curve: CurveClient | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = context or zmq.asyncio.Context.instance()
        self._lock = asyncio.Lock()
        self._sock = self._ctx.socket(zmq.REQ)
        if curve is not None:
            curve.apply(self._sock)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.REQ_RELAXED, 1)
        self._sock.setsockopt(zmq.REQ_CORRELATE, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        self._sock.connect(endpoint)

    async def request(self, req: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """The node's reply as a dict; raises ControlTimeout, or ValueError for a reply that is not JSON."""
        wait = self.timeout if timeout is None else timeout
        async with self._lock:
            await self._sock.send(json.dumps(req).encode())
            try:
                raw = await asyncio.wait_for(self._sock.recv(), wait)
            except asyncio.TimeoutError as exc:
                raise ControlTimeout(f"no reply from {self.endpoint} within {wait:g} s") from exc
        try:
            reply = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"the control socket at {self.endpoint} sent a reply that is not JSON") from exc
        if not isinstance(reply, dict):
            raise ValueError(f"the control socket at {self.endpoint} sent a reply that is not an object")
        return reply

    def close(self) -> None:
        self._sock.close(linger=0)
