"""The control socket: change prompts and read status while frames flow.

A REP socket with one JSON object per request and per reply. Every request is validated in full
before anything changes, so a malformed command gets ``{"ok": false, "error": {...}}`` and leaves
the node exactly as it was. Prompt text is encoded here, on the control thread, never on the
frame path; the new prompt set is used from the next frame on.

Requests (see docs/protocol.md):
  {"cmd": "add", "prompts": [PROMPT, ...]}     PROMPT = "text" or {"text", "id"?, "points"?, "labels"?}
  {"cmd": "remove", "ids": ["id", ...]}
  {"cmd": "set", "prompts": [PROMPT, ...]}
  {"cmd": "list"} | {"cmd": "status"} | {"cmd": "stats"} | {"cmd": "shutdown"}
  {"cmd": "flow", "since"?: N, "limit"?: N}    raw flow-tracking rows (monotonic ns per stage)

add/set replies also carry "hints": per requested prompt {"id", "text", "far", "similarity", "nearest":
[[canonical prompt, similarity], ...]} (fluorosam_rt/prompt_hints/), or null without a hint table.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from typing import Any

import zmq

from ..prompt_hints import PromptHints
from ..prompts import Prompt, PromptError
from .security import CurveKeys, make_server

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
COMMANDS = ("add", "remove", "set", "list", "status", "stats", "flow", "shutdown")
MAX_FLOW_ROWS = 4096
MAX_PROMPTS_PER_REQUEST = 256  # the node's own max_prompts is at most 256 (node_config)


class CommandError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_request(raw: bytes) -> dict[str, Any]:
    """Bytes -> a validated request dict; raises CommandError. Pure, so it can be fuzzed."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise CommandError("too_large", f"request is {len(raw)} bytes; the limit is {MAX_REQUEST_BYTES}")
    try:
        req = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CommandError("bad_json", f"request is not UTF-8 JSON: {exc}") from exc
    if not isinstance(req, dict):
        raise CommandError("bad_request", "request must be a JSON object")
    cmd = req.get("cmd")
    if cmd not in COMMANDS:
        raise CommandError("unknown_command", f"unknown command {cmd!r}; expected one of {list(COMMANDS)}")
    allowed = {"cmd", "prompts"} if cmd in ("add", "set") else {"cmd", "ids"} if cmd == "remove" else {"cmd"}
    if cmd == "flow":
        allowed = {"cmd", "since", "limit"}
    extra = sorted(set(req) - allowed)
    if extra:
        raise CommandError("bad_request", f"unknown field(s) {extra} for command {cmd!r}")
    if cmd in ("add", "set"):
        items = req.get("prompts")
        if not isinstance(items, list) or (cmd == "add" and not items):
            raise CommandError("bad_request", f"{cmd!r} needs 'prompts': a non-empty list")
        if len(items) > MAX_PROMPTS_PER_REQUEST:  # refuse before encoding thousands of texts
            raise CommandError(
                "too_many_prompts", f"{len(items)} prompts; one request may carry {MAX_PROMPTS_PER_REQUEST}"
            )
        req["prompts"] = [parse_prompt(p) for p in items]
        ids = [p.id for p in req["prompts"]]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:  # 'add' would otherwise keep the last silently: say which one was meant
            raise CommandError("bad_prompt", f"duplicate prompt ids in one request: {dup}")
    if cmd == "remove":
        ids = req.get("ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise CommandError("bad_request", "'remove' needs 'ids': a non-empty list of strings")
    if cmd == "flow":
        for key, default, hi in (("since", 0, 2**62), ("limit", MAX_FLOW_ROWS, MAX_FLOW_ROWS)):
            v = req.setdefault(key, default)
            if type(v) is not int or not 0 <= v <= hi:
                raise CommandError("bad_request", f"'flow' field {key!r} must be an integer in [0, {hi}]")
    return req


def parse_prompt(item: Any) -> Prompt:
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict):
        raise CommandError("bad_prompt", f"a prompt is a string or an object, got {type(item).__name__}")
    extra = sorted(set(item) - {"text", "id", "points", "labels"})
    if extra:
        raise CommandError("bad_prompt", f"unknown prompt field(s) {extra}")
    text, pid = item.get("text"), item.get("id", "")
    points, labels = item.get("points", []), item.get("labels")
    if not isinstance(text, str) or not isinstance(pid, str) or len(pid) > 64:
        raise CommandError("bad_prompt", "prompt 'text' must be a string and 'id' a string of <= 64 chars")
    if not (_is_text(text) and _is_text(pid)):  # JSON's "\ud800" is valid JSON but not text
        raise CommandError("bad_prompt", "prompt 'text' and 'id' must be valid Unicode (no lone surrogates)")
    if not isinstance(points, list) or len(points) > 16:
        raise CommandError("bad_prompt", "'points' must be a list of at most 16 [x, y] pairs")
    if labels is None:
        labels = [1] * len(points)
    try:
        pts = tuple(
            (float(p[0]), float(p[1]))
            for p in points
            if isinstance(p, list)
            and len(p) == 2
            and all(type(v) in (int, float) and math.isfinite(v) for v in p)  # json takes NaN
        )
        if len(pts) != len(points) or not isinstance(labels, list):
            raise PromptError("'points' must be finite [x, y] number pairs and 'labels' a list")
        return Prompt(text=text, points=pts, labels=tuple(labels), id=pid)
    except PromptError as exc:
        raise CommandError("bad_prompt", str(exc)) from exc


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ControlServer:
    """Serves the control socket on its own thread until the node stops."""

    def __init__(
        self,
        node: Any,
        endpoint: str,
        context: zmq.Context | None = None,
        curve: CurveKeys | None = None,
        hints: PromptHints | None = None,
    ) -> None:
        self.node = node
        self.hints = hints  # "did you mean" advice in add/set replies (None: no hints field)
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.REP)
        if curve is not None:  # only allow-listed clients can connect, let alone send commands
            make_server(self._sock, curve)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES * 4)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise OSError(f"cannot bind the control socket to {endpoint}: {exc}") from exc
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.requests = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="node-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(linger=0)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            raw = self._sock.recv()
            reply = self.handle(raw)
            self._sock.send(json.dumps(reply).encode())
            if reply.get("ok") and reply.get("shutdown"):
                self.node.request_stop()

    def handle(self, raw: bytes) -> dict[str, Any]:
        """One request -> one reply; never raises."""
        self.requests += 1
        try:
            req = parse_request(raw)
            return {"ok": True, **self._execute(req)}
        except CommandError as exc:
            self.errors += 1
            return {"ok": False, "error": {"code": exc.code, "message": str(exc)}}
        except PromptError as exc:
            self.errors += 1
            return {"ok": False, "error": {"code": "bad_prompt", "message": str(exc)}}
        except Exception as exc:  # an encoder failure must not kill the control thread
            self.errors += 1
            log.exception("control command failed")
            return {"ok": False, "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}

    def _execute(self, req: dict[str, Any]) -> dict[str, Any]:
        from .node import prompt_dict

        cmd, prompts = req["cmd"], self.node.prompts
        if cmd == "add":
            active = prompts.add(req["prompts"])
        elif cmd == "set":
            active = prompts.set(req["prompts"])
        elif cmd == "remove":
            active = prompts.remove(req["ids"])
        elif cmd == "list":
            active = prompts.snapshot()
        elif cmd == "status":
            return {"status": self.node.status()}
        elif cmd == "stats":
            return {"stats": self.node.stats()}
        elif cmd == "flow":
            return {"flow": self.node.flow.export(since=req["since"], limit=req["limit"])}
        else:
            return {"shutdown": True}
        reply: dict[str, Any] = {"prompts": [prompt_dict(p) for p in active]}
        if cmd in ("add", "set") and self.hints is not None:
            # One entry per requested prompt; null when the node has no hint table for its encoder.
            hints = self.hints.check([p.text for p in req["prompts"]])
            reply["hints"] = (
                None
                if hints is None
                else [{"id": p.id, "text": p.text, **h.to_dict()} for p, h in zip(req["prompts"], hints)]
            )
        return reply


def send_command(endpoint: str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Client side: one request, one reply, bounded wait (a dead node must not hang the caller)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    try:
        sock.connect(endpoint)
        sock.send(json.dumps(request).encode())
        return json.loads(sock.recv())
    except zmq.Again as exc:
        raise TimeoutError(f"no reply from {endpoint} within {timeout} s") from exc
    finally:
        sock.close(linger=0)
