"""Anatomical regions a C-arm is aimed at, and the structures that define each.

A body "has" a region when it carries at least one of the region's ``requires`` structures; views for
the region aim at the centroid of the union of its ``aim`` structures present in the body. The view
presets (AP pelvis, inlet/outlet, Judet, ...) live in ``train/synth/views.py``; tool sites per region
in ``train/synth/tools.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Region:
    name: str
    requires: tuple[str, ...]  # vocabulary structure names; any one present => the body has the region
    aim: tuple[str, ...]  # structures whose present members' centroid a view is aimed at


REGIONS: dict[str, Region] = {
    r.name: r
    for r in (
        Region(
            "chest",
            ("lung_upper_lobe_left", "lung_upper_lobe_right", "heart"),
            ("heart", "lung_lower_lobe_left", "lung_lower_lobe_right"),
        ),
        Region("pelvis", ("hip_left", "hip_right", "sacrum"), ("hip_left", "hip_right", "sacrum")),
        # A femur alone (a knee or leg body) does not make a hip: the hip bone is required.
        Region("hip_left", ("hip_left",), ("femur_left", "hip_left")),
        Region("hip_right", ("hip_right",), ("femur_right", "hip_right")),
        Region(
            "lumbar_spine",
            ("vertebrae_L1", "vertebrae_L3", "vertebrae_L5"),
            ("vertebrae_L2", "vertebrae_L3", "vertebrae_L4"),
        ),
        Region(
            "thoracic_spine",
            ("vertebrae_T6", "vertebrae_T8", "vertebrae_T10"),
            ("vertebrae_T6", "vertebrae_T7", "vertebrae_T8"),
        ),
        Region(
            "cervical_spine",
            ("vertebrae_C2", "vertebrae_C4", "vertebrae_C6"),
            ("vertebrae_C3", "vertebrae_C4", "vertebrae_C5"),
        ),
        Region(
            "shoulder_left",
            ("humerus_left", "scapula_left"),
            ("humerus_left", "scapula_left", "clavicula_left"),
        ),
        Region(
            "shoulder_right",
            ("humerus_right", "scapula_right"),
            ("humerus_right", "scapula_right", "clavicula_right"),
        ),
        Region("knee_left", ("patella_left", "tibia_left"), ("patella_left",)),
        Region("knee_right", ("patella_right", "tibia_right"), ("patella_right",)),
        Region("wrist_left", ("carpals_left",), ("carpals_left",)),
        Region("wrist_right", ("carpals_right",), ("carpals_right",)),
        Region("hand_left", ("metacarpals_left",), ("metacarpals_left", "phalanges_hand_left")),
        Region("hand_right", ("metacarpals_right",), ("metacarpals_right", "phalanges_hand_right")),
        Region("skull", ("skull",), ("skull",)),
    )
}


def regions_of(structure_names: set[str]) -> list[str]:
    """Regions a body with these structures has."""
    return [r.name for r in REGIONS.values() if set(r.requires) & structure_names]
