"""FracSegNet's five test pelvises (repository MIT; the data set's README cites IRB approval 202009-04).

Each patient ``DataSet/testData/NNN`` has three bone-only CTs, ``NNN_LI`` / ``NNN_RI`` / ``NNN_SA``
(left ilium = left hip bone, right hip bone, sacrum: the bone's own HU, 0 everywhere else) and a
fragment mask for each (``NNN_LI_mask``: 1..k fragments of a fractured bone). The union of the
fragments of each file becomes hip_left / hip_right / sacrum; the bone HU are kept as they are, and a
synthetic soft-tissue body (``envelope.build_envelope``, seeded by the body name, so each build is
the same) is grown around them, because an X-ray of bare bones in air would look like nothing a C-arm
sees. These are fracture patients: fragments may be displaced.

Laterality is checked against each file's affine: in the NIfTI world frame (RAS+, x grows toward the
patient's right) the left hip bone must lie at smaller x than the right one. All five test cases pass.
``fracsegnet_005`` is held out: it is never trained on and serves the synthetic evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from train.synth.bodies import BodySpec, register
from train.synth.ct_source import CTInputError

SPACING_MM = 1.25
MARGIN_MM = 110.0  # room around the bones for the envelope (muscle + fat + skin, all at their largest)
BONES = (("LI", "hip_left"), ("RI", "hip_right"), ("SA", "sacrum"))
CASES = ("001", "002", "003", "004", "005")
HELDOUT = "005"
DATA = "DataSet/testData"


def _load_pair(case_dir: Path, case: str, key: str):
    """(bone CT image, fragment mask image) of one bone, with one-line errors naming the file."""
    import nibabel as nib

    ct_p = case_dir / f"{case}_{key}.nii.gz"
    mask_p = case_dir / f"{case}_{key}_mask.nii.gz"
    if not ct_p.exists():
        raise CTInputError(f"bone CT not found: {ct_p}")
    if not mask_p.exists():
        raise CTInputError(f"no label map for CT {ct_p.name}: {mask_p} not found")
    ct, mask = nib.load(str(ct_p)), nib.load(str(mask_p))
    if ct.shape != mask.shape or not np.allclose(ct.affine, mask.affine, atol=1e-3):
        raise CTInputError(
            f"label map {mask_p} is not on the grid of CT {ct_p.name} (shape {mask.shape} vs {ct.shape})"
        )
    return ct_p, ct, mask


def convert(case_dir: Path, case: str, out_dir: Path, seed: int, spacing_mm: float = SPACING_MM) -> None:
    """One FracSegNet patient -> body: bones with their HU inside a synthetic soft-tissue envelope."""
    from train.synth.bodies.build import canonical, crop_box, resample, shift_affine, vocabulary, write_body
    from train.synth.bodies.envelope import build_envelope

    vocab = vocabulary()
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise CTInputError(f"FracSegNet case folder not found: {case_dir}")
    ref_path, ref_img, ref_aff = None, None, None
    hu = labels = None
    centroid_x: dict[str, float] = {}
    overlap = 0
    for key, structure in BONES:
        ct_p, ct_img, mask_img = _load_pair(case_dir, case, key)
        if ref_img is None:
            ref_path, ref_img, ref_aff = ct_p, ct_img, ct_img.affine
        elif ct_img.shape != ref_img.shape or not np.allclose(ct_img.affine, ref_aff, atol=1e-3):
            raise CTInputError(
                f"{ct_p} is not on the grid of {ref_path.name}; the three bones must share one grid"
            )
        bone_hu, aff = canonical(ct_img)
        frag, _ = canonical(mask_img)
        m = np.asarray(frag) != 0
        del frag
        if not m.any():
            raise CTInputError(f"label map {case}_{key}_mask.nii.gz is empty (no {structure} voxels)")
        if hu is None:
            hu = np.zeros(m.shape, dtype=np.float32)
            labels = np.zeros(m.shape, dtype=np.uint8)
        overlap += int((labels[m] != 0).sum())
        labels[m] = vocab.structure_id(structure)
        hu[m] = np.asarray(bone_hu, dtype=np.float32)[m]
        del bone_hu
        idx = np.flatnonzero(m.any(axis=(1, 2)))
        xs = np.arange(m.shape[0])[idx]
        w = m.sum(axis=(1, 2))[idx]
        centroid_x[structure] = float(aff[0, 0] * np.average(xs, weights=w) + aff[0, 3])
    if not centroid_x["hip_left"] < centroid_x["hip_right"]:
        raise CTInputError(
            f"{case_dir}: {case}_LI lies at patient right of {case}_RI by the affine "
            f"(x {centroid_x['hip_left']:.0f} vs {centroid_x['hip_right']:.0f} mm, RAS: right = +x)"
        )

    # Crop to the bones plus room for the soft tissue, resample, grow the body, crop to the body.
    box = crop_box(labels > 0, aff, (MARGIN_MM, MARGIN_MM, MARGIN_MM / 2))
    aff = shift_affine(aff, box)
    bone = labels[box] > 0
    hu_r, aff_r = resample(hu[box], aff, spacing_mm, order=1, weights=bone.astype(np.float32))
    lab_r, _ = resample(labels[box], aff, spacing_mm, order=0)
    del hu, labels
    # Every slice is trunk: the abdomen above the crests and the hips below the pubis stay about as
    # wide as the pelvis (tapering) up to the crop margin, instead of hugging the iliac crests.
    body_hu = build_envelope(
        lab_r,
        (spacing_mm,) * 3,
        np.where(lab_r > 0, hu_r, 0.0),
        rng=np.random.default_rng(seed),
        trunk_slices=np.ones(lab_r.shape[2], bool),
    )
    box2 = crop_box(body_hu > -999, aff_r, (5.0, 5.0, 5.0))
    write_body(
        out_dir,
        body_hu[box2],
        lab_r[box2],
        shift_affine(aff_r, box2),
        {
            "notes": f"bone-only CTs {case}_LI/_RI/_SA (+ _mask) resampled to {spacing_mm} mm inside a "
            f"synthetic soft-tissue envelope (muscle, fat, skin; seed {seed}); laterality checked against "
            f"the affine: hip_left x={centroid_x['hip_left']:.0f} mm < hip_right "
            f"x={centroid_x['hip_right']:.0f} mm (RAS); {overlap} voxels claimed by two bone masks "
            "(the later of LI, RI, SA kept)",
            "envelope_seed": seed,
            "synthetic_soft_tissue": True,
        },
    )


def _builder(case: str):
    def _build(sources_dir: Path, out_dir: Path) -> None:
        from train.synth.bodies.build import body_seed, source_dir

        src = source_dir(sources_dir, "FracSegNet")
        convert(src / DATA / case, case, out_dir, seed=body_seed(f"fracsegnet_{case}"))

    return _build


FRACSEGNET = [
    register(
        BodySpec(
            name=f"fracsegnet_{case}",
            description=f"pelvic-fracture patient {case}: left/right hip bones and sacrum (bone HU from CT) "
            "inside a synthetic soft-tissue body"
            + (" - HELD OUT, evaluation only" if case == HELDOUT else ""),
            source=f"https://github.com/YzzLiu/FracSegNet DataSet/testData/{case}/"
            f"{case}_LI|RI|SA(_mask).nii.gz",
            licence="repository MIT; the data set README cites IRB approval (202009-04), no data licence",
            use="research; cite Liu et al., MICCAI 2023 (FracSegNet); check terms before any commercial use",
            sources=("FracSegNet",),
            build=_builder(case),
            heldout=case == HELDOUT,
        )
    )
    for case in CASES
]
