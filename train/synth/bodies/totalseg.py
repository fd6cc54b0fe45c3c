"""TotalSegmentator's example CT (Apache-2.0): thorax to pelvis with the tool's own 'total' labels.

``tests/reference_files/example_ct.nii.gz`` and ``example_seg_fast_force_split.nii.gz`` share one grid
(122x101x112 at 3 mm). The label values are TotalSegmentator v2 'total' task ids; their class names
are read from the repository's ``totalsegmentator/map_to_binary.py`` (the ``class_map['total']``
literal) and mapped to vocabulary ids by name, so a renumbering upstream cannot mislabel a bone. 3 mm
voxels make bones blocky in a 256^2 projection, so the body is resampled to 1.5 mm (HU trilinear,
labels nearest).

The same folder's DICOM slab (``example_ct_dicom/`` + ``example_seg_dicom.nii.gz``) was checked and
left out: its labels do line up with the CT (labelled bone has median 262 HU), but it is 20 slices
(40 mm) thick, so every view of it would be a 4-cm band of anatomy in air.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from train.synth.bodies import BodySpec, register
from train.synth.ct_source import CTInputError

SPACING_MM = 1.5
REF = "tests/reference_files"


def read_class_map(path: Path, task: str = "total") -> dict[int, str]:
    """``class_map[task]`` of TotalSegmentator's map_to_binary.py, read as a literal (never executed)."""
    path = Path(path)
    if not path.exists():
        raise CTInputError(f"class map not found: {path}")
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)):
            continue
        if not any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets):
            continue
        for k, v in zip(node.value.keys, node.value.values, strict=True):
            if isinstance(k, ast.Constant) and k.value == task:
                return {int(i): str(n) for i, n in ast.literal_eval(v).items()}
    raise CTInputError(f"{path}: no class_map[{task!r}] literal found")


def convert(
    ct_path: Path, seg_path: Path, class_map_path: Path, out_dir: Path, spacing_mm: float = SPACING_MM
) -> None:
    """A TotalSegmentator CT + 'total' label map -> body (canonical RAS, ``spacing_mm`` isotropic)."""
    import nibabel as nib

    from train.synth.bodies.build import canonical, resample, vocabulary, write_body
    from train.synth.vocabulary import UnknownStructureError

    ct_path, seg_path = Path(ct_path), Path(seg_path)
    if not ct_path.exists():
        raise CTInputError(f"CT file not found: {ct_path}")
    if not seg_path.exists():
        raise CTInputError(f"no label map for CT {ct_path.name}: {seg_path} not found")
    ct_img, seg_img = nib.load(str(ct_path)), nib.load(str(seg_path))
    if ct_img.shape[:3] != seg_img.shape[:3] or not np.allclose(ct_img.affine, seg_img.affine, atol=1e-3):
        raise CTInputError(
            f"label map {seg_path} is not on the grid of CT {ct_path.name} "
            f"(shapes {seg_img.shape} vs {ct_img.shape}, or affines differ)"
        )
    names = read_class_map(class_map_path)
    vocab = vocabulary()
    hu, aff = canonical(ct_img)
    raw, _ = canonical(seg_img)
    raw = np.rint(raw).astype(np.int32)
    lut = np.zeros(max(int(raw.max()) + 1, 1), dtype=np.uint8)
    for v in np.unique(raw):
        if v == 0:
            continue
        if int(v) not in names:
            raise CTInputError(
                f"{seg_path}: label value {int(v)} is not a class of {Path(class_map_path).name}"
            )
        try:
            lut[v] = vocab.structure_id(names[int(v)])
        except UnknownStructureError as e:
            raise CTInputError(
                f"{seg_path}: class {names[int(v)]!r} (value {int(v)}) is not a vocabulary structure"
            ) from e
    labels = lut[raw]
    hu_r, aff_r = resample(hu.astype(np.float32), aff, spacing_mm, order=1)
    lab_r, _ = resample(labels, aff, spacing_mm, order=0)
    write_body(
        out_dir,
        hu_r,
        lab_r,
        aff_r,
        {
            "notes": f"{ct_path.name} + {seg_path.name} resampled from "
            f"{np.round(np.linalg.norm(aff[:3, :3], axis=0), 3).tolist()} mm to {spacing_mm} mm "
            "(HU trilinear, labels nearest); labels are TotalSegmentator's own predictions"
        },
    )


def _build(sources_dir: Path, out_dir: Path) -> None:
    from train.synth.bodies.build import source_dir

    src = source_dir(sources_dir, "TotalSegmentator")
    convert(
        src / REF / "example_ct.nii.gz",
        src / REF / "example_seg_fast_force_split.nii.gz",
        src / "totalsegmentator" / "map_to_binary.py",
        out_dir,
    )


TOTALSEG_EXAMPLE = register(
    BodySpec(
        name="totalseg_example",
        description="thorax-to-pelvis CT (3 mm, resampled to 1.5 mm) with 61 TotalSegmentator classes: "
        "hips, femurs, sacrum, T11-L5, lower ribs, organs, muscles",
        source="https://github.com/wasserth/TotalSegmentator tests/reference_files/example_ct.nii.gz + "
        "example_seg_fast_force_split.nii.gz; class names from totalsegmentator/map_to_binary.py",
        licence="Apache-2.0",
        use="any use, with the licence and notices; labels are model predictions, not expert annotation",
        sources=("TotalSegmentator",),
        build=_build,
    )
)
