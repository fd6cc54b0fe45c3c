"""``fluorosam-rt``: the command-line entry point.

Each subcommand lives in its own function; errors a user can fix (missing file, wrong
checkpoint, empty prompt) are printed as one clear line with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


class UsageError(Exception):
    """An error in the user's input; printed without a traceback."""


def _parse_point(spec: str, n_prompts: int) -> tuple[list[int], tuple[float, float]]:
    """'X,Y' (every prompt) or 'N:X,Y' (prompt N, 0-based) -> (prompt indices, point)."""
    target, _, xy = spec.rpartition(":")
    try:
        x_s, y_s = xy.split(",")
        point = (float(x_s), float(y_s))
    except ValueError as exc:
        raise UsageError(f"bad point {spec!r}: expected X,Y or N:X,Y") from exc
    if not target:
        return list(range(n_prompts)), point
    try:
        idx = int(target)
    except ValueError as exc:
        raise UsageError(f"bad point {spec!r}: prompt index {target!r} is not an integer") from exc
    if not 0 <= idx < n_prompts:
        raise UsageError(f"bad point {spec!r}: there are {n_prompts} prompts")
    return [idx], point


def _build_prompts(texts: Sequence[str], pos: Sequence[str], neg: Sequence[str]) -> list:
    from .prompts import Prompt, PromptError

    if not texts:
        raise UsageError("give at least one --prompt")
    points: list[list[tuple[float, float]]] = [[] for _ in texts]
    labels: list[list[int]] = [[] for _ in texts]
    for specs, label in ((pos, 1), (neg, 0)):
        for spec in specs:
            idxs, pt = _parse_point(spec, len(texts))
            for i in idxs:
                points[i].append(pt)
                labels[i].append(label)
    try:
        return [Prompt(t, tuple(p), tuple(lb)) for t, p, lb in zip(texts, points, labels)]
    except PromptError as exc:
        raise UsageError(f"bad prompt: {exc}") from exc


