"""An asyncio client of the node's control socket (one JSON request, one JSON reply).

The node side and the full request list are in ``fluorosam_rt/service/control.py`` and docs/protocol.md;
the bridge may not import that package, so this is the client half for asyncio bridge
processes (the web viewer). A node that does not answer must never wedge the caller, so every
request, send and receive, has one deadline; after a timeout or a socket error the REQ socket
is closed and a new one opened (the "lazy pirate" pattern), so a late reply to an old request
lands on the closed socket and can never be taken for the answer to a new one.
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
        self.curve = curve
        self.reconnects = 0
        self._ctx = context or zmq.asyncio.Context.instance()
        self._lock = asyncio.Lock()
        self._sock = self._open()

    def _open(self) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(zmq.REQ)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        sock.connect(self.endpoint)
        return sock

    async def request(self, req: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """The node's reply as a dict; raises ControlTimeout, or ValueError for a reply that is not JSON."""
        wait = self.timeout if timeout is None else timeout
        async with self._lock:
            try:
                raw = await asyncio.wait_for(self._exchange(json.dumps(req).encode()), wait)
            except (asyncio.TimeoutError, zmq.ZMQError) as exc:
                self._sock.close(linger=0)  # a REQ socket that missed its reply is spent
                self._sock = self._open()
                self.reconnects += 1
                why = f"within {wait:g} s" if isinstance(exc, asyncio.TimeoutError) else f"({exc})"
                raise ControlTimeout(f"no reply from {self.endpoint} {why}") from exc
        try:
            reply = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"the control socket at {self.endpoint} sent a reply that is not JSON") from exc
        if not isinstance(reply, dict):
            raise ValueError(f"the control socket at {self.endpoint} sent a reply that is not an object")
        return reply

    async def _exchange(self, data: bytes) -> bytes:
        await self._sock.send(data)
        return await self._sock.recv()

    def close(self) -> None:
        self._sock.close(linger=0)
