"""ZeroMQ CURVE on the subscriber side: the keys a bridge process shows the node.

When the node's mask stream and control socket are CURVE servers (docs/reliability.md), a
client needs its own key pair (``NAME.key_secret``, whose public half is in the node's
allow-list folder) and the node's public key (``node.key``). These are ZeroMQ's certificate
files as ``fluorosam-rt keys generate`` writes them. The node side lives in
``fluorosam_rt.service.security``; this is the client half, here because the bridge may not import the
node package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


@dataclass(frozen=True)
class CurveClient:
    """This client's key pair and the server's public key; applied to a socket before connect."""

    public: bytes
    secret: bytes
    server_public: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot read CURVE key file {path}: {exc}") from exc


def load_curve_client(secret_file: str | Path, server_public_file: str | Path) -> CurveClient:
    """Keys from our ``NAME.key_secret`` and the node's ``NAME.key``; OSError names a bad file."""
    public, secret = _load(secret_file)
    if secret is None:
        raise OSError(f"{secret_file} holds only a public key; a client needs its NAME.key_secret")
    server_public, _ = _load(server_public_file)
    return CurveClient(public=public, secret=secret, server_public=server_public)
