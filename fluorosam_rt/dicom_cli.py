"""CLI commands about DICOM ingest: the conformance statement and the decode benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_conformance(args: argparse.Namespace) -> int:
    from .sources.dicom_conformance import conformance_markdown

    text = conformance_markdown()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from .bench.decode import run_decode_benchmark

    return run_decode_benchmark(args)


def add_dicom_commands(sub: Any) -> None:
    conf = sub.add_parser(
        "conformance", help="print the DICOM Conformance Statement generated from the SCP's configuration"
    )
    conf.add_argument(
        "--markdown", action="store_true", help="Markdown output (the only format; the default)"
    )
    conf.add_argument("--out", help="write to this file (docs/conformance.md) instead of stdout")
    conf.set_defaults(func=cmd_conformance)
    bench = sub.add_parser(
        "bench-decode", help="decode + ingest time of a 1024x1024 frame per transfer syntax"
    )
    bench.add_argument("--image", help="DICOM image to crop the frame from (default: ../shared WG04 RG3)")
    bench.add_argument("--size", type=int, default=1024, help="frame size in pixels (square)")
    bench.add_argument("--runs", type=int, default=30, help="timed runs per syntax")
    bench.add_argument("--syntaxes", help="comma list of syntax keys (default: all)")
    bench.add_argument("--json", help="write results here")
    bench.set_defaults(func=cmd_bench_decode)
    from .bench.cine import add_cine_parser

    add_cine_parser(sub)  # bench-cine: an XA cine through the real node, uncompressed vs JPEG Lossless
