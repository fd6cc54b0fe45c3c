"""Build bodies: fetch their public sources, convert them, and publish each body atomically.

* ``fetch_sources`` clones every repository of ``SOURCES`` into ``sources_root()/<key>`` with git, as a
  sparse checkout of only the paths the builders read (``SOURCE_PATHS``), so a clone stays small and a
  repository whose other files are unavailable still checks out.
* ``build_body`` runs a body's builder into a temporary folder inside ``bodies_root()`` and renames it
  into place only when the four files are written and read back as a valid body; a failing build leaves
  nothing behind (and an earlier build of the body untouched).
* ``write_body`` / ``canonical`` / ``resample`` are the shared steps of the builders.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from train.synth.bodies import (
    SOURCES,
    BodySpec,
    all_bodies,
    bodies_root,
    get_body,
    sources_root,
)
from train.synth.ct_source import CTInputError

# Paths (git sparse-checkout patterns, no-cone mode) each source's builders read.
SOURCE_PATHS: dict[str, tuple[str, ...]] = {
    "TotalSegmentator": (
        "/LICENSE",
        "/README.md",
        "/totalsegmentator/map_to_binary.py",
        "/tests/reference_files/example_ct.nii.gz",
        "/tests/reference_files/example_seg_fast_force_split.nii.gz",
        "/tests/reference_files/example_ct_dicom/",
        "/tests/reference_files/example_seg_dicom.nii.gz",
    ),
    "FracSegNet": ("/LICENSE", "/README.md", "/DataSet/"),
    "opensim-models": ("/README.md", "/*.txt", "/Geometry/", "/Models/"),
}

BODY_FILES = ("ct.nii.gz", "labels.nii.gz", "structures.csv", "body.json")


class BuildError(RuntimeError):
    """A body that could not be built or a source that could not be fetched (one-line message)."""


# ----------------------------------------------------------------------------------------------------
# fetch


def _git(*args: str, cwd: Path | None = None) -> None:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise BuildError(f"git {' '.join(args[:2])} failed: {msg[-1] if msg else r.returncode}")


def source_url(key: str, mirror: str | None = None) -> str:
    """Clone URL of a source: its GitHub URL, or ``mirror`` with ``{owner}``/``{name}``/``{key}`` set."""
    url = SOURCES[key]
    if not mirror:
        return url
    owner, name = url.rstrip("/").split("/")[-2:]
    return mirror.format(owner=owner, name=name, key=key)


def fetch_sources(
    dest: Path | None = None, mirror: str | None = None, keys: Iterable[str] | None = None, log=print
) -> dict[str, Path]:
    """Clone each source (sparse: ``SOURCE_PATHS``) into ``dest/<key>``; an existing folder is kept."""
    dest = Path(dest) if dest else sources_root()
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for key in keys or SOURCES:
        if key not in SOURCES:
            raise BuildError(f"unknown source {key!r}; known: {', '.join(SOURCES)}")
        final = dest / key
        out[key] = final
        if final.exists():
            log(f"{key}: present in {final}")
            continue
        url = source_url(key, mirror)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=dest))
        try:
            _git("clone", "--quiet", "--no-checkout", url, str(tmp))
            patterns = SOURCE_PATHS.get(key)
            if patterns:
                _git("sparse-checkout", "set", "--no-cone", *patterns, cwd=tmp)
            _git("checkout", "--quiet", cwd=tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"{key}: cloned {url} -> {final} ({source_commit(final)[:12]})")
    return out


def source_commit(path: Path) -> str:
    """The checked-out commit of a source clone ('' when it is not a git checkout)."""
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def source_dir(sources: Path, key: str) -> Path:
    """A source checkout, or a one-line error with the command that fetches it."""
    d = Path(sources) / key
    if not d.is_dir():
        raise CTInputError(f"source {key!r} is not in {sources}; run: fluorosam-train bodies fetch")
    return d


# ----------------------------------------------------------------------------------------------------
# shared builder steps


def canonical(img) -> tuple[np.ndarray, np.ndarray]:
    """Data and affine of a NIfTI image reoriented to the closest RAS+ voxel order (long axis = axis 2)."""
    import nibabel as nib

    can = nib.as_closest_canonical(img)
    return np.asarray(can.dataobj), np.asarray(can.affine, dtype=np.float64)


def resample(
    data: np.ndarray, affine: np.ndarray, spacing_mm: float, order: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Resample an axis-aligned volume to isotropic ``spacing_mm`` voxels (first voxel centre kept).

    ``order`` 0 for label maps, 1 (trilinear) for HU. With ``weights`` (a 0/1 mask), HU is the
    mask-weighted average, so a bone-only CT's zeros outside the bone do not dilute its edge.
    """
    from scipy import ndimage

    lin = affine[:3, :3]
    if not np.allclose(lin, np.diag(np.diag(lin)), atol=1e-4):
        raise CTInputError("resample expects an axis-aligned grid (no oblique affine)")
    sp = np.abs(np.diag(lin))
    step = spacing_mm / sp  # old voxels per new voxel
    shape = tuple(int(np.floor((n - 1) / s)) + 1 for n, s in zip(data.shape, step, strict=True))
    src = data if weights is None else data * weights

    def _res(a: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(
            a.astype(np.float32) if order else a, step, output_shape=shape, order=order, mode="nearest"
        )

    out = _res(src)
    if weights is not None:
        w = _res(weights.astype(np.float32))
        out = np.where(w > 1e-3, out / np.maximum(w, 1e-3), 0.0)
    new_aff = affine.copy()
    new_aff[:3, :3] = lin @ np.diag(step)
    return out, new_aff


def crop_box(
    mask: np.ndarray, affine: np.ndarray, margin_mm: tuple[float, float, float]
) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin_mm`` per axis (clipped to the grid)."""
    if not mask.any():
        raise CTInputError("nothing to crop: the mask is empty")
    sp = np.linalg.norm(affine[:3, :3], axis=0)
    box = []
    for a in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))
        m = int(np.ceil(margin_mm[a] / sp[a]))
        box.append(slice(max(0, int(idx[0]) - m), min(mask.shape[a], int(idx[-1]) + 1 + m)))
    return tuple(box)


def shift_affine(affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """Affine of a cropped grid starting at ``box``."""
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.array([b.start or 0 for b in box], dtype=np.float64) + affine[:3, 3]
    return out


def write_body(
    out_dir: Path, hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ct.nii.gz (int16 HU), labels.nii.gz (uint8 vocabulary ids), structures.csv and body.json.

    ``labels`` already holds vocabulary structure ids; every value must be a vocabulary structure.
    ``info`` (provenance, notes) goes into body.json next to the grid facts computed here.
    """
    import nibabel as nib

    from train.synth.regions import regions_of

    if hu.shape != labels.shape or hu.ndim != 3:
        raise CTInputError(
            f"CT shape {hu.shape} and label shape {labels.shape} differ; they must share a grid"
        )
    vocab = vocabulary()
    ids = [int(v) for v in np.unique(labels) if v != 0]
    names = []
    for v in ids:
        cat = vocab.structures_by_id.get(v)
        if cat is None:
            raise CTInputError(f"label value {v} is not a vocabulary structure id (configs/vocabulary.yaml)")
        names.append(cat.name)
    out_dir = Path(out_dir)
    hu16 = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    aff = np.asarray(affine, dtype=np.float64)
    ct_img = nib.Nifti1Image(hu16, aff)
    ct_img.header.set_xyzt_units("mm")
    lab_img = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), aff)
    lab_img.header.set_xyzt_units("mm")
    nib.save(ct_img, str(out_dir / "ct.nii.gz"))
    nib.save(lab_img, str(out_dir / "labels.nii.gz"))
    with open(out_dir / "structures.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "structure"])
        for v, n in zip(ids, names, strict=True):
            w.writerow([v, n])
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    counts = np.bincount(np.asarray(labels, dtype=np.uint8).ravel(), minlength=256)
    body = {
        "shape": list(hu16.shape),
        "voxel_size_mm": [round(float(s), 4) for s in spacing],
        "extent_mm": [round(float(s * n), 1) for s, n in zip(spacing, hu16.shape, strict=True)],
        "affine": np.round(aff, 5).tolist(),
        "structures": names,
        "structure_voxels": {n: int(counts[v]) for v, n in zip(ids, names, strict=True)},
        "regions": regions_of(set(names)),
        **(info or {}),
    }
    write_json(out_dir / "body.json", body)
    return body


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """JSON with one key per line but short lists of numbers kept on one line (readable body.json)."""
    text = json.dumps(obj, indent=1)
    text = re.sub(
        r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
        lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]",
        text,
    )
    Path(path).write_text(text + "\n")


