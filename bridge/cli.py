"""``fluorosam-rt bridge ...`` (also ``python -m bridge ...``): relay, archive, record, listen.

These run next to navigation systems and archives that do not have the model stack, so this
module (and everything it imports) must never import torch; ``fluorosam_rt.cli`` hands a
``bridge`` command line straight here before it builds its own, torch-importing, parser.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from .protocol import ProtocolError
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


def cmd_listen(args: argparse.Namespace) -> int:
    """One line per message, in the same format as the C subscriber (bridge/c), for comparison."""
    with Subscriber(args.connect, topic=args.topic, rcvhwm=1000) as sub:
        for msg in sub.messages(args.max_messages or 10**12, timeout=args.idle_timeout or 1e9, newest=False):
            sums = " ".join(str(int(p.mask.sum())) for p in msg.prompts)
            print(
                f"frame {msg.frame_id} seq {msg.seq} prompts {len(msg.prompts)} sums {sums}".rstrip(),
                flush=True,
            )
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

    p = sub.add_parser("listen", help="print frame ids and mask sums (what the C subscriber prints)")
    _connect_args(p)
    p.set_defaults(func=cmd_listen)


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
