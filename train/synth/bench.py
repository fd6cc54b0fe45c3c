"""Speed and agreement of our projector against diffdrr's renderer: same process, same CT, same poses."""

from __future__ import annotations

import json
import time

import numpy as np
import torch


def _timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - t0) / max(repeats, 1), out


def main(size: int = 256, repeats: int = 3, views: int = 3, json_path: str | None = None) -> int:
    """Print a table: per pose, seconds for our image+masks and diffdrr's image and masks, and mask Dice."""
    from train.synth.ct_source import load_ct
    from train.synth.geometry import Camera
    from train.synth.materials import hu_to_material_densities
    from train.synth.physics import PhysicsParams, form_image
    from train.synth.projector import Projector
    from train.synth.reference import DiffDRRReference, dice, diffdrr_available
    from train.synth.volume import prepare_volume

    ct = load_ct("bundled")
    vol = prepare_volume(ct)
    proj = Projector(vol)
    density = hu_to_material_densities(ct.hu).sum(0)
    poses = [(0.0, 0.0, "AP"), (90.0, 0.0, "lateral"), (35.0, 15.0, "oblique"), (-40.0, -10.0, "oblique")]
    rows = []
    for prim, sec, name in poses[:views]:
        cam = Camera(size, size, 360.0 / size, 1000.0, 650.0, prim, sec, tuple(vol.anchors[51]), view=name)

        def ours(cam=cam):
            p = proj.project(cam)
            return p, form_image(p.line_integrals, PhysicsParams())

        t_ours, (p, _) = _timed(ours, repeats)
        row = {"view": name, "size": size, "ours_s": round(t_ours, 4)}
        if diffdrr_available():
            ref = DiffDRRReference(density, ct.labels, ct.affine, cam)
            t0 = time.perf_counter()
            img = ref.line_integral()
            row["diffdrr_image_s"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            masks = ref.label_masks()
            row["diffdrr_masks_s"] = round(time.perf_counter() - t0, 3)
            row["speedup"] = round((row["diffdrr_image_s"] + row["diffdrr_masks_s"]) / t_ours, 1)
            ours_li = p.line_integrals[:3].sum(0) * 10.0
            row["image_corr"] = round(float(np.corrcoef(img.ravel(), ours_li.ravel())[0, 1]), 5)
            big = [i for i in p.label_ids if i in masks and masks[i].float().mean() > 0.01]
            d = [dice(p.label_hits[p.label_ids.index(i)], masks[i]) for i in big]
            row["dice_min"], row["dice_mean"], row["n_structures"] = (
                round(min(d), 4),
                round(float(np.mean(d)), 4),
                len(d),
            )
        rows.append(row)
        print(json.dumps(row))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
