"""Speed and agreement of our projector against diffdrr's renderer: same process, same CT, same poses.

Our image and mask times are measured apart (image: density pass + physics; masks: what the label pass
adds on top), after a warm-up call and averaged over ``repeats``. diffdrr's image and masks are one call each
(its renderer is the slow side, and one call of it already takes seconds at 256²), after building its DRR
module outside the timing. Agreement is the correlation of the line integrals and the Dice of every label
mask covering more than 1% of the image in diffdrr's render.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import numpy as np
import torch


def _timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - t0) / max(repeats, 1), out


def _conditions() -> dict[str, Any]:
    """What the machine was doing: timings on a shared 2-core box mean little without it."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_average_1_5_15": load,
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The per-view table as it goes into docs/synth_benchmark.md."""
    head = (
        "| view | ours image (s) | ours masks (s) | ours total (s) | diffdrr image (s) | diffdrr masks (s) "
        "| speed-up (total) | image corr. | Dice min / mean (n structures > 1%) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if "diffdrr_image_s" in r:
            dd = f"{r['diffdrr_image_s']:.2f} | {r['diffdrr_masks_s']:.2f} | {r['speedup']:.0f}x | "
            dd += f"{r['image_corr']:.4f} | {r['dice_min']:.3f} / {r['dice_mean']:.3f} ({r['n_structures']})"
        else:
            dd = "n/a | n/a | n/a | n/a | n/a"
        lines.append(
            f"| {r['view']} {r['size']}² | {r['ours_image_s']:.3f} | {r['ours_masks_s']:.3f} | "
            f"{r['ours_s']:.3f} | {dd} |"
        )
    return head + "\n".join(lines) + "\n"


def main(size: int = 256, repeats: int = 3, views: int = 3, json_path: str | None = None) -> int:
    """Print per pose: our image and mask seconds, diffdrr's, the speed-up, image correlation, mask Dice."""
    from train.synth.ct_source import load_ct
    from train.synth.geometry import Camera
    from train.synth.materials import hu_to_material_densities
    from train.synth.physics import PhysicsParams, form_image
    from train.synth.projector import Projector
    from train.synth.reference import DiffDRRReference, dice, diffdrr_available
    from train.synth.volume import prepare_volume

    before = _conditions()
    ct = load_ct("bundled")
    vol = prepare_volume(ct)
    proj = Projector(vol)
    density = hu_to_material_densities(ct.hu).sum(0)
    poses = [(0.0, 0.0, "AP"), (90.0, 0.0, "lateral"), (35.0, 15.0, "oblique"), (-40.0, -10.0, "oblique")]
    rows = []
    for prim, sec, name in poses[:views]:
        cam = Camera(size, size, 360.0 / size, 1000.0, 650.0, prim, sec, tuple(vol.anchors[51]), view=name)

        def image_only(cam=cam):
            p = proj.project(cam, with_labels=False)
            return p, form_image(p.line_integrals, PhysicsParams())

        def ours(cam=cam):
            p = proj.project(cam)
            return p, form_image(p.line_integrals, PhysicsParams())

        t_img, _ = _timed(image_only, repeats)
        t_ours, (p, _) = _timed(ours, repeats)
        row: dict[str, Any] = {
            "view": name,
            "size": size,
            "primary_deg": prim,
            "secondary_deg": sec,
            "ours_image_s": round(t_img, 4),
            "ours_masks_s": round(max(t_ours - t_img, 0.0), 4),
            "ours_s": round(t_ours, 4),
            "n_labels": len(p.label_ids),
        }
        if diffdrr_available():
            ref = DiffDRRReference(density, ct.labels, ct.affine, cam)
            t0 = time.perf_counter()
            img = ref.line_integral()
            row["diffdrr_image_s"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            masks = ref.label_masks()
            row["diffdrr_masks_s"] = round(time.perf_counter() - t0, 3)
            row["speedup"] = round((row["diffdrr_image_s"] + row["diffdrr_masks_s"]) / t_ours, 1)
            row["speedup_image"] = round(row["diffdrr_image_s"] / max(t_img, 1e-9), 1)
            ours_li = p.line_integrals[:3].sum(0) * 10.0
            row["image_corr"] = round(float(np.corrcoef(img.ravel(), ours_li.ravel())[0, 1]), 5)
            big = [i for i in p.label_ids if i in masks and masks[i].float().mean() > 0.01]
            d = [dice(p.label_hits[p.label_ids.index(i)], masks[i]) for i in big]
            row["dice_min"], row["dice_mean"], row["n_structures"] = (
                round(min(d), 4),
                round(float(np.mean(d)), 4),
                len(d),
            )
            row["dice_per_structure"] = {int(i): round(x, 4) for i, x in zip(big, d)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "dice_per_structure"}), flush=True)
    after = _conditions()
    print(markdown_table(rows))
    load = f"load before {before['load_average_1_5_15']}, after {after['load_average_1_5_15']}"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {load}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"rows": rows, "conditions_before": before, "conditions_after": after}, f, indent=1)
    return 0


def generator_main(cfg: Any, json_path: str | None = None) -> int:
    """Images/s of the whole generator (bodies, variation, views, tools, all masks, writing) for ``cfg``.

    The bodies are first prepared into their on-disk cache (what every later run reuses), then ``generate``
    runs into a temporary folder. The figure is images over the rendering phase's wall time, worker
    start-up and each worker's first body load included.
    """
    import tempfile
    from dataclasses import replace

    from train.synth.generate import generate, prepare_bodies

    prepare_bodies(cfg)
    with tempfile.TemporaryDirectory(prefix="synth-bench-") as tmp:
        before = _conditions()
        doc = generate(replace(cfg, out=f"{tmp}/run"), progress=False, contact_sheet=0)
        after = _conditions()
    row = {
        "size": cfg.size,
        "n_images": doc["n_images"],
        "workers": doc["workers"],
        "bodies": {b["name"]: b["regions"] for b in doc["bodies"]},
        "cases_per_body": doc["cases_per_body"],
        "images_per_region": doc["images_per_region"],
        "seconds_render": doc["seconds_render"],
        "images_per_second": doc["images_per_second"],
        "images_per_second_steady": doc["images_per_second_steady"],
        "worker_peak_rss_mb": doc["worker_peak_rss_mb"],
        "body_loads": doc["body_loads"],
        "variation": cfg.variation,
        "masks": "all" if not cfg.structures else ",".join(cfg.structures),
    }
    print(json.dumps(row))
    load = f"load before {before['load_average_1_5_15']}, after {after['load_average_1_5_15']}"
    print(
        f"{row['images_per_second']:.2f} images/s at {cfg.size}² with {row['masks']} masks "
        f"({row['images_per_second_steady'] or float('nan'):.2f} once started), "
        f"{row['workers']} workers, peak RSS per worker {row['worker_peak_rss_mb']:.0f} MB ({load})"
    )
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"generator": row, "conditions_before": before, "conditions_after": after}, f, indent=1)
    return 0
