"""``fluorosam-rt bench``: flags, presets and the entry point.

``--quick`` is the preset a fresh clone can run in a few minutes; the full sweep is the default;
``--soak MINUTES`` runs only the long 15 fps / 3 prompt run; ``--faults`` runs only the
subscriber-fault comparison (baseline and fault phases alternating, faults.py); ``--render JSON``
rebuilds the plots and the markdown from an earlier run without measuring.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

FULL = {"rates": "7.5,15,30,0", "prompts": "1,3,10", "warmup": 3.0, "measure": 15.0, "baseline_frames": 20}
QUICK = {"rates": "15,0", "prompts": "1,3,10", "warmup": 2.0, "measure": 6.0, "baseline_frames": 6}


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def options_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> Any:
    from .harness import BenchOptions

    preset = QUICK if args.quick else FULL

    def pick(name: str) -> Any:
        v = getattr(args, name)
        return preset[name] if v is None else v

    rates = [0.0 if r in ("0", "unthrottled", "max") else float(r) for r in pick("rates").split(",") if r]
    return BenchOptions(
        out_dir=Path(args.out),
        engines=[e.strip() for e in args.engines.split(",") if e.strip()] if args.engines else None,
        rates=rates,
        prompts=[int(k) for k in pick("prompts").split(",") if k],
        warmup_s=pick("warmup"),
        measure_s=pick("measure"),
        baseline_frames=pick("baseline_frames"),
        floor_seconds=args.floor_seconds if args.floor_seconds is not None else (1.5 if args.quick else 3.0),
        frame_size=args.frame_size,
        n_frames=args.frames,
        downsample=args.downsample,
        mask_encoding=args.mask_encoding,
        checkpoint=args.checkpoint,
        compare_checkpoint=args.compare_checkpoint,
        threads=args.threads,
        quick=args.quick,
        geometry=not args.no_geometry,
        soak_minutes=args.soak,
        soak_interval_s=args.soak_interval,
        soak_engine=args.soak_engine,
        faults=args.faults,
        faults_phase_s=args.faults_phase_s,
        faults_rounds=args.faults_rounds,
        faults_settle_s=args.faults_settle_s,
        faults_engine=args.faults_engine,
        faults_transport=args.faults_transport,
        faults_baseline_peers=args.faults_baseline_peers,
        report=Path(args.report) if args.report else None,
        keep_workdir=args.keep_workdir,
        argv=["fluorosam-rt", "bench", *(argv or sys.argv[2:])],
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from . import report

    if args.render:
        result = json.loads(Path(args.render).read_text())
        report.write_all(result, Path(args.out), Path(args.report) if args.report else None)
        report.print_table(result)
        return 0
    from .run import run_bench

    opts = options_from_args(args)
    if any(k < 1 for k in opts.prompts) or any(r < 0 for r in opts.rates):
        from ..service.node_config import NodeConfigError

        raise NodeConfigError("--prompts must be >= 1 and --rates >= 0 (0: unthrottled)")
    if opts.faults and (opts.soak_minutes or opts.faults_rounds < 1 or opts.faults_phase_s <= 0):
        from ..service.node_config import NodeConfigError

        raise NodeConfigError("--faults needs --faults-rounds >= 1 and --faults-phase-s > 0, and no --soak")
    if opts.compare_checkpoint and (opts.faults or opts.soak_minutes):
        from ..service.node_config import NodeConfigError

        raise NodeConfigError("--compare-checkpoint compares sweeps; it does not apply to --soak or --faults")
    cmp = opts.compare_checkpoint
    if cmp and cmp != "embedded" and not Path(cmp).is_file():  # before minutes of setup for model A
        raise FileNotFoundError(f"no checkpoint file {cmp}")
    result = run_bench(opts)
    report.print_table(result)
    print(f"wrote {opts.out_dir}" + (f" and {opts.report}" if opts.report else ""))
    return 0


def add_bench_parser(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="end-to-end latency of the real node (processes, sockets) vs a naive baseline and the floor",
    )
    b.add_argument("--quick", action="store_true", help="short sweep: 15 fps and unthrottled, 6 s cells")
    b.add_argument("--engines", help="comma list (default: every back end that loads: torch,onnxruntime)")
    b.add_argument("--rates", help="comma list of source fps; 0 = unthrottled (default 7.5,15,30,0)")
    b.add_argument("--prompts", help="comma list of prompt counts (default 1,3,10)")
    b.add_argument("--warmup", type=float, help="seconds per cell before measuring")
    b.add_argument("--measure", type=float, help="seconds measured per cell")
    b.add_argument("--baseline-frames", type=int, help="frames timed per prompt count for the baseline")
    b.add_argument("--floor-seconds", type=float, help="seconds of matmul for the CPU's GFLOP/s")
    b.add_argument("--frame-size", type=int, default=1024, help="replayed frames are N x N uint16")
    b.add_argument("--frames", type=int, default=16, help="distinct frames in the replay loop")
    b.add_argument("--downsample", type=int, default=1, help="publish masks at 1/N size")
    b.add_argument("--mask-encoding", choices=["u8", "bits"], default="u8")
    b.add_argument("--checkpoint", help="weights (default: embedded model, else random-weight small model)")
    b.add_argument(
        "--compare-checkpoint",
        metavar="PATH",
        help="also run this model (a checkpoint, or 'embedded'), each group right after the first "
        "model's, and report both side by side with B/A ratios (e.g. v1 and v2)",
    )
    b.add_argument("--threads", type=int, default=0, help="torch threads in the node (0: torch's default)")
    b.add_argument("--out", default="bench-results", help="folder for bench.json and the PNGs")
    b.add_argument("--report", help="also write the markdown report here (e.g. docs/benchmarks.md)")
    b.add_argument(
        "--no-geometry",
        action="store_true",
        help="skip the geometry stage's cost, flicker and transport runs",
    )
    b.add_argument("--soak", type=float, metavar="MINUTES", help="only a soak run: 15 fps, 3 prompts")
    b.add_argument("--soak-interval", type=float, default=10.0, help="soak sampling period, s")
    b.add_argument("--soak-engine", help="engine for the soak (default: onnxruntime, else torch)")
    b.add_argument(
        "--faults",
        action="store_true",
        help="only the subscriber-fault run: 15 fps, 3 prompts, baseline and fault phases alternating",
    )
    b.add_argument("--faults-phase-s", type=float, default=25.0, help="seconds measured per phase")
    b.add_argument(
        "--faults-rounds", type=int, default=4, help="rounds of one baseline + one fault phase (ABBA order)"
    )
    b.add_argument(
        "--faults-settle-s", type=float, default=3.0, help="seconds after starting a phase's processes"
    )
    b.add_argument("--faults-engine", help="engine for the fault run (default: onnxruntime, else torch)")
    b.add_argument("--faults-transport", choices=["tcp", "ipc"], default="tcp", help="mask stream endpoint")
    b.add_argument(
        "--faults-baseline-peers",
        choices=["healthy", "none"],
        default="healthy",
        help="baseline phases: 3 healthy peers (same peer count as the faults; default) or none",
    )
    b.add_argument("--render", metavar="JSON", help="re-render plots/report from an earlier bench.json")
    b.add_argument("--keep-workdir", action="store_true", help="keep node/subscriber logs and configs")
    b.set_defaults(func=cmd_bench)
