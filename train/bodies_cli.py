"""``fluorosam-train bodies``: list, fetch, build, preview and tabulate the labelled bodies.

* ``bodies [--json]``                          every registered body, built or not
* ``bodies fetch [--sources DIR] [--mirror T]``  git-clone the public sources (sparse) into DIR
* ``bodies build NAME|all [--sources DIR]``      build bodies into ``bodies_root()`` (atomically)
* ``bodies coverage [--markdown]``               structure -> number of built bodies that have it
* ``bodies preview [NAME|all] [--out DIR]``      mid-slice PNGs (HU + label overlay) to check a build

Kept free of heavy imports at parse time (``fluorosam-train --help`` builds every subparser).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# The anatomy checklist: row label -> vocabulary structure or group names (a body covers the row
# when it has any leaf structure of them).
CHECKLIST: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("skull", ("skull",)),
    ("cervical vertebrae", ("cervical_vertebrae",)),
    ("thoracic vertebrae", ("thoracic_vertebrae",)),
    ("lumbar vertebrae", ("lumbar_vertebrae",)),
    ("sacrum", ("sacrum",)),
    ("hip bones", ("hip_left", "hip_right")),
    ("femur", ("femurs",)),
    ("tibia", ("tibia",)),
    ("fibula", ("fibula",)),
    ("patella", ("patella",)),
    ("humerus", ("humeri",)),
    ("radius", ("radius",)),
    ("ulna", ("ulna",)),
    ("carpals", ("carpals",)),
    ("hand bones (metacarpals, phalanges)", ("metacarpals", "phalanges_hand")),
    ("clavicle", ("clavicles",)),
    ("scapula", ("scapulae",)),
    ("ribs", ("ribs",)),
    ("lungs", ("lungs",)),
    ("heart", ("heart",)),
)


BEGIN = "<!-- coverage:begin (fluorosam-train bodies coverage --update docs/bodies.md) -->"
END = "<!-- coverage:end -->"


def add_bodies_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bodies", help="list, fetch, build and tabulate the labelled bodies (CT + labels)")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=_run_list)
    bsub = p.add_subparsers(dest="bodies_command")

    f = bsub.add_parser("fetch", help="git-clone the bodies' public sources (only the paths builders read)")
    f.add_argument(
        "--sources", default=None, help="where to clone (default: $FLUOROSAM_SOURCES or out/sources)"
    )
    f.add_argument(
        "--mirror",
        default=None,
        metavar="TEMPLATE",
        help="clone from a mirror instead of GitHub, e.g. /srv/mirror/{owner}+{name}/repo ({key} also works)",
    )
    f.set_defaults(func=_run_fetch)

    b = bsub.add_parser("build", help="build bodies from their sources into the bodies folder")
    b.add_argument("name", nargs="+", help="body name(s), or 'all'")
    b.add_argument(
        "--sources", default=None, help="source checkouts (default: $FLUOROSAM_SOURCES or out/sources)"
    )
    b.set_defaults(func=_run_build)

    c = bsub.add_parser("coverage", help="structure -> number of built bodies that have it")
    c.add_argument("--markdown", action="store_true", help="print the Markdown tables of docs/bodies.md")
    c.add_argument(
        "--update",
        default=None,
        metavar="FILE",
        help=f"rewrite the tables between the lines {BEGIN!r} and {END!r} of FILE (e.g. docs/bodies.md)",
    )
    c.set_defaults(func=_run_coverage)

    v = bsub.add_parser("preview", help="write mid-slice PNGs (HU with label overlay) of built bodies")
    v.add_argument("name", nargs="*", default=["all"], help="body name(s) or 'all' (default)")
    v.add_argument("--out", default="out/bodies_preview", help="folder for the PNGs")
    v.set_defaults(func=_run_preview)


def body_rows() -> list[dict[str, Any]]:
    """One dict per registered body: registry facts plus, when built, its body.json facts."""
    from train.synth.bodies import all_bodies, body_dir, body_info
    from train.synth.regions import regions_of

    rows = []
    for spec in all_bodies():
        info = body_info(spec.name)
        rows.append(
            {
                "name": spec.name,
                "description": spec.description,
                "source": spec.source,
                "licence": spec.licence,
                "use": spec.use,
                "heldout": spec.heldout,
                "built": info is not None,
                "path": str(body_dir(spec.name)) if info is not None else None,
                "shape": info.get("shape") if info else None,
                "voxel_size_mm": info.get("voxel_size_mm") if info else None,
                "extent_mm": info.get("extent_mm") if info else None,
                "structures": info.get("structures") if info else None,
                # from the structures with today's regions.py (body.json keeps the ones at build time)
                "regions": regions_of(set(info["structures"])) if info else None,
            }
        )
    return rows


def _run_list(args: argparse.Namespace) -> int:
    rows = body_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        flag = " [held out]" if r["heldout"] else ""
        if r["built"]:
            vs = "x".join(f"{v:g}" for v in r["voxel_size_mm"])
            ext = "x".join(f"{v:.0f}" for v in r["extent_mm"])
            state = f"built, {vs} mm voxels, {ext} mm, {len(r['structures'])} structures, regions: "
            state += ", ".join(r["regions"]) or "-"
        else:
            state = f"not built (fluorosam-train bodies build {r['name']})"
        lic = r["licence"].split(";")[0]
        lic = lic if len(lic) <= 40 else lic[:37] + "..."
        print(f"{r['name']}{flag}: {lic}; {state}")
    return 0


def _run_fetch(args: argparse.Namespace) -> int:
    from train.synth.bodies.build import BuildError, fetch_sources

    try:
        fetch_sources(Path(args.sources) if args.sources else None, mirror=args.mirror)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _run_build(args: argparse.Namespace) -> int:
    from train.synth.bodies import all_bodies, get_body
    from train.synth.bodies.build import build_all
    from train.synth.ct_source import CTInputError

    names = [b.name for b in all_bodies()] if args.name == ["all"] else list(args.name)
    try:
        for n in names:
            get_body(n)
    except CTInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = build_all(names, Path(args.sources) if args.sources else None)
    if failed:
        print(f"error: {len(failed)} of {len(names)} bodies failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def coverage(rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per structure and per checklist row, which built bodies have it."""
    from train.synth.bodies.build import vocabulary

    vocab = vocabulary()
    built = [r for r in (rows if rows is not None else body_rows()) if r["built"]]
    per_structure: dict[str, list[str]] = {}
    for r in built:
        for s in r["structures"]:
            per_structure.setdefault(s, []).append(r["name"])
    order = {c.name: c.id for c in vocab.structures_by_id.values()}
    per_structure = dict(sorted(per_structure.items(), key=lambda kv: order.get(kv[0], 999)))
    checklist = {}
    for label, names in CHECKLIST:
        leaves = {leaf for n in names for leaf in vocab.leaves(n)}
        checklist[label] = [r["name"] for r in built if leaves & set(r["structures"])]
    return {"bodies": [r["name"] for r in built], "checklist": checklist, "structures": per_structure}


