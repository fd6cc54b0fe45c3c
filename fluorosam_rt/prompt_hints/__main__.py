"""``python -m fluorosam_rt.prompt_hints build``: the prompt-hint table of a model's text encoder.

Apart from the table code (``__init__``) because it loads a model bundle, and the bundle itself
uses the table: the command sits above both.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..bundle import load_bundle
from . import (
    DEFAULT_CACHE_DIR,
    ENV_VAR,
    SOURCE_VOCABULARY,
    build_table,
    load_vocabulary,
    resolve_cache_dir,
    table_filename,
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fluorosam_rt.prompt_hints",
        description="build the prompt-hint table of a text encoder",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="encode the vocabulary with a model's text encoder (about a minute)")
    b.add_argument("--checkpoint", help="model whose text encoder to use (default: the embedded model)")
    b.add_argument("--format", default="auto", choices=["auto", "official", "native"])
    b.add_argument("--clip-weights", help="local CLIP weights if the checkpoint lacks the text tower")
    b.add_argument("--vocabulary", default=str(SOURCE_VOCABULARY))
    b.add_argument("--out", help=f"folder (default: ${ENV_VAR} or {DEFAULT_CACHE_DIR})")
    a = ap.parse_args(argv)
    try:
        bundle = load_bundle(a.checkpoint, fmt=a.format, clip_weights=a.clip_weights)
        doc = load_vocabulary(a.vocabulary)
    except (OSError, ValueError) as exc:
        print(f"prompt_hints: error: {exc}", file=sys.stderr)
        return 2
    table = build_table(bundle.text_encoder, doc)
    out = Path(a.out) if a.out else resolve_cache_dir()
    path = table.save(out / table_filename(table.identity))
    print(json.dumps({"table": str(path), "texts": len(table), **table.calibration}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