def cmd_segment(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from .bundle import load_bundle
    from .imageio import read_image
    from .overlay import render_overlay, slugify

    prompts = _build_prompts(args.prompt, args.point, args.negative_point)
    image = read_image(args.image)
    bundle = load_bundle(
        args.checkpoint,
        fmt=args.format,
        clip_weights=args.clip_weights,
        allow_partial=args.allow_partial,
        trust_pickle=args.trust_pickle,
    )
    if bundle.report is not None and not bundle.report.ok:
        print(bundle.report.summary(), file=sys.stderr)
    from engines.select import EngineOptions, EngineSettings, create_engine

    settings = EngineSettings(args.engine, options=EngineOptions(threads=args.engine_threads))
    predictor = bundle.predictor(
        create_engine(settings, bundle.model),
        presence_threshold=args.presence_threshold,
        mask_threshold=args.mask_threshold,
    )
    predictor.set_image(image.pixels)
    results = predictor.predict(prompts)
    hinter = bundle.prompt_hints()
    hints = hinter.check([p.text for p in prompts])
    if hints is None and hinter.note:
        print(f"note: {hinter.note}", file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    used: set[str] = set()
    for k, r in enumerate(results):
        name = slugify(r.prompt.text)
        while name in used:
            name += "_"
        used.add(name)
        cv2.imwrite(str(out / f"{name}.png"), r.mask.astype(np.uint8) * 255)
        summary.append(
            {
                "prompt": r.prompt.text,
                "file": f"{name}.png",
                "score": r.score,
                "present": r.present,
                "area_fraction": float(r.mask.mean()),
                "points": [list(p) for p in r.prompt.points],
                "labels": list(r.prompt.labels),
                "hint": hints[k].to_dict() if hints else None,
            }
        )
        state = "present" if r.present else "not present"
        print(
            f"{r.prompt.text!r}: score {r.score:.3f} ({state}), "
            f"{100 * r.mask.mean():.1f}% of image -> {name}.png"
        )
        if hints and hints[k].far:
            print(f"  hint: {hints[k].message()}")
    labels = [f"{r.prompt.text} ({r.score:.2f})" + ("" if r.present else " absent") for r in results]
    overlay = render_overlay(image.pixels, [r.mask for r in results], labels)
    cv2.imwrite(str(out / "overlay.png"), overlay)
    (out / "result.json").write_text(
        json.dumps({"image": str(args.image), "model": bundle.name, "masks": summary}, indent=2)
    )
    print(f"wrote {len(results)} masks and overlay.png to {out}")
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    from .benchmark_model import run_model_benchmark

    return run_model_benchmark(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluorosam-rt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment an X-ray image (PNG, JPEG, TIFF, DICOM) by text prompts")
    seg.add_argument("image", help="input image")
    seg.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    seg.add_argument("--point", action="append", default=[], help="positive click X,Y or N:X,Y (prompt N)")
    seg.add_argument("--negative-point", action="append", default=[], help="negative click X,Y or N:X,Y")
    seg.add_argument("--checkpoint", help="weights (default: the embedded model)")
    seg.add_argument("--format", default="auto", choices=["auto", "official", "native"])
    seg.add_argument("--clip-weights", help="local OpenAI CLIP ViT-B/32 file if the checkpoint lacks CLIP")
    seg.add_argument("--allow-partial", action="store_true", help="accept missing/unexpected keys (reported)")
    seg.add_argument("--trust-pickle", action="store_true", help="allow a checkpoint with pickled objects")
    seg.add_argument("--mask-threshold", type=float, default=0.0, help="logit threshold (SAM: 0.0)")
    seg.add_argument("--presence-threshold", type=float, help="override the model's calibrated threshold")
    seg.add_argument("--out", required=True, help="output folder")
    seg.add_argument(
        "--engine",
        default="torch",
        choices=["auto", "trt", "torch-compiled", "onnxruntime", "torch"],
        help="inference back end (auto: fastest that loads here; see docs/engines.md)",
    )
    seg.add_argument(
        "--engine-threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)"
    )
    seg.set_defaults(func=cmd_segment)

    bench = sub.add_parser("bench-model", help="time image encoding and K-prompt decoding on this machine")
    bench.add_argument(
        "--models", default="small,official", help="comma list: small, v2[:SIZE[:STRIDE]], official"
    )
    bench.add_argument("--prompts", default="1,3,10", help="comma list of prompt counts")
    bench.add_argument("--runs", type=int, default=30, help="timed runs per cell (official: fewer)")
    bench.add_argument("--official-runs", type=int, default=3, help="timed runs per cell for Swin-L")
    bench.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    bench.add_argument("--checkpoint", help="small model weights (default: embedded model or random init)")
    bench.add_argument(
        "--random-small", type=int, metavar="PX", help="time a random-weight small model at this input size"
    )
    bench.add_argument(
        "--engine",
        default="torch",
        choices=["torch", "onnxruntime"],
        help="frame path of the real-time models",
    )
    bench.add_argument("--e2e-prompts", default="3", help="prompt counts for raw frame -> masks timing")
    bench.add_argument("--e2e-runs", type=int, default=100, help="timed raw-frame runs per model and K")
    bench.add_argument("--cache-dir", help="ONNX engine cache (default ~/.cache/fluorosam-rt/engines)")
    bench.add_argument("--json", help="write results here")
    bench.set_defaults(func=cmd_bench_model)

    from .engine_cli import add_engine_parser

    add_engine_parser(sub)

    from .service.node_cli import add_node_commands

    add_node_commands(sub)
    from .dicom_cli import add_dicom_commands

    add_dicom_commands(sub)
    # Listed for --help only: main() hands "bridge ..." to bridge.cli before this parser exists.
    sub.add_parser("bridge", help="torch-free relays: OpenIGTLink, DICOM SEG, recorder (bridge -h)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bridge"]:
        # Runs where the model stack is absent: building this module's parser would import torch.
        from bridge.cli import main as bridge_main

        return bridge_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from engines.base import EngineError

    from .checkpoint import CheckpointError
    from .imageio import ImageReadError
    from .prompts import PromptError
    from .service.node_config import NodeConfigError
    from .sources import SourceError

    try:
        return int(args.func(args) or 0)
    except (
        UsageError,
        CheckpointError,
        ImageReadError,
        PromptError,
        FileNotFoundError,
        NodeConfigError,
        SourceError,
        OSError,
        EngineError,
    ) as exc:
        print(f"fluorosam-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
