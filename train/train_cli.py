"""Argument parsers of ``fluorosam-train fit``, ``export`` and ``eval``, kept free of heavy imports.

``fluorosam-train --help`` builds every subparser; torch and the model code load only when one of
these subcommands actually runs.
"""

from __future__ import annotations

import argparse


def add_fit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="train a model (single process or under torchrun)")
    p.add_argument("--config", required=True, help="training config YAML (configs/train/*.yaml)")
    p.add_argument("--data", action="append", default=None, help="data folder (repeatable; overrides config)")
    p.add_argument("--out", default=None, help="run folder (overrides config)")
    p.add_argument(
        "--resume",
        default=None,
        help="checkpoint to resume from (e.g. <out>/last.pt), or auto: <out>/last.pt when it exists",
    )
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training (overrides config)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--init", default=None, help="scratch, official:<path> or native:<path> (overrides config)"
    )
    p.add_argument("--text-cache", default=None, help="text-feature cache file (shared between runs)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_fit)


def _run_fit(args: argparse.Namespace) -> int:
    from train.fit import run_fit

    return run_fit(args)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="model.safetensors from a run's last.pt without stopping the run (read-only on the run folder)",
    )
    p.add_argument("--run", required=True, help="run folder (with last.pt), or a last.pt")
    p.add_argument("--out", required=True, help="where to write the .safetensors file")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from train.fit import export_checkpoint

    try:
        print(export_checkpoint(Path(args.run), Path(args.out)))
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"fluorosam-train export: {exc}") from None
    return 0


def add_curves_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curves", help="plot a run's loss and lr by step, stages and segments marked")
    p.add_argument("--run", required=True, help="run folder (with log.csv and ledger.csv)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--window", type=int, default=100, help="logged steps in the smoothing mean")
    p.set_defaults(func=_run_curves)


def _run_curves(args: argparse.Namespace) -> int:
    from train.curves import plot_run

    try:
        print(plot_run(args.run, args.out, args.window))
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"fluorosam-train curves: {exc}") from None
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (Dice/IoU, clicks, absent FP rate)")
    p.add_argument("--checkpoint", default=None, help="model file (default: the embedded model)")
    p.add_argument("--data", required=True, help="FluoroSeg root or labelled X-ray folder")
    p.add_argument("--json", default=None, help="write the metrics JSON here")
    p.add_argument(
        "--out-dir", default=None, help="montage and reliability plot folder (default: next to --json)"
    )
    p.add_argument("--prompts", default=None, help="JSON {structure: prompt} overriding the data's prompts")
    p.add_argument("--split", default="val", help="FluoroSeg split: train, val or all")
    p.add_argument("--clicks", default="1,3,8", help="click counts to report ('' for text-only)")
    p.add_argument("--min-area", type=float, default=0.0, help="skip present masks below this image fraction")
    p.add_argument("--max-cases", type=int, default=0)
    p.add_argument(
        "--case-sample",
        choices=["first", "spread"],
        default="first",
        help="with --max-cases: the first images, or images spread evenly over the set (every root)",
    )
    p.add_argument("--cases", choices=["all", "even", "odd"], default="all")
    p.add_argument("--structures", default="", help="comma-separated structure names to evaluate")
    p.add_argument(
        "--max-absent",
        type=int,
        default=0,
        help="absent prompts per image: all (0) or a sample of this many, fixed by the case id",
    )
    p.add_argument(
        "--assume-absent",
        default="",
        help="comma-separated vocabulary names absent from every image of a labelled folder that did "
        "not annotate them (e.g. lower-limb bones on chest radiographs); adds absent prompts",
    )
    p.add_argument(
        "--phrasings",
        choices=["canonical", "heldout"],
        default="canonical",
        help="heldout: also decode each present structure with the vocabulary's held-out phrasings and "
        "report the relative Dice drop (JSON key paraphrase; train/paraphrase_eval.py)",
    )
    p.add_argument(
        "--max-phrasings",
        type=int,
        default=0,
        help="held-out phrasings per structure (0: all; else a fixed sample)",
    )
    p.add_argument(
        "--phrasing-structures",
        default="",
        help="comma-separated names to paraphrase (default: every present one)",
    )
    p.add_argument(
        "--paraphrase-floor",
        type=float,
        default=0.5,
        help="canonical Dice a structure needs to enter the overall paraphrase drop",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="calibrate the presence threshold on this data and store it in --checkpoint",
    )
    p.add_argument("--max-fpr", type=float, default=0.05)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from train.evaluate import run_eval

    return run_eval(args)
