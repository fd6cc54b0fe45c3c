"""Labelled bodies: a registry of CTs (HU) with label maps in the project's vocabulary.

A *body* is one labelled volume the data engine renders: a real CT with TotalSegmentator labels, a
bone-only CT given a synthetic soft-tissue body, or a skeleton voxelised from bone meshes inside a
synthetic envelope. Nothing large lives in git: each body is rebuilt from its public source by
``fluorosam-train bodies build NAME`` into ``bodies_root()/NAME/`` as

* ``ct.nii.gz``        CT in Hounsfield units (int16),
* ``labels.nii.gz``    label map on the same grid, values = vocabulary structure ids (uint8),
* ``structures.csv``   ``id,structure`` for every value used (so ``load_ct`` validates names),
* ``body.json``        provenance, licence, voxel size, extent, structures and regions.

A body is not a patient: per-case anatomical variation (``train/synth/variation.py``) turns each
body into many.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.synth.ct_source import CTInputError, CTSource, load_ct

REPO_ROOT = Path(__file__).resolve().parents[3]

# Public git repositories bodies are built from: key -> clone URL. ``bodies fetch`` clones them
# into ``sources_root()/<key>``; any existing clone (or a bare mirror) there is used as it is.
SOURCES: dict[str, str] = {
    "TotalSegmentator": "https://github.com/wasserth/TotalSegmentator",
    "FracSegNet": "https://github.com/YzzLiu/FracSegNet",
    "opensim-models": "https://github.com/opensim-org/opensim-models",
}


def bodies_root() -> Path:
    """Where built bodies live: ``$FLUOROSAM_BODIES`` or ``<repo>/out/bodies`` (git-ignored)."""
    return Path(os.environ.get("FLUOROSAM_BODIES", REPO_ROOT / "out" / "bodies"))


def sources_root() -> Path:
    """Where source checkouts live: ``$FLUOROSAM_SOURCES`` or ``<repo>/out/sources`` (git-ignored)."""
    return Path(os.environ.get("FLUOROSAM_SOURCES", REPO_ROOT / "out" / "sources"))


@dataclass(frozen=True)
class BodySpec:
    """One registered body: where it comes from, what it may be used for, and how it is built.

    ``build(sources_dir, out_dir)`` reads the source checkout(s) under ``sources_dir`` and writes the
    four files above into ``out_dir`` (an empty temporary folder, renamed into place on success).
    ``heldout`` bodies are never trained on; they serve the synthetic evaluation only.
    """

    name: str
    description: str
    source: str  # human-readable origin: repository URL and path(s)
    licence: str
    use: str  # what the licence / source allows it to be used for
    sources: tuple[str, ...]  # keys of SOURCES the build reads ("" tuple: bundled with a package)
    build: Callable[[Path, Path], None]
    heldout: bool = False


_REGISTRY: dict[str, BodySpec] = {}


def register(spec: BodySpec) -> BodySpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"body {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


BUILDER_MODULES = ("bundled", "totalseg", "fracsegnet", "skeleton")


def _load_builders() -> None:
    """Import the builder modules; each registers its bodies at import (once)."""
    import importlib

    for mod in BUILDER_MODULES:
        importlib.import_module(f"train.synth.bodies.{mod}")


def all_bodies() -> list[BodySpec]:
    _load_builders()
    return list(_REGISTRY.values())


def get_body(name: str) -> BodySpec:
    _load_builders()
    if name not in _REGISTRY:
        raise CTInputError(f"unknown body {name!r}; known bodies: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def body_dir(name: str) -> Path:
    return bodies_root() / name


def body_info(name: str) -> dict[str, Any] | None:
    """The built body's ``body.json``, or None when it has not been built."""
    p = body_dir(name) / "body.json"
    return json.loads(p.read_text()) if p.exists() else None


def load_body(name: str) -> CTSource:
    """A built body as a CTSource; a clear error (with the build command) when it is not built."""
    get_body(name)
    d = body_dir(name)
    ct, labels, csv = d / "ct.nii.gz", d / "labels.nii.gz", d / "structures.csv"
    if not (ct.exists() and labels.exists() and csv.exists()):
        raise CTInputError(f"body {name!r} is not built in {d}; run: fluorosam-train bodies build {name}")
    return load_ct(ct, labels, structures_csv=csv, name=name)
