"""``fluorosam-rt bridge web``: the node's live output in any browser, as one more subscriber.

A technician at the C-arm, a navigation vendor's engineer or someone running a latency study
opens a page and sees the frame with each prompt's mask, the legend, fps, latency and drops,
and can add or remove prompts through the node's control socket. Nothing to install on their
side; on the node's side this is a torch-free bridge process (aiohttp), like the other relays.

Latest frame wins, end to end:

* the viewer's SUB socket keeps at most two messages and hands out only the newest
  (:class:`bridge.AsyncSubscriber`); a slow viewer makes the node's PUB drop messages for it,
  never wait;
* the page acknowledges each frame once it has drawn it; a tab gets a new frame only while it
  has fewer than ``CREDIT`` frames unacknowledged, and then the newest one. A backgrounded tab
  (the browser stops drawing it) gets nothing until it is shown again, then the current frame;
* a frame's browser packet (bridge/web_packet.py) is built once, only when some tab is ready
  for it, and shared by all tabs.

Security: binds 127.0.0.1 by default, and then only answers requests addressed to a loopback
name (a web page elsewhere cannot reach it through DNS rebinding). Binding to any other address
needs an access token; TLS with ``--certfile``/``--keyfile``. WebSocket connections from pages
of another origin are refused. CURVE keys are used towards the node when given.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
from aiohttp import WSMsgType, web

from .aio import AsyncSubscriber
from .control_client import AsyncControlClient, ControlTimeout
from .curve import CurveClient
from .protocol import MaskMessage, ProtocolError
from .subscriber import SubscriberTimeout
from .web_packet import JPEG_QUALITY, RollingStats, build_frame_packet

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("web_static")
STATIC_FILES = {
    "/": ("index.html", "text/html"),
    "/viewer.js": ("viewer.js", "text/javascript"),
    "/viewer.css": ("viewer.css", "text/css"),
}
CREDIT = 2  # frames a tab may have unacknowledged: one being drawn, one on the way
TOKEN_COOKIE = "fsam_viewer_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# What a page may ask the node for. "shutdown" and "flow" are for operators' tools, not a page.
PAGE_COMMANDS = ("add", "remove", "set", "list")
MAX_PAGE_MESSAGE = 64 * 1024
MAX_PENDING_COMMANDS = 4  # per tab: a page that floods commands gets "busy", not a growing queue
NODE_STATUS_KEYS = (
    "stream",
    "model",
    "engine",
    "fps",
    "uptime_s",
    "received",
    "published",
    "dropped",
    "in_flight",
    "prompts",
    "last_error",
)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


class WebConfigError(ValueError):
    """Settings that would make the viewer unsafe or unable to start; the message says which."""


@dataclass
class WebOptions:
    connect: list[str]
    topic: str = ""
    control: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    curve: CurveClient | None = None
    show_patient: bool = False
    max_fps: float = 30.0  # per tab; the node may publish faster than anyone can watch
    jpeg_quality: int = JPEG_QUALITY
    status_period_s: float = 0.5
    control_period_s: float = 1.0
    control_timeout_s: float = 3.0


def is_loopback(host: str) -> bool:
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_options(opts: WebOptions) -> None:
    """Refuse settings that would expose the page without protection."""
    if not is_loopback(opts.host) and not opts.token:
        raise WebConfigError(
            f"binding to {opts.host} makes the page reachable from other machines: give --token or "
            "--token-file (and preferably --certfile/--keyfile), or use an SSH tunnel to 127.0.0.1"
        )
    if opts.token is not None and len(opts.token) < 16:
        raise WebConfigError("the access token must be at least 16 characters")
    if bool(opts.certfile) != bool(opts.keyfile):
        raise WebConfigError("TLS needs both --certfile and --keyfile")
    if not 0 < opts.max_fps <= 1000:
        raise WebConfigError("--max-fps must be in (0, 1000]")
    if not 1 <= opts.jpeg_quality <= 95:
        raise WebConfigError("--jpeg-quality must be in [1, 95]")


def ssl_context(opts: WebOptions) -> ssl.SSLContext | None:
    if not opts.certfile:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(opts.certfile, opts.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(f"cannot load the TLS certificate/key: {exc}") from exc
    return ctx


# --------------------------------------------------------------------------- frames and tabs


@dataclass(eq=False)  # tabs are kept in a set, by identity
class Tab:
    """One connected page: its socket, its flow-control credit and what it still has to get."""

    ws: web.WebSocketResponse
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    credit: int = CREDIT
    sent_version: int = -1
    status_version: int = -1
    last_frame_sent: float = 0.0
    outbox: deque[str] = field(default_factory=deque)
    frames_sent: int = 0


class Hub:
    """The newest message, its browser packet (built once, on demand) and the connected tabs."""

    def __init__(self, opts: WebOptions) -> None:
        self.opts = opts
        self.latest: MaskMessage | None = None
        self.arrived_wall_ns = 0
        self.version = 0  # bumped per message taken from the stream
        self._packet: tuple[int, bytes] | None = None
        self._build_lock = asyncio.Lock()
        self.tabs: set[Tab] = set()
        self.rolling = RollingStats()
        self.status: dict[str, Any] = {"type": "status"}
        self.status_json = json.dumps(self.status)
        self.status_version = 0
        self.packets_built = 0
        self.received = 0
        self.bad_messages = 0
        self.last_error: str | None = None

    def take(self, msg: MaskMessage) -> None:
        self.arrived_wall_ns = time.time_ns()
        self.rolling.add(msg, self.arrived_wall_ns)
        self.latest = msg
        self.version += 1
        self.received += 1
        self.wake_all()

    def wake_all(self) -> None:
        for tab in self.tabs:
            tab.wake.set()

    def set_status(self, status: dict[str, Any]) -> None:
        self.status = status
        self.status_json = json.dumps(status, allow_nan=False, default=str)
        self.status_version += 1
        self.wake_all()

    async def packet(self) -> tuple[int, bytes]:
        """(version, packet) of the newest message; built once per message, in a worker thread
        so a JPEG encode never holds up the WebSocket traffic of other tabs."""
        async with self._build_lock:
            if self._packet is not None and self._packet[0] == self.version:
                return self._packet
            msg, version, arrived = self.latest, self.version, self.arrived_wall_ns
            assert msg is not None
            data = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: build_frame_packet(msg, arrived, self.opts.show_patient, self.opts.jpeg_quality),
            )
            self._packet = (version, data)
            self.packets_built += 1
            return self._packet


async def tab_sender(hub: Hub, tab: Tab) -> None:
    """The only writer of a tab's socket: replies, status, and the newest frame when it has credit."""
    min_gap = 1.0 / hub.opts.max_fps
    ws = tab.ws
    while not ws.closed:
        await tab.wake.wait()
        tab.wake.clear()
        while tab.outbox:
            await ws.send_str(tab.outbox.popleft())
        if tab.status_version != hub.status_version:
            tab.status_version = hub.status_version
            await ws.send_str(hub.status_json)
        if hub.latest is None or tab.credit <= 0 or tab.sent_version == hub.version:
            continue
        wait = tab.last_frame_sent + min_gap - time.monotonic()
        if wait > 0:  # rate cap: come back when the gap has passed; newer frames may arrive
            asyncio.get_running_loop().call_later(wait, tab.wake.set)
            continue
        version, data = await hub.packet()
        await ws.send_bytes(data)
        tab.sent_version = version
        tab.credit -= 1
        tab.frames_sent += 1
        tab.last_frame_sent = time.monotonic()
        if tab.sent_version != hub.version:
            tab.wake.set()


