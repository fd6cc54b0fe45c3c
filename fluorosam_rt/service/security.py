"""ZeroMQ CURVE for the mask stream and the control socket: who may listen, who may command.

Off by default because the default endpoints are on localhost. When the node's sockets must be
reachable from another machine in the operating room network, CURVE encrypts every message and
a ZAP handler admits only clients whose public key is in an allow-list folder, so a laptop on
the same network can neither read masks (patient anatomy) nor change prompts.

Keys are ZeroMQ's certificate files (``zmq.auth``): ``NAME.key`` holds the public key and
``NAME.key_secret`` the public and secret key. ``fluorosam-rt keys generate`` writes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


class SecurityError(OSError):
    """Key files that are missing or unusable; the message names the file."""


@dataclass(frozen=True)
class CurveKeys:
    public: bytes
    secret: bytes


def generate_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public, to hand out) and NAME.key_secret (owner-only); return both paths."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(d), name)
    os.chmod(secret, 0o600)  # the secret file must not be readable by other users
    return Path(public), Path(secret)


def load_keys(secret_file: str | Path) -> CurveKeys:
    p = Path(secret_file)
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read CURVE key file {p}: {exc}") from exc
    if secret is None:
        raise SecurityError(f"{p} holds only a public key; the node needs NAME.key_secret")
    return CurveKeys(public=public, secret=secret)


def load_public_key(file: str | Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(str(file))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read CURVE key file {file}: {exc}") from exc
    return public


def make_server(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE server; must run before bind."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def make_client(sock: zmq.Socket, client: CurveKeys, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client of the server with that public key; must run before connect."""
    sock.curve_secretkey = client.secret
    sock.curve_publickey = client.public
    sock.curve_serverkey = server_public


class CurveGate:
    """A ZAP authenticator on one context admitting only the public keys found in a folder.

    One per context (ZeroMQ's ZAP endpoint is per context), so a node with CURVE on gets its own
    context and this gate, and closing the node closes both.
    """

    def __init__(self, context: zmq.Context, allowed_clients_dir: str | Path) -> None:
        d = Path(allowed_clients_dir)
        if not d.is_dir() or not any(d.glob("*.key")):
            raise SecurityError(f"allowed-clients folder {d} holds no public keys (*.key)")
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(d))

    def stop(self) -> None:
        self._auth.stop()
