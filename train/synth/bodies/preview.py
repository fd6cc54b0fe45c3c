"""Mid-slice pictures of a built body, to check by eye that labels sit on bone and sides are right.

Three slices through the centre of the labelled anatomy (axial, coronal, sagittal), HU in a bone-and-
soft-tissue window, labels overlaid: structures named ``*_left`` in red, ``*_right`` in blue, the rest
in green. Axes are world millimetres in the RAS+ frame; the patient's right (+x) is marked, so a red
femur on the "patient L" side means laterality is right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_preview(name: str, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    from train.synth.bodies import body_dir, body_info, get_body
    from train.synth.ct_source import CTInputError, read_structures_csv

    get_body(name)
    d = body_dir(name)
    info = body_info(name)
    if info is None:
        raise CTInputError(f"body {name!r} is not built in {d}; run: fluorosam-train bodies build {name}")
    ct = nib.as_closest_canonical(nib.load(str(d / "ct.nii.gz")))
    lab = nib.as_closest_canonical(nib.load(str(d / "labels.nii.gz")))
    hu = np.asarray(ct.dataobj, dtype=np.float32)
    labels = np.asarray(lab.dataobj).astype(np.int32)
    names = read_structures_csv(d / "structures.csv")
    side = np.zeros(256, dtype=np.int8)  # 1 left, 2 right, 3 other
    for v, n in names.items():
        side[v] = 1 if n.endswith("_left") else 2 if n.endswith("_right") else 3
    aff = ct.affine
    sp = np.abs(np.diag(aff)[:3])
    lo = aff[:3, 3]
    hi = lo + sp * (np.array(hu.shape) - 1)
    c = np.argwhere(labels > 0).mean(0).round().astype(int)
    colours = np.array([[0, 0, 0, 0], [1, 0.1, 0.1, 0.55], [0.2, 0.4, 1, 0.55], [0.1, 0.9, 0.2, 0.45]])

    fig, axes = plt.subplots(1, 3, figsize=(18, 6.5))
    views = [
        (
            "axial",
            hu[:, :, c[2]],
            labels[:, :, c[2]],
            (lo[0], hi[0], lo[1], hi[1]),
            "x (mm)",
            "y (mm, +anterior)",
        ),
        (
            "coronal",
            hu[:, c[1], :],
            labels[:, c[1], :],
            (lo[0], hi[0], lo[2], hi[2]),
            "x (mm)",
            "z (mm, +superior)",
        ),
        (
            "sagittal",
            hu[c[0], :, :],
            labels[c[0], :, :],
            (lo[1], hi[1], lo[2], hi[2]),
            "y (mm, +anterior)",
            "z (mm)",
        ),
    ]
    for ax, (title, img, lb, ext, xl, yl) in zip(axes, views, strict=True):
        ax.imshow(img.T, cmap="gray", vmin=-400, vmax=1000, origin="lower", extent=ext)
        ax.imshow(colours[side[np.clip(lb, 0, 255)]].transpose(1, 0, 2), origin="lower", extent=ext)
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        if title != "sagittal":
            ax.text(0.02, 0.97, "patient L", transform=ax.transAxes, color="yellow", va="top")
            ax.text(0.98, 0.97, "patient R", transform=ax.transAxes, color="yellow", va="top", ha="right")
    vs = "x".join(f"{v:g}" for v in info["voxel_size_mm"])
    fig.suptitle(
        f"{name}: {hu.shape} at {vs} mm, {len(names)} structures; red = *_left, blue = *_right, green = other"
    )
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=60)
    plt.close(fig)
    return out_png
