"""atheris: raw bytes on the control socket -> ``fluorosam_rt.service.control.parse_request``.

Contract: a validated request the executor can run as it is, or ``CommandError`` with a code and
a message. Any other exception, or a request that breaks the executor's assumptions, is a crash.

    .venv/bin/python fuzz/fuzz_control.py -runs=100000
"""

from __future__ import annotations

import json
import sys

import atheris

with atheris.instrument_imports(include=["fluorosam_rt"]):
    from fluorosam_rt.prompts import Prompt
    from fluorosam_rt.service.control import COMMANDS, CommandError, parse_request

import harness


def test_one_input(data: bytes) -> None:
    try:
        req = parse_request(data)
    except CommandError as exc:
        if not (exc.code and str(exc)):
            raise AssertionError(f"CommandError without a code or message: {exc.code!r} {exc!s}") from exc
        return
    if not isinstance(req, dict) or req.get("cmd") not in COMMANDS:
        raise AssertionError(f"accepted request without a known command: {req!r}")
    cmd = req["cmd"]
    if cmd in ("add", "set"):
        prompts = req["prompts"]
        if not all(isinstance(p, Prompt) for p in prompts) or (cmd == "add" and not prompts):
            raise AssertionError(f"accepted {cmd} with bad prompts: {prompts!r}")
    if cmd == "remove" and not (req["ids"] and all(isinstance(i, str) for i in req["ids"])):
        raise AssertionError(f"accepted remove with bad ids: {req['ids']!r}")
    if cmd == "flow" and not (type(req["since"]) is int and type(req["limit"]) is int):
        raise AssertionError(f"accepted flow with bad since/limit: {req!r}")


def seeds() -> list[bytes]:
    requests = [
        {"cmd": "add", "prompts": ["left lung", "heart"]},
        {
            "cmd": "add",
            "prompts": [{"text": "left femur", "id": "femur", "points": [[10, 20]], "labels": [1]}],
        },
        {"cmd": "set", "prompts": [{"text": "spine", "points": [[1.5, 2.5], [3, 4]], "labels": [1, 0]}]},
        {"cmd": "set", "prompts": []},
        {"cmd": "remove", "ids": ["femur", "p0"]},
        {"cmd": "flow", "since": 0, "limit": 100},
        *({"cmd": c} for c in ("list", "status", "stats", "shutdown")),
    ]
    return [json.dumps(r).encode() for r in requests]


if __name__ == "__main__":
    harness.quiet()
    harness.run("control", test_one_input, seeds())
    sys.exit(0)
