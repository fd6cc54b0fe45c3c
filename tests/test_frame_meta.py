"""A frame's metadata is built once (sources.base.frame_meta) and published as is."""

from __future__ import annotations

import numpy as np
import pytest

from fluorosam_rt.sources.base import GEOMETRY_KEYS, Frame, FrameMeta, Source, frame_meta


class _Recorder(Source):
    kind = "test"

    def _start(self) -> None: ...

    def _stop_impl(self) -> None: ...


def test_split_into_source_and_geometry_once() -> None:
    read = {"format": "dicom", "PixelSpacing": None, "ImagerPixelSpacing": (0.3, 0.3), "FrameTime": 50.0}
    m = frame_meta("dicom", read, calling_ae="CARM1")
    assert m.source == {"source": "dicom", "format": "dicom", "calling_ae": "CARM1"}
    assert m.geometry == {"ImagerPixelSpacing": (0.3, 0.3), "FrameTime": 50.0}  # None left out
    assert set(m.geometry) <= set(GEOMETRY_KEYS)
    assert m["FrameTime"] == 50.0
    assert m["calling_ae"] == "CARM1"
    assert "PixelSpacing" not in m
    assert dict(m) == {**m.source, **m.geometry}


def test_emit_takes_the_built_meta_as_is() -> None:
    src, got = _Recorder(), []
    src.start(got.append)
    meta = src.frame_meta({"frame_index": 3, "DistanceSourceToDetector": 1200.0}, replay_index=3)
    frame = src.emit(np.zeros((4, 4), np.uint8), meta)
    assert got == [frame]
    assert frame.meta is meta
    assert frame.meta.source == {"source": "test", "frame_index": 3, "replay_index": 3}
    with pytest.raises(TypeError, match="FrameMeta"):
        src.emit(np.zeros((4, 4), np.uint8), {"frame_index": 4})  # type: ignore[arg-type]


def test_a_plain_mapping_is_split_the_same_way() -> None:
    f = Frame(np.zeros((2, 2), np.uint8), 0, 0, {"FrameTime": 40.0, "Modality": "XA"})  # type: ignore[arg-type]
    assert isinstance(f.meta, FrameMeta)
    assert (f.meta.source, f.meta.geometry) == ({"Modality": "XA"}, {"FrameTime": 40.0})