def coverage_markdown(cov: dict[str, Any]) -> str:
    n = len(cov["bodies"])
    lines = [
        f"Built bodies counted: {n} ({', '.join(cov['bodies'])}).",
        "",
        "| anatomy (issue checklist) | bodies | which |",
        "|---|---:|---|",
    ]
    for label, names in cov["checklist"].items():
        lines.append(f"| {label} | {len(names)} | {', '.join(names) or '**none**'} |")
    lines += ["", "| structure | bodies | which |", "|---|---:|---|"]
    for s, names in cov["structures"].items():
        lines.append(f"| {s} | {len(names)} | {', '.join(names)} |")
    return "\n".join(lines) + "\n"


def update_between_markers(path: Path, text: str) -> None:
    """Replace what lies between the BEGIN and END marker lines of a file (markers kept)."""
    lines = path.read_text().splitlines(keepends=True)
    try:
        i = next(k for k, ln in enumerate(lines) if ln.strip() == BEGIN)
        j = next(k for k, ln in enumerate(lines) if ln.strip() == END and k > i)
    except StopIteration:
        raise ValueError(f"{path}: no {BEGIN!r} ... {END!r} block to update") from None
    path.write_text("".join([*lines[: i + 1], text, *lines[j:]]))


def _run_coverage(args: argparse.Namespace) -> int:
    cov = coverage()
    if not cov["bodies"]:
        print("error: no body is built; run: fluorosam-train bodies build all", file=sys.stderr)
        return 2
    if args.update:
        try:
            update_between_markers(Path(args.update), coverage_markdown(cov))
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"updated {args.update} ({len(cov['bodies'])} bodies)")
        return 0
    print(coverage_markdown(cov) if args.markdown else json.dumps(cov, indent=1))
    return 0


def _run_preview(args: argparse.Namespace) -> int:
    from train.synth.bodies import all_bodies
    from train.synth.bodies.preview import write_preview
    from train.synth.ct_source import CTInputError

    names = [b.name for b in all_bodies()] if args.name == ["all"] else list(args.name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rc = 0
    for n in names:
        try:
            print(write_preview(n, out / f"{n}.png"))
        except CTInputError as e:
            print(f"{n}: {e}", file=sys.stderr)
            rc = 1
    return rc
