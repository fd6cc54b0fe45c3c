"""``fluorosam-rt bridge ...`` (also ``python -m bridge ...``): relay, archive, record, listen.

These run next to navigation systems and archives that do not have the model stack, so this
module (and everything it imports) must never import torch; ``fluorosam_rt.cli`` hands a
``bridge`` command line straight here before it builds its own, torch-importing, parser.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .protocol import MaskMessage, ProtocolError
from .subscriber import Subscriber


def _connect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", action="append", required=True, help="mask stream endpoint (repeatable)")
    p.add_argument("--topic", default="", help="stream name to follow (default: all)")
    p.add_argument("--max-messages", type=int, help="stop after this many messages")
    p.add_argument("--idle-timeout", type=float, help="stop when no message came for this many seconds")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_igtl(args: argparse.Namespace) -> int:
    from .igtl_relay import IgtlRelay

    relay = IgtlRelay(
        port=args.port, local_only=not args.iface, iface=args.iface, send_status=not args.no_status
    )
    stop = _stop_on_signals()  # after the server: pyigtl installs its own handlers
    print(f"OpenIGTLink server on port {relay.port}; relaying {', '.join(args.connect)}", flush=True)
    with Subscriber(args.connect, topic=args.topic) as sub:
        try:
            n = relay.run(sub, stop=stop, max_messages=args.max_messages)
        finally:
            relay.close()
    print(f"relayed {n} frames ({relay.sent} OpenIGTLink messages)")
    return 0


def cmd_seg(args: argparse.Namespace) -> int:
    from .seg_archive import CStoreTarget, SegArchive, run_archive

    store = None
    if args.pacs:
        host, _, port = args.pacs.rpartition(":")
        store = CStoreTarget(host or "127.0.0.1", int(port), called_ae=args.pacs_ae, calling_ae=args.ae_title)
    archive = SegArchive(args.out, model=args.model or "", store=store)
    with Subscriber(args.connect, topic=args.topic, rcvhwm=1000) as sub:
        n = run_archive(sub, archive, args.max_messages, args.idle_timeout, args.min_interval)
    print(
        f"read {n} messages, wrote {archive.written} DICOM SEG files to {args.out}; skipped {archive.skipped}"
    )
    if store is not None:
        print(f"C-STORE: {store.sent} sent, {store.failed} failed")
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from .recorder import Recorder

    rec = Recorder(args.out)
    with Subscriber(args.connect, topic=args.topic, rcvhwm=1000) as sub:
        try:
            n = rec.run(sub, args.max_messages, args.idle_timeout)
        finally:
            rec.close()
    print(f"recorded {n} messages to {args.out}")
    return 0


def listen_line(msg: MaskMessage) -> str:
    """What ``listen`` and the C subscriber print for a message: mask sums ("-" without mask
    planes), then each tool tip as prompt index:instance id:x,y (source pixels)."""
    sums = " ".join("-" if p.mask is None else str(int(p.mask.sum())) for p in msg.prompts)
    line = f"frame {msg.frame_id} seq {msg.seq} prompts {len(msg.prompts)} sums {sums}".rstrip()
    tips = [
        f"{k}:{i.id}:{i.tip[0]:.2f},{i.tip[1]:.2f}"
        for k, p in enumerate(msg.prompts)
        if p.geometry is not None
        for i in p.geometry.instances
        if i.tip is not None
    ]
    return f"{line} tips {' '.join(tips)}" if tips else line


def cmd_listen(args: argparse.Namespace) -> int:
    """One line per message, in the same format as the C subscriber (bridge/c), for comparison."""
    with Subscriber(args.connect, topic=args.topic, rcvhwm=1000) as sub:
        for msg in sub.messages(args.max_messages or 10**12, timeout=args.idle_timeout or 1e9, newest=False):
            print(listen_line(msg), flush=True)
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    """The live page (bridge/web.py); runs until Ctrl-C or SIGTERM."""
    import asyncio

    try:
        from .web import WebOptions, check_options, page_url, serve
    except ImportError as exc:
        raise ImportError(f"{exc}; the viewer needs the web extra: pip install './bridge[web]'") from exc

    token = args.token
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    curve = None
    if args.curve_secret_key or args.curve_server_key:
        from .curve import load_curve_client

        if not (args.curve_secret_key and args.curve_server_key):
            raise ValueError("CURVE needs both --curve-secret-key and --curve-server-key")
        curve = load_curve_client(args.curve_secret_key, args.curve_server_key)
    opts = WebOptions(
        connect=args.connect,
        topic=args.topic,
        control=args.control,
        host=args.host,
        port=args.port,
        token=token,
        certfile=args.certfile,
        keyfile=args.keyfile,
        curve=curve,
        show_patient=args.show_patient_identifiers,
        max_fps=args.max_fps,
        jpeg_quality=args.jpeg_quality,
    )
    check_options(opts)
    if args.nice:  # before any thread exists, so every thread of the viewer inherits it
        os.nice(args.nice)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(viewer: Any) -> None:
            print(f"viewer: {page_url(opts, viewer.port)}  (following {', '.join(opts.connect)})", flush=True)

        await serve(opts, ready=ready, stop=stop)

    asyncio.run(run())
    return 0


def add_bridge_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("igtl", help="relay masks to 3D Slicer / PLUS over OpenIGTLink (IMAGE per prompt)")
    _connect_args(p)
    p.add_argument("--port", type=int, default=18944, help="OpenIGTLink server port (default 18944)")
    p.add_argument("--iface", help="network interface to serve on (default: localhost only)")
    p.add_argument("--no-status", action="store_true", help="do not send the STRING status message")
    p.set_defaults(func=cmd_igtl)

    p = sub.add_parser("seg", help="archive frames that came over DICOM as DICOM SEG files (and C-STORE)")
    _connect_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", help="model name if the stream does not carry one")
    p.add_argument("--min-interval", type=float, default=0.0, help="at most one SEG per this many seconds")
    p.add_argument("--pacs", help="HOST:PORT of a PACS to C-STORE each SEG to")
    p.add_argument("--pacs-ae", default="ANY-SCP", help="called AE title of the PACS")
    p.add_argument("--ae-title", default="FLUOROSAM", help="our calling AE title")
    p.set_defaults(func=cmd_seg)

    p = sub.add_parser("record", help="record the stream (headers, masks, preview frames) for audit/replay")
    _connect_args(p)
    p.add_argument("--out", required=True, help="recording folder")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("listen", help="print frame ids, mask sums, tool tips (what the C subscriber prints)")
    _connect_args(p)
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("web", help="live view in a browser: frame, masks, fps, latency, drops, prompts")
    p.add_argument("--connect", action="append", required=True, help="mask stream endpoint (repeatable)")
    p.add_argument("--topic", default="", help="stream name to follow (default: all)")
    p.add_argument("--control", help="the node's control endpoint: status, drops, prompt add/remove")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1 only)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080; 0: any free port)")
    p.add_argument("--token", help="access token the page must present (required off loopback)")
    p.add_argument("--token-file", help="read the access token from this file instead")
    p.add_argument("--certfile", help="TLS certificate (PEM): serve https/wss")
    p.add_argument("--keyfile", help="TLS private key (PEM, unencrypted)")
    p.add_argument("--curve-secret-key", help="this client's CURVE NAME.key_secret (node with CURVE on)")
    p.add_argument("--curve-server-key", help="the node's public CURVE NAME.key")
    p.add_argument("--max-fps", type=float, default=30.0, help="frames per second sent to each tab at most")
    p.add_argument("--jpeg-quality", type=int, default=80, help="display image JPEG quality (1-95)")
    p.add_argument(
        "--nice",
        type=int,
        default=10,
        help="lower the viewer's CPU priority by this much (default 10) so that, on the node's machine, "
        "the node always comes first; 0 leaves it",
    )
    p.add_argument(
        "--show-patient-identifiers",
        action="store_true",
        help="show the DICOM patient/study attributes the node's messages carry (hidden by default)",
    )
    p.set_defaults(func=cmd_web)


def build_parser(prog: str = "fluorosam-rt bridge") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_bridge_commands(parser.add_subparsers(dest="bridge_command", required=True))
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "fluorosam-rt bridge") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies
    try:
        return int(args.func(args) or 0)
    except (OSError, ProtocolError, ValueError, ImportError) as exc:
        print(f"{prog} {args.bridge_command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