@functools.lru_cache(maxsize=1)
def vocabulary():
    """The project vocabulary, loaded once per process (loading expands every phrasing: not free)."""
    from train.synth.vocabulary import Vocabulary

    return Vocabulary.load()


def body_seed(name: str) -> int:
    """A fixed seed per body name (stable across runs and Python versions), for deterministic builds."""
    import zlib

    return zlib.crc32(name.encode())


# ----------------------------------------------------------------------------------------------------
# build


def build_body(name: str, sources: Path | None = None, log=print) -> Path:
    """Build one registered body into ``bodies_root()/name`` atomically; returns its folder."""
    spec = get_body(name)
    sources = Path(sources) if sources else sources_root()
    for key in spec.sources:
        source_dir(sources, key)
    root = bodies_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a body should read like any folder
    try:
        spec.build(sources, tmp)
        _finish(spec, sources, tmp)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{name}: built in {final}")
    return final


def _finish(spec: BodySpec, sources: Path, tmp: Path) -> None:
    """Check the builder's four files read back as a body, and add the registry's provenance to body.json."""
    from train.synth.ct_source import load_ct

    missing = [f for f in BODY_FILES if not (tmp / f).exists()]
    if missing:
        raise BuildError(f"builder of {spec.name!r} did not write {', '.join(missing)}")
    src = load_ct(
        tmp / "ct.nii.gz",
        tmp / "labels.nii.gz",
        vocabulary=vocabulary(),
        structures_csv=tmp / "structures.csv",
        name=spec.name,
    )
    if not src.present_ids:
        raise BuildError(f"body {spec.name!r} has no labelled structure")
    info = json.loads((tmp / "body.json").read_text())
    commits = {k: source_commit(Path(sources) / k) for k in spec.sources}
    info = {
        "name": spec.name,
        "description": spec.description,
        "source": spec.source,
        "licence": spec.licence,
        "use": spec.use,
        "heldout": spec.heldout,
        "source_commits": commits,
        "rebuild": f"fluorosam-train bodies build {spec.name}",
        **info,
    }
    write_json(tmp / "body.json", info)


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an earlier build there is moved aside first and deleted after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_all(names: Iterable[str] | None = None, sources: Path | None = None, log=print) -> list[str]:
    """Build several bodies; returns the names that failed (each failure logged on one line)."""
    failed = []
    for n in names or [b.name for b in all_bodies()]:
        try:
            build_body(n, sources, log=log)
        except (CTInputError, BuildError, ValueError, OSError) as e:
            log(f"{n}: FAILED: {e}")
            failed.append(n)
    return failed