# --------------------------------------------------------------------------- the node


async def follow_stream(hub: Hub, sub: AsyncSubscriber, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            msg = await sub.receive(timeout=0.5)
        except SubscriberTimeout:
            continue
        except (ProtocolError, zmq.ZMQError) as exc:  # count it, keep following the stream
            hub.bad_messages += 1
            hub.last_error = str(exc)
            log.warning("message not taken: %s", exc)
            await asyncio.sleep(0.05)
            continue
        hub.take(msg)


def node_summary(status: dict[str, Any] | None, stats: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if status:
        out.update({k: status[k] for k in NODE_STATUS_KEYS if k in status})
    if stats:
        lat = stats.get("latency") or {}
        out["latency"] = {k: lat[k] for k in ("end_to_end", "source_to_published") if k in lat}
        out["dropped_total"] = stats.get("dropped_total")
    return out


async def status_loop(
    hub: Hub,
    sub: AsyncSubscriber,
    control: AsyncControlClient | None,
    stop: asyncio.Event,
    poke: asyncio.Event,
) -> None:
    """Viewer figures every status period; the node's status and stats every control period
    (at once after a prompt change, so the page's prompt list follows)."""
    node: dict[str, Any] = {}
    control_state: str | None = None if control is None else "connecting"
    next_control = 0.0
    while not stop.is_set():
        now = time.monotonic()
        if control is not None and (now >= next_control or poke.is_set()):
            poke.clear()
            next_control = now + hub.opts.control_period_s
            try:
                st = await control.request({"cmd": "status"}, hub.opts.control_timeout_s)
                sa = await control.request({"cmd": "stats"}, hub.opts.control_timeout_s)
                node = node_summary(st.get("status"), sa.get("stats"))
                control_state = "ok"
            except (ControlTimeout, ValueError) as exc:
                control_state = f"no answer: {exc}"
            except Exception as exc:  # the figures must keep coming whatever the control socket does
                log.exception("status request failed")
                control_state = f"error: {exc}"
        gaps = sub.gaps
        hub.set_status(
            {
                "type": "status",
                "viewer": {
                    **hub.rolling.summary(),
                    "received": gaps.received,
                    "skipped": gaps.skipped,
                    "lost": gaps.lost,
                    "node_dropped": gaps.node_dropped,
                    "bad_messages": hub.bad_messages,
                    "tabs": len(hub.tabs),
                    "connect": hub.opts.connect,
                },
                "node": node,
                "control": control_state,
            }
        )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(poke.wait(), hub.opts.status_period_s)


def page_command(raw: Any) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None]:
    """(request id, request to forward, or an error reply) for one command message of a page."""
    if not isinstance(raw, dict):
        return None, None, _error("bad_request", "a command message must be a JSON object")
    rid, req = raw.get("id"), raw.get("request")
    if not isinstance(req, dict) or req.get("cmd") not in PAGE_COMMANDS:
        cmd = req.get("cmd") if isinstance(req, dict) else None
        return rid, None, _error("not_allowed", f"the page may send {list(PAGE_COMMANDS)}, not {cmd!r}")
    return rid, req, None


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


# --------------------------------------------------------------------------- HTTP


class Viewer:
    """The aiohttp application and the tasks that feed it."""

    def __init__(self, opts: WebOptions) -> None:
        check_options(opts)
        self.opts = opts
        self.port = opts.port
        self.hub = Hub(opts)
        self.stop = asyncio.Event()
        self.poke = asyncio.Event()
        self.sub: AsyncSubscriber | None = None
        self.control: AsyncControlClient | None = None
        self._tasks: list[asyncio.Task] = []
        self.app = web.Application(middlewares=[self._guard], client_max_size=MAX_PAGE_MESSAGE)
        for path in STATIC_FILES:
            self.app.router.add_get(path, self._static)
        self.app.router.add_get("/ws", self._websocket)
        self.app.on_response_prepare.append(self._headers)
        self.app.on_startup.append(self._start)
        self.app.on_shutdown.append(self._close_tabs)
        self.app.on_cleanup.append(self._cleanup)

    # -- lifecycle

    async def _start(self, _app: web.Application) -> None:
        self.sub = AsyncSubscriber(self.opts.connect, topic=self.opts.topic, curve=self.opts.curve)
        if self.opts.control:
            self.control = AsyncControlClient(
                self.opts.control, self.opts.control_timeout_s, curve=self.opts.curve
            )
        self._tasks = [
            asyncio.create_task(follow_stream(self.hub, self.sub, self.stop), name="web-stream"),
            asyncio.create_task(
                status_loop(self.hub, self.sub, self.control, self.stop, self.poke), name="web-status"
            ),
        ]
        for t in self._tasks:
            t.add_done_callback(_report_death)

    async def _close_tabs(self, _app: web.Application) -> None:
        for tab in list(self.hub.tabs):
            await tab.ws.close(code=1001, message=b"viewer stopping")

    async def _cleanup(self, _app: web.Application) -> None:
        self.stop.set()
        self.poke.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sub is not None:
            self.sub.close()
        if self.control is not None:
            self.control.close()

    # -- protection

    def _token_ok(self, request: web.Request) -> bool:
        token = self.opts.token
        if not token:
            return True
        offered = [request.cookies.get(TOKEN_COOKIE, ""), request.query.get("token", "")]
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            offered.append(auth[7:])
        return any(o and hmac.compare_digest(o.encode(), token.encode()) for o in offered)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if is_loopback(self.opts.host) and not is_loopback(request.url.host or ""):
            # Bound to loopback but addressed by another name: a DNS-rebinding page, refuse.
            return web.Response(status=421, text="this viewer answers only to localhost / 127.0.0.1\n")
        if not self._token_ok(request):
            return web.Response(status=401, text="access token required: open the URL the viewer printed\n")
        if self.opts.token and "token" in request.query and request.path == "/":
            # Keep the token out of the address bar, history and Referer: a cookie from now on.
            resp = web.Response(status=302, headers={"Location": "/"})
            resp.set_cookie(
                TOKEN_COOKIE,
                request.query["token"],
                httponly=True,
                samesite="Strict",
                secure=bool(self.opts.certfile),
            )
            return resp
        return await handler(request)

    async def _headers(self, _request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"

    # -- handlers

    async def _static(self, request: web.Request) -> web.Response:
        name, ctype = STATIC_FILES[request.path]
        return web.Response(body=(STATIC_DIR / name).read_bytes(), content_type=ctype, charset="utf-8")

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            # A page from another site (cross-site WebSocket hijacking): no frames, no commands.
            raise web.HTTPForbidden(text="cross-origin WebSocket refused\n")
        ws = web.WebSocketResponse(compress=False, heartbeat=20.0, max_msg_size=MAX_PAGE_MESSAGE)
        await ws.prepare(request)
        tab = Tab(ws)
        self.hub.tabs.add(tab)
        tab.wake.set()
        sender = asyncio.create_task(tab_sender(self.hub, tab))
        pending: set[asyncio.Task] = set()
        try:
            async for m in ws:
                if m.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(m.data)
                except json.JSONDecodeError:
                    continue
                kind = data.get("type") if isinstance(data, dict) else None
                if kind == "ack":
                    tab.credit = min(CREDIT, tab.credit + 1)
                    tab.wake.set()
                elif kind == "command" and len(pending) >= MAX_PENDING_COMMANDS:
                    rid = data.get("id")
                    busy = _error("busy", f"{MAX_PENDING_COMMANDS} commands are still waiting for the node")
                    reply = {"type": "reply", "id": rid, "request": None, "reply": busy}
                    tab.outbox.append(json.dumps(reply))
                    tab.wake.set()
                elif kind == "command":
                    task = asyncio.create_task(self._command(tab, data))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if sender.done():
                    break
        finally:
            self.hub.tabs.discard(tab)
            sender.cancel()
            for t in pending:
                t.cancel()
            await asyncio.gather(sender, *pending, return_exceptions=True)
        return ws

    async def _command(self, tab: Tab, data: dict[str, Any]) -> None:
        rid, req, reply = page_command(data)
        if req is not None:
            if self.control is None:
                reply = _error("no_control", "the viewer was started without --control")
            else:
                try:
                    reply = await self.control.request(req, self.opts.control_timeout_s)
                except ControlTimeout as exc:
                    reply = _error("timeout", str(exc))
                except ValueError as exc:
                    reply = _error("bad_reply", str(exc))
                if reply.get("ok") and req["cmd"] != "list":
                    self.poke.set()  # refresh the prompt list from the node now
        tab.outbox.append(json.dumps({"type": "reply", "id": rid, "request": req, "reply": reply}))
        tab.wake.set()


def _report_death(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_name(), task.exception(), exc_info=task.exception())


def page_url(opts: WebOptions, port: int | None = None, with_token: bool = True) -> str:
    host = opts.host
    if host in ("0.0.0.0", "::", ""):
        host = "HOSTNAME"  # the machine's name as the browser reaches it
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if opts.certfile else "http"
    url = f"{scheme}://{host}:{port or opts.port}/"
    if with_token and opts.token:
        url += f"?token={opts.token}"
    return url


async def serve(opts: WebOptions, ready: Any = None, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or forever); ``ready(viewer)`` is called once it listens
    (``viewer.port`` is the port it got, also for ``port=0``)."""
    viewer = Viewer(opts)
    runner = web.AppRunner(viewer.app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port, ssl_context=ssl_context(opts))
    try:
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            viewer.port = server.sockets[0].getsockname()[1]
        if ready is not None:
            ready(viewer)
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()
